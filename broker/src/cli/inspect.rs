//! `ketenbus inspect`: a file as ketenbus reads it (parsed message and the events it makes)
//! as JSON, without touching the log.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use ketenbus_schemas::Format;

use crate::route::inspect::{inspect, sniff};
use crate::route::normalise::normalisers;

/// Print `file` as JSON; fails with the error position when it does not parse.
///
/// # Errors
/// The file cannot be read, or its format is unknown.
pub fn run(file: &Path, format: Option<&str>) -> anyhow::Result<ExitCode> {
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
            println!("{}", serde_json::to_string_pretty(&json)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{}: {e}", file.display());
            Ok(ExitCode::FAILURE)
        }
    }
}
