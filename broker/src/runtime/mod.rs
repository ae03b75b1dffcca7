//! Starting and stopping the broker on a chosen engine.

pub mod retention;
mod supervise;

use std::sync::Arc;

use anyhow::Context;
use ketenbus_schemas::{EventKind, topics};
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, TopicSpec};
use crate::config::Settings;
use crate::deliver;
use crate::deliver::config::{SinkContext, Source};
use crate::http::state::ApiState;
use crate::ingest::BusIngest;
use crate::observe::health::{Health, State};
use crate::observe::lineage::Lineage;
use crate::observe::metrics;
use crate::route::router;
use crate::runtime::supervise::Tasks;

/// Every topic the configuration uses.
#[must_use]
pub fn topic_specs(settings: &Settings) -> Vec<TopicSpec> {
    let n = settings.config.bus.partitions();
    let mut names = vec![
        topics::RAW.to_owned(),
        topics::DELIVERY_OUTCOMES.to_owned(),
        topics::ROUTER_DEAD_LETTERS.to_owned(),
        topics::LINEAGE.to_owned(),
    ];
    names.extend(EventKind::ALL.iter().map(|k| topics::events(*k)));
    if settings.config.notified_pull.is_some() {
        names.push(topics::dead_letters(crate::deliver::pull::STAGE));
    }
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
    // Outside the supervised set: it publishes and applies until the last handle is gone,
    // so the writes of stopping stages still reach the topic.
    let lineage = Lineage::start(&cfg.data_dir, Arc::clone(&bus))
        .await
        .context("starting the lineage index")?;
    let env = &settings.env;
    let keyer = cfg
        .keys
        .keyer(&cfg.data_dir, env)
        .context("loading the patient-key secret")?;
    let report_key = keyer.derive(ketenbus_connectors::mail::dsn::KEY_PURPOSE);
    let health = Arc::new(Health::default());
    // Every task, by name, in one set: see `supervise`.
    let mut tasks = Tasks::default();
    let content: Arc<dyn ketenbus_connectors::ContentStore> = Arc::new(
        ketenbus_connectors::mail::content_store(&cfg.mail, &cfg.data_dir)
            .context("opening the content store")?,
    );
    let raw_patients = Arc::new(crate::route::keys::RawPatients::new(keyer.clone()));
    // The router takes `keyer`; consent from Mitz and the search by patient use it too.
    let patient_keyer = keyer.clone();
    let router_task = router::run(
        Arc::clone(&bus),
        Arc::new(router::Routing {
            normalisers: crate::route::normalise::normalisers(),
            keyer,
            contrl_partners: cfg.edifact.contrl_partners(),
            content: Some(Arc::clone(&content)),
            bodies: bus.bodies().cloned(),
            max_event_bytes: bus.max_record_bytes(),
            raw_patients: settings
                .subscriptions
                .iter()
                .any(|s| s.sources.contains(&Source::Raw))
                .then(|| Arc::clone(&raw_patients)),
            reports: ketenbus_connectors::mail::dsn::ReportCheck {
                key: report_key.clone(),
                subscriptions: settings
                    .subscriptions
                    .iter()
                    .filter(|s| s.sink.gets_delivery_reports())
                    .map(|s| s.name.clone())
                    .collect(),
                sources: ketenbus_connectors::mail::dsn::ReportSources::of(&cfg.mail),
            },
        }),
        lineage.clone(),
        Arc::clone(&health),
        cancel.clone(),
    );
    tasks.spawn("router", router_task);
    let audit = cfg
        .audit
        .start(&cfg.data_dir, cfg.http.listen.ip().is_loopback(), env)?;
    let mut consent_registry = cfg.consent.registry().context("reading the consent file")?;
    let mitz = match &cfg.consent.mitz {
        Some(m) => Some(Arc::new(
            crate::deliver::mitz::MitzRegistry::new(m, patient_keyer.clone(), audit.clone(), env)
                .and_then(|r| r.keep_subscriptions(&cfg.data_dir))
                .context("setting up consent from mitz")?,
        )),
        None => None,
    };
    if let Some(m) = &mitz {
        consent_registry = Some(Arc::clone(m) as Arc<dyn crate::deliver::consent::ConsentRegistry>);
    }
    let pauses =
        deliver::pause::Pauses::open(&cfg.data_dir).context("reading the paused subscriptions")?;
    for (source, replica) in cfg.mcsd.iter().zip(&settings.replicas) {
        replica.load().context("reading the mcsd replicas")?;
        tasks.spawn(
            "mcsd",
            crate::deliver::mcsd::run(source.clone(), Arc::clone(replica), cancel.clone()),
        );
    }
    // The resources of every event, readable at /fhir/{Type}/{id}; Notified Pull on them.
    let resources =
        crate::deliver::resources::Resources::start(&cfg.data_dir, Arc::clone(&bus), &cancel)
            .await
            .context("starting the FHIR resource index")?
            .with_content(Arc::clone(&content));
    let pull = match &cfg.notified_pull {
        Some(n) => {
            let mut p = crate::deliver::pull::NotifiedPull::open(n, env, &cfg.data_dir)
                .context("opening the notified pull store")?;
            p.resources = Some(resources.clone());
            let p = Arc::new(p);
            let ingest: Arc<dyn ketenbus_connectors::Ingest> = Arc::new(BusIngest::new(
                Arc::clone(&bus),
                lineage.clone(),
                cfg.http.ingest_timeout,
            ));
            let task = Arc::clone(&p).run(Arc::clone(&bus), ingest, cancel.clone());
            tasks.spawn("notified pull", task);
            Some(p)
        }
        None => None,
    };
    let sinks = SinkContext {
        book: Arc::new(
            cfg.address_book.clone().with_directories(
                settings
                    .replicas
                    .iter()
                    .map(|r| Arc::clone(r) as Arc<dyn ketenbus_connectors::address_book::Directory>)
                    .collect(),
            ),
        ),
        content: Arc::clone(&content),
        report_key,
        pull: pull.clone(),
    };
    for sub in &settings.subscriptions {
        let sink = sub.sink.build(&sinks)?;
        let configured = cfg.subscriptions.iter().find(|s| s.name == sub.name);
        let policy = configured.and_then(|s| s.consent.clone());
        let hooks = deliver::Hooks {
            consent: policy
                .zip(consent_registry.clone())
                .map(|(policy, registry)| {
                    Arc::new(crate::deliver::consent::ConsentCheck { registry, policy })
                }),
            audit: audit.clone(),
            receiver_is_party: configured.is_some_and(|s| !s.sink.has_fixed_destination())
                || !sub.filter.receivers.is_empty(),
            raw_patients: sub
                .sources
                .contains(&Source::Raw)
                .then(|| Arc::clone(&raw_patients)),
            pauses: Some(pauses.clone()),
        };
        let task = deliver::run_with(
            Arc::clone(&bus),
            sub.clone(),
            sink,
            lineage.clone(),
            Arc::clone(&health),
            cancel.clone(),
            hooks,
        );
        tasks.spawn(format!("subscription {}", sub.name), task);
    }
    // Subscriptions made through `/fhir/Subscription`: kept in the data directory, run by
    // their own task as the configured ones are.
    let (fhir_subscriptions, commands) = deliver::backport::Registry::open(
        &cfg.data_dir,
        cfg.fhir_subscriptions.clone(),
        &format!("http://{}/fhir", cfg.http.listen),
        audit.clone(),
        deliver::backport::seal::key_from(&cfg.fhir_subscriptions.header_key_env, env)
            .map_err(|p| anyhow::anyhow!("{}: {}", p.path, p.message))?,
        patient_keyer.clone(),
        Some(resources.clone()),
    )
    .context("opening the FHIR subscriptions")?;
    let task = deliver::backport::manage::run(
        Arc::clone(&bus),
        Arc::clone(&fhir_subscriptions),
        commands,
        deliver::backport::manage::Context {
            lineage: lineage.clone(),
            health: Arc::clone(&health),
            consent: consent_registry.clone(),
            audit: audit.clone(),
            pauses: Some(pauses.clone()),
            partitions: cfg.bus.partitions(),
            sinks: sinks.clone(),
        },
        cancel.clone(),
    );
    tasks.spawn("fhir subscriptions", task);
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
            .with_budget(budget.clone())
            .with_status(Arc::new(crate::observe::health::SourceHealth(Arc::clone(
                &health,
            ))));
        let task = source.run(cancel.clone());
        tasks.spawn(format!("inbox {}", inbox.path.display()), task);
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
    let labels = settings.metric_labels();
    metrics::init(&labels, &connectors);
    let task = crate::observe::watch::watch(Arc::clone(&bus), &labels, cancel.clone());
    tasks.spawn("telemetry", task);
    let task = crate::runtime::retention::run(
        Arc::clone(&bus),
        &settings,
        lineage.group(),
        Arc::clone(&fhir_subscriptions),
        Arc::clone(&health),
        cancel.clone(),
    );
    tasks.spawn("retention", task);

    let state = Arc::new(ApiState {
        ingest: Arc::new(BusIngest::new(
            Arc::clone(&bus),
            lineage.clone(),
            cfg.http.ingest_timeout,
        )),
        lineage: lineage.clone(),
        idempotency: crate::http::idempotency::Idempotency::open(&cfg.data_dir)
            .context("opening the idempotency index")?,
        health: Arc::clone(&health),
        max_body: cfg.http.max_body_bytes(),
        mitz,
        keyer: patient_keyer,
        pull,
        resources: Some(resources),
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
        .on_refused(metrics::rejected),
    );
    let status: Arc<dyn ketenbus_connectors::SourceStatus> =
        Arc::new(crate::observe::health::SourceHealth(Arc::clone(&health)));
    ketenbus_connectors::mail::start(
        &cfg.mail,
        &ketenbus_connectors::mail::MailContext {
            data_dir: &cfg.data_dir,
            ingest: &mail_ingest,
            env: env.lookup(),
            status: &status,
            budget: &budget,
            cancel: &cancel,
        },
        tasks.set(),
    )
    .await
    .context("starting the mail connectors")?;
    let tls = cfg
        .http
        .tls
        .as_ref()
        .map(crate::http::config::TlsConfig::build)
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
    if settings.subscriptions.is_empty() {
        tracing::info!(
            "no subscriptions configured: messages are taken in and normalised, nothing is delivered (see [[subscriptions]] in ops/ketenbus.example.toml)"
        );
    }
    for w in cfg.warnings() {
        tracing::warn!(warning = %w, "access is open");
    }
    let auth = crate::http::auth::Authenticator::new(&cfg.senders, &cfg.operators);
    let max_body = cfg.http.max_body_bytes();
    let console = crate::http::console::Console::new(
        &cfg.http.console,
        Arc::clone(&state),
        auth.clone(),
        audit.clone(),
        Arc::new(crate::http::console::ops::BusOperations {
            bus: Arc::clone(&bus),
            audit: audit.clone(),
        }),
        settings.subscriptions.clone(),
        (pauses, raw_patients),
        tls.is_some(),
    )
    .with_fhir(Arc::clone(&fhir_subscriptions));
    let serve = crate::http::server::serve(
        listener,
        // Authentication reads headers only; the budget holds bodies of those let in, so a
        // client without credentials cannot fill it.
        crate::http::auth::protect(
            crate::http::budget::protect(
                crate::http::router(state)
                    .merge(crate::http::console::router(Arc::new(console)))
                    .merge(crate::http::subscription::routes(fhir_subscriptions)),
                budget,
                max_body,
                bus.bodies().cloned(),
            ),
            auth,
            audit,
        ),
        tls,
        cfg.http.limits.clone(),
        cancel.clone(),
    );
    tasks.spawn("http", serve);
    let failure = tasks.supervise(&health, &cancel).await;
    if tokio::time::timeout(std::time::Duration::from_secs(10), lineage.flush())
        .await
        .is_err()
    {
        tracing::warn!("lineage writes not all published at shutdown; the topics keep the record");
    }
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
