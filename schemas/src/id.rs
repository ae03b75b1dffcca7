//! Ids and times every record carries: envelope ids (UUIDv7, time-ordered, assigned once at
//! ingest), event ids derived from them (`<envelope id>.<index>`, so a replay yields the same
//! ids) and wall-clock milliseconds.

/// A new envelope id: UUIDv7, time-ordered.
#[must_use]
pub fn new_envelope_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// The id of event number `index` of envelope `envelope_id`: `<envelope id>.<index>`.
#[must_use]
pub fn event_id(envelope_id: &str, index: i32) -> String {
    format!("{envelope_id}.{index}")
}

/// The envelope id of a record id: the part before `.<index>` for an event id (see
/// [`event_id`]), the id itself for an envelope's.
#[must_use]
pub fn envelope_of(record_id: &str) -> &str {
    match record_id.rsplit_once('.') {
        Some((env, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => env,
        _ => record_id,
    }
}

/// Milliseconds since the Unix epoch (0 for a clock before it).
#[must_use]
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_lead_back_to_their_envelope() {
        let env = new_envelope_id();
        assert_eq!(envelope_of(&event_id(&env, 3)), env);
        assert_eq!(envelope_of(&env), env);
        assert!(now_ms() > 1_700_000_000_000);
        assert_eq!(
            envelope_of("0193a1b2-0000-7000-8000-000000000001.3"),
            "0193a1b2-0000-7000-8000-000000000001"
        );
        assert_eq!(
            envelope_of("0193a1b2-0000-7000-8000-000000000001"),
            "0193a1b2-0000-7000-8000-000000000001"
        );
    }
}
