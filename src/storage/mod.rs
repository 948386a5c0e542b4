//! Persistence behind one object-safe trait.
//!
//! The HTTP layer turns requests into the plain types of this module and calls a
//! [`Store`]; every backend keeps the same rules (versions, conditions, revisions,
//! snapshots), so the API behaves the same whichever engine is configured.

pub(crate) mod changes;
mod codec;
pub mod embedded;
mod feed;
pub mod layer;
pub mod postgres;
pub mod rules;

use std::ops::Bound;
use std::sync::Arc;

use async_trait::async_trait;

use crate::error::{StoreError, StoreResult};
pub use changes::{Change, DeleteReason, Event, History, KeyRange};
pub use feed::{Feed, Watcher};

/// One stored key with its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key.
    pub key: Vec<u8>,
    /// The value.
    pub value: Vec<u8>,
    /// 1 when the key was created, plus one for every write since.
    pub version: u64,
    /// The store-wide revision of the write that produced this version.
    pub revision: u64,
    /// Microseconds since the Unix epoch.
    pub created_at_us: i64,
    /// Microseconds since the Unix epoch.
    pub updated_at_us: i64,
    /// When the key expires, in microseconds since the Unix epoch: its own
    /// deadline, or its lease's when it has one; `None` when it never does.
    pub expires_at_us: Option<i64>,
    /// The lease the key is attached to.
    pub lease: Option<LeaseId>,
}

/// A lease's id: never 0.
pub type LeaseId = u64;

/// What a put does to the key's deadline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Expiry {
    /// The key has no deadline after the put (as Redis's SET leaves it).
    #[default]
    Never,
    /// The key expires this many milliseconds after the put is applied.
    Ttl(u64),
    /// The key expires at this time, in microseconds since the Unix epoch
    /// (by the backend's clock): Redis's EXPIREAT, PEXPIREAT and EXAT. A
    /// time already past leaves the key expired at once.
    At(i64),
    /// The key keeps its deadline or lease (none for a key that is absent).
    Keep,
    /// The key is attached to this lease and expires with it; the lease must
    /// exist, else the whole write fails with `LeaseNotFound`.
    Lease(LeaseId),
}

impl Expiry {
    /// The deadline and lease a put with this expiry leaves on its key,
    /// applied at `now_us`, given the key's current ones (`None`: absent).
    pub fn applied(
        self,
        now_us: i64,
        current: Option<(Option<i64>, Option<LeaseId>)>,
    ) -> (Option<i64>, Option<LeaseId>) {
        match self {
            Expiry::Never => (None, None),
            Expiry::Ttl(ms) => (Some(deadline_after(now_us, ms)), None),
            Expiry::At(deadline) => (Some(deadline), None),
            Expiry::Keep => current.unwrap_or((None, None)),
            Expiry::Lease(id) => (None, Some(id)),
        }
    }
}

/// A lease: a deadline many keys share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The lease id (random, never 0).
    pub id: LeaseId,
    /// What a keepalive renews it for.
    pub ttl_ms: u64,
    /// Microseconds since the Unix epoch.
    pub expires_at_us: i64,
    /// The name of the token that granted it, when the server has auth on:
    /// only that token may renew, read, revoke or attach keys to it.
    pub owner: Option<String>,
}

/// What revoking a lease did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// The revision that deleted the lease's keys (the store's current one
    /// when it had none).
    pub revision: u64,
    /// The keys deleted.
    pub keys: Vec<Vec<u8>>,
}

/// What must hold about a key's current version for a write to go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// No condition.
    Any,
    /// The key exists with exactly this version.
    Version(u64),
    /// The key does not exist.
    Absent,
    /// The key exists, whatever its version.
    Exists,
}

impl Condition {
    /// Whether the condition holds when the key's current version is `current`
    /// (`None` for an absent key).
    pub fn holds(self, current: Option<u64>) -> bool {
        match self {
            Condition::Any => true,
            Condition::Version(v) => current == Some(v),
            Condition::Absent => current.is_none(),
            Condition::Exists => current.is_some(),
        }
    }
}

/// One write of an atomic group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    /// Writes `value` to `key`.
    Put {
        /// The key.
        key: Vec<u8>,
        /// The new value.
        value: Vec<u8>,
        /// What the key's version must be for the write to go ahead.
        condition: Condition,
        /// The key's deadline after the write.
        expiry: Expiry,
    },
    /// Removes `key`.
    Delete {
        /// The key.
        key: Vec<u8>,
        /// What the key's version must be for the write to go ahead.
        condition: Condition,
    },
    /// Writes nothing: the write goes ahead only if the key's condition
    /// holds (a transaction's reads and WATCHed keys, checked at its commit).
    Check {
        /// The key.
        key: Vec<u8>,
        /// What the key's version must be for the write to go ahead.
        condition: Condition,
    },
}

impl WriteOp {
    /// The key the op is about.
    pub fn key(&self) -> &[u8] {
        match self {
            WriteOp::Put { key, .. } | WriteOp::Delete { key, .. } | WriteOp::Check { key, .. } => {
                key
            }
        }
    }

    /// What the key's version must be for the write to go ahead.
    pub fn condition(&self) -> Condition {
        match self {
            WriteOp::Put { condition, .. }
            | WriteOp::Delete { condition, .. }
            | WriteOp::Check { condition, .. } => *condition,
        }
    }

    /// Whether the op changes its key (a put or a delete, not a check).
    pub fn writes(&self) -> bool {
        !matches!(self, WriteOp::Check { .. })
    }

    /// Bytes this op adds to a commit, for sizing commit groups.
    pub(crate) fn weight(&self) -> usize {
        match self {
            WriteOp::Put { key, value, .. } => key.len() + value.len(),
            WriteOp::Delete { key, .. } | WriteOp::Check { key, .. } => key.len(),
        }
    }
}

/// What one op of an applied write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpResult {
    /// The timestamps are those of the entry the put produced.
    Put {
        /// The key's new version.
        version: u64,
        /// Whether the put created the key.
        created: bool,
        /// When the key was created, in µs since the Unix epoch.
        created_at_us: i64,
        /// When it was written, in µs since the Unix epoch.
        updated_at_us: i64,
        /// As on [`Entry`].
        expires_at_us: Option<i64>,
        /// As on [`Entry`].
        lease: Option<LeaseId>,
    },
    /// A delete.
    Deleted {
        /// False for an unconditional delete of an absent key.
        existed: bool,
    },
    /// A check held.
    Checked,
}

/// A condition that did not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailedCondition {
    /// Index into the ops of the write.
    pub index: usize,
    /// The key's version when the condition was checked (`None`: absent).
    pub current_version: Option<u64>,
}

/// The outcome of a write: all ops applied under one revision, or none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Every op was applied.
    Applied {
        /// The revision the write got.
        revision: u64,
        /// One per op, in the order of the ops.
        results: Vec<OpResult>,
    },
    /// Nothing was written.
    Rejected {
        /// The conditions that did not hold.
        failed: Vec<FailedCondition>,
    },
}

/// A range read: bounds already combine start/end/prefix and the cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanRequest {
    /// Where the range starts.
    pub lower: Bound<Vec<u8>>,
    /// Where it ends.
    pub upper: Bound<Vec<u8>>,
    /// From the last key down.
    pub reverse: bool,
    /// At most this many entries.
    pub limit: usize,
    /// Leave `Entry::value` empty.
    pub keys_only: bool,
    /// End the page once the values returned add up to this many bytes; an
    /// entry that would cross it is left for the next page unless it is the
    /// first of the page.
    pub max_value_bytes: usize,
}

/// One page of a range read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanPage {
    /// The entries, in key order (descending when reversed).
    pub entries: Vec<Entry>,
    /// Whether at least one more entry lies in the range after this page.
    pub more: bool,
    /// The store revision the page was read at: it reflects every write up
    /// to it (and, on PostgreSQL, possibly some above it; see docs/api.md).
    pub revision: u64,
}

/// Entries of several keys read from one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// One per key asked, in the order asked; `None` for an absent key.
    pub entries: Vec<Option<Entry>>,
    /// The store revision the entries were read at, as for [`ScanPage`].
    pub revision: u64,
}

/// A clock in microseconds since the Unix epoch (see [`system_now_us`]).
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The longest time to live a store keeps, in ms (about 317 years): a
/// longer one (RESP takes any that Redis takes) is kept as this long, on
/// every backend alike, so that a deadline in µs stays far inside an i64,
/// PostgreSQL's int8 included.
pub const MAX_TTL_MS: u64 = 10_000_000_000_000;

/// A time to live in µs, at most [`MAX_TTL_MS`].
pub(crate) fn capped_ttl_us(ttl_ms: u64) -> i64 {
    i64::try_from(ttl_ms.min(MAX_TTL_MS) * 1000).unwrap_or(i64::MAX)
}

/// The deadline `ttl_ms` milliseconds (at most [`MAX_TTL_MS`]) after `now_us`.
pub(crate) fn deadline_after(now_us: i64, ttl_ms: u64) -> i64 {
    now_us.saturating_add(capped_ttl_us(ttl_ms))
}

/// A new lease id: random, so that ids cannot be guessed, and never 0.
pub(crate) fn new_lease_id() -> StoreResult<LeaseId> {
    loop {
        let mut bytes = [0u8; 8];
        rustls::crypto::ring::default_provider()
            .secure_random
            .fill(&mut bytes)
            .map_err(|_| StoreError::Internal("the system's random source failed".into()))?;
        let id = u64::from_le_bytes(bytes);
        if id != 0 {
            return Ok(id);
        }
    }
}

/// The wall clock, in microseconds since the Unix epoch.
pub fn system_now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

impl Entry {
    /// Whether the entry's deadline has passed at `now_us`.
    pub fn expired(&self, now_us: i64) -> bool {
        self.expires_at_us
            .is_some_and(|deadline| deadline <= now_us)
    }
}

/// A key-value backend.
///
/// Implementations assign versions and revisions inside their own atomic write,
/// so concurrent writers never race on a read-modify-write.
#[async_trait]
pub trait Store: Send + Sync {
    /// The current entry of a key.
    async fn get(&self, key: &[u8]) -> StoreResult<Option<Entry>>;

    /// Entries of several keys, read from one snapshot, in the order asked.
    async fn get_many(&self, keys: Vec<Vec<u8>>) -> StoreResult<Found>;

    /// Applies the ops atomically under one new revision when every condition
    /// holds; otherwise writes nothing. Keys must be distinct. Returns once the
    /// write is durable under the store's durability mode.
    async fn write(&self, ops: Vec<WriteOp>) -> StoreResult<WriteOutcome>;

    /// Applies several writes, each as [`Store::write`] would (its own
    /// revision; its conditions checked after the writes before it), in the
    /// order given; gives their outcomes in that order. A backend may commit
    /// them together, under one sync: a RESP client's pipeline of writes.
    async fn write_many(&self, writes: Vec<Vec<WriteOp>>) -> Vec<StoreResult<WriteOutcome>> {
        write_each(self, writes).await
    }

    /// One page of entries in key order, read from one snapshot.
    async fn scan(&self, request: ScanRequest) -> StoreResult<ScanPage>;

    /// The changes after revision `after`, oldest first: at most `limit`
    /// revisions, fewer when their values add up to many bytes. A revision
    /// that changed nothing may come with no events. Only durable revisions
    /// are given, and on PostgreSQL none above a revision that may still
    /// commit.
    ///
    /// # Errors
    /// [`StoreError::Compacted`] when
    /// `after + 1` is older than the history kept.
    async fn changes(&self, after: u64, limit: usize) -> StoreResult<Vec<Change>>;

    /// The live feed of this store's changes.
    fn feed(&self) -> Arc<Feed>;

    /// Grants a lease that expires `ttl_ms` milliseconds from now unless it
    /// is kept alive.
    async fn grant_lease(&self, ttl_ms: u64, owner: Option<String>) -> StoreResult<Lease>;

    /// Renews a lease for its full `ttl_ms` from now.
    ///
    /// # Errors
    /// `LeaseNotFound` when it does not exist or has expired.
    async fn keep_lease_alive(&self, id: LeaseId) -> StoreResult<Lease>;

    /// A lease; `None` when it does not exist or has expired. Cheap: the API
    /// asks it on every write that names a lease (to check its owner).
    async fn lease(&self, id: LeaseId) -> StoreResult<Option<Lease>>;

    /// How many keys are attached to a lease (0 for one that is gone): a
    /// count of its keys, so only for `GET /v1/leases/{id}`.
    async fn lease_keys(&self, id: LeaseId) -> StoreResult<u64>;

    /// Ends a lease and deletes every key attached to it in one revision,
    /// each with the reason `LeaseRevoked`.
    ///
    /// # Errors
    /// `LeaseNotFound` when it does not exist or has expired.
    async fn revoke_lease(&self, id: LeaseId) -> StoreResult<Revoked>;

    /// The clock deadlines are kept by, in microseconds since the Unix
    /// epoch: the server's wall clock unless a test set another. Layers that
    /// hold entries (the caches) ask it whether an entry has expired.
    fn now_us(&self) -> i64 {
        system_now_us()
    }

    /// Whether the backend answers (for `/readyz`).
    async fn ready(&self) -> StoreResult<()>;

    /// Why writes are refused while reads are still served (the disk is
    /// full), or `None`; `/readyz` reports it.
    fn read_only(&self) -> Option<String> {
        None
    }

    /// Finishes queued writes, makes everything durable and stops the backend.
    /// Writes after this fail with `Unavailable`.
    async fn close(&self) -> StoreResult<()>;

    /// Brings gauges that are read rather than counted (queue depth, cache
    /// size) up to date before the metrics are rendered.
    fn report_metrics(&self) {}

    /// Which read cache this store is, for `/metrics`: `Off` but for the
    /// caches themselves (asked of the store the API serves, on top).
    fn cache_mode(&self) -> layer::cache::CacheMode {
        layer::cache::CacheMode::Off
    }

    /// The read replicas that reads may opt into; `None` when the backend
    /// has none (the embedded engine, PostgreSQL without replicas). Layers
    /// hand out their engine's, so that what a replica serves never enters
    /// a cache (which holds only what the primary serves, never stale).
    fn replicas(&self) -> Option<Arc<dyn ReplicaReads>> {
        None
    }

    /// A short name for logs.
    fn describe(&self) -> String;
}

/// Reads served by a read replica, which may lag the primary. Each gives
/// `None` when no replica can serve it: none is up, none has replayed
/// `min_revision` yet, or the one asked failed (each counted in the
/// metrics); the caller then reads from the [`Store`] as usual.
#[async_trait]
pub trait ReplicaReads: Send + Sync {
    /// [`Store::get`] on a replica that holds `min_revision`.
    async fn get(&self, key: &[u8], min_revision: u64) -> Option<Option<Entry>>;

    /// [`Store::get_many`] on a replica that holds `min_revision`; the
    /// revision is the replica's.
    async fn get_many(&self, keys: &[Vec<u8>], min_revision: u64) -> Option<Found>;

    /// [`Store::scan`] on a replica that holds `min_revision`; the revision
    /// is the replica's.
    async fn scan(&self, request: &ScanRequest, min_revision: u64) -> Option<ScanPage>;
}

/// Makes `writes` one after the other, each with [`Store::write`]: what
/// [`Store::write_many`] does unless a backend commits them together.
pub(crate) async fn write_each<S: Store + ?Sized>(
    store: &S,
    writes: Vec<Vec<WriteOp>>,
) -> Vec<StoreResult<WriteOutcome>> {
    let mut outcomes = Vec::with_capacity(writes.len());
    for ops in writes {
        outcomes.push(store.write(ops).await);
    }
    outcomes
}
