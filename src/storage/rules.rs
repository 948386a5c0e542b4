//! What a write does, decided once for every backend: given a group of ops,
//! the current metadata of their keys and the clock, which conditions fail,
//! or else what each op leaves on its key and what it answers.
//!
//! No I/O and no engine types: the embedded writer ([`super::embedded`]),
//! the PostgreSQL batch path ([`super::postgres`]) and a RESP transaction's
//! view of its own writes (`resp/transaction.rs`) read the current metadata
//! their own way, call [`decide`], and store what it says.
//!
//! The rules:
//!
//! - **Conditions** ([`Condition::holds`](super::Condition::holds)):
//!   checked against the key's live version (`None` for an absent or
//!   expired key); when one fails, nothing is written and every failure is
//!   reported with the version found.
//! - **Versions**: a put makes version 1 of an absent key and the current
//!   version plus one of a live one.
//! - **Timestamps**: a put of an absent key sets `created_at` and
//!   `updated_at` to now; a put of a live key keeps its `created_at` and sets
//!   `updated_at` to the later of now and its previous `updated_at`, so that
//!   it never goes back when the clock steps back.
//! - **Expiry**: what [`Expiry::applied`] decides, at now, from the key's
//!   current deadline and lease.
//! - **Results**: a put answers its new metadata (with the effective
//!   deadline: its own, or its lease's); a delete answers whether the key
//!   existed; a check answers that it held.
//!
//! # Where PostgreSQL restates them in SQL
//!
//! A single put or delete on PostgreSQL is one statement, so that it costs
//! one round trip and takes the row lock only for that statement; these
//! (in `postgres/sql.rs`) restate the rules in SQL:
//!
//! - the condition of a single write (`condition_holds`, on the locked
//!   row's state and version), which both functions below use;
//! - the put function (`put_function`, which the `put` statement calls):
//!   a stale row or a lapsed lease fails it (`ok`), version 1
//!   or plus one, `created_at` kept and `updated_at = greatest(previous,
//!   now)` (its UPDATE and INSERT), the expiry (`own` and `attached`;
//!   `Keep` from the locked row), and the result (the effective deadline,
//!   the lease's for a key on one);
//! - the delete function (`delete_function`, which the `delete` statement
//!   calls): a stale row fails it (`o_ok`), and whether the key existed
//!   (`o_deleted`).
//!
//! Everything else goes through [`decide`], PostgreSQL's batches included:
//! their `apply` statement writes what it decided, and updates a row only at
//! the version it decided from. The conformance suite (`tests/it/model.rs`)
//! runs the same random writes on every backend and cache mode against a
//! model built on [`decide`], so it is what shows that the statements and
//! this module agree.

use super::{Expiry, FailedCondition, LeaseId, OpResult, WriteOp};

/// A live key's metadata, as the rules need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyMeta {
    /// 1 when the key was created, one more at each put since.
    pub version: u64,
    /// Microseconds since the Unix epoch.
    pub created_at_us: i64,
    /// Microseconds since the Unix epoch.
    pub updated_at_us: i64,
    /// The key's own deadline (a key on a lease has none: it has the lease's).
    pub expires_at_us: Option<i64>,
    /// The lease the key lives on, if any.
    pub lease: Option<LeaseId>,
}

/// What one op of a write that goes ahead does to its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// A put.
    Put {
        /// The key's metadata after the put.
        meta: KeyMeta,
        /// Whether the key was absent before it.
        created: bool,
    },
    /// A delete.
    Delete {
        /// The key's metadata before the delete; `None` when it was absent
        /// (the delete then writes nothing).
        removed: Option<KeyMeta>,
    },
    /// A check that held: nothing written.
    Check,
}

impl Effect {
    /// Whether the op changes its key: a put, or a delete of a key that
    /// exists. A revision counts the events of these.
    pub fn changes(&self) -> bool {
        match self {
            Effect::Put { .. } => true,
            Effect::Delete { removed } => removed.is_some(),
            Effect::Check => false,
        }
    }

    /// What the op answers. A put on a lease answers the lease's deadline,
    /// which `lease_deadline` gives (`None` for a lease that is gone).
    pub fn result(&self, lease_deadline: impl FnOnce(LeaseId) -> Option<i64>) -> OpResult {
        match *self {
            Effect::Put { meta, created } => OpResult::Put {
                version: meta.version,
                created,
                created_at_us: meta.created_at_us,
                updated_at_us: meta.updated_at_us,
                expires_at_us: meta
                    .expires_at_us
                    .or_else(|| meta.lease.and_then(lease_deadline)),
                lease: meta.lease,
            },
            Effect::Delete { removed } => OpResult::Deleted {
                existed: removed.is_some(),
            },
            Effect::Check => OpResult::Checked,
        }
    }
}

/// The conditions of `ops` that fail when their keys' live versions are
/// `versions` (one per op, `None`: absent), in the order of the ops.
pub fn failures(
    ops: &[WriteOp],
    versions: impl IntoIterator<Item = Option<u64>>,
) -> Vec<FailedCondition> {
    ops.iter()
        .zip(versions)
        .enumerate()
        .filter(|(_, (op, version))| !op.condition().holds(*version))
        .map(|(index, (_, version))| FailedCondition {
            index,
            current_version: version,
        })
        .collect()
}

/// The metadata a put with `expiry` leaves at `now_us` on a key whose live
/// metadata is `current` (`None`: absent).
pub fn put(current: Option<&KeyMeta>, expiry: Expiry, now_us: i64) -> KeyMeta {
    let (expires_at_us, lease) =
        expiry.applied(now_us, current.map(|m| (m.expires_at_us, m.lease)));
    match current {
        None => KeyMeta {
            version: 1,
            created_at_us: now_us,
            updated_at_us: now_us,
            expires_at_us,
            lease,
        },
        Some(m) => KeyMeta {
            version: m.version + 1,
            created_at_us: m.created_at_us,
            // Never before the previous write, even if the clock steps back.
            updated_at_us: now_us.max(m.updated_at_us),
            expires_at_us,
            lease,
        },
    }
}

/// Decides one write: `current` holds the live metadata of each op's key
/// (one per op, in order; `None` for a key that is absent or expired), and
/// `now_us` is the time the write is applied at. Gives what each op does,
/// in the order of the ops, or the conditions that failed (then nothing is
/// written). The keys of `ops` must be distinct.
///
/// # Errors
/// The failed conditions, when any condition does not hold.
pub fn decide(
    ops: &[WriteOp],
    current: &[Option<KeyMeta>],
    now_us: i64,
) -> Result<Vec<Effect>, Vec<FailedCondition>> {
    let failed = failures(ops, current.iter().map(|m| m.map(|m| m.version)));
    if !failed.is_empty() {
        return Err(failed);
    }
    Ok(ops
        .iter()
        .zip(current)
        .map(|(op, current)| match op {
            WriteOp::Put { expiry, .. } => Effect::Put {
                meta: put(current.as_ref(), *expiry, now_us),
                created: current.is_none(),
            },
            WriteOp::Delete { .. } => Effect::Delete { removed: *current },
            WriteOp::Check { .. } => Effect::Check,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{Condition, deadline_after};

    const NOW: i64 = 1_800_000_000_000_000;

    fn put_op(key: &str, condition: Condition, expiry: Expiry) -> WriteOp {
        WriteOp::Put {
            key: key.into(),
            value: b"v".to_vec(),
            condition,
            expiry,
        }
    }

    fn live(version: u64, created: i64, updated: i64) -> KeyMeta {
        KeyMeta {
            version,
            created_at_us: created,
            updated_at_us: updated,
            expires_at_us: None,
            lease: None,
        }
    }

    #[test]
    fn a_put_creates_version_one_stamped_now() {
        let effects = decide(
            &[put_op("k", Condition::Absent, Expiry::Never)],
            &[None],
            NOW,
        );
        let meta = KeyMeta {
            version: 1,
            created_at_us: NOW,
            updated_at_us: NOW,
            expires_at_us: None,
            lease: None,
        };
        assert_eq!(
            effects,
            Ok(vec![Effect::Put {
                meta,
                created: true
            }])
        );
    }

    #[test]
    fn a_put_of_a_live_key_keeps_created_at_and_moves_updated_at() {
        let current = live(4, NOW - 50, NOW - 10);
        let effects = decide(
            &[put_op("k", Condition::Version(4), Expiry::Never)],
            &[Some(current)],
            NOW,
        );
        let Ok(effects) = effects else {
            panic!("rejected: {effects:?}")
        };
        let [Effect::Put { meta, created }] = effects.as_slice() else {
            panic!("{effects:?}")
        };
        assert!(!created);
        assert_eq!(
            (meta.version, meta.created_at_us, meta.updated_at_us),
            (5, NOW - 50, NOW)
        );
    }

    #[test]
    fn updated_at_never_goes_back_when_the_clock_does() {
        let current = live(2, NOW - 50, NOW);
        // The clock stepped back a second since the last write.
        let back = NOW - 1_000_000;
        let meta = put(Some(&current), Expiry::Never, back);
        assert_eq!(
            (meta.version, meta.created_at_us, meta.updated_at_us),
            (3, NOW - 50, NOW)
        );
        // A deadline is counted from the clock, not from the kept time.
        let meta = put(Some(&current), Expiry::Ttl(10), back);
        assert_eq!(meta.expires_at_us, Some(deadline_after(back, 10)));
        assert_eq!(meta.updated_at_us, NOW);
        // A key created after the step back is stamped with the clock.
        let meta = put(None, Expiry::Never, back);
        assert_eq!((meta.created_at_us, meta.updated_at_us), (back, back));
    }

    #[test]
    fn expiry_is_what_expiry_applied_decides() {
        let mut current = live(1, NOW, NOW);
        current.expires_at_us = Some(NOW + 5);
        for expiry in [
            Expiry::Never,
            Expiry::Ttl(7),
            Expiry::At(NOW - 3),
            Expiry::Keep,
            Expiry::Lease(9),
        ] {
            for current in [None, Some(current)] {
                let meta = put(current.as_ref(), expiry, NOW);
                assert_eq!(
                    (meta.expires_at_us, meta.lease),
                    expiry.applied(NOW, current.map(|m| (m.expires_at_us, m.lease))),
                    "{expiry:?} over {current:?}"
                );
            }
        }
    }

    #[test]
    fn every_failed_condition_is_reported_and_nothing_goes_ahead() {
        let ops = [
            put_op("a", Condition::Version(2), Expiry::Never),
            WriteOp::Delete {
                key: b"b".to_vec(),
                condition: Condition::Exists,
            },
            WriteOp::Check {
                key: b"c".to_vec(),
                condition: Condition::Absent,
            },
            put_op("d", Condition::Any, Expiry::Never),
        ];
        let current = [Some(live(3, NOW, NOW)), None, Some(live(1, NOW, NOW)), None];
        assert_eq!(
            decide(&ops, &current, NOW),
            Err(vec![
                FailedCondition {
                    index: 0,
                    current_version: Some(3)
                },
                FailedCondition {
                    index: 1,
                    current_version: None
                },
                FailedCondition {
                    index: 2,
                    current_version: Some(1)
                },
            ])
        );
    }

    #[test]
    fn conditions_hold_as_condition_holds_says() {
        for condition in [
            Condition::Any,
            Condition::Version(1),
            Condition::Version(2),
            Condition::Absent,
            Condition::Exists,
        ] {
            for current in [None, Some(live(1, NOW, NOW))] {
                let ops = [WriteOp::Check {
                    key: b"k".to_vec(),
                    condition,
                }];
                assert_eq!(
                    decide(&ops, &[current], NOW).is_ok(),
                    condition.holds(current.map(|m| m.version)),
                    "{condition:?} on {current:?}"
                );
            }
        }
    }

    #[test]
    fn results_answer_what_each_op_did() {
        let mut on_lease = live(2, NOW - 9, NOW - 9);
        on_lease.lease = Some(7);
        let ops = [
            put_op("a", Condition::Any, Expiry::Keep),
            WriteOp::Delete {
                key: b"b".to_vec(),
                condition: Condition::Any,
            },
            WriteOp::Delete {
                key: b"c".to_vec(),
                condition: Condition::Any,
            },
            WriteOp::Check {
                key: b"d".to_vec(),
                condition: Condition::Any,
            },
        ];
        let current = [Some(on_lease), Some(live(1, NOW, NOW)), None, None];
        let Ok(effects) = decide(&ops, &current, NOW) else {
            panic!("rejected")
        };
        let changes: Vec<bool> = effects.iter().map(Effect::changes).collect();
        assert_eq!(changes, [true, true, false, false]);
        let results: Vec<OpResult> = effects
            .iter()
            .map(|e| e.result(|id| (id == 7).then_some(NOW + 100)))
            .collect();
        assert_eq!(
            results,
            [
                OpResult::Put {
                    version: 3,
                    created: false,
                    created_at_us: NOW - 9,
                    updated_at_us: NOW,
                    expires_at_us: Some(NOW + 100),
                    lease: Some(7),
                },
                OpResult::Deleted { existed: true },
                OpResult::Deleted { existed: false },
                OpResult::Checked,
            ]
        );
    }
}
