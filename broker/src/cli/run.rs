//! `ketenbus run`: the broker, until SIGINT or SIGTERM.

use std::path::Path;

use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, WithBus};
use crate::config::Settings;

/// Run the broker with the configuration at `config` (defaults without one) until SIGINT or
/// SIGTERM.
///
/// # Errors
/// The configuration is invalid, the log cannot be opened, or a task failed.
pub async fn run(config: Option<&Path>) -> anyhow::Result<()> {
    let settings = super::load(config)?;
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        stop.cancel();
    });
    let (bus, data_dir) = (
        settings.config.bus.clone(),
        settings.config.data_dir.clone(),
    );
    let max_body = settings.config.http.max_body.as_u64();
    let env = settings.env.clone();
    crate::bus::open(&bus, &data_dir, max_body, &env, Broker { settings, cancel }).await?
}

/// The broker, waiting for its engine.
struct Broker {
    settings: Settings,
    cancel: CancellationToken,
}

impl WithBus for Broker {
    type Output = anyhow::Result<()>;

    async fn with<B: Bus>(self, bus: B) -> anyhow::Result<()> {
        crate::runtime::run(self.settings, bus, self.cancel).await
    }
}
