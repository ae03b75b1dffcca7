//! What a source tells the broker about itself while it runs.

/// Where a long-running source (SMTP listener, IMAP pickup) says whether it can do its work,
/// for the operator's health endpoint and metrics. A source that is down keeps trying.
pub trait SourceStatus: Send + Sync {
    /// `source` works: it is listening, or its peer answered.
    fn up(&self, source: &str);
    /// `source` cannot work now and keeps trying; `reason` names no patient data.
    fn down(&self, source: &str, reason: &str);
    /// A way in (`connector`: `smtp`, `imap`, `inbox`) refused a message or set it aside,
    /// for `reason`, a code from a closed set (e.g. `too_large`, `empty_body`). Nothing by
    /// default.
    fn refused(&self, connector: &str, reason: &'static str) {
        let _ = (connector, reason);
    }
}
