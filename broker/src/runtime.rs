//! Starting and stopping the broker on a chosen engine.

use std::sync::Arc;

use anyhow::Context;
use ketenbus_connectors::webhook::WebhookSink;
use ketenbus_schemas::{topics, EventKind};
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
    let mut names = vec![topics::RAW.to_owned(), topics::DELIVERY_OUTCOMES.to_owned(), topics::ROUTER_DEAD_LETTERS.to_owned()];
    names.extend(EventKind::ALL.iter().map(|k| topics::events(*k)));
    for s in &settings.subscriptions {
        names.push(topics::dead_letters(&s.name));
        names.push(topics::replay(&s.name));
    }
    names.into_iter().map(|name| TopicSpec { name, partitions: n }).collect()
}

fn build_sink(sink: &Sink) -> anyhow::Result<Arc<dyn ketenbus_connectors::Sink>> {
    match sink {
        Sink::Webhook { url, secret, timeout } => {
            let s = WebhookSink::new(url.clone(), secret.as_ref().map(|s| s.0.clone()), *timeout)
                .context("building the webhook client")?;
            Ok(Arc::new(s))
        }
    }
}

/// Run the broker on `bus` until `cancel`: HTTP API, router and one dispatcher per subscription.
///
/// # Errors
/// When start-up fails (topics, data directory, listener).
pub async fn run<B: Bus>(settings: Settings, bus: B, cancel: CancellationToken) -> anyhow::Result<()> {
    let cfg = &settings.config;
    let bus = Arc::new(bus);
    bus.ensure_topics(&topic_specs(&settings)).await.context("creating topics")?;
    let lineage = Lineage::open(&cfg.data_dir).context("opening the lineage index")?;
    let secret = cfg.keys.patient_key_secret_env.as_ref().and_then(|v| std::env::var(v).ok());
    let keyer = PatientKeyer::load(&cfg.data_dir, secret).context("loading the patient-key secret")?;
    let health = Arc::new(Health::default());
    let mut tasks = tokio::task::JoinSet::new();

    tasks.spawn(router::run(
        Arc::clone(&bus),
        Arc::new(router::normalizers()),
        keyer,
        lineage.clone(),
        Arc::clone(&health),
        cancel.clone(),
    ));
    for sub in &settings.subscriptions {
        let sink = build_sink(&sub.sink)?;
        tasks.spawn(dispatch::run(Arc::clone(&bus), sub.clone(), sink, lineage.clone(), Arc::clone(&health), cancel.clone()));
    }
    telemetry::init(&settings, &["http"]);
    tasks.spawn(telemetry::watch(Arc::clone(&bus), &settings, cancel.clone()));

    let state = Arc::new(ApiState {
        ingest: BusIngest::new(Arc::clone(&bus), lineage.clone(), cfg.http.ingest_timeout),
        lineage: lineage.clone(),
        health: Arc::clone(&health),
        max_body: usize::try_from(cfg.http.max_body.as_u64()).unwrap_or(usize::MAX),
    });
    let listener = tokio::net::TcpListener::bind(cfg.http.listen)
        .await
        .with_context(|| format!("binding the HTTP listener to {}", cfg.http.listen))?;
    health.set("http", State::Ready);
    tracing::info!(listen = %cfg.http.listen, engine = ?cfg.bus.engine, subscriptions = settings.subscriptions.len(), "ketenbus running");
    let shutdown = cancel.clone();
    let server = axum::serve(listener, api::router(state)).with_graceful_shutdown(async move { shutdown.cancelled().await });
    let result = server.await.context("HTTP server");
    cancel.cancel();
    while let Some(joined) = tasks.join_next().await {
        if let Err(e) = joined {
            tracing::error!(error = %e, "a task panicked");
        }
    }
    lineage.flush().await;
    tracing::info!("ketenbus stopped");
    result
}
