//! Record values as the log keeps them: LZ4-compressed where that saves space, as given
//! otherwise, with the codec in each row (`records.codec`).
//!
//! Much of what the embedded log costs is what it writes: a commit is one fsync of the WAL
//! frames it wrote, and every page a commit touches is written whole, once to the WAL and
//! once more when it is checkpointed into the database. A 2 KB MEDLAB
//! interchange became an 8.4 KB lab-result event (its zib fields, with names and codes
//! repeated per result), so one message wrote about 20 KB of WAL. Normalised events and
//! EDIFACT are text-like and repetitive; LZ4 shrinks them several times over at a cost of
//! microseconds, on the publisher's thread rather than the writer's. Consumers at the head
//! of a partition take values from memory as they were published, so only reads from the
//! log itself decompress. On the Kafka engine values stay as published: Kafka users read
//! the topics with their own clients.

use rusqlite::types::Type;

/// `records.codec` of a value stored as given.
pub(super) const PLAIN: i64 = 0;
/// `records.codec` of a value stored as an LZ4 block after its length (4 bytes, little
/// endian): `lz4_flex::compress_prepend_size`.
pub(super) const LZ4: i64 = 1;

/// Values shorter than this are stored as given: a lineage record (about 180 bytes) does
/// not shrink.
const PACK_FROM: usize = 512;

/// The most a value may take to be packed inline; a larger one is packed on a blocking
/// thread (see [`pack_all`]).
pub(super) const PACK_INLINE: usize = 256 * 1024;

/// LZ4 never expands more than about 255 times: a stored length past that is corruption.
const MAX_RATIO: usize = 255;

/// The value to store in place of `value` (codec [`LZ4`]) when that saves at least an
/// eighth of it; `None`: store `value` itself (codec [`PLAIN`]).
#[must_use]
pub(super) fn pack(value: &[u8]) -> Option<Vec<u8>> {
    if value.len() < PACK_FROM {
        return None;
    }
    let packed = lz4_flex::compress_prepend_size(value);
    (packed.len() <= value.len() - value.len() / 8).then_some(packed)
}

/// [`pack`] for each value, in order.
#[must_use]
pub(super) fn pack_all<'a>(values: impl Iterator<Item = &'a [u8]>) -> Vec<Option<Vec<u8>>> {
    values.map(pack).collect()
}

/// The value a row stores as `stored` with `codec`. Column `column` names it in the error.
///
/// # Errors
/// An unknown codec, or an LZ4 block that does not decode to the length it declares.
pub(super) fn unpack(codec: i64, stored: Vec<u8>, column: usize) -> rusqlite::Result<Vec<u8>> {
    let fail =
        |why: String| rusqlite::Error::FromSqlConversionFailure(column, Type::Blob, why.into());
    match codec {
        PLAIN => Ok(stored),
        LZ4 => {
            let (len, block) = lz4_flex::block::uncompressed_size(&stored)
                .map_err(|e| fail(format!("LZ4 value: {e}")))?;
            if len > block.len().saturating_mul(MAX_RATIO).saturating_add(16) {
                return Err(fail(format!(
                    "LZ4 value declares {len} bytes from {} stored",
                    block.len()
                )));
            }
            let mut out = vec![0; len];
            let n = lz4_flex::block::decompress_into(block, &mut out)
                .map_err(|e| fail(format!("LZ4 value: {e}")))?;
            if n != len {
                return Err(fail(format!("LZ4 value: {n} bytes of {len} declared")));
            }
            Ok(out)
        }
        other => Err(fail(format!("unknown value codec {other}"))),
    }
}

/// The value of a row that selected it as column `value` and its codec as column `codec`.
///
/// # Errors
/// As [`unpack`], or when a column is missing or of another type.
pub(super) fn read(
    row: &rusqlite::Row<'_>,
    value: usize,
    codec: usize,
) -> rusqlite::Result<Vec<u8>> {
    unpack(row.get(codec)?, row.get(value)?, value)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// `len` bytes that do not repeat (a xorshift stream from `seed`): LZ4 would only add its
    /// framing, so the log stores them as given.
    pub(in crate::bus::embedded) fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = 0x9E37_79B9_7F4A_7C15_u64 ^ seed;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[0]
            })
            .collect()
    }

    /// Something like a normalised event: repeated names and codes.
    fn eventish(len: usize) -> Vec<u8> {
        b"result-1 urn:ketenbus:local:500001234 Kreatinine umol/l specimen-1 CHEMIE "
            .iter()
            .copied()
            .cycle()
            .take(len)
            .collect()
    }

    #[test]
    fn a_repetitive_value_is_stored_smaller_and_read_back_the_same() {
        let value = eventish(8448);
        let packed = pack(&value).expect("an event-like value shrinks");
        assert!(packed.len() < value.len() / 4, "{} bytes", packed.len());
        assert_eq!(unpack(LZ4, packed, 2).unwrap(), value);
    }

    #[test]
    fn short_or_incompressible_values_are_stored_as_given() {
        assert!(pack(&eventish(PACK_FROM - 1)).is_none());
        let noise = noise(4096, 1);
        assert!(pack(&noise).is_none());
        assert_eq!(unpack(PLAIN, noise.clone(), 2).unwrap(), noise);
    }

    #[test]
    fn a_damaged_or_unknown_value_is_an_error_not_a_panic_or_a_huge_allocation() {
        let mut packed = pack(&eventish(8448)).unwrap();
        // A length of 4 GiB declared for a few hundred stored bytes.
        packed[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(unpack(LZ4, packed.clone(), 2).is_err());
        // A block cut short.
        let mut cut = pack(&eventish(8448)).unwrap();
        cut.truncate(cut.len() / 2);
        assert!(unpack(LZ4, cut, 2).is_err());
        assert!(unpack(LZ4, vec![1, 2], 2).is_err());
        assert!(unpack(7, b"v".to_vec(), 2).is_err());
    }
}
