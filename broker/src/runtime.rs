//! Starting and stopping the broker on a chosen engine.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use ketenbus_connectors::webhook::WebhookSink;
use ketenbus_schemas::{EventKind, topics};
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiState};
use crate::bus::{Bus, TopicSpec};
use crate::config::{Settings, Sink};
use crate::health::{Health, State};
use crate::ingest::BusIngest;
use crate::keys::PatientKeyer;
use crate::lineage::Lineage;
use crate::{dispatch, router, telemetry};

/// Every topic the configuration uses.
#[must_use]
pub fn topic_specs(settings: &Settings) -> Vec<TopicSpec> {
    let n = settings.config.bus.partitions;
    let mut names = vec![
        topics::RAW.to_owned(),
        topics::DELIVERY_OUTCOMES.to_owned(),
        topics::ROUTER_DEAD_LETTERS.to_owned(),
    ];
    names.extend(EventKind::ALL.iter().map(|k| topics::events(*k)));
    for s in &settings.subscriptions {
        names.push(topics::dead_letters(&s.name));
        names.push(topics::replay(&s.name));
        names.push(topics::retry(&s.name));
    }
    names
        .into_iter()
        .map(|name| TopicSpec {
            name,
            partitions: n,
        })
        .collect()
}

fn build_sink(
    sink: &Sink,
    book: &Arc<ketenbus_connectors::address_book::AddressBook>,
    content: &Arc<dyn ketenbus_connectors::ContentStore>,
    report_key: &[u8],
) -> anyhow::Result<Arc<dyn ketenbus_connectors::Sink>> {
    match sink {
        Sink::Mail { config, password } => {
            let password = password
                .as_ref()
                .map(|p| String::from_utf8_lossy(&p.0).into_owned());
            let s = ketenbus_connectors::mail::MailSink::new(
                config.clone(),
                password,
                Arc::clone(book),
                Some(Arc::clone(content)),
            )
            .context("building the mail sink")?
            .with_report_key(report_key.to_vec());
            Ok(Arc::new(s))
        }
        Sink::Fhir {
            base,
            style,
            source_endpoint,
            token,
            timeout,
        } => {
            let store = Arc::clone(content);
            let s = ketenbus_connectors::fhir::FhirSink::new(
                base.clone(),
                *style,
                source_endpoint.clone(),
                *timeout,
            )
            .map_err(|e| anyhow::anyhow!("building the FHIR sink: {e}"))?
            .with_bearer(
                token
                    .as_ref()
                    .map(|t| String::from_utf8_lossy(&t.0).into_owned()),
            )
            .with_attachments(Arc::new(move |hash: &str| store.get(hash).ok().flatten()));
            Ok(Arc::new(s))
        }
        Sink::Webhook {
            url,
            secret,
            timeout,
            ca_file,
        } => {
            let ca = ca_file
                .as_ref()
                .map(|f| std::fs::read(f).with_context(|| format!("reading {}", f.display())))
                .transpose()?;
            let s = WebhookSink::with_roots(
                url.clone(),
                secret.as_ref().map(|s| s.0.clone()),
                *timeout,
                ca.as_deref(),
            )
            .context("building the webhook client")?;
            Ok(Arc::new(s))
        }
    }
}

/// Run the broker on `bus` until `cancel`: HTTP API, router and one dispatcher per subscription.
///
/// # Errors
/// When start-up fails (topics, data directory, listener).
pub async fn run<B: Bus>(
    settings: Settings,
    bus: B,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let cfg = &settings.config;
    let bus = Arc::new(bus);
    bus.ensure_topics(&topic_specs(&settings))
        .await
        .context("creating topics")?;
    let lineage = Lineage::open(&cfg.data_dir).context("opening the lineage index")?;
    let secret = cfg
        .keys
        .patient_key_secret_env
        .as_ref()
        .and_then(|v| std::env::var(v).ok());
    let keyer =
        PatientKeyer::load(&cfg.data_dir, secret).context("loading the patient-key secret")?;
    let report_key = keyer.derive(ketenbus_connectors::mail::dsn::KEY_PURPOSE);
    let health = Arc::new(Health::default());
    let mut tasks = tokio::task::JoinSet::new();
    // Task names by id, for the log line when one ends unexpectedly (and its health entry).
    let mut names: HashMap<tokio::task::Id, String> = HashMap::new();
    let content: Arc<dyn ketenbus_connectors::ContentStore> = Arc::new(
        ketenbus_connectors::mail::content_store(&cfg.mail, &cfg.data_dir)
            .context("opening the content store")?,
    );
    let raw_patients = Arc::new(crate::keys::RawPatients::new(keyer.clone()));
    let router_task = tasks.spawn(router::run(
        Arc::clone(&bus),
        Arc::new(router::Routing {
            normalizers: router::normalizers(),
            keyer,
            contrl_partners: cfg.edifact.contrl_partners.iter().cloned().collect(),
            content: Some(Arc::clone(&content)),
            reports: ketenbus_connectors::mail::dsn::ReportCheck {
                key: report_key.clone(),
                subscriptions: settings
                    .subscriptions
                    .iter()
                    .filter(|s| matches!(s.sink, Sink::Mail { .. }))
                    .map(|s| s.name.clone())
                    .collect(),
                sources: ketenbus_connectors::mail::dsn::ReportSources::of(&cfg.mail),
            },
        }),
        lineage.clone(),
        Arc::clone(&health),
        cancel.clone(),
    ));
    names.insert(router_task.id(), "router".to_owned());
    let audit = if cfg.audit.enabled {
        let env = |v: &str| std::env::var(v).ok();
        if cfg.http.listen.ip().is_loopback()
            && cfg.audit.key_file.is_none()
            && env(&cfg.audit.key_env).is_none()
        {
            // The quick start: a loopback broker makes its own key, outside data_dir.
            let file = crate::audit::ensure_local_key(&env).map_err(|m| {
                anyhow::anyhow!("audit.key_env is not set and no local key can be made: {m}")
            })?;
            tracing::warn!(key_file = %file.display(), "audit.key_env is not set: the audit trail is keyed with this machine's own key; set audit.key_env or audit.key_file from a secret store before leaving loopback");
        }
        let key = cfg
            .audit
            .key(&cfg.data_dir, &env)
            .map_err(|(k, m)| anyhow::anyhow!("audit.{k}: {m}"))?;
        Some(crate::audit::Audit::open(&cfg.data_dir, key).context("opening the audit trail")?)
    } else {
        None
    };
    let consent_registry = match &cfg.consent.file {
        Some(f) => Some(Arc::new(
            crate::consent::FileRegistry::open(f).context("reading the consent file")?,
        ) as Arc<dyn crate::consent::ConsentRegistry>),
        None => None,
    };
    let book = Arc::new(cfg.address_book.clone());
    for sub in &settings.subscriptions {
        let sink = build_sink(&sub.sink, &book, &content, &report_key)?;
        let configured = cfg.subscriptions.iter().find(|s| s.name == sub.name);
        let policy = configured.and_then(|s| s.consent.clone());
        let hooks = dispatch::Hooks {
            consent: policy
                .zip(consent_registry.clone())
                .map(|(policy, registry)| {
                    Arc::new(crate::consent::ConsentCheck { registry, policy })
                }),
            audit: audit.clone(),
            receiver_is_party: configured.is_some_and(|s| !s.sink.has_fixed_destination())
                || !sub.filter.receivers.is_empty(),
            raw_patients: sub
                .sources
                .contains(&crate::config::Source::Raw)
                .then(|| Arc::clone(&raw_patients)),
        };
        let task = tasks.spawn(dispatch::run_with(
            Arc::clone(&bus),
            sub.clone(),
            sink,
            lineage.clone(),
            Arc::clone(&health),
            cancel.clone(),
            hooks,
        ));
        names.insert(task.id(), format!("subscription {}", sub.name));
    }
    // One memory budget for every way in.
    let budget = cfg.limits.budget();
    for inbox in &cfg.inbox {
        let ingest = Arc::new(BusIngest::new(
            Arc::clone(&bus),
            lineage.clone(),
            cfg.http.ingest_timeout,
        ));
        let source = ketenbus_connectors::inbox::Inbox::new(inbox.clone(), ingest)
            .with_context(|| format!("preparing inbox {}", inbox.path.display()))?
            .with_budget(budget.clone());
        let task = tasks.spawn(source.run(cancel.clone()));
        names.insert(task.id(), format!("inbox {}", inbox.path.display()));
    }
    let mut connectors = vec!["http", "fhir"];
    if !cfg.inbox.is_empty() {
        connectors.push("inbox");
    }
    if cfg.mail.smtp.is_some() {
        connectors.push("smtp");
    }
    if !cfg.mail.imap.is_empty() {
        connectors.push("imap");
    }
    telemetry::init(&settings, &connectors);
    let task = tasks.spawn(telemetry::watch(
        Arc::clone(&bus),
        &settings,
        cancel.clone(),
    ));
    names.insert(task.id(), "telemetry".to_owned());
    let task = tasks.spawn(crate::retention::run(
        Arc::clone(&bus),
        &settings,
        Arc::clone(&health),
        cancel.clone(),
    ));
    names.insert(task.id(), "retention".to_owned());

    let state = Arc::new(ApiState {
        ingest: BusIngest::new(Arc::clone(&bus), lineage.clone(), cfg.http.ingest_timeout),
        lineage: lineage.clone(),
        idempotency: crate::idempotency::Idempotency::open(&cfg.data_dir)
            .context("opening the idempotency index")?,
        health: Arc::clone(&health),
        max_body: usize::try_from(cfg.http.max_body.as_u64()).unwrap_or(usize::MAX),
    });
    let mail_ingest: Arc<dyn ketenbus_connectors::Ingest> = Arc::new(
        ketenbus_connectors::mail::SmtpSenderCheck::new(
            Arc::new(BusIngest::new(
                Arc::clone(&bus),
                lineage.clone(),
                cfg.http.ingest_timeout,
            )),
            cfg.mail.smtp.as_ref().and_then(|s| s.auth.as_ref()),
        )
        .on_refused(telemetry::rejected),
    );
    ketenbus_connectors::mail::start(
        &cfg.mail,
        &cfg.data_dir,
        &mail_ingest,
        &|k| std::env::var(k).ok(),
        &(Arc::new(crate::health::SourceHealth(Arc::clone(&health)))
            as Arc<dyn ketenbus_connectors::SourceStatus>),
        &budget,
        &cancel,
        &mut tasks,
    )
    .await
    .context("starting the mail connectors")?;
    let tls = cfg
        .http
        .tls
        .as_ref()
        .map(crate::tls::server_config)
        .transpose()
        .context("setting up TLS on the HTTP listener")?;
    if tls.is_none() && !cfg.http.listen.ip().is_loopback() {
        tracing::warn!(listen = %cfg.http.listen, "plain HTTP on a non-loopback address (http.allow_plaintext): patient data crosses the network unencrypted");
    }
    let listener = tokio::net::TcpListener::bind(cfg.http.listen)
        .await
        .with_context(|| format!("binding the HTTP listener to {}", cfg.http.listen))?;
    health.set("http", State::Ready);
    tracing::info!(listen = %cfg.http.listen, tls = tls.is_some(), engine = ?cfg.bus.engine, subscriptions = settings.subscriptions.len(), "ketenbus running");
    for w in crate::auth::warnings(cfg) {
        tracing::warn!(warning = %w, "access is open");
    }
    let auth = crate::auth::Authenticator::new(&cfg.senders, &cfg.operators);
    let max_body = usize::try_from(cfg.http.max_body.as_u64()).unwrap_or(usize::MAX);
    let serve = crate::tls::serve(
        listener,
        // Authentication reads headers only; the budget holds bodies of those let in, so a
        // client without credentials cannot fill it.
        crate::auth::protect(
            crate::http_budget::protect(api::router(state), budget, max_body),
            auth,
            audit,
        ),
        tls,
        cfg.http.limits.clone(),
        cancel.clone(),
    );
    let failure = supervise(serve, &mut tasks, &names, &health, &cancel).await;
    lineage.flush().await;
    match failure {
        Some(failure) => {
            tracing::error!(cause = %failure, "ketenbus stopped after a failure; exiting non-zero");
            Err(anyhow::anyhow!(failure))
        }
        None => {
            tracing::info!("ketenbus stopped");
            Ok(())
        }
    }
}

/// Serve until `cancel`; when a task ends before that (it returned after a fatal error, or
/// panicked), log why at ERROR, mark it failed, and stop the others cleanly. The broker then
/// exits non-zero for its supervisor to restart it: nothing acknowledged is lost, since
/// every record is acknowledged only once its next durable store holds it. Returns what
/// ended unexpectedly, if anything did.
async fn supervise(
    serve: impl Future<Output = ()>,
    tasks: &mut tokio::task::JoinSet<()>,
    names: &HashMap<tokio::task::Id, String>,
    health: &Health,
    cancel: &CancellationToken,
) -> Option<String> {
    let mut failure = None;
    let mut serving = true;
    tokio::pin!(serve);
    loop {
        tokio::select! {
            () = &mut serve, if serving => {
                serving = false;
                cancel.cancel();
            }
            Some(joined) = tasks.join_next_with_id() => {
                let (id, cause) = match joined {
                    Ok(_) if cancel.is_cancelled() => continue, // stopped as asked
                    Ok((id, ())) => (id, "it returned (see the error before)".to_owned()),
                    Err(e) => (e.id(), panic_text(e)),
                };
                let task = names.get(&id).map_or("a mail connector", String::as_str);
                tracing::error!(task, cause = %cause, "a task ended unexpectedly; stopping the broker");
                health.set(task, State::Failed(cause.clone()));
                failure.get_or_insert_with(|| format!("{task} ended unexpectedly: {cause}"));
                cancel.cancel();
            }
            else => return failure,
        }
    }
}

/// Why a task ended: its panic message.
fn panic_text(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => {
            let text = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".to_owned());
            format!("panicked: {text}")
        }
        Err(e) => e.to_string(),
    }
}
