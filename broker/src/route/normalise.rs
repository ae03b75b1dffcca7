//! The normalisers this build has, and the one reading of an envelope's events that routing,
//! bounces and the raw-delivery audit share.

use std::collections::HashMap;

use ketenbus_connectors::{Normalise, NormaliseError};
use ketenbus_schemas::{Event, Format, RawEnvelope};

/// Normalisers by format; a format without one is recorded as `unsupported_format`.
pub type Normalisers = HashMap<Format, Box<dyn Normalise>>;

/// The normalisers this build has.
#[must_use]
pub fn normalisers() -> Normalisers {
    let mut n: Normalisers = HashMap::new();
    n.insert(
        Format::Edifact,
        Box::new(ketenbus_connectors::edifact::EdifactNormaliser),
    );
    n.insert(
        Format::FhirJson,
        Box::new(ketenbus_connectors::fhir::FhirNormaliser),
    );
    n.insert(
        Format::FhirXml,
        Box::new(ketenbus_connectors::fhir::FhirNormaliser),
    );
    n.insert(
        Format::Rfc822,
        Box::new(ketenbus_connectors::mail::MailNormaliser::default()),
    );
    n
}

/// The events of an envelope as the router publishes them: its format's normaliser, then one
/// event per transport receiver for events that name none ([`per_receiver`]). Pure, so
/// whoever reads an envelope again (a bounce, a raw delivery's audit) gets the same events.
///
/// # Errors
/// The normaliser's error, or `unsupported_format` for a format without one.
pub fn events_of(
    normalisers: &Normalisers,
    envelope: &RawEnvelope,
) -> Result<Vec<Event>, NormaliseError> {
    let normaliser =
        normalisers
            .get(&envelope.format)
            .ok_or(NormaliseError::UnsupportedFormat {
                format: envelope.format.as_str(),
            })?;
    normaliser
        .normalise(envelope)
        .map(|events| per_receiver(events, envelope))
}

/// One event per receiver for an event that names no receiver of its own (a letter), when
/// the transport names several (a mail to two recipients): a subscription filtered on any
/// one of them gets its copy. Pure, numbered over the whole message (`<envelope>.<n>`), so
/// normalising again (a replay, a bounce) gives the same ids.
pub(crate) fn per_receiver(events: Vec<Event>, envelope: &RawEnvelope) -> Vec<Event> {
    let receivers = ketenbus_connectors::party::transport_receivers(envelope);
    if receivers.len() < 2 || events.iter().all(|e| e.header().receiver.is_some()) {
        return events;
    }
    let mut out = Vec::with_capacity(events.len() * receivers.len());
    for event in events {
        if event.header().receiver.is_some() {
            out.push(event);
            continue;
        }
        for r in &receivers {
            let mut copy = event.clone();
            copy.header_mut().receiver = Some(r.clone());
            out.push(copy);
        }
    }
    for (i, e) in out.iter_mut().enumerate() {
        let h = e.header_mut();
        h.index = i32::try_from(i).unwrap_or(i32::MAX);
        h.id = format!("{}.{i}", envelope.id);
    }
    out
}
