//! The on-disk record of the embedded engine.
//!
//! A key's record is a fixed header followed by the value bytes:
//! `format (1) | version (8) | revision (8) | created_at_us (8) | updated_at_us (8) | value`,
//! integers little-endian. The format byte lets a later release change the
//! layout and still read old records.

use crate::error::{StoreError, StoreResult};

const FORMAT_V1: u8 = 1;
pub(crate) const HEADER_LEN: usize = 1 + 8 * 4;

/// The metadata of a stored record, without its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecordMeta {
    pub version: u64,
    pub revision: u64,
    pub created_at_us: i64,
    pub updated_at_us: i64,
}

pub(crate) fn encode(meta: &RecordMeta, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + value.len());
    out.push(FORMAT_V1);
    out.extend_from_slice(&meta.version.to_le_bytes());
    out.extend_from_slice(&meta.revision.to_le_bytes());
    out.extend_from_slice(&meta.created_at_us.to_le_bytes());
    out.extend_from_slice(&meta.updated_at_us.to_le_bytes());
    out.extend_from_slice(value);
    out
}

/// Splits a record into its metadata and value bytes.
pub(crate) fn decode(record: &[u8]) -> StoreResult<(RecordMeta, &[u8])> {
    let (header, value) = record
        .split_at_checked(HEADER_LEN)
        .ok_or_else(|| corrupt("record shorter than its header"))?;
    let (format, rest) = header
        .split_first()
        .ok_or_else(|| corrupt("empty record"))?;
    if *format != FORMAT_V1 {
        return Err(corrupt(&format!("unknown record format {format}")));
    }
    let word = |i: usize| -> [u8; 8] {
        let mut buf = [0u8; 8];
        buf.copy_from_slice(&rest[i * 8..i * 8 + 8]);
        buf
    };
    let meta = RecordMeta {
        version: u64::from_le_bytes(word(0)),
        revision: u64::from_le_bytes(word(1)),
        created_at_us: i64::from_le_bytes(word(2)),
        updated_at_us: i64::from_le_bytes(word(3)),
    };
    Ok((meta, value))
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("a record that does not decode: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let meta = RecordMeta {
            version: 7,
            revision: u64::MAX,
            created_at_us: -1,
            updated_at_us: 1_764_000_000_000_000,
        };
        let record = encode(&meta, b"hello");
        let (back, value) = decode(&record).unwrap();
        assert_eq!(back, meta);
        assert_eq!(value, b"hello");
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        assert!(decode(&[FORMAT_V1; 10]).is_err());
        let mut record = encode(
            &RecordMeta {
                version: 1,
                revision: 1,
                created_at_us: 0,
                updated_at_us: 0,
            },
            b"",
        );
        assert_eq!(decode(&record).unwrap().1, b"");
        record[0] = 9;
        assert!(decode(&record).is_err());
    }
}
