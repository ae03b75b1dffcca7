//! `ketenbus dlq`: list, replay and purge dead letters, each audited per dead letter before
//! it acts. They work on an existing log only (never a new empty one), need no sink secrets
//! (none of them sends: a replay is delivered by the running broker), and refuse a
//! subscription the configuration does not name.

use std::path::PathBuf;

use anyhow::Context;
use ketenbus_connectors::BoxFuture;
use ketenbus_schemas::DeadLetter;

use crate::bus::{Bus, WithBus};
use crate::config::Settings;
use crate::deliver::dlq::{self, Purged, Selection};
use crate::observe::audit::Audit;

/// Which dead letters a `dlq` command works on.
#[derive(Debug, clap::Args)]
pub struct DlqSelection {
    /// Configuration file (TOML) naming the log. Without it: the defaults, so the log in
    /// ./data, which must exist.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Subscription name (`router` for messages that could not be normalised: list and purge
    /// only). A name the configuration does not have is an error that lists those it has.
    #[arg(long)]
    pub subscription: String,
    /// Only these dead-letter, record or message ids.
    #[arg(long = "id")]
    pub ids: Vec<String>,
    /// Only dead letters since this time (RFC 3339, e.g. 2026-11-24T08:00:00Z).
    #[arg(long)]
    pub since: Option<String>,
}

impl DlqSelection {
    /// The validated settings, the subscription and the selection. `router` is a stage
    /// when `router_ok`.
    fn resolve(self, router_ok: bool) -> anyhow::Result<(Settings, String, Selection)> {
        let settings = super::load_for_log(self.config.as_deref())?;
        known(&settings, &self.subscription, router_ok)?;
        let sel = Selection {
            ids: self.ids,
            since_ms: super::parse_since(self.since.as_deref())?,
            before_ms: None,
        };
        Ok((settings, self.subscription, sel))
    }
}

/// `name` is a configured subscription (or, when `router_ok`, `router`); else an error that
/// lists the names there are.
fn known(settings: &Settings, name: &str, router_ok: bool) -> anyhow::Result<()> {
    // Notified Pull's dead letters (pulls that failed) are listed and purged like the router's.
    let pull_stage =
        router_ok && name == crate::deliver::pull::STAGE && settings.config.notified_pull.is_some();
    // Subscriptions made through /fhir/Subscription, as `fhir-<id>`.
    let fhir = crate::deliver::backport::store::names(&settings.config.data_dir)
        .context("reading the FHIR subscriptions")?;
    if (router_ok && name == "router")
        || pull_stage
        || settings.subscriptions.iter().any(|s| s.name == name)
        || fhir.iter().any(|f| f == name)
    {
        return Ok(());
    }
    if name == "router" {
        anyhow::bail!(
            "router dead letters cannot be replayed to a subscription; resend the message instead"
        );
    }
    let mut names: Vec<&str> = settings
        .subscriptions
        .iter()
        .map(|s| s.name.as_str())
        .chain(fhir.iter().map(String::as_str))
        .collect();
    if router_ok {
        names.push("router");
    }
    if names.is_empty() {
        anyhow::bail!("no subscription named {name:?}: the configuration has no subscriptions");
    }
    anyhow::bail!(
        "no subscription named {name:?}; known: {}",
        names.join(", ")
    )
}

/// The `dlq` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// List dead letters of a subscription (or `router`) as JSON lines. A dead letter that was
    /// replayed and then delivered (or dead-lettered again under a new id) is resolved: listed
    /// only with --resolved, with its `resolved_at_ms`.
    List {
        #[command(flatten)]
        selection: DlqSelection,
        /// Also list resolved dead letters.
        #[arg(long)]
        resolved: bool,
    },
    /// Deliver dead letters of a subscription again (to that subscription only).
    Replay {
        #[command(flatten)]
        selection: DlqSelection,
        /// Replay every dead letter of the subscription (required when no --id or --since is given).
        #[arg(long)]
        all: bool,
    },
    /// Remove dead letters of a subscription (or `router`) from the log for good, writing an
    /// audit record (`dlq_purge`) for each first.
    Purge {
        #[command(flatten)]
        selection: DlqSelection,
        /// Only dead letters from before this time (RFC 3339, e.g. 2026-11-24T08:00:00Z).
        #[arg(long)]
        before: Option<String>,
        /// Purge every dead letter of the subscription (required when no --id or --before is given).
        #[arg(long)]
        all: bool,
    },
}

/// Run a `dlq` subcommand.
///
/// # Errors
/// The configuration, the operator check, the selection or the log fails.
pub async fn run(command: DlqCommand) -> anyhow::Result<()> {
    match command {
        DlqCommand::List {
            selection,
            resolved,
        } => list(selection, resolved).await,
        DlqCommand::Replay { selection, all } => replay(selection, all).await,
        DlqCommand::Purge {
            selection,
            before,
            all,
        } => purge(selection, before, all).await,
    }
}

async fn list(selection: DlqSelection, resolved: bool) -> anyhow::Result<()> {
    let (settings, subscription, sel) = selection.resolve(true)?;
    let (audit, actor) = super::operator_audit(&settings)?;
    let mut letters = with_bus(&settings, async |bus| bus.list(&subscription, &sel).await).await?;
    if !resolved {
        letters.retain(|(_, at)| at.is_none());
    }
    // No read without its audit record.
    if let Some(audit) = &audit {
        audit
            .append(dlq::audit_entries(
                "dlq_list",
                &actor,
                letters.iter().map(|(dl, _)| dl),
            ))
            .await
            .context("writing the audit trail")?;
    }
    for (dl, resolved_at) in &letters {
        let line = serde_json::json!({
            "id": dl.id, "stage": dl.stage, "record_id": dl.record_id, "envelope_id": dl.envelope_id,
            "at_ms": dl.at_ms, "attempt": dl.attempt, "reason": dl.reason, "detail": dl.detail,
            "source_topic": dl.source_topic, "value_bytes": dl.value.len(),
            "resolved_at_ms": resolved_at,
        });
        println!("{line}");
    }
    let n = letters.len();
    eprintln!(
        "{n} dead letter{} of {subscription}{}",
        if n == 1 { "" } else { "s" },
        if resolved {
            ", resolved ones included"
        } else {
            ""
        }
    );
    Ok(())
}

async fn replay(selection: DlqSelection, all: bool) -> anyhow::Result<()> {
    let (settings, subscription, sel) = selection.resolve(false)?;
    let (audit, actor) = super::operator_audit(&settings)?;
    if sel.ids.is_empty() && sel.since_ms.is_none() && !all {
        anyhow::bail!("say which dead letters: --id, --since, or --all");
    }
    let n = with_bus(&settings, async |bus| {
        bus.replay(&subscription, &sel, audit.as_ref(), &actor)
            .await
    })
    .await?;
    eprintln!(
        "replayed {n} dead letter{} to subscription {subscription}",
        if n == 1 { "" } else { "s" }
    );
    Ok(())
}

async fn purge(selection: DlqSelection, before: Option<String>, all: bool) -> anyhow::Result<()> {
    let (settings, stage, mut sel) = selection.resolve(true)?;
    sel.before_ms = super::parse_since(before.as_deref())?;
    if sel.ids.is_empty() && sel.before_ms.is_none() && !all {
        anyhow::bail!("say which dead letters: --id, --before, or --all");
    }
    let (audit, actor) = super::operator_audit(&settings)?;
    let purged = with_bus(&settings, async |bus| {
        bus.purge(&stage, &sel, audit.as_ref(), &actor).await
    })
    .await?;
    eprintln!(
        "purged {} dead letter(s) of {stage} (audited {})",
        purged.removed, purged.selected
    );
    if purged.removed < purged.selected as u64 {
        eprintln!(
            "{} kept: the kafka engine removes only a partition's oldest records",
            purged.selected as u64 - purged.removed
        );
    }
    Ok(())
}

async fn with_bus<T>(
    settings: &Settings,
    f: impl AsyncFnOnce(&dyn DlqOps) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let cfg = &settings.config;
    crate::bus::open(
        &cfg.bus,
        &cfg.data_dir,
        cfg.http.max_body.as_u64(),
        &settings.env,
        Ops(f),
    )
    .await?
}

/// A dead-letter command, waiting for its engine.
struct Ops<F>(F);

impl<T, F: AsyncFnOnce(&dyn DlqOps) -> anyhow::Result<T>> WithBus for Ops<F> {
    type Output = anyhow::Result<T>;

    async fn with<B: Bus>(self, bus: B) -> anyhow::Result<T> {
        (self.0)(&bus).await
    }
}

/// A dead letter and when it was resolved, if it was.
type Listed = (DeadLetter, Option<i64>);

/// The dead-letter operations, object-safe over both engines.
trait DlqOps {
    fn list<'a>(
        &'a self,
        stage: &'a str,
        sel: &'a Selection,
    ) -> BoxFuture<'a, anyhow::Result<Vec<Listed>>>;
    fn replay<'a>(
        &'a self,
        subscription: &'a str,
        sel: &'a Selection,
        audit: Option<&'a Audit>,
        actor: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<usize>>;
    fn purge<'a>(
        &'a self,
        stage: &'a str,
        sel: &'a Selection,
        audit: Option<&'a Audit>,
        actor: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<Purged>>;
}

impl<B: Bus> DlqOps for B {
    fn list<'a>(
        &'a self,
        stage: &'a str,
        sel: &'a Selection,
    ) -> BoxFuture<'a, anyhow::Result<Vec<Listed>>> {
        Box::pin(async move { Ok(dlq::list_with_resolved(self, stage, sel).await?) })
    }
    fn replay<'a>(
        &'a self,
        subscription: &'a str,
        sel: &'a Selection,
        audit: Option<&'a Audit>,
        actor: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<usize>> {
        Box::pin(async move { Ok(dlq::replay(self, subscription, sel, audit, actor).await?) })
    }
    fn purge<'a>(
        &'a self,
        stage: &'a str,
        sel: &'a Selection,
        audit: Option<&'a Audit>,
        actor: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<Purged>> {
        Box::pin(async move { Ok(dlq::purge(self, stage, sel, audit, actor).await?) })
    }
}
