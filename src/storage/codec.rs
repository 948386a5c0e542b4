//! The on-disk record of the embedded engine.
//!
//! A key's record is a fixed header followed by the value bytes:
//! `format (1) | version (8) | revision (8) | created_at_us (8) | updated_at_us (8) | value`,
//! integers little-endian. Format 2 inserts `flags (1) | expires_at_us (8,
//! if flags & 1) | lease (8, if flags & 2)` before the value, for keys that
//! expire; a key without a deadline is still written in format 1, so the
//! common record is as small as before. The format byte lets a later release
//! change the layout and still read old records.

use crate::error::{StoreError, StoreResult};
use crate::storage::LeaseId;
use crate::storage::rules::KeyMeta;

const FORMAT_V1: u8 = 1;
const FORMAT_V2: u8 = 2;
const HAS_DEADLINE: u8 = 1;
const HAS_LEASE: u8 = 2;
const V1_HEADER_LEN: usize = 1 + 8 * 4;

/// The metadata of a stored record, without its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecordMeta {
    pub version: u64,
    pub revision: u64,
    pub created_at_us: i64,
    pub updated_at_us: i64,
    /// The key's own deadline (a key on a lease has none: it has the lease's).
    pub expires_at_us: Option<i64>,
    pub lease: Option<LeaseId>,
}

impl RecordMeta {
    /// The record of a key whose metadata the rules decided, written at `revision`.
    pub(crate) fn new(meta: KeyMeta, revision: u64) -> Self {
        RecordMeta {
            version: meta.version,
            revision,
            created_at_us: meta.created_at_us,
            updated_at_us: meta.updated_at_us,
            expires_at_us: meta.expires_at_us,
            lease: meta.lease,
        }
    }

    /// The metadata the rules decide from.
    pub(crate) fn key_meta(&self) -> KeyMeta {
        KeyMeta {
            version: self.version,
            created_at_us: self.created_at_us,
            updated_at_us: self.updated_at_us,
            expires_at_us: self.expires_at_us,
            lease: self.lease,
        }
    }
}

pub(crate) fn encode(meta: &RecordMeta, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(V1_HEADER_LEN + 17 + value.len());
    let expires = meta.expires_at_us.is_some() || meta.lease.is_some();
    out.push(if expires { FORMAT_V2 } else { FORMAT_V1 });
    out.extend_from_slice(&meta.version.to_le_bytes());
    out.extend_from_slice(&meta.revision.to_le_bytes());
    out.extend_from_slice(&meta.created_at_us.to_le_bytes());
    out.extend_from_slice(&meta.updated_at_us.to_le_bytes());
    if expires {
        out.push(
            u8::from(meta.expires_at_us.is_some()) * HAS_DEADLINE
                + u8::from(meta.lease.is_some()) * HAS_LEASE,
        );
        if let Some(deadline) = meta.expires_at_us {
            out.extend_from_slice(&deadline.to_le_bytes());
        }
        if let Some(lease) = meta.lease {
            out.extend_from_slice(&lease.to_le_bytes());
        }
    }
    out.extend_from_slice(value);
    out
}

/// Splits a record into its metadata and value bytes.
pub(crate) fn decode(record: &[u8]) -> StoreResult<(RecordMeta, &[u8])> {
    let (header, rest) = record
        .split_at_checked(V1_HEADER_LEN)
        .ok_or_else(|| corrupt("record shorter than its header"))?;
    let (format, words) = header
        .split_first()
        .ok_or_else(|| corrupt("empty record"))?;
    let word = |bytes: &[u8], i: usize| -> [u8; 8] {
        let mut buf = [0u8; 8];
        buf.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
        buf
    };
    let mut meta = RecordMeta {
        version: u64::from_le_bytes(word(words, 0)),
        revision: u64::from_le_bytes(word(words, 1)),
        created_at_us: i64::from_le_bytes(word(words, 2)),
        updated_at_us: i64::from_le_bytes(word(words, 3)),
        expires_at_us: None,
        lease: None,
    };
    let value = match *format {
        FORMAT_V1 => rest,
        FORMAT_V2 => {
            let (flags, mut rest) = rest
                .split_first()
                .ok_or_else(|| corrupt("record shorter than its header"))?;
            let mut next = || -> StoreResult<[u8; 8]> {
                let (field, after) = rest
                    .split_at_checked(8)
                    .ok_or_else(|| corrupt("record shorter than its header"))?;
                rest = after;
                Ok(word(field, 0))
            };
            if flags & HAS_DEADLINE != 0 {
                meta.expires_at_us = Some(i64::from_le_bytes(next()?));
            }
            if flags & HAS_LEASE != 0 {
                meta.lease = Some(u64::from_le_bytes(next()?));
            }
            rest
        }
        other => return Err(corrupt(&format!("unknown record format {other}"))),
    };
    Ok((meta, value))
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("a record that does not decode: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(expires_at_us: Option<i64>, lease: Option<LeaseId>) -> RecordMeta {
        RecordMeta {
            version: 7,
            revision: u64::MAX,
            created_at_us: -1,
            updated_at_us: 1_764_000_000_000_000,
            expires_at_us,
            lease,
        }
    }

    #[test]
    fn round_trip() {
        for (expires, lease) in [
            (None, None),
            (Some(5), None),
            (None, Some(9)),
            (Some(-3), Some(1)),
        ] {
            let meta = meta(expires, lease);
            let record = encode(&meta, b"hello");
            let (back, value) = decode(&record).unwrap();
            assert_eq!(back, meta);
            assert_eq!(value, b"hello");
            for cut in 0..record.len() - value.len() {
                assert!(decode(&record[..cut]).is_err(), "cut at {cut}");
            }
        }
        // A key that never expires keeps the old, smaller format.
        assert_eq!(encode(&meta(None, None), b"").len(), V1_HEADER_LEN);
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        assert!(decode(&[FORMAT_V1; 10]).is_err());
        let mut record = encode(&meta(None, None), b"");
        assert_eq!(decode(&record).unwrap().1, b"");
        record[0] = 9;
        assert!(decode(&record).is_err());
    }
}
