//! `ketenbus address resolve`: what a record for a party would be sent to, and why.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use ketenbus_connectors::address_book::{Channel, Source};

/// Print, for each channel asked (all three without one), the address a record whose
/// receiver is `party` would be sent to: from `[address_book]` (an override, which wins) or
/// from which `[[mcsd]]` replica through which resources, and every endpoint passed over with
/// why (status, period, FHIR version, kind). Reads the replicas in the data dir as
/// `ketenbus run` left them (the data dir must exist); asks no directory and needs none of
/// the sinks' secrets.
///
/// # Errors
/// The configuration is invalid or a replica cannot be read.
pub fn resolve(
    config: Option<&Path>,
    party: &str,
    channel: Option<Channel>,
) -> anyhow::Result<ExitCode> {
    let settings = super::load_for_log(config)?;
    for r in &settings.replicas {
        r.load()
            .with_context(|| format!("reading the replica of mcsd {}", r.name()))?;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let channels = channel.map_or_else(
        || vec![Channel::Fhir, Channel::Webhook, Channel::Mail],
        |c| vec![c],
    );
    let mut found_any = false;
    for c in channels {
        let over = settings.config.address_book.address(party, c);
        let explained: Vec<_> = settings
            .replicas
            .iter()
            .map(|r| (r.name().to_owned(), r.len(), r.explain(party, c, now)))
            .collect();
        let chosen = over.map(|a| (a.to_owned(), Source::Override)).or_else(|| {
            explained.iter().find_map(|(_, _, e)| {
                e.chosen
                    .as_ref()
                    .map(|r| (r.address.clone(), r.source.clone()))
            })
        });
        match &chosen {
            Some((address, source)) => {
                found_any = true;
                println!("{}: {address}", c.key());
                println!("  from: {source}");
            }
            None => println!("{}: nothing fits", c.key()),
        }
        for (name, len, e) in &explained {
            if len == &0 {
                println!("  mcsd {name}: the replica is empty (has `ketenbus run` synced it?)");
            }
            if over.is_some()
                && let Some(r) = &e.chosen
            {
                println!("  overridden: {} ({})", r.address, r.source);
            }
            for s in &e.skipped {
                println!("  skipped in mcsd {name}: {s}");
            }
        }
    }
    Ok(if found_any {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
