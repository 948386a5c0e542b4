//! Deadlines and leases on the embedded engine.
//!
//! Two keyspaces index what expires, written in the same batch as the keys
//! they index, so they are exact after any crash:
//!
//! - `deadlines`: `deadline (8, big-endian, sign bit flipped) | key` →
//!   the version that carried the deadline. Ordered by deadline, so the
//!   expirer reads only what is due, never every key.
//! - `lease_keys`: `lease id (8, big-endian) | key` → nothing: the keys a
//!   revoke or a lease's expiry deletes, and what `GET /v1/leases/{id}` counts.
//!
//! Leases themselves live in a third keyspace, `leases`: `id` → `ttl_ms (8) |
//! expires_at_us (8) | owner`, and in memory ([`Leases`]), loaded at open:
//! every read of a key on a lease asks it for the lease's deadline.
//!
//! The expirer thread deletes due keys as writes of the one writer, each key
//! under a revision of its own with the reason `expired`, and only when the
//! key still has the version that carried the deadline (a key rewritten since
//! is not touched; its stale index entry is dropped). A round takes at most
//! [`ROUND_KEYS`] keys and then lets queued writes commit, so a million keys
//! due in the same second do not stall other writers.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use fjall::Readable;

use super::Shared;
use super::engine::Engine;
use super::reads::View;
use crate::error::{StoreError, StoreResult};
use crate::storage::{Lease, LeaseId};

/// How often the expirer looks for due keys: deletes land well within the
/// API's one second.
const EXPIRE_EVERY: Duration = Duration::from_millis(50);
/// Keys deleted per round (one commit group) at most.
pub(super) const ROUND_KEYS: usize = 1000;

/// The `deadlines` key of `key` expiring at `deadline_us`.
pub(super) fn deadline_key(deadline_us: i64, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + key.len());
    out.extend_from_slice(&sortable(deadline_us));
    out.extend_from_slice(key);
    out
}

/// Big-endian with the sign bit flipped: sorts as the signed number does.
fn sortable(us: i64) -> [u8; 8] {
    ((us as u64) ^ (1 << 63)).to_be_bytes()
}

/// Splits a `deadlines` key into the deadline and the key.
pub(super) fn split_deadline_key(raw: &[u8]) -> StoreResult<(i64, &[u8])> {
    let (deadline, key) = raw
        .split_at_checked(8)
        .ok_or_else(|| corrupt("a deadline index key is shorter than 8 bytes"))?;
    let mut word = [0; 8];
    word.copy_from_slice(deadline);
    Ok(((u64::from_be_bytes(word) ^ (1 << 63)) as i64, key))
}

/// The first `deadlines` key after every deadline up to `now_us`.
pub(super) fn due_end(now_us: i64) -> [u8; 8] {
    sortable(now_us.saturating_add(1))
}

/// The `lease_keys` key of `key` on `lease`.
pub(super) fn lease_key(lease: LeaseId, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + key.len());
    out.extend_from_slice(&lease.to_be_bytes());
    out.extend_from_slice(key);
    out
}

pub(super) fn encode_lease(lease: &Lease) -> Vec<u8> {
    let owner = lease.owner.as_deref().unwrap_or_default().as_bytes();
    let mut out = Vec::with_capacity(17 + owner.len());
    out.push(u8::from(lease.owner.is_some()));
    out.extend_from_slice(&lease.ttl_ms.to_le_bytes());
    out.extend_from_slice(&lease.expires_at_us.to_le_bytes());
    out.extend_from_slice(owner);
    out
}

fn decode_lease(id: LeaseId, raw: &[u8]) -> StoreResult<Lease> {
    let short = || corrupt("a lease record is shorter than 17 bytes");
    let (&has_owner, rest) = raw.split_first().ok_or_else(short)?;
    let (ttl, rest) = rest.split_at_checked(8).ok_or_else(short)?;
    let (deadline, owner) = rest.split_at_checked(8).ok_or_else(short)?;
    let word = |bytes: &[u8]| {
        let mut word = [0; 8];
        word.copy_from_slice(bytes);
        word
    };
    Ok(Lease {
        id,
        ttl_ms: u64::from_le_bytes(word(ttl)),
        expires_at_us: i64::from_le_bytes(word(deadline)),
        owner: (has_owner == 1)
            .then(|| String::from_utf8(owner.to_vec()))
            .transpose()
            .map_err(|_| corrupt("a lease's owner is not UTF-8"))?,
    })
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(what.to_owned())
}

/// The leases, in memory. Changed only by the writer, after the commit that
/// stored the change; read by every read of a key on a lease.
pub(super) struct Leases(RwLock<HashMap<LeaseId, Lease>>);

impl Leases {
    /// The leases stored in `engine`.
    pub(super) fn load(engine: &Engine) -> StoreResult<Self> {
        let mut leases = HashMap::new();
        for item in engine.db.snapshot().iter(&engine.leases) {
            let (id, raw) = item.into_inner()?;
            let id: [u8; 8] = id
                .as_ref()
                .try_into()
                .map_err(|_| corrupt("a lease id is not 8 bytes"))?;
            let id = u64::from_be_bytes(id);
            leases.insert(id, decode_lease(id, &raw)?);
        }
        Ok(Leases(RwLock::new(leases)))
    }

    /// The lease, if it exists and has not expired at `now_us`.
    pub(super) fn live(&self, id: LeaseId, now_us: i64) -> Option<Lease> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .filter(|lease| lease.expires_at_us > now_us)
            .cloned()
    }

    /// The lease's deadline; `None` when it is gone (its keys are expired).
    pub(super) fn deadline(&self, id: LeaseId) -> Option<i64> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .map(|lease| lease.expires_at_us)
    }

    pub(super) fn contains(&self, id: LeaseId) -> bool {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&id)
    }

    /// Leases whose deadline has passed at `now_us`, the earliest first (and
    /// by id between equal deadlines, so that the order is the same each time).
    pub(super) fn due(&self, now_us: i64) -> Vec<LeaseId> {
        let mut due: Vec<(i64, LeaseId)> = self
            .0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|lease| lease.expires_at_us <= now_us)
            .map(|lease| (lease.expires_at_us, lease.id))
            .collect();
        due.sort_unstable();
        due.into_iter().map(|(_, id)| id).collect()
    }

    /// Stores (`Some`) or removes (`None`) each lease, in order.
    pub(super) fn apply(&self, changes: Vec<(LeaseId, Option<Lease>)>) {
        if changes.is_empty() {
            return;
        }
        let mut leases = self.0.write().unwrap_or_else(PoisonError::into_inner);
        for (id, lease) in changes {
            match lease {
                Some(lease) => leases.insert(id, lease),
                None => leases.remove(&id),
            };
        }
    }
}

/// The keys attached to `lease`, from one snapshot.
pub(super) fn lease_keys(engine: &Engine, lease: LeaseId) -> StoreResult<Vec<Vec<u8>>> {
    engine
        .db
        .snapshot()
        .prefix(&engine.lease_keys, lease.to_be_bytes())
        .map(|item| Ok(item.key()?[8..].to_vec()))
        .collect()
}

/// How many keys are attached to `lease`, as readers see them.
pub(super) fn count_lease_keys(view: &View, lease: LeaseId) -> StoreResult<u64> {
    let mut count = 0;
    for item in view
        .snapshot
        .prefix(&view.engine.lease_keys, lease.to_be_bytes())
    {
        item.key()?;
        count += 1;
    }
    Ok(count)
}

/// Deletes due keys and expired leases until told to stop.
pub(super) fn run_expirer(shared: &Shared, stop: &Receiver<()>) {
    let mut wait = Duration::ZERO;
    let mut failing = false;
    loop {
        match stop.recv_timeout(wait) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        // A full round leaves more due: go again at once, after the writes
        // that queued meanwhile (the writer lock is released in between).
        wait = match shared.lock_writer().expire_round(shared) {
            Ok(more) => {
                failing = false;
                if more {
                    Duration::from_millis(1)
                } else {
                    EXPIRE_EVERY
                }
            }
            // Once per spell of failures (a full disk refuses every round
            // until space is freed; it is logged where writes are refused).
            Err(err) => {
                if !failing && !matches!(err, StoreError::InsufficientStorage(_)) {
                    tracing::warn!(error = %err, "deleting expired keys failed; retrying");
                }
                failing = true;
                EXPIRE_EVERY
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_keys_sort_by_deadline_and_round_trip() {
        let deadlines = [i64::MIN, -5, -1, 0, 1, 1_764_000_000_000_000, i64::MAX];
        let keys: Vec<Vec<u8>> = deadlines.iter().map(|d| deadline_key(*d, b"k")).collect();
        assert!(keys.windows(2).all(|pair| pair[0] < pair[1]));
        for (deadline, raw) in deadlines.iter().zip(&keys) {
            assert_eq!(split_deadline_key(raw).unwrap(), (*deadline, &b"k"[..]));
            assert!(raw.as_slice() < due_end(*deadline).as_slice() || *deadline == i64::MAX);
        }
        assert!(split_deadline_key(b"short").is_err());
    }

    #[test]
    fn lease_records_round_trip() {
        for owner in [None, Some("svc".to_owned())] {
            let lease = Lease {
                id: 9,
                ttl_ms: 10_000,
                expires_at_us: -3,
                owner,
            };
            assert_eq!(decode_lease(9, &encode_lease(&lease)).unwrap(), lease);
        }
        assert!(decode_lease(1, &[1, 2, 3]).is_err());
    }
}
