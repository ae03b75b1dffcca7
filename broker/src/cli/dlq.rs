//! `ketenbus dlq`: list, replay and purge dead letters, each audited per dead letter before
//! it acts.

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
    /// Configuration file (TOML) naming the log.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Subscription name (`router` for messages that could not be normalised: list only).
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
    /// The validated settings, the subscription and the selection.
    fn resolve(self) -> anyhow::Result<(Settings, String, Selection)> {
        let settings = super::load(self.config.as_deref())?;
        let sel = Selection {
            ids: self.ids,
            since_ms: super::parse_since(self.since.as_deref())?,
            before_ms: None,
        };
        Ok((settings, self.subscription, sel))
    }
}

/// The `dlq` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// List dead letters of a subscription (or `router`) as JSON lines.
    List(#[command(flatten)] DlqSelection),
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
        DlqCommand::List(selection) => list(selection).await,
        DlqCommand::Replay { selection, all } => replay(selection, all).await,
        DlqCommand::Purge {
            selection,
            before,
            all,
        } => purge(selection, before, all).await,
    }
}

async fn list(selection: DlqSelection) -> anyhow::Result<()> {
    let (settings, subscription, sel) = selection.resolve()?;
    let (audit, actor) = super::operator_audit(&settings)?;
    let letters = with_bus(&settings, async |bus| bus.list(&subscription, &sel).await).await?;
    // No read without its audit record.
    if let Some(audit) = &audit {
        audit
            .append(dlq::audit_entries("dlq_list", &actor, letters.iter()))
            .await
            .context("writing the audit trail")?;
    }
    for dl in &letters {
        let line = serde_json::json!({
            "id": dl.id, "stage": dl.stage, "record_id": dl.record_id, "envelope_id": dl.envelope_id,
            "at_ms": dl.at_ms, "reason": dl.reason, "detail": dl.detail, "source_topic": dl.source_topic,
            "value_bytes": dl.value.len(),
        });
        println!("{line}");
    }
    eprintln!("{} dead letter(s)", letters.len());
    Ok(())
}

async fn replay(selection: DlqSelection, all: bool) -> anyhow::Result<()> {
    let (settings, subscription, sel) = selection.resolve()?;
    let (audit, actor) = super::operator_audit(&settings)?;
    if subscription == "router" {
        anyhow::bail!(
            "router dead letters cannot be replayed to a subscription; resend the message instead"
        );
    }
    if !settings
        .subscriptions
        .iter()
        .any(|s| s.name == subscription)
    {
        anyhow::bail!("no subscription named {subscription:?} in the configuration");
    }
    if sel.ids.is_empty() && sel.since_ms.is_none() && !all {
        anyhow::bail!("say which dead letters: --id, --since, or --all");
    }
    let n = with_bus(&settings, async |bus| {
        bus.replay(&subscription, &sel, audit.as_ref(), &actor)
            .await
    })
    .await?;
    eprintln!("replayed {n} dead letter(s) to subscription {subscription}");
    Ok(())
}

async fn purge(selection: DlqSelection, before: Option<String>, all: bool) -> anyhow::Result<()> {
    let (settings, stage, mut sel) = selection.resolve()?;
    sel.before_ms = super::parse_since(before.as_deref())?;
    if stage != "router" && !settings.subscriptions.iter().any(|s| s.name == stage) {
        anyhow::bail!("no subscription named {stage:?} in the configuration");
    }
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

/// The dead-letter operations, object-safe over both engines.
trait DlqOps {
    fn list<'a>(
        &'a self,
        stage: &'a str,
        sel: &'a Selection,
    ) -> BoxFuture<'a, anyhow::Result<Vec<DeadLetter>>>;
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
    ) -> BoxFuture<'a, anyhow::Result<Vec<DeadLetter>>> {
        Box::pin(async move { Ok(dlq::list(self, stage, sel).await?) })
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
