//! Retention that never loses an unfinished record: which consumer groups must finish each
//! topic (known from the configuration, so a subscription that never started holds its topics
//! too), and the task that runs the engine's retention with them, reports a topic held past
//! its size limit (`ketenbus_log_retention_excess_bytes`, the `log` component of `/readyz`)
//! and so lets ingest refuse new messages rather than lose one.

use std::sync::Arc;

use ketenbus_schemas::topics;
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, Readers};
use crate::config::Settings;
use crate::observe::health::{Health, State};
use crate::observe::metrics;

/// The groups that must finish each topic: the router for the raw topic; every subscription
/// for the topics it reads (its event kinds or raw, and its replay topic); this node's
/// lineage index (`lineage_group`) for the lineage topic.
#[must_use]
pub fn readers(settings: &Settings, lineage_group: &str) -> Readers {
    let mut readers = Readers::new();
    readers
        .entry(topics::LINEAGE.to_owned())
        .or_default()
        .push(lineage_group.to_owned());
    readers
        .entry(topics::RAW.to_owned())
        .or_default()
        .push(topics::ROUTER_GROUP.to_owned());
    for sub in &settings.subscriptions {
        held_by(&mut readers, sub);
    }
    readers
}

/// `sub`'s groups among the `readers`: its source topics, and its retry topic, where parked
/// records wait until its own group has finished them.
fn held_by(readers: &mut Readers, sub: &crate::deliver::config::Subscription) {
    for topic in sub.source_topics() {
        readers
            .entry(topic)
            .or_default()
            .push(topics::subscription_group(&sub.name));
    }
    readers
        .entry(topics::retry(&sub.name))
        .or_default()
        .push(topics::retry_group(&sub.name));
}

/// Health component that reports the log's retention.
pub const COMPONENT: &str = "log";

/// Every `bus.embedded.retention_interval` until `cancel` (the first pass at once): run the
/// engine's retention with the configured readers and the lineage index's `lineage_group`, export how far a topic stays past its
/// size limit, and set the `log` component of `/readyz` (degraded while a topic is held
/// past its limit, with the reason; new messages are refused past the margin).
pub fn run<B: Bus>(
    bus: Arc<B>,
    settings: &Settings,
    lineage_group: &str,
    fhir: Arc<crate::deliver::backport::Registry>,
    health: Arc<Health>,
    cancel: CancellationToken,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let configured = readers(settings, lineage_group);
    let every = settings.config.bus.retention_interval();
    async move {
        health.set(COMPONENT, State::Ready);
        loop {
            // Subscriptions made through the API hold what their groups have not finished.
            let mut readers = configured.clone();
            for sub in fhir.subscriptions() {
                held_by(&mut readers, &sub);
            }
            match bus.enforce_retention(&readers).await {
                Ok(report) => {
                    metrics::retention(report.deleted, report.excess_bytes());
                    if report.deleted > 0 {
                        tracing::info!(
                            deleted = report.deleted,
                            "retention removed finished records"
                        );
                    }
                    let state = if let Some(why) = &report.refusing {
                        tracing::error!(reason = %why, "log full of unfinished records: new messages are refused until readers catch up");
                        State::Degraded(format!("refusing new messages: {why}"))
                    } else if let Some((topic, excess)) = report.held.first() {
                        tracing::warn!(topic = %topic, excess_bytes = excess, "retention keeps unfinished records past the size limit");
                        State::Degraded(format!(
                            "topic {topic} is {excess} bytes past retention_max_bytes with records not every reader has finished"
                        ))
                    } else {
                        State::Ready
                    };
                    health.set(COMPONENT, state);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "retention failed, trying again next interval")
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_configured_group_holds_what_it_reads() {
        let config: crate::config::Config = toml::from_str(
            r#"
            [[subscriptions]]
            name = "gp"
            kinds = ["lab_result", "letter"]
            sink = { type = "webhook", url = "http://127.0.0.1:9/x" }

            [[subscriptions]]
            name = "archive"
            kinds = ["raw"]
            sink = { type = "webhook", url = "http://127.0.0.1:9/y" }
            "#,
        )
        .unwrap();
        let settings = config.validate(&crate::config::Env::empty()).unwrap();
        let r = readers(&settings, "ketenbus.lineage.n1");
        let groups = |t: &str| {
            let mut g = r[t].clone();
            g.sort();
            g
        };
        assert_eq!(
            groups("ketenbus.raw"),
            ["ketenbus.router", "ketenbus.sub.archive"]
        );
        assert_eq!(groups("ketenbus.events.lab_result"), ["ketenbus.sub.gp"]);
        assert_eq!(groups("ketenbus.events.letter"), ["ketenbus.sub.gp"]);
        assert_eq!(groups("ketenbus.replay.gp"), ["ketenbus.sub.gp"]);
        assert_eq!(groups("ketenbus.replay.archive"), ["ketenbus.sub.archive"]);
        assert_eq!(groups("ketenbus.retry.gp"), ["ketenbus.sub.gp.retry"]);
        assert_eq!(groups("ketenbus.lineage"), ["ketenbus.lineage.n1"]);
        assert!(!r.contains_key("ketenbus.events.acute_handover"));
        assert!(!r.keys().any(|t| t.starts_with("ketenbus.dlq.")));
    }
}
