//! `ketenbus inspect`: a file as ketenbus reads it (parsed message and the events it makes)
//! as JSON, without touching the log; with `--coverage`, which of its elements the events
//! carry.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use ketenbus_schemas::Format;

use crate::route::inspect::{inspect, sniff};
use crate::route::normalise::normalisers;

/// Print `file` as JSON, or with `coverage` (`Some(json)`) its field-coverage report as text
/// or JSON; fails with the error position when it does not parse.
///
/// # Errors
/// The file cannot be read, or its format is unknown, or has no coverage report (mail).
pub fn run(file: &Path, format: Option<&str>, coverage: Option<bool>) -> anyhow::Result<ExitCode> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let format = match format {
        Some(f) => Format::ALL
            .into_iter()
            .find(|x| x.as_str() == f)
            .context("unknown format")?,
        None => sniff(&bytes)
            .with_context(|| format!("{}: format not recognised; give --format", file.display()))?,
    };
    match inspect(&bytes, format, &normalisers()) {
        Ok(json) => {
            match coverage {
                None => println!("{}", serde_json::to_string_pretty(&json)?),
                Some(as_json) => {
                    let report = crate::route::coverage::coverage(&json)
                        .map_err(anyhow::Error::msg)
                        .with_context(|| file.display().to_string())?;
                    if as_json {
                        println!("{}", serde_json::to_string_pretty(&report)?);
                    } else {
                        print!("{}", crate::route::coverage::render(&report));
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{}: {e}", file.display());
            Ok(ExitCode::FAILURE)
        }
    }
}
