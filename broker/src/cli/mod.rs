//! The subcommands of the `ketenbus` command line, one file each, with what they share:
//! loading the configuration, the operator check and the audit trail of operator actions.
//! `main.rs` only parses arguments and calls them.

pub mod address;
pub mod audit;
pub mod check_config;
pub mod consent;
pub mod dlq;
pub mod inspect;
pub mod run;
pub mod status;
pub mod token;

use std::path::Path;

use anyhow::Context;

use crate::config::{Config, Env, Settings};
use crate::observe::audit::{Audit, AuditKey};

/// Load and validate, printing every problem.
///
/// # Errors
/// The file cannot be read or parsed, or the configuration has problems (all listed).
pub fn load(path: Option<&Path>) -> anyhow::Result<Settings> {
    let config = match path {
        Some(p) => Config::from_file(p).map_err(invalid(path))?,
        None => Config::default(),
    };
    config.validate(&Env::process()).map_err(invalid(path))
}

/// Every problem of the configuration at `path`, one per line, as one error.
fn invalid(path: Option<&Path>) -> impl Fn(Vec<crate::config::Problem>) -> anyhow::Error + '_ {
    move |problems| {
        let list: Vec<String> = problems.iter().map(|p| format!("  {p}")).collect();
        let file = path.map_or_else(String::new, |p| format!(" {}", p.display()));
        anyhow::anyhow!("invalid configuration{file}:\n{}", list.join("\n"))
    }
}

/// The configuration without the secrets of sinks and mail sources, for commands that read
/// the log and send nothing (`dlq`, `status`): on a data directory (and, on the embedded engine, a log) that
/// exists, never a new empty one.
///
/// # Errors
/// The file cannot be read, the data directory or log is not there, or the configuration
/// has problems (all listed).
pub fn load_for_log(config: Option<&Path>) -> anyhow::Result<Settings> {
    let cfg = match config {
        Some(p) => crate::config::Config::from_file(p).map_err(invalid(config))?,
        None => crate::config::Config::default(),
    };
    // What sinks send with and what mail sources log in with: none of it reads the log.
    let secrets: std::collections::BTreeSet<String> = cfg
        .subscriptions
        .iter()
        .flat_map(|s| s.sink.secret_vars())
        .chain(cfg.mail.imap.iter().map(|i| i.password_env.as_str()))
        .chain(
            cfg.mail
                .smtp
                .iter()
                .filter_map(|s| s.auth.as_ref())
                .flat_map(|a| a.users.iter().map(|u| u.password_env.as_str())),
        )
        .map(str::to_owned)
        .collect();
    let process = crate::config::Env::process();
    // A secret this command does not have stands in as unused: it never sends.
    let env = crate::config::Env::from_fn(move |name| {
        let value = process.var(name);
        if secrets.contains(name) && value.as_deref().is_none_or(str::is_empty) {
            return Some("unused-by-this-command".to_owned());
        }
        value
    });
    let log = (cfg.bus.engine == crate::bus::Engine::Embedded)
        .then(|| cfg.data_dir.join(&cfg.bus.embedded.file));
    let given = config.map_or_else(
        || "no --config given, so the default ./data".to_owned(),
        |p| format!("as {} says", p.display()),
    );
    if !cfg.data_dir.is_dir() {
        anyhow::bail!(
            "no data directory at {} ({given}): give --config with the broker's configuration file",
            cfg.data_dir.display()
        );
    }
    if let Some(log) = log.filter(|l| !l.is_file()) {
        anyhow::bail!(
            "no log at {} ({given}): give --config with the broker's configuration file",
            log.display()
        );
    }
    cfg.validate(&env).map_err(invalid(config))
}

/// An RFC 3339 time given on the command line, as milliseconds since the epoch.
///
/// # Errors
/// Not an RFC 3339 time, or before 1970.
pub fn parse_since(since: Option<&str>) -> anyhow::Result<Option<i64>> {
    since
        .map(|s| {
            let t = humantime::parse_rfc3339_weak(s)
                .with_context(|| format!("--since {s:?} is not an RFC 3339 time"))?;
            let ms = t
                .duration_since(std::time::UNIX_EPOCH)
                .context("--since before 1970")?
                .as_millis();
            Ok(i64::try_from(ms)?)
        })
        .transpose()
}

/// When `[[operators]]` are configured, the operator whose token is in
/// KETENBUS_OPERATOR_TOKEN, or an error; `None` when none are configured.
///
/// # Errors
/// Operators are configured and the token is missing or names none of them.
pub fn operator(settings: &Settings) -> anyhow::Result<Option<String>> {
    let auth =
        crate::http::auth::Authenticator::new(&settings.config.senders, &settings.config.operators);
    let token = settings.env.var("KETENBUS_OPERATOR_TOKEN");
    auth.operator_token(token.as_deref())
        .map(|p| p.map(|p| p.name.clone()))
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// The audit key as the configuration names it (also when `[audit] enabled = false`, to
/// check an older trail).
///
/// # Errors
/// The key cannot be read.
pub fn audit_key(settings: &Settings) -> anyhow::Result<AuditKey> {
    let cfg = &settings.config;
    cfg.audit
        .key(&cfg.data_dir, &settings.env)
        .map_err(|(k, m)| anyhow::anyhow!("audit.{k}: {m}"))
}

/// The operator running a command (checked against the configured operators) as the audit
/// trail names it, and the trail its records go to (none when the audit is off).
///
/// # Errors
/// The operator check fails, or the trail cannot be opened.
pub fn operator_audit(settings: &Settings) -> anyhow::Result<(Option<Audit>, String)> {
    let operator = operator(settings)?;
    let audit = if settings.config.audit.enabled {
        Some(
            Audit::open(&settings.config.data_dir, audit_key(settings)?)
                .context("opening the audit trail")?,
        )
    } else {
        None
    };
    let actor = operator.map_or_else(|| "anonymous".to_owned(), |o| format!("operator:{o}"));
    Ok((audit, actor))
}
