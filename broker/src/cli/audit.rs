//! `ketenbus audit`: verify the audit trail's keyed hash chain, export its records.

use std::path::Path;
use std::process::ExitCode;

use crate::observe::audit::{Verified, export, path_in, verify};

/// Check the keyed hash chain; names the first broken record and fails.
///
/// # Errors
/// The configuration, the operator check, the key or the trail cannot be read.
pub fn verify_trail(config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let settings = super::load(config)?;
    let _operator = super::operator(&settings)?;
    let path = path_in(&settings.config.data_dir);
    match verify(&path, &super::audit_key(&settings)?)? {
        Verified::Intact { records, last_hash } => {
            println!(
                "{}: intact, {records} record(s), last hash {last_hash}",
                path.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Verified::Broken { line, reason } => {
            eprintln!("{}: broken at record {line}: {reason}", path.display());
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Write the records at or after `since` (RFC 3339) as JSON lines to standard output.
///
/// # Errors
/// The configuration, the operator check, the time or the trail cannot be read.
pub fn export_since(config: Option<&Path>, since: &str) -> anyhow::Result<()> {
    let settings = super::load(config)?;
    let _operator = super::operator(&settings)?;
    let path = path_in(&settings.config.data_dir);
    let since_ms = super::parse_since(Some(since))?.unwrap_or(0);
    let mut out = std::io::stdout().lock();
    let n = export(&path, since_ms, &mut out)?;
    eprintln!("{n} audit record(s)");
    Ok(())
}
