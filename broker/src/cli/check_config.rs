//! `ketenbus check-config`: validate a configuration file and print every problem with its
//! key path.

use std::path::Path;
use std::process::ExitCode;

use crate::config::{Config, Env, Problem};

/// Check the file at `config`: warnings and problems on stderr, a summary on stdout.
#[must_use]
pub fn run(config: &Path) -> ExitCode {
    let problems = match Config::from_file(config) {
        Ok(parsed) => {
            for w in parsed.warnings() {
                eprintln!("{}: warning: {w}", config.display());
            }
            match parsed.validate(&Env::process()) {
                Ok(s) => {
                    println!(
                        "{}: ok ({}, engine {:?})",
                        config.display(),
                        counted(s.subscriptions.len(), "subscription"),
                        s.config.bus.engine
                    );
                    return ExitCode::SUCCESS;
                }
                Err(problems) => problems,
            }
        }
        Err(problems) => problems,
    };
    report(config, &problems);
    ExitCode::FAILURE
}

/// Each problem on its own line after the file's name, then how many.
fn report(config: &Path, problems: &[Problem]) {
    for p in problems {
        eprintln!("{}: {p}", config.display());
    }
    eprintln!("{}", counted(problems.len(), "problem"));
}

/// `1 subscription`, `2 subscriptions`, `0 subscriptions`.
#[must_use]
pub fn counted(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}
