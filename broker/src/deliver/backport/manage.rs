//! The Subscriptions while the broker runs: the [`Registry`] the HTTP handlers change (kept
//! in the store before it answers), and the task ([`run`]) that starts each one as a
//! ketenbus subscription (`deliver::run_with`, with the [`NotifySink`]) and its heartbeat,
//! and stops it when it is deleted. A new Subscription's consumer group starts at the end
//! of its topic: it is notified of what arrives after it was made.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ketenbus_connectors::{BoxFuture, Delivery, DeliveryError, Payload, Receipt};
use ketenbus_schemas::{now_ms, topics};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::notify::{self, Held, Notice};
use super::parse::Refusal;
use super::store::{Numbered, Store, StoreError};
use super::{Content, FhirSubscriptionsConfig, Registration, Status};
use crate::bus::{Bus, Consumer, TopicSpec};
use crate::deliver::config::{FilterConfig, Source, Subscription};
use crate::deliver::resources::Resources;
use crate::deliver::sink::{BuildError, BuildSink, SinkContext};
use crate::observe::audit::{Audit, Entry};
use crate::observe::health::Health;
use crate::observe::lineage::Lineage;
use crate::route::keys::PatientKeyer;

/// Most events one `$events` answer carries.
pub const EVENTS_PAGE: usize = 100;

/// What the manager task is asked.
enum Command {
    /// Start the Subscription `id`; a new one first moves its group to the end of its topic.
    Start {
        id: String,
        new: bool,
        started: oneshot::Sender<()>,
    },
    /// Stop the Subscription `id`.
    Stop(String),
}

struct Live {
    reg: Registration,
    /// When a notification (any type) last reached the endpoint.
    last_sent: Instant,
}

/// The Subscriptions made through the API.
pub struct Registry {
    store: Store,
    config: FhirSubscriptionsConfig,
    base: String,
    client: reqwest::Client,
    live: Mutex<HashMap<String, Live>>,
    commands: mpsc::Sender<Command>,
    audit: Option<Audit>,
    keyer: PatientKeyer,
    /// The log (and the index that locates events numbered without a position), for
    /// `$events`.
    log: Option<Resources>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// Why the registry could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The HTTP client could not be made.
    #[error("fhir subscriptions: building the notification client")]
    Client(#[source] reqwest::Error),
}

/// What the manager task receives its commands on.
pub struct Commands(mpsc::Receiver<Command>);

impl std::fmt::Debug for Commands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Commands(..)")
    }
}

fn internal(e: &StoreError) -> Refusal {
    tracing::error!(error = %e, "fhir subscription store failed");
    Refusal::new(500, "exception", "the subscription store failed")
}

impl Registry {
    /// The Subscriptions kept in `data_dir`; `base`: ketenbus's FHIR base as subscribers
    /// reach it; `keyer` turns a patient filter's BSN into its pseudonym; `log` reads the
    /// numbered events back for `$events` (without it, `$events` carries no resources). The
    /// returned [`Commands`] go to [`run`].
    ///
    /// # Errors
    /// When the store cannot be opened or read.
    pub fn open(
        data_dir: &std::path::Path,
        config: FhirSubscriptionsConfig,
        base: &str,
        audit: Option<Audit>,
        key: Option<super::seal::HeaderKey>,
        keyer: PatientKeyer,
        log: Option<Resources>,
    ) -> Result<(Arc<Registry>, Commands), OpenError> {
        let store = Store::open_with(data_dir, key)?;
        let live = store
            .all()?
            .into_iter()
            .map(|reg| {
                (
                    reg.id.clone(),
                    Live {
                        reg,
                        last_sent: Instant::now(),
                    },
                )
            })
            .collect();
        let (tx, rx) = mpsc::channel(64);
        let registry = Registry {
            store,
            base: config
                .base_url
                .clone()
                .unwrap_or_else(|| base.to_owned())
                .trim_end_matches('/')
                .to_owned(),
            config,
            client: notify::client().map_err(OpenError::Client)?,
            live: Mutex::new(live),
            commands: tx,
            audit,
            keyer,
            log,
        };
        Ok((Arc::new(registry), Commands(rx)))
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// ketenbus's FHIR base as subscribers reach it.
    #[must_use]
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The limits a Subscription is checked against: (longest timeout, shortest heartbeat),
    /// in seconds.
    #[must_use]
    pub fn limits(&self) -> (u32, u32) {
        let secs = |d: Duration| u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX);
        (
            secs(self.config.max_timeout),
            secs(self.config.min_heartbeat),
        )
    }

    /// A client's Subscription checked ([`parse::registration`] with this server's limits),
    /// its patient filter's BSN turned into the patient's pseudonym: a patient filter only
    /// for a receiver in `patient_filter_receivers`, else 403.
    ///
    /// # Errors
    /// [`Refusal`] naming what is wrong.
    pub fn checked(&self, body: &Value) -> Result<Registration, Refusal> {
        let pseudonym = |bsn: &str| {
            self.keyer.key_of(&ketenbus_schemas::event::Identifier {
                system: ketenbus_schemas::event::systems::BSN.into(),
                value: bsn.to_owned(),
            })
        };
        let reg = super::parse::registration(body, self.limits(), &pseudonym)?;
        if reg.patient.is_some() && !self.config.patient_filter_receivers.contains(&reg.receiver) {
            crate::observe::metrics::rejected("fhir", "patient_filter_not_allowed");
            return Err(Refusal::new(
                403,
                "forbidden",
                "this receiver may not filter by patient (fhir_subscriptions.patient_filter_receivers)",
            )
            .at("Subscription.criteria.extension"));
        }
        if reg.ended(now_ms()) {
            return Err(Refusal::new(422, "invalid", "end has passed").at("Subscription.end"));
        }
        Ok(reg)
    }

    /// The Subscription `id`.
    #[must_use]
    pub fn get(&self, id: &str) -> Option<Registration> {
        self.live().get(id).map(|l| l.reg.clone())
    }

    /// Every Subscription.
    #[must_use]
    pub fn all(&self) -> Vec<Registration> {
        let mut v: Vec<Registration> = self.live().values().map(|l| l.reg.clone()).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Every Subscription as the ketenbus subscription it runs as (retention keeps what
    /// their groups have not finished).
    #[must_use]
    pub fn subscriptions(self: &Arc<Self>) -> Vec<Subscription> {
        self.all().iter().map(|r| self.subscription(r)).collect()
    }

    /// The ketenbus subscription `r` runs as.
    #[must_use]
    pub fn subscription(self: &Arc<Self>, r: &Registration) -> Subscription {
        Subscription {
            name: r.subscription_name(),
            sources: BTreeSet::from([Source::Events(r.kind)]),
            filter: FilterConfig {
                senders: r.senders.clone(),
                receivers: vec![r.receiver.clone()],
                patients: r.patient.iter().cloned().collect(),
            },
            sink: crate::deliver::sink::Sink::new(NotifyBuild {
                registry: Arc::clone(self),
                id: r.id.clone(),
            }),
            retry: self.config.retry.clone(),
            // One lane: events are numbered in the order of the log.
            concurrency: 1,
        }
    }

    fn keep(&self, reg: &Registration) -> Result<(), Refusal> {
        self.store.put(reg).map_err(|e| internal(&e))?;
        let mut live = self.live();
        match live.get_mut(&reg.id) {
            Some(l) => l.reg = reg.clone(),
            None => {
                live.insert(
                    reg.id.clone(),
                    Live {
                        reg: reg.clone(),
                        last_sent: Instant::now(),
                    },
                );
            }
        }
        Ok(())
    }

    /// Append an audit record of `action` on `reg` by `actor`.
    ///
    /// # Errors
    /// [`Refusal`] (503) when the audit trail cannot be written.
    pub async fn audit(
        &self,
        action: &str,
        reg: &Registration,
        actor: &str,
    ) -> Result<(), Refusal> {
        let Some(audit) = &self.audit else {
            return Ok(());
        };
        let entry = Entry {
            action: action.to_owned(),
            actor: actor.to_owned(),
            party: Some(reg.receiver.clone()),
            patient: reg.patient.clone(),
            event_id: Some(format!("Subscription/{}", reg.id)),
            ..Entry::default()
        };
        audit.append(vec![entry]).await.map_err(|e| {
            tracing::error!(error = %e, "audit trail unavailable; subscription change refused");
            Refusal::new(503, "transient", "the audit trail cannot be written")
        })
    }

    /// Make a Subscription from what a client asked (`asked`, checked), by `owner`: kept,
    /// started (its group at the end of its topic), then activated by a handshake unless
    /// it asked for `off`.
    ///
    /// # Errors
    /// [`Refusal`] when there are too many, or the store, audit or manager fails.
    pub async fn create(
        self: &Arc<Self>,
        mut asked: Registration,
        owner: &str,
    ) -> Result<Registration, Refusal> {
        if self.live().len() >= self.config.max {
            return Err(Refusal::new(
                429,
                "too-costly",
                "this server keeps no more Subscriptions (fhir_subscriptions.max)",
            ));
        }
        self.can_keep(&asked.headers)?;
        asked.id = hex::encode(rand::random::<[u8; 8]>());
        owner.clone_into(&mut asked.owner);
        let off = asked.status == Status::Off;
        asked.status = if off { Status::Off } else { Status::Requested };
        self.audit("fhir_subscription_create", &asked, owner)
            .await?;
        self.keep(&asked)?;
        if let Err(r) = self.start(&asked.id, true).await {
            // Not running: not kept either, so a restart does not start it behind its back.
            self.live().remove(&asked.id);
            self.store.remove(&asked.id).map_err(|e| internal(&e))?;
            return Err(r);
        }
        if off {
            return Ok(asked);
        }
        Ok(self.handshake(&asked.id).await)
    }

    /// Headers are kept only sealed: without a key, a Subscription with headers is refused.
    fn can_keep(&self, headers: &[String]) -> Result<(), Refusal> {
        if headers.is_empty() || self.store.seals() {
            return Ok(());
        }
        Err(Refusal::new(
            422,
            "not-supported",
            format!(
                "this server keeps no channel.header: its operator has not set {} (the key they are kept encrypted with)",
                self.config.header_key_env
            ),
        )
        .at("Subscription.channel.header"))
    }

    async fn start(&self, id: &str, new: bool) -> Result<(), Refusal> {
        let (tx, rx) = oneshot::channel();
        let sent = self
            .commands
            .send(Command::Start {
                id: id.to_owned(),
                new,
                started: tx,
            })
            .await;
        if sent.is_err() || rx.await.is_err() {
            return Err(Refusal::new(
                503,
                "transient",
                "the subscription could not be started",
            ));
        }
        Ok(())
    }

    /// Replace the Subscription `id` with `asked`: its topic stays (it names the events it
    /// numbers); its filters (receiver, sender, patient) may change, and the new ones hold
    /// from the next event it reads (its tasks are started again, where its group stood).
    /// Status `requested` or `active` sends a handshake and, when it is answered, makes it
    /// active again (the reset after `error`), `off` stops notifying.
    ///
    /// # Errors
    /// [`Refusal`] when it is unknown, changes its topic, or the store fails.
    pub async fn update(
        self: &Arc<Self>,
        id: &str,
        mut asked: Registration,
        actor: &str,
    ) -> Result<Registration, Refusal> {
        let Some(old) = self.get(id) else {
            return Err(Refusal::new(404, "not-found", "no such Subscription"));
        };
        if old.kind != asked.kind {
            return Err(Refusal::new(
                422,
                "invalid",
                "a Subscription's topic cannot change: delete it and make another",
            )
            .at("Subscription.criteria"));
        }
        let refiltered = old.receiver != asked.receiver
            || old.senders != asked.senders
            || old.patient != asked.patient;
        asked.headers = super::seal::unmask(&asked.headers, &old.headers).map_err(|name| {
            Refusal::new(
                422,
                "invalid",
                format!("channel.header {name}: give its value, not the mask"),
            )
            .at("Subscription.channel.header")
        })?;
        self.can_keep(&asked.headers)?;
        asked.id = old.id.clone();
        asked.owner = old.owner.clone();
        let off = asked.status == Status::Off;
        asked.status = if off { Status::Off } else { Status::Requested };
        self.audit("fhir_subscription_update", &asked, actor)
            .await?;
        self.keep(&asked)?;
        if refiltered || old.ended(now_ms()) {
            // New filters: its tasks start again with them. Stopped at its end: a later end
            // starts it again. Either way where its group stood.
            self.start(id, false).await?;
        }
        if off {
            return Ok(asked);
        }
        Ok(self.handshake(id).await)
    }

    /// Delete the Subscription `id`: stopped, forgotten with its numbered events.
    ///
    /// # Errors
    /// [`Refusal`] when it is unknown or the store fails.
    pub async fn delete(&self, id: &str, actor: &str) -> Result<(), Refusal> {
        let Some(old) = self.get(id) else {
            return Err(Refusal::new(404, "not-found", "no such Subscription"));
        };
        self.audit("fhir_subscription_delete", &old, actor).await?;
        let _ = self.commands.send(Command::Stop(id.to_owned())).await;
        self.store.remove(id).map_err(|e| internal(&e))?;
        self.live().remove(id);
        Ok(())
    }

    /// Send the handshake; answered, the Subscription is active, else in error.
    pub async fn handshake(&self, id: &str) -> Registration {
        let Some(mut reg) = self.get(id) else {
            return Registration::gone(id);
        };
        reg.status = Status::Requested;
        reg.error = None;
        let since = self.store.count(id).unwrap_or(0);
        let b = notify::bundle(&self.base, &reg, "handshake", since, &[], Content::Empty);
        match notify::send(&self.client, &reg, &b).await {
            Ok(_) => {
                reg.status = Status::Active;
                tracing::info!(subscription = %reg.subscription_name(), "fhir subscription active");
            }
            Err(m) => {
                tracing::warn!(subscription = %reg.subscription_name(), error = %m, "handshake failed");
                reg.status = Status::Error;
                reg.error = Some(format!("handshake failed: {m}"));
            }
        }
        self.set(&reg);
        reg
    }

    /// Keep a status change made by a notification.
    fn set(&self, reg: &Registration) {
        if let Err(e) = self.store.put(reg) {
            tracing::error!(error = %e, "fhir subscription status not kept");
        }
        if let Some(l) = self.live().get_mut(&reg.id) {
            l.reg.status = reg.status;
            l.reg.error.clone_from(&reg.error);
            l.last_sent = Instant::now();
        }
    }

    /// Whether the Subscription `id` has passed its `end`; the first time, it goes `off`
    /// (R4: the time the server turns it off).
    fn expire(&self, id: &str) -> bool {
        let Some(mut reg) = self.get(id) else {
            return false;
        };
        if !reg.ended(now_ms()) {
            return false;
        }
        if reg.status != Status::Off {
            tracing::info!(subscription = %reg.subscription_name(), "fhir subscription reached its end; off");
            reg.status = Status::Off;
            reg.error = None;
            self.set(&reg);
        }
        true
    }

    fn failed(&self, id: &str, why: &str) {
        if let Some(mut reg) = self.get(id)
            && reg.status == Status::Active
        {
            tracing::warn!(subscription = %reg.subscription_name(), error = %why, "notification failed; the subscription is in error until reset");
            reg.status = Status::Error;
            reg.error = Some(format!("notification failed: {why}"));
            self.set(&reg);
        }
    }

    fn sent(&self, id: &str) {
        if let Some(l) = self.live().get_mut(id) {
            l.last_sent = Instant::now();
        }
    }

    /// `$status`: a `searchset` Bundle with the status `Parameters` (`query-status`).
    ///
    /// # Errors
    /// [`Refusal`] when the store cannot be read.
    pub fn status(&self, reg: &Registration) -> Result<Value, Refusal> {
        let since = self.store.count(&reg.id).map_err(|e| internal(&e))?;
        let p = notify::status(&self.base, reg, "query-status", since, &[]);
        Ok(notify::searchset(vec![(
            format!("urn:uuid:{}", notify::new_uuid()),
            p,
        )]))
    }

    /// `$events`: the numbered events `from..=until` (at most [`EVENTS_PAGE`]) as a
    /// `history` Bundle (`query-event`), carried as `content` says. Each event is read back
    /// from the log at the position kept with its number (or, for a number kept without one,
    /// where the resource index finds it). An event the log no longer holds (retention) is
    /// listed by number and time without focus, and its entry answers `410` with an
    /// OperationOutcome: `content` is a hint the Backport IG lets a server not follow.
    ///
    /// # Errors
    /// [`Refusal`] when the store cannot be read (500), the log cannot be read now (503), or
    /// a record at a kept position is no event (500).
    pub async fn events(
        &self,
        reg: &Registration,
        from: u64,
        until: u64,
        content: Content,
    ) -> Result<Value, Refusal> {
        let since = self.store.count(&reg.id).map_err(|e| internal(&e))?;
        let kept = self
            .store
            .events(&reg.id, from.max(1), until.min(since), EVENTS_PAGE)
            .map_err(|e| internal(&e))?;
        let read =
            content != Content::Empty && crate::deliver::resources::KINDS.contains(&reg.kind);
        let mut notices = Vec::with_capacity(kept.len());
        for n in kept {
            let event = if read {
                self.read_back(reg, &n).await?
            } else {
                Held::Unread
            };
            notices.push(Notice {
                number: n.number,
                at_ms: n.at_ms,
                event,
            });
        }
        let mut shown = reg.clone();
        shown.content = content;
        Ok(notify::bundle(
            &self.base,
            &shown,
            "query-event",
            since,
            &notices,
            content,
        ))
    }

    /// The numbered event `n` read back from the log.
    async fn read_back(&self, reg: &Registration, n: &Numbered) -> Result<Held, Refusal> {
        let Some(log) = &self.log else {
            return Ok(Held::Unread);
        };
        let unavailable = |e: &dyn std::fmt::Display| {
            tracing::warn!(subscription = %reg.subscription_name(), error = %e, "$events: the log cannot be read");
            Refusal::new(
                503,
                "transient",
                "the events cannot be read from the log now; retry later",
            )
        };
        let position = match &n.position {
            Some(p) => Some(p.clone()),
            // Numbered before positions were kept, or first tried from a retry topic.
            None => match log.locate_event(&n.event_id) {
                Ok(Some(at)) => {
                    let p = at.position();
                    if let Err(e) = self.store.place(&reg.id, n.number, &p) {
                        tracing::warn!(error = %e, "fhir subscription store: position not kept");
                    }
                    Some(p)
                }
                Ok(None) => None,
                Err(e) => return Err(unavailable(&e)),
            },
        };
        let Some(p) = position else {
            return Ok(Held::Gone);
        };
        match log.event_at(&p.topic, p.partition, p.offset).await {
            Ok(Some(e)) if e.header().id == n.event_id => Ok(Held::Event(Arc::new(e))),
            Ok(Some(_)) => {
                tracing::error!(subscription = %reg.subscription_name(), number = n.number, "$events: the record at a kept position is another event");
                Err(Refusal::new(
                    500,
                    "exception",
                    "a numbered event cannot be read back",
                ))
            }
            Ok(None) => {
                tracing::info!(subscription = %reg.subscription_name(), number = n.number, "$events: the event is no longer in the log");
                Ok(Held::Gone)
            }
            Err(crate::deliver::resources::ResourceError::Undecodable(_)) => {
                tracing::error!(subscription = %reg.subscription_name(), number = n.number, "$events: the record at a kept position is no event");
                Err(Refusal::new(
                    500,
                    "exception",
                    "a numbered event cannot be read back",
                ))
            }
            Err(e) => Err(unavailable(&e)),
        }
    }

    /// A heartbeat when the Subscription is active, has a heartbeat period and nothing went
    /// out for that long.
    async fn heartbeat(&self, id: &str) {
        let due = {
            let live = self.live();
            live.get(id).and_then(|l| {
                let period = Duration::from_secs(u64::from(l.reg.heartbeat_secs?));
                (l.reg.status == Status::Active && l.last_sent.elapsed() >= period)
                    .then(|| l.reg.clone())
            })
        };
        let Some(reg) = due else { return };
        let since = self.store.count(id).unwrap_or(0);
        let b = notify::bundle(&self.base, &reg, "heartbeat", since, &[], Content::Empty);
        match notify::send(&self.client, &reg, &b).await {
            Ok(_) => self.sent(id),
            Err(m) => self.failed(id, &m),
        }
    }

    /// Deliver one event: numbered (kept), then sent while the Subscription is active.
    async fn notify(&self, id: &str, d: &Delivery) -> Result<Receipt, DeliveryError> {
        let Payload::Event(event) = &d.payload else {
            return Err(DeliveryError::Rejected {
                reason: "not_an_event".into(),
                detail: "a FHIR Subscription takes events".into(),
            });
        };
        let Some(reg) = self.get(id) else {
            return Err(DeliveryError::Retryable {
                reason: "subscription_gone".into(),
                detail: "the Subscription was deleted".into(),
            });
        };
        if self.expire(id) {
            // Not numbered: it waits in the log in case a later end starts it again.
            return Err(DeliveryError::Retryable {
                reason: "subscription_ended".into(),
                detail: "the Subscription has passed its end".into(),
            });
        }
        let store_failed = |e: StoreError| DeliveryError::Retryable {
            reason: "store_unavailable".into(),
            detail: e.to_string(),
        };
        // Where the event is in the log, kept with its number: `$events` reads it back there
        // (the store never keeps the event, which holds patient data).
        let position = match &d.position {
            Some(p) => Some(p.clone()),
            None => self.log.as_ref().and_then(|log| {
                log.locate_event(&d.record_id)
                    .ok()
                    .flatten()
                    .map(crate::deliver::resources::Located::position)
            }),
        };
        let number = self
            .store
            .number(id, &d.record_id, position.as_ref(), now_ms())
            .map_err(store_failed)?;
        if reg.status != Status::Active {
            return Err(DeliveryError::Retryable {
                reason: "subscription_not_active".into(),
                detail: format!("the Subscription is {}", reg.status.code()),
            });
        }
        let since = self.store.count(id).map_err(store_failed)?;
        let notice = Notice {
            number,
            at_ms: now_ms(),
            event: Held::Event(Arc::clone(event)),
        };
        let b = notify::bundle(
            &self.base,
            &reg,
            "event-notification",
            since,
            &[notice],
            reg.content,
        );
        match notify::send(&self.client, &reg, &b).await {
            Ok(detail) => {
                self.sent(id);
                Ok(Receipt {
                    detail,
                    origin: None,
                })
            }
            Err(m) => {
                self.failed(id, &m);
                Err(DeliveryError::Retryable {
                    reason: "notification_failed".into(),
                    detail: m,
                })
            }
        }
    }
}

impl Registration {
    /// What is left of a Subscription deleted meanwhile.
    pub(super) fn gone(id: &str) -> Registration {
        Registration {
            id: id.to_owned(),
            kind: ketenbus_schemas::EventKind::Letter,
            receiver: String::new(),
            senders: Vec::new(),
            patient: None,
            endpoint: String::new(),
            content: Content::Empty,
            headers: Vec::new(),
            heartbeat_secs: None,
            timeout_secs: 1,
            max_count: 1,
            reason: String::new(),
            end: None,
            status: Status::Off,
            error: Some("deleted".into()),
            owner: String::new(),
        }
    }
}

/// The sink of a Subscription: its notifications.
#[derive(Debug)]
pub struct NotifyBuild {
    registry: Arc<Registry>,
    id: String,
}

/// The sink a Subscription's lanes deliver to.
struct NotifySink {
    registry: Arc<Registry>,
    id: String,
}

impl BuildSink for NotifyBuild {
    fn build(&self, _: &SinkContext) -> Result<Arc<dyn ketenbus_connectors::Sink>, BuildError> {
        Ok(Arc::new(NotifySink {
            registry: Arc::clone(&self.registry),
            id: self.id.clone(),
        }))
    }
}

impl ketenbus_connectors::Sink for NotifySink {
    fn deliver<'a>(&'a self, d: &'a Delivery) -> BoxFuture<'a, Result<Receipt, DeliveryError>> {
        Box::pin(self.registry.notify(&self.id, d))
    }
}

/// What the manager starts each subscription with, besides its registration.
pub struct Context {
    /// Lineage.
    pub lineage: Lineage,
    /// Health.
    pub health: Arc<Health>,
    /// Where consent is looked up, if anywhere.
    pub consent: Option<Arc<dyn crate::deliver::consent::ConsentRegistry>>,
    /// The audit trail.
    pub audit: Option<Audit>,
    /// Paused subscriptions.
    pub pauses: Option<crate::deliver::pause::Pauses>,
    /// Partitions of new topics.
    pub partitions: u32,
    /// The sinks' context.
    pub sinks: SinkContext,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Context(..)")
    }
}

/// Move the new group of `sub` to the end of what its topics hold now.
async fn to_the_end<B: Bus>(bus: &B, sub: &Subscription) -> Result<u64, crate::bus::BusError> {
    let mut c = bus
        .subscribe(&topics::subscription_group(&sub.name), &sub.source_topics())
        .await?;
    let mut n = 0;
    while let Some(r) = c.poll(Duration::from_millis(200)).await? {
        c.ack(r.ack_token()).await?;
        n += 1;
    }
    c.commit().await?;
    Ok(n)
}

/// A deleted Subscription's series and lag sampling go with it.
fn forget(id: &str) {
    let name = super::subscription_name(id);
    if let Some(topics) = crate::observe::watch::unwatch(&name) {
        crate::observe::metrics::subscription_removed(&name, &topics);
    }
}

/// A running Subscription's tasks.
struct Running {
    /// Stops them.
    stop: CancellationToken,
    /// Hears `None` once every one of them has ended.
    ended: mpsc::Receiver<()>,
}

impl Running {
    /// Stop the tasks and wait until they have ended, at most `within`.
    async fn end(mut self, within: Duration) {
        self.stop.cancel();
        if tokio::time::timeout(within, self.ended.recv())
            .await
            .is_err()
        {
            tracing::warn!(
                "a fhir subscription's tasks did not end in time; starting it again anyway"
            );
        }
    }
}

/// Run the Subscriptions until `cancel`: each kept one at once, then as the registry asks.
pub async fn run<B: Bus>(
    bus: Arc<B>,
    registry: Arc<Registry>,
    commands: Commands,
    ctx: Context,
    cancel: CancellationToken,
) {
    let mut rx = commands.0;
    let mut tasks = tokio::task::JoinSet::new();
    let mut running: HashMap<String, Running> = HashMap::new();
    let start = async |id: &str, new: bool, tasks: &mut tokio::task::JoinSet<()>| {
        if registry.expire(id) {
            return None; // past its end: not started
        }
        let reg = registry.get(id)?;
        let sub = registry.subscription(&reg);
        let specs: Vec<TopicSpec> = [
            topics::dead_letters(&sub.name),
            topics::replay(&sub.name),
            topics::retry(&sub.name),
        ]
        .into_iter()
        .map(|name| TopicSpec {
            name,
            partitions: ctx.partitions,
        })
        .collect();
        if let Err(e) = bus.ensure_topics(&specs).await {
            tracing::error!(subscription = %sub.name, error = %e, "cannot create the subscription's topics");
            return None;
        }
        if new && let Err(e) = to_the_end(bus.as_ref(), &sub).await {
            tracing::error!(subscription = %sub.name, error = %e, "cannot start the subscription's group");
            return None;
        }
        let sink = sub.sink.build(&ctx.sinks).ok()?;
        let hooks = crate::deliver::Hooks {
            consent: registry
                .config
                .consent
                .as_ref()
                .zip(ctx.consent.clone())
                .map(|(c, registry)| {
                    Arc::new(crate::deliver::consent::ConsentCheck {
                        registry,
                        policy: crate::deliver::consent::SubscriptionConsent {
                            party: Some(reg.receiver.clone()),
                            purpose: c.purpose.clone(),
                            default: c.default,
                        },
                    })
                }),
            audit: ctx.audit.clone(),
            receiver_is_party: true,
            raw_patients: None,
            pauses: ctx.pauses.clone(),
        };
        let stop = cancel.child_token();
        // Seen by operators as any subscription: its series at zero, its lag sampled.
        crate::observe::metrics::subscription_started(&sub.name, &sub.source_topics());
        crate::observe::watch::watch_also(&sub.name, &sub.source_topics());
        // Each task holds a sender until it ends: the receiver hears `None` once all have.
        let (alive, ended) = mpsc::channel::<()>(1);
        let delivering = crate::deliver::run_with(
            Arc::clone(&bus),
            sub,
            sink,
            ctx.lineage.clone(),
            Arc::clone(&ctx.health),
            stop.clone(),
            hooks,
        );
        let held = alive.clone();
        tasks.spawn(async move {
            delivering.await;
            drop(held);
        });
        let beat = Arc::clone(&registry);
        let id_owned = id.to_owned();
        let beat_stop = stop.clone();
        tasks.spawn(async move {
            let _held = alive;
            loop {
                tokio::select! {
                    () = beat_stop.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(250)) => {
                        if beat.expire(&id_owned) {
                            let _ = beat.commands.send(Command::Stop(id_owned.clone())).await;
                            break;
                        }
                        beat.heartbeat(&id_owned).await;
                    }
                }
            }
        });
        Some(Running { stop, ended })
    };
    for reg in registry.all() {
        if let Some(r) = start(&reg.id, false, &mut tasks).await {
            running.insert(reg.id, r);
        }
    }
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            cmd = rx.recv() => match cmd {
                None => break,
                Some(Command::Start { id, new, started }) => {
                    // Started again (its filters changed, or its end moved): the old tasks
                    // end first, so one consumer reads its group and the new filters hold
                    // from the first record read after.
                    if let Some(old) = running.remove(&id) {
                        old.end(registry.config.max_timeout + Duration::from_secs(5)).await;
                    }
                    if let Some(r) = start(&id, new, &mut tasks).await {
                        running.insert(id, r);
                        let _ = started.send(());
                    }
                }
                Some(Command::Stop(id)) => {
                    if let Some(r) = running.remove(&id) {
                        r.stop.cancel();
                    }
                    forget(&id);
                }
            },
        }
    }
    for r in running.values() {
        r.stop.cancel();
    }
    while tasks.join_next().await.is_some() {}
}
