//! The `notified-pull` sink: for each event, an exchange (`deliver/pull.rs`) and a
//! notification Task (code `pull-notification`) POSTed to the receiver's FHIR base, or (the
//! `backport` form) a Backport notification Bundle with that Task as its focus, POSTed to the
//! receiver's endpoint; the receiver then pulls the event's resources from this node with a
//! token.

use std::sync::Arc;
use std::time::Duration;

use ketenbus_connectors::address_book::{Channel, Destination};
use ketenbus_connectors::fhir::Value;
use ketenbus_connectors::{BoxFuture, Delivery, DeliveryError, Payload, Receipt, webhook};
use serde::Deserialize;

use super::{BuildError, BuildSink, Found, Secret, Sink, SinkConfigure, SinkContext};
use crate::deliver::backport::notify::StatusOf;
use crate::deliver::backport::topic::notified_pull;
use crate::deliver::pull::NotifiedPull;

/// `[subscriptions.sink]` with `type = "notified-pull"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifiedPullSinkConfig {
    /// The receiver's FHIR base: the Task is POSTed to `[base]/Task`. When absent, each
    /// record's receiver's `fhir` address from `[address_book]`.
    #[serde(default)]
    pub base_url: Option<String>,
    /// This node's party id, written as `Task.requester` (who notifies), e.g. `ura:12345678`.
    pub requester: String,
    /// Environment variable holding a bearer token for the receiver's endpoint.
    #[serde(default)]
    pub token_env: Option<String>,
    /// Per-request timeout.
    #[serde(default = "super::default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Allow an `http://` base URL to a non-loopback host (unencrypted). Loopback needs no flag.
    #[serde(default)]
    pub allow_plain_http: bool,
    /// The notification's form: `task` (the default), the TA's notification Task POSTed to
    /// `[base]/Task`; or `backport`, a Backport `history` notification Bundle (the
    /// SubscriptionStatus first, the same Task as its focus) POSTed to the base URL itself,
    /// the receiver's rest-hook endpoint (ketenbus receives it at its FHIR base, `POST /fhir`).
    #[serde(default)]
    pub notification: NotificationForm,
}

/// The form of a Notified Pull notification.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NotificationForm {
    /// The TA Notified Pull notification Task (code `pull-notification`).
    #[default]
    Task,
    /// A Backport notification Bundle with the notification Task as its focus.
    Backport,
}

/// A validated `notified-pull` sink.
#[derive(Debug, Clone)]
pub struct NotifiedPullSink {
    base: Destination<reqwest::Url>,
    requester: String,
    token: Option<Secret>,
    timeout: Duration,
    form: NotificationForm,
}

impl SinkConfigure for NotifiedPullSinkConfig {
    fn has_fixed_destination(&self) -> bool {
        self.base_url.is_some()
    }

    fn check(&self, found: &mut Found<'_>) -> Option<Sink> {
        let base = found.destination(
            "base_url",
            &self.base_url,
            self.allow_plain_http,
            Channel::Fhir,
        );
        let token = found.secret("token_env", self.token_env.as_ref());
        found.timeout(self.timeout);
        if !self
            .requester
            .split_once(':')
            .is_some_and(|(a, b)| !a.is_empty() && !b.is_empty())
        {
            found.push("requester", "must be scheme:value, e.g. ura:12345678");
        }
        base.map(|base| {
            Sink::new(NotifiedPullSink {
                base,
                requester: self.requester.clone(),
                token,
                timeout: self.timeout,
                form: self.notification,
            })
        })
    }
}

impl BuildSink for NotifiedPullSink {
    fn build(&self, ctx: &SinkContext) -> Result<Arc<dyn ketenbus_connectors::Sink>, BuildError> {
        let pull = ctx.pull.clone().ok_or_else(|| {
            BuildError::Fhir("a notified-pull subscription needs [notified_pull]".into())
        })?;
        let client = reqwest::Client::builder()
            .timeout(self.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(BuildError::Webhook)?;
        Ok(Arc::new(Notifier {
            sink: self.clone(),
            pull,
            client,
        }))
    }
}

/// The sink's client.
struct Notifier {
    sink: NotifiedPullSink,
    pull: Arc<NotifiedPull>,
    client: reqwest::Client,
}

fn rejected(reason: &str, detail: impl Into<String>) -> DeliveryError {
    DeliveryError::Rejected {
        reason: reason.into(),
        detail: detail.into(),
    }
}

impl Notifier {
    /// The Backport notification of `event`: its number among this subscription's
    /// notifications (kept, so a retry sends the same), the status Parameters, and the
    /// notification `task` as the focus and only other entry (no clinical content).
    fn backport(
        &self,
        delivery: &Delivery,
        event: &ketenbus_schemas::Event,
        exchange: &str,
        task: Value,
    ) -> Result<Vec<u8>, DeliveryError> {
        let n = self
            .pull
            .number(&delivery.subscription, &event.header().id)
            .map_err(|e| DeliveryError::Retryable {
                reason: "store".into(),
                detail: e.to_string(),
            })?;
        let base = self.pull.base_url();
        let focus = format!("{base}/Task/{exchange}");
        let status = StatusOf {
            subscription: format!("{base}/Subscription/{}", delivery.subscription),
            // The Notified Pull topic: its focus is the notification Task, not the event's
            // own focus (a ServiceRequest, an Observation).
            topic: notified_pull::canonical(),
            status: "active",
            kind: "event-notification",
            since: n.since,
            events: vec![(n.number, n.at_ms, Some(focus.clone()))],
            gone: Vec::new(),
            error: None,
        };
        let task = serde_json::from_slice(&ketenbus_connectors::fhir::json::to_vec(&task))
            .map_err(|e| rejected("invalid_payload", e.to_string()))?;
        let bundle = status.history(vec![(focus, format!("Task/{exchange}"), Some(task))]);
        Ok(serde_json::to_vec(&bundle).unwrap_or_default())
    }
}

impl ketenbus_connectors::Sink for Notifier {
    fn deliver<'a>(
        &'a self,
        delivery: &'a Delivery,
    ) -> BoxFuture<'a, Result<Receipt, DeliveryError>> {
        Box::pin(async move {
            let Payload::Event(event) = &delivery.payload else {
                return Err(rejected(
                    "invalid_payload",
                    "notified pull carries events, not raw messages",
                ));
            };
            let resources = ketenbus_connectors::fhir::emit::resources(event)
                .map_err(|e| rejected("invalid_payload", e.to_string()))?;
            let names: Vec<String> = resources
                .iter()
                .filter_map(|r| {
                    Some(format!(
                        "{}/{}",
                        r.get("resourceType")?.as_str()?,
                        r.get("id")?.as_str()?
                    ))
                })
                .collect();
            // The focus (the referral, the first observation) first.
            let mut names = names;
            if let Some(i) = names
                .iter()
                .position(|n| n.starts_with("ServiceRequest/") || n.starts_with("Observation/"))
            {
                let focus = names.remove(i);
                names.insert(0, focus);
            }
            let h = event.header();
            let Some(receiver) = h.receiver.as_deref() else {
                return Err(rejected(
                    "no_receiver",
                    "the event names no receiver to notify",
                ));
            };
            let (base, origin) = self
                .sink
                .base
                .resolve(delivery, Channel::Fhir, |a| reqwest::Url::parse(a).ok())?;
            // The receiver may pull only once this node's index knows the event.
            if let Some(r) = &self.pull.resources
                && !r.wait_for(&h.id, Duration::from_secs(5)).await
            {
                return Err(DeliveryError::Retryable {
                    reason: "not_indexed".into(),
                    detail: "the event's resources are not readable yet".into(),
                });
            }
            let opened = self
                .pull
                .open_exchange(&h.id, receiver, &delivery.subscription)
                .map_err(|e| DeliveryError::Retryable {
                    reason: "store".into(),
                    detail: e.to_string(),
                })?;
            let task: Value =
                self.pull
                    .task(&opened, (Some(&self.sink.requester), receiver), &names);
            self.pull
                .keep_task(&opened.exchange, &task)
                .map_err(|e| DeliveryError::Retryable {
                    reason: "store".into(),
                    detail: e.to_string(),
                })?;
            let (url, body) = match self.sink.form {
                NotificationForm::Task => (
                    format!("{}/Task", base.as_str().trim_end_matches('/')),
                    ketenbus_connectors::fhir::json::to_vec(&task),
                ),
                NotificationForm::Backport => (
                    base.to_string(),
                    self.backport(delivery, event, &opened.exchange, task)?,
                ),
            };
            let mut req = self
                .client
                .post(url)
                .header("content-type", ketenbus_connectors::fhir::MEDIA_JSON)
                .header("idempotency-key", &delivery.record_id)
                .body(body);
            if let Some(t) = &self.sink.token {
                req = req.bearer_auth(t.text());
            }
            let resp = req.send().await.map_err(|e| DeliveryError::Retryable {
                reason: if e.is_timeout() { "timeout" } else { "connect" }.into(),
                detail: e.without_url().to_string(),
            })?;
            let status = resp.status().as_u16();
            let body = resp.bytes().await.unwrap_or_default();
            webhook::classify_status(status, webhook::answer_excerpt(&body))?;
            Ok(Receipt {
                detail: format!("notified: http {status}, exchange {}", opened.exchange),
                origin: Some(origin.to_string()),
            })
        })
    }
}
