//! `ketenbus run`: the broker, until SIGINT or SIGTERM.

use std::path::Path;

use tokio_util::sync::CancellationToken;

use crate::bus::embedded::EmbeddedBus;
use crate::config::Engine;

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
    match settings.config.bus.engine {
        Engine::Embedded => {
            let bus = EmbeddedBus::open(&settings.config.data_dir, &settings.config.bus.embedded)?;
            crate::runtime::run(settings, bus, cancel).await
        }
        Engine::Kafka => {
            let bus = super::kafka_bus(&settings)?;
            crate::runtime::run(settings, bus, cancel).await
        }
    }
}
