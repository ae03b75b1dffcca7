//! `ketenbus inspect`: a file as ketenbus reads it (parsed message and the events it makes)
//! as JSON, without touching the log; with `--coverage`, which of its elements the events
//! carry.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use ketenbus_schemas::Format;

use crate::route::inspect::{inspect, sniff};
use crate::route::normalise::normalisers;

/// Print `file` as JSON, or with `coverage` (`Some(json)`) its field-coverage report as text
/// or JSON. Fails with the error position when it does not parse, and with the reason when
/// the router would reject it (after printing what it read). A reader that stops reading
/// (`| head`) ends the output quietly.
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
    let json = match inspect(&bytes, format, &normalisers()) {
        Ok(json) => json,
        Err(e) => {
            eprintln!("{}: {e}", file.display());
            return Ok(ExitCode::FAILURE);
        }
    };
    let text = match coverage {
        None => format!("{}\n", serde_json::to_string_pretty(&json)?),
        Some(as_json) => {
            let report = crate::route::coverage::coverage(&json)
                .map_err(anyhow::Error::msg)
                .with_context(|| file.display().to_string())?;
            if as_json {
                format!("{}\n", serde_json::to_string_pretty(&report)?)
            } else {
                crate::route::coverage::render(&report)
            }
        }
    };
    print_quietly(&text)?;
    if let Some(rejected) = json.get("rejected") {
        eprintln!(
            "{}: the router would reject it: {} ({})",
            file.display(),
            rejected["reason"].as_str().unwrap_or("rejected"),
            rejected["error"].as_str().unwrap_or("")
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Write `text` to stdout; a closed pipe (the reader has what it wanted) is no error.
///
/// # Errors
/// Any other write error.
pub fn print_quietly(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}
