//! `ketenbus consent`: consent registry helpers.

use std::path::Path;

use anyhow::Context;
use ketenbus_schemas::event::{Identifier, systems};

/// Print the patient pseudonym (patient key) of a BSN, the value the consent file's
/// `patient` column holds, reading the patient-key secret as `ketenbus run` does.
///
/// # Errors
/// The configuration is invalid or the secret cannot be read.
pub fn pseudonym(config: Option<&Path>, bsn: &str) -> anyhow::Result<()> {
    let settings = super::load(config)?;
    let cfg = &settings.config;
    let keyer = cfg
        .keys
        .keyer(&cfg.data_dir, &settings.env)
        .context("loading the patient-key secret")?;
    let id = Identifier {
        system: systems::BSN.into(),
        value: bsn.trim().to_owned(),
    };
    println!("{}", keyer.key_of(&id));
    Ok(())
}
