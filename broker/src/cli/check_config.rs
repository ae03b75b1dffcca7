//! `ketenbus check-config`: validate a configuration file and print every problem with its
//! key path.

use std::path::Path;
use std::process::ExitCode;

use crate::config::{Config, Env};

/// Check the file at `config`: warnings and problems on stderr, a summary on stdout.
#[must_use]
pub fn run(config: &Path) -> ExitCode {
    let parsed = match Config::from_file(config) {
        Ok(c) => c,
        Err(p) => {
            eprintln!("{}: {p}", config.display());
            return ExitCode::FAILURE;
        }
    };
    for w in parsed.warnings() {
        eprintln!("{}: warning: {w}", config.display());
    }
    match parsed.validate(&Env::process()) {
        Ok(s) => {
            println!(
                "{}: ok ({} subscriptions, engine {:?})",
                config.display(),
                s.subscriptions.len(),
                s.config.bus.engine
            );
            ExitCode::SUCCESS
        }
        Err(problems) => {
            for p in &problems {
                eprintln!("{}: {p}", config.display());
            }
            eprintln!("{} problem(s)", problems.len());
            ExitCode::FAILURE
        }
    }
}
