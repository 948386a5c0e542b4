//! The change feed's types: what one revision changed, and how a run of
//! revisions is stored as one record.
//!
//! The embedded engine writes one record per commit group, in the same engine
//! batch as the data, keyed by the group's first revision (big-endian, so
//! keys sort by revision). A record holds every revision of the group:
//!
//! ```text
//! format (1) | last revision (8) | written at, µs (8) | revisions...
//! revision   = revision (8) | event count (4) | events...
//! event      = kind (1) | key length (4) | key | version (8)
//!              put:    created_at_us (8) | updated_at_us (8) | value length (4) | value
//!                      | deadline
//!              delete: reason (1)
//! deadline   = flags (1) | expires_at_us (8, if flags & 1) | lease (8, if flags & 2)
//! ```
//!
//! Format 1 records (written before expiry existed) have no `deadline`.
//!
//! Integers are little-endian, as in [`super::codec`]. The header lets the
//! trimmer read a record's span and age without decoding its events.

use std::ops::Bound;

use super::LeaseId;
use crate::error::{StoreError, StoreResult};

/// Why a key was deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteReason {
    /// A client deleted it.
    Deleted,
    /// Its deadline passed.
    Expired,
    /// Its lease was revoked.
    LeaseRevoked,
}

impl DeleteReason {
    /// The name the API uses.
    pub fn name(self) -> &'static str {
        match self {
            DeleteReason::Deleted => "deleted",
            DeleteReason::Expired => "expired",
            DeleteReason::LeaseRevoked => "lease_revoked",
        }
    }

    /// Its code in stored change records (both backends).
    pub(crate) fn code(self) -> u8 {
        match self {
            DeleteReason::Deleted => 0,
            DeleteReason::Expired => 1,
            DeleteReason::LeaseRevoked => 2,
        }
    }

    pub(crate) fn from_code(code: u8) -> StoreResult<Self> {
        match code {
            0 => Ok(DeleteReason::Deleted),
            1 => Ok(DeleteReason::Expired),
            2 => Ok(DeleteReason::LeaseRevoked),
            other => Err(corrupt(&format!("unknown delete reason {other}"))),
        }
    }
}

/// What a write did to one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The key now holds this entry (its revision is the change's).
    Put {
        /// The key.
        key: Vec<u8>,
        /// Its new value.
        value: Vec<u8>,
        /// Its new version.
        version: u64,
        /// When the key was created, in µs since the Unix epoch.
        created_at_us: i64,
        /// When it was last written, in µs since the Unix epoch.
        updated_at_us: i64,
        /// As on [`Entry`](super::Entry).
        expires_at_us: Option<i64>,
        /// The lease the key is attached to.
        lease: Option<LeaseId>,
    },
    /// The key, which had `version`, was removed.
    Delete {
        /// The key.
        key: Vec<u8>,
        /// The version it had.
        version: u64,
        /// Why it was removed.
        reason: DeleteReason,
    },
}

impl Event {
    /// The key the event is about.
    pub fn key(&self) -> &[u8] {
        match self {
            Event::Put { key, .. } | Event::Delete { key, .. } => key,
        }
    }

    /// Bytes the event takes in memory, roughly, for bounding buffers.
    pub fn weight(&self) -> usize {
        match self {
            Event::Put { key, value, .. } => 48 + key.len() + value.len(),
            Event::Delete { key, .. } => 32 + key.len(),
        }
    }
}

/// Everything one revision changed: one write, or one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The revision of the write or batch.
    pub revision: u64,
    /// Empty for a write that changed nothing (an unconditional delete of an
    /// absent key) or, on PostgreSQL, a revision that no write used.
    pub events: Vec<Event>,
}

impl Change {
    /// Bytes the change takes in memory, roughly.
    pub fn weight(&self) -> usize {
        32 + self.events.iter().map(Event::weight).sum::<usize>()
    }

    /// The change with only the events in `range`, or `None` when it has none.
    pub fn within(&self, range: &KeyRange) -> Option<Change> {
        if range.is_everything() {
            return (!self.events.is_empty()).then(|| self.clone());
        }
        let events: Vec<Event> = self
            .events
            .iter()
            .filter(|event| range.contains(event.key()))
            .cloned()
            .collect();
        (!events.is_empty()).then_some(Change {
            revision: self.revision,
            events,
        })
    }
}

/// The smallest key above every key that starts with `prefix`, if any.
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// The keys a watcher follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRange {
    /// Where the range starts.
    pub lower: Bound<Vec<u8>>,
    /// Where it ends.
    pub upper: Bound<Vec<u8>>,
}

impl KeyRange {
    /// Every key.
    pub fn everything() -> Self {
        KeyRange {
            lower: Bound::Unbounded,
            upper: Bound::Unbounded,
        }
    }

    /// The one key the range holds, when it is a single key.
    pub(crate) fn single_key(&self) -> Option<&[u8]> {
        match (&self.lower, &self.upper) {
            (Bound::Included(low), Bound::Included(high)) if low == high => Some(low),
            _ => None,
        }
    }

    /// The prefix whose keys the range holds exactly, when it is one (not
    /// the empty prefix: that is every key).
    pub(crate) fn prefix(&self) -> Option<&[u8]> {
        let Bound::Included(low) = &self.lower else {
            return None;
        };
        let exact = match (&self.upper, prefix_end(low)) {
            (Bound::Excluded(high), Some(end)) => *high == end,
            (Bound::Unbounded, None) => true,
            _ => false,
        };
        (exact && !low.is_empty()).then_some(low.as_slice())
    }

    fn is_everything(&self) -> bool {
        matches!(
            (&self.lower, &self.upper),
            (Bound::Unbounded, Bound::Unbounded)
        )
    }

    /// Whether `key` lies in the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        let above = match &self.lower {
            Bound::Included(low) => key >= low.as_slice(),
            Bound::Excluded(low) => key > low.as_slice(),
            Bound::Unbounded => true,
        };
        above
            && match &self.upper {
                Bound::Included(high) => key <= high.as_slice(),
                Bound::Excluded(high) => key < high.as_slice(),
                Bound::Unbounded => true,
            }
    }
}

/// The retention of the change history: a revision is kept while it is among
/// the last `revisions`, or younger than `age`, whichever keeps more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct History {
    /// How many of the latest revisions are kept at least.
    pub revisions: u64,
    /// How long a revision is kept at least.
    pub age: std::time::Duration,
}

impl Default for History {
    /// The API's promise: the last 1,000,000 revisions or the last hour.
    fn default() -> Self {
        History {
            revisions: 1_000_000,
            age: std::time::Duration::from_secs(3600),
        }
    }
}

/// Counts keys deleted by expiry or by a lease's revocation (both backends,
/// once their delete is committed), by reason.
pub(crate) fn count_expired(reason: DeleteReason, keys: usize) {
    metrics::counter!("kvstore_keys_expired_total", "reason" => reason.name())
        .increment(keys as u64);
}

/// Metric names of the history a backend keeps.
pub(crate) const OLDEST_GAUGE: &str = "kvstore_watch_history_oldest_revision";
pub(crate) const REVISIONS_GAUGE: &str = "kvstore_watch_history_revisions";

const FORMAT_V1: u8 = 1;
/// Adds a put's deadline and lease.
const FORMAT_V2: u8 = 2;
const HAS_DEADLINE: u8 = 1;
const HAS_LEASE: u8 = 2;
const KIND_PUT: u8 = 0;
const KIND_DELETE: u8 = 1;
/// Bytes before a record's revisions.
const RECORD_HEADER_LEN: usize = 1 + 8 + 8;

/// A stored record's span and age, read without decoding its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecordHeader {
    pub last_revision: u64,
    pub written_at_us: i64,
}

/// A put's metadata, as a change record keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub version: u64,
    pub created_at_us: i64,
    pub updated_at_us: i64,
    pub expires_at_us: Option<i64>,
    pub lease: Option<LeaseId>,
}

/// Builds one record from the revisions of a commit group, in order.
pub(crate) struct RecordBuilder {
    bytes: Vec<u8>,
}

impl RecordBuilder {
    pub(crate) fn new() -> Self {
        let mut bytes = Vec::with_capacity(256);
        bytes.push(FORMAT_V2);
        bytes.extend_from_slice(&[0; 16]);
        RecordBuilder { bytes }
    }

    /// Starts a revision of `events` events.
    pub(crate) fn revision(&mut self, revision: u64, events: usize) {
        self.bytes.extend_from_slice(&revision.to_le_bytes());
        self.bytes
            .extend_from_slice(&u32::try_from(events).unwrap_or(u32::MAX).to_le_bytes());
    }

    pub(crate) fn put(&mut self, key: &[u8], value: &[u8], stamp: &Stamp) {
        self.bytes.push(KIND_PUT);
        self.bytes_field(key);
        self.bytes.extend_from_slice(&stamp.version.to_le_bytes());
        self.bytes
            .extend_from_slice(&stamp.created_at_us.to_le_bytes());
        self.bytes
            .extend_from_slice(&stamp.updated_at_us.to_le_bytes());
        self.bytes_field(value);
        let flags = u8::from(stamp.expires_at_us.is_some()) * HAS_DEADLINE
            + u8::from(stamp.lease.is_some()) * HAS_LEASE;
        self.bytes.push(flags);
        if let Some(deadline) = stamp.expires_at_us {
            self.bytes.extend_from_slice(&deadline.to_le_bytes());
        }
        if let Some(lease) = stamp.lease {
            self.bytes.extend_from_slice(&lease.to_le_bytes());
        }
    }

    pub(crate) fn delete(&mut self, key: &[u8], version: u64, reason: DeleteReason) {
        self.bytes.push(KIND_DELETE);
        self.bytes_field(key);
        self.bytes.extend_from_slice(&version.to_le_bytes());
        self.bytes.push(reason.code());
    }

    fn bytes_field(&mut self, field: &[u8]) {
        // Keys and values are bounded far below 4 GiB by the API's limits.
        self.bytes
            .extend_from_slice(&u32::try_from(field.len()).unwrap_or(u32::MAX).to_le_bytes());
        self.bytes.extend_from_slice(field);
    }

    /// The record, with the header that names its last revision and age.
    pub(crate) fn finish(mut self, last_revision: u64, written_at_us: i64) -> Vec<u8> {
        self.bytes[1..9].copy_from_slice(&last_revision.to_le_bytes());
        self.bytes[9..17].copy_from_slice(&written_at_us.to_le_bytes());
        self.bytes
    }
}

/// The key of the record whose first revision is `revision`.
pub(crate) fn record_key(revision: u64) -> [u8; 8] {
    revision.to_be_bytes()
}

/// The first revision of the record stored under `key`.
pub(crate) fn record_first(key: &[u8]) -> StoreResult<u64> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| corrupt("a change record's key is not 8 bytes"))?;
    Ok(u64::from_be_bytes(bytes))
}

pub(crate) fn record_header(record: &[u8]) -> StoreResult<RecordHeader> {
    let mut reader = Reader(record);
    if !matches!(reader.u8()?, FORMAT_V1 | FORMAT_V2) {
        return Err(corrupt("unknown change record format"));
    }
    Ok(RecordHeader {
        last_revision: reader.u64()?,
        written_at_us: reader.i64()?,
    })
}

/// The revisions of a record.
pub(crate) fn decode_record(record: &[u8]) -> StoreResult<Vec<Change>> {
    let header = record_header(record)?;
    let with_deadlines = record.first() == Some(&FORMAT_V2);
    let mut reader = Reader(&record[RECORD_HEADER_LEN..]);
    let mut changes = Vec::new();
    while !reader.0.is_empty() {
        let revision = reader.u64()?;
        let count = reader.u32()? as usize;
        let mut events = Vec::with_capacity(count.min(1024));
        for _ in 0..count {
            let kind = reader.u8()?;
            let key = reader.bytes()?.to_vec();
            let version = reader.u64()?;
            events.push(match kind {
                KIND_PUT => {
                    let created_at_us = reader.i64()?;
                    let updated_at_us = reader.i64()?;
                    let value = reader.bytes()?.to_vec();
                    let flags = if with_deadlines { reader.u8()? } else { 0 };
                    let expires_at_us = if flags & HAS_DEADLINE != 0 {
                        Some(reader.i64()?)
                    } else {
                        None
                    };
                    let lease = if flags & HAS_LEASE != 0 {
                        Some(reader.u64()?)
                    } else {
                        None
                    };
                    Event::Put {
                        key,
                        value,
                        version,
                        created_at_us,
                        updated_at_us,
                        expires_at_us,
                        lease,
                    }
                }
                KIND_DELETE => Event::Delete {
                    key,
                    version,
                    reason: DeleteReason::from_code(reader.u8()?)?,
                },
                other => return Err(corrupt(&format!("unknown event kind {other}"))),
            });
        }
        changes.push(Change { revision, events });
    }
    if changes.last().map(|c| c.revision) != Some(header.last_revision) {
        return Err(corrupt("a change record does not end at its last revision"));
    }
    Ok(changes)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> StoreResult<&'a [u8]> {
        let (head, rest) = self
            .0
            .split_at_checked(n)
            .ok_or_else(|| corrupt("a change record ends early"))?;
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> StoreResult<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> StoreResult<u32> {
        let mut word = [0; 4];
        word.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(word))
    }

    fn u64(&mut self) -> StoreResult<u64> {
        let mut word = [0; 8];
        word.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(word))
    }

    fn i64(&mut self) -> StoreResult<i64> {
        Ok(self.u64()? as i64)
    }

    fn bytes(&mut self) -> StoreResult<&'a [u8]> {
        let len = self.u32()? as usize;
        self.take(len)
    }
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("a change record that does not decode: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let mut builder = RecordBuilder::new();
        builder.revision(7, 2);
        builder.put(
            b"a",
            b"1",
            &Stamp {
                version: 3,
                created_at_us: -5,
                updated_at_us: 9,
                expires_at_us: None,
                lease: None,
            },
        );
        builder.delete(b"b", 2, DeleteReason::Expired);
        builder.revision(8, 1);
        builder.put(
            b"c",
            b"",
            &Stamp {
                version: 1,
                created_at_us: 10,
                updated_at_us: 10,
                expires_at_us: Some(20),
                lease: Some(7),
            },
        );
        let record = builder.finish(8, 1_700_000_000_000_000);
        let header = record_header(&record).unwrap();
        assert_eq!(header.last_revision, 8);
        assert_eq!(header.written_at_us, 1_700_000_000_000_000);
        let changes = decode_record(&record).unwrap();
        assert_eq!(
            changes,
            vec![
                Change {
                    revision: 7,
                    events: vec![
                        Event::Put {
                            key: b"a".to_vec(),
                            value: b"1".to_vec(),
                            version: 3,
                            created_at_us: -5,
                            updated_at_us: 9,
                            expires_at_us: None,
                            lease: None,
                        },
                        Event::Delete {
                            key: b"b".to_vec(),
                            version: 2,
                            reason: DeleteReason::Expired,
                        },
                    ],
                },
                Change {
                    revision: 8,
                    events: vec![Event::Put {
                        key: b"c".to_vec(),
                        value: Vec::new(),
                        version: 1,
                        created_at_us: 10,
                        updated_at_us: 10,
                        expires_at_us: Some(20),
                        lease: Some(7),
                    }],
                },
            ]
        );
        for cut in 0..record.len() {
            assert!(decode_record(&record[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn ranges_filter_events() {
        let change = Change {
            revision: 1,
            events: vec![
                Event::Delete {
                    key: b"a/1".to_vec(),
                    version: 1,
                    reason: DeleteReason::Deleted,
                },
                Event::Delete {
                    key: b"b/1".to_vec(),
                    version: 1,
                    reason: DeleteReason::Deleted,
                },
            ],
        };
        let a = KeyRange {
            lower: Bound::Included(b"a/".to_vec()),
            upper: Bound::Excluded(b"a0".to_vec()),
        };
        assert_eq!(change.within(&a).unwrap().events.len(), 1);
        assert_eq!(change.within(&KeyRange::everything()).unwrap(), change);
        let c = KeyRange {
            lower: Bound::Included(b"c".to_vec()),
            upper: Bound::Unbounded,
        };
        assert!(change.within(&c).is_none());
    }
}
