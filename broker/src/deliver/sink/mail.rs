//! The `mail` sink: secure mail through an SMTP submission server. Its settings are the
//! connector's own ([`MailSinkConfig`]); here they are checked and the sink built.

use std::sync::Arc;

use ketenbus_connectors::mail::{MailSink, MailSinkConfig};

use super::{BuildError, BuildSink, Found, Secret, Sink, SinkConfigure, SinkContext};

/// A validated mail sink: its password read.
#[derive(Debug, Clone)]
pub struct Mail {
    /// The sink's settings.
    pub config: MailSinkConfig,
    /// Submission password (never printed).
    pub password: Option<Secret>,
}

impl SinkConfigure for MailSinkConfig {
    fn has_fixed_destination(&self) -> bool {
        self.to.is_some()
    }

    fn check(&self, found: &mut Found<'_>) -> Option<Sink> {
        found.extend(self.problems(found.book(), found.env().lookup()));
        let password = self
            .password_env
            .as_ref()
            .and_then(|v| found.env().var(v))
            .map(|v| Secret(v.into_bytes()));
        Some(Sink::new(Mail {
            config: self.clone(),
            password,
        }))
    }
}

impl BuildSink for Mail {
    fn build(&self, ctx: &SinkContext) -> Result<Arc<dyn ketenbus_connectors::Sink>, BuildError> {
        let s = MailSink::new(
            self.config.clone(),
            self.password.as_ref().map(Secret::text),
            Arc::clone(&ctx.book),
            Some(Arc::clone(&ctx.content)),
        )
        .map_err(BuildError::Mail)?
        .with_report_key(ctx.report_key.clone());
        Ok(Arc::new(s))
    }

    fn gets_delivery_reports(&self) -> bool {
        true
    }
}
