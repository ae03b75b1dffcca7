//! What every configuration section's check shares: the environment, read in one place
//! ([`Env`], made once by the command line and passed in), and the [`Problem`] a section
//! reports at its key path.

use std::sync::Arc;

/// The environment variables configuration reads (secrets named by `*_env` keys, the
/// audit key, the operator token, `HOME`). The command line makes one from the process
/// environment; tests make one from a closure, so none touches the process environment.
#[derive(Clone)]
pub struct Env {
    lookup: Arc<Lookup>,
}

/// How an [`Env`] answers: a variable's name in, its value out.
pub type Lookup = dyn Fn(&str) -> Option<String> + Send + Sync;

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Values may be secrets: never printed.
        f.write_str("Env(..)")
    }
}

impl Env {
    /// The process environment: the one place that reads it.
    #[must_use]
    pub fn process() -> Env {
        Env::from_fn(|name| std::env::var(name).ok())
    }

    /// An environment answering through `lookup`.
    #[must_use]
    pub fn from_fn(lookup: impl Fn(&str) -> Option<String> + Send + Sync + 'static) -> Env {
        Env {
            lookup: Arc::new(lookup),
        }
    }

    /// An environment without any variable.
    #[must_use]
    pub fn empty() -> Env {
        Env::from_fn(|_| None)
    }

    /// The value of variable `name`, if set (and valid Unicode).
    #[must_use]
    pub fn var(&self, name: &str) -> Option<String> {
        (self.lookup)(name)
    }

    /// The lookup as the connectors' configuration takes it.
    pub fn lookup(&self) -> &Lookup {
        &*self.lookup
    }
}

/// A configuration problem at a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Key path, e.g. `subscriptions[1].sink.url`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl Problem {
    /// The problem `message` at `path`.
    #[must_use]
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem {
            path: path.into(),
            message: message.into(),
        }
    }

    /// Problems given as (key below `prefix`, message), at their full key paths.
    #[must_use]
    pub fn under(prefix: &str, found: Vec<(String, String)>) -> Vec<Problem> {
        found
            .into_iter()
            .map(|(key, message)| Problem::new(format!("{prefix}.{key}"), message))
            .collect()
    }

    /// Problems given as (full key path, message).
    #[must_use]
    pub fn all(found: Vec<(String, String)>) -> Vec<Problem> {
        found
            .into_iter()
            .map(|(path, message)| Problem { path, message })
            .collect()
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A problem of the whole file (it cannot be read) has no key path.
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}
