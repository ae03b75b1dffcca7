//! The `[bus]` section, and the one place that chooses the engine it names: [`open`].

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::embedded::{EmbeddedBus, EmbeddedConfig};
use super::kafka::{KafkaBus, KafkaConfig, RECORD_OVERHEAD};
use super::{Bus, BusError};
use crate::env::Env;

/// Which engine holds the topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// SQLite in the data directory; no extra process.
    Embedded,
    /// A Kafka-protocol cluster.
    Kafka,
}

/// `[bus]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusConfig {
    /// `embedded` (default) or `kafka`.
    pub engine: Engine,
    /// Partitions of topics ketenbus creates; by default 1 on the embedded engine and 8 on
    /// Kafka ([`BusConfig::partitions`]).
    pub partitions: Option<u32>,
    /// Settings of the embedded engine.
    pub embedded: EmbeddedConfig,
    /// Settings of the Kafka engine; required when `engine = "kafka"`.
    pub kafka: Option<KafkaConfig>,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            engine: Engine::Embedded,
            partitions: None,
            embedded: EmbeddedConfig::default(),
            kafka: None,
        }
    }
}

/// Partitions of a topic on the embedded engine when `bus.partitions` is not set. One
/// process reads every partition there, so more give no parallelism; each commit rewrites the
/// last index page of every partition it appends to, so they cost throughput. Measured with
/// `ketenbus-bench --count 30000` in alternating pairs: 3,997 and 3,861 msg/s end to end with
/// 1 partition against 3,207 and 3,034 with 8; publish only 6,616 against 5,425.
const EMBEDDED_PARTITIONS: u32 = 1;

/// Partitions of a topic on Kafka when `bus.partitions` is not set: room for that many nodes
/// to share a consumer group.
const KAFKA_PARTITIONS: u32 = 8;

impl BusConfig {
    /// Partitions of the topics ketenbus creates: `bus.partitions`, else the engine's
    /// default. Topics that exist keep theirs.
    #[must_use]
    pub fn partitions(&self) -> u32 {
        self.partitions.unwrap_or(match self.engine {
            Engine::Embedded => EMBEDDED_PARTITIONS,
            Engine::Kafka => KAFKA_PARTITIONS,
        })
    }

    /// How often the retention task runs the engine's retention
    /// (`bus.embedded.retention_interval`).
    #[must_use]
    pub fn retention_interval(&self) -> Duration {
        self.embedded.retention_interval
    }
}

/// What runs on the engine the configuration names: [`open`] hands it the engine, whichever
/// it is (`Bus` has generic methods, so it cannot be a trait object).
pub trait WithBus {
    /// What running on the engine gives.
    type Output;

    /// Run on `bus`.
    fn with<B: Bus>(self, bus: B) -> impl Future<Output = Self::Output>;
}

/// Open the engine `config` names and hand it to `user`: the one place that chooses the
/// engine. The embedded log lives in `data_dir`; `max_message_bytes` is the largest message
/// a listener takes (`http.max_body`), which every record of the engine must fit with the
/// envelope around it.
///
/// # Errors
/// The engine cannot be opened, or `bus.kafka` is missing for the Kafka engine.
pub async fn open<U: WithBus>(
    config: &BusConfig,
    data_dir: &Path,
    max_message_bytes: u64,
    env: &Env,
    user: U,
) -> Result<U::Output, BusError> {
    match config.engine {
        Engine::Embedded => {
            let bus = EmbeddedBus::open(data_dir, &config.embedded)?;
            Ok(user.with(bus).await)
        }
        Engine::Kafka => {
            let mut kafka = config
                .kafka
                .clone()
                .ok_or_else(|| BusError::Fatal("bus.kafka is required".to_owned()))?;
            kafka.max_record_bytes = max_message_bytes + RECORD_OVERHEAD;
            kafka.resolve(env);
            let bus = KafkaBus::new(&kafka)?;
            Ok(user.with(bus).await)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_default_by_engine_and_a_setting_wins() {
        let embedded = BusConfig::default();
        assert_eq!(embedded.partitions(), 1, "one process reads them all");
        let kafka = BusConfig {
            engine: Engine::Kafka,
            ..BusConfig::default()
        };
        assert_eq!(kafka.partitions(), 8, "room for nodes to share the work");
        for engine in [Engine::Embedded, Engine::Kafka] {
            let set = BusConfig {
                engine,
                partitions: Some(3),
                ..BusConfig::default()
            };
            assert_eq!(set.partitions(), 3);
        }
    }
}
