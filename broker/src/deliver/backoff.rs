//! The retry policy of a subscription, a FHIR Subscription and a Notified Pull partner:
//! one [`RetryConfig`], its waits ([`RetryConfig::wait`]), and [`RetryConfig::with_defaults`]
//! for a section whose defaults differ, key by key. A leaf: it imports nothing of the broker.

use std::time::Duration;

use rand::Rng;
use serde::Deserialize;

/// `[subscriptions.retry]`: exponential backoff with jitter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// First wait after a failure: the first retry never comes sooner. Each later wait
    /// doubles, plus up to 25% jitter, never past `max`.
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    /// Longest wait between tries.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// After this long since the first try, the record goes to the dead letters.
    #[serde(with = "humantime_serde")]
    pub give_up_after: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(300),
            give_up_after: Duration::from_secs(24 * 3600),
        }
    }
}

/// A retry table as written: each key it leaves out is `None`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PartialRetry {
    #[serde(default, with = "humantime_serde")]
    initial: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    max: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    give_up_after: Option<Duration>,
}

impl RetryConfig {
    /// The wait before try number `attempt + 1`: exponential from `initial`, capped at `max`,
    /// with jitter upwards in [100%, 125%] (never past `max`) so retries of many records spread
    /// out. Never shorter than `initial`: the first retry never comes before the documented
    /// first wait.
    #[must_use]
    pub fn wait(&self, attempt: u32) -> Duration {
        let exp = self.initial.saturating_mul(
            1u32.checked_shl(attempt.saturating_sub(1).min(30))
                .unwrap_or(u32::MAX),
        );
        let capped = exp.min(self.max);
        capped
            .mul_f64(rand::rng().random_range(1.0..=1.25))
            .min(self.max)
            .max(self.initial)
    }

    /// Read a retry table whose own defaults are `defaults`, key by key: a table that
    /// names only `give_up_after` keeps the `initial` and `max` of `defaults` (the
    /// `deserialize_with` of a retry field whose defaults differ from [`RetryConfig`]'s).
    ///
    /// # Errors
    /// An unknown key or a bad duration.
    pub fn with_defaults<'de, D: serde::Deserializer<'de>>(
        d: D,
        defaults: RetryConfig,
    ) -> Result<RetryConfig, D::Error> {
        let p = PartialRetry::deserialize(d)?;
        Ok(RetryConfig {
            initial: p.initial.unwrap_or(defaults.initial),
            max: p.max.unwrap_or(defaults.max),
            give_up_after: p.give_up_after.unwrap_or(defaults.give_up_after),
        })
    }
}
