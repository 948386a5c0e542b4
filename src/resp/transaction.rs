//! MULTI / EXEC / DISCARD / WATCH / UNWATCH, as one conditional batch: one
//! revision, one sync.
//!
//! EXEC runs the queued commands, with their own code, against an
//! [`Overlay`]: a store that reads through to the real one, noting the
//! version of every key it reads, and keeps the writes to itself. Then the
//! overlay's writes go to the store as one batch, each conditional on the
//! version read, with a [`WriteOp::Check`] for every key read but not
//! written and every WATCHed key. If a WATCHed key changed since WATCH, EXEC
//! answers null, as Redis does; if another key read changed meanwhile, the
//! transaction runs again on what is there now. So a transaction is atomic
//! and isolated (serializable) without a lock, on both backends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use bytes::Bytes;

use super::commands::{
    MAX_ATTEMPTS, Outcome, Right, checked_key, kept_changing, store_error, wrong_arity,
};
use super::frame::Reply;
use super::{Context, Session};
use crate::error::{StoreError, StoreResult};
use crate::storage::rules::{self, Effect, KeyMeta};
use crate::storage::{
    Change, Condition, Entry, Expiry, Feed, Found, Lease, LeaseId, Revoked, ScanPage, ScanRequest,
    Store, WriteOp, WriteOutcome,
};

/// A connection's transaction state.
#[derive(Default)]
pub(crate) struct Transaction {
    /// The commands queued since MULTI; `None` outside MULTI.
    queued: Option<Vec<Vec<Bytes>>>,
    /// A command could not be queued: EXEC discards the transaction.
    failed: bool,
    /// WATCHed keys, with their version when watched (`None`: absent).
    watched: HashMap<Vec<u8>, Option<u64>>,
}

impl Transaction {
    pub(crate) fn open(&self) -> bool {
        self.queued.is_some()
    }

    /// A command could not be queued: EXEC will discard the transaction.
    pub(crate) fn fail(&mut self) {
        self.failed = true;
    }
}

/// Commands that run at once inside MULTI rather than being queued.
pub(crate) fn runs_inside_multi(label: &str) -> bool {
    matches!(
        label,
        "exec" | "discard" | "multi" | "watch" | "quit" | "reset"
    )
}

/// Queues a command inside MULTI: `+QUEUED`, or an error that dooms the
/// transaction. Commands whose answers need more than the overlay can give
/// (a scan, kvstore's revisions) are refused here.
pub(crate) fn queue(session: &mut Session, label: &str, args: Vec<Bytes>) -> Reply {
    let refusal = match label {
        "scan" | "keys" | "randomkey" | "dbsize" | "flushdb" | "flushall" | "kv.set" | "kv.del"
        | "kv.get" | "kv.revision" | "auth" | "hello" | "select" | "client" => {
            Some(Reply::Error(format!(
                "ERR {} is not allowed inside MULTI on kvstore",
                label.to_ascii_uppercase()
            )))
        }
        _ => None,
    };
    if let Some(refusal) = refusal {
        session.transaction.fail();
        return refusal;
    }
    if let Some(queued) = &mut session.transaction.queued {
        queued.push(args);
    }
    Reply::Simple("QUEUED")
}

pub(crate) async fn run(
    context: &Context,
    session: &mut Session,
    label: &str,
    name: &str,
    args: &[Bytes],
) -> Outcome {
    match label {
        "multi" => {
            if !args.is_empty() {
                return Err(wrong_arity(name));
            }
            if session.transaction.open() {
                return Err(Reply::Error("ERR MULTI calls can not be nested".into()));
            }
            session.transaction.queued = Some(Vec::new());
            session.transaction.failed = false;
            Ok(Reply::Simple("OK"))
        }
        "discard" => {
            if !session.transaction.open() {
                return Err(Reply::Error("ERR DISCARD without MULTI".into()));
            }
            session.transaction = Transaction::default();
            Ok(Reply::Simple("OK"))
        }
        "unwatch" => {
            session.transaction.watched.clear();
            Ok(Reply::Simple("OK"))
        }
        "watch" => {
            if args.is_empty() {
                return Err(wrong_arity(name));
            }
            if session.transaction.open() {
                return Err(Reply::Error("ERR WATCH inside MULTI is not allowed".into()));
            }
            // Read as GET reads (through the cache), so that a GET after
            // WATCH never shows an older version than the one watched: a
            // read around the cache could see a write the cache has not
            // applied yet, and a value computed from the GET would then
            // pass the check.
            for key in args {
                let key = checked_key(context, session, key, Right::Read)?;
                let version = context
                    .store
                    .get(&key)
                    .await
                    .map_err(store_error)?
                    .map(|e| e.version);
                session.transaction.watched.entry(key).or_insert(version);
            }
            Ok(Reply::Simple("OK"))
        }
        _ => exec(context, session).await,
    }
}

/// `EXEC`: the queued commands' replies, or null when a WATCHed key changed.
async fn exec(context: &Context, session: &mut Session) -> Outcome {
    let Transaction {
        queued,
        failed,
        watched,
    } = std::mem::take(&mut session.transaction);
    let Some(queued) = queued else {
        return Err(Reply::Error("ERR EXEC without MULTI".into()));
    };
    if failed {
        return Err(Reply::Error(
            "EXECABORT Transaction discarded because of previous errors.".into(),
        ));
    }
    for _ in 0..MAX_ATTEMPTS {
        let overlay = Arc::new(Overlay::new(Arc::clone(&context.store)));
        let inside = context.with_store(overlay.clone());
        let mut replies = Vec::with_capacity(queued.len());
        for args in &queued {
            // Boxed: EXEC is itself a command, so this is a recursion.
            let label = super::commands::label_of(args);
            let reply = Box::pin(super::commands::execute(
                &inside,
                session,
                label,
                args.clone(),
            ))
            .await;
            replies.push(reply);
        }
        match overlay.commit(&watched).await {
            Ok(Committed::Yes) => return Ok(Reply::Array(replies)),
            Ok(Committed::WatchedChanged) => return Ok(Reply::NullArray),
            Ok(Committed::ReadChanged) => continue,
            Err(err) => return Err(store_error(err)),
        }
    }
    Err(kept_changing())
}

/// How a transaction's commit went.
enum Committed {
    Yes,
    /// A WATCHed key changed since WATCH: nothing was written.
    WatchedChanged,
    /// Another key the transaction read changed: nothing was written; run
    /// it again.
    ReadChanged,
}

/// What a transaction has read and written so far.
#[derive(Default)]
struct State {
    /// The version of each key when first read (`None`: absent).
    read: HashMap<Vec<u8>, Option<u64>>,
    /// Each key the transaction wrote, as it left it (`None`: deleted).
    written: HashMap<Vec<u8>, Option<Entry>>,
}

/// A store over the real one that a transaction's commands run against:
/// reads go through (and are noted), writes stay here until the commit.
struct Overlay {
    inner: Arc<dyn Store>,
    state: Mutex<State>,
}

impl Overlay {
    fn new(inner: Arc<dyn Store>) -> Self {
        Overlay {
            inner,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The key as the transaction sees it: its own write, else the store's
    /// entry (noting the version read).
    async fn current(&self, key: &[u8]) -> StoreResult<Option<Entry>> {
        if let Some(written) = self.state().written.get(key) {
            // Written with a deadline already past (PXAT 1): gone, as the
            // store would have it.
            let now = self.inner.now_us();
            return Ok(written.clone().filter(|entry| !entry.expired(now)));
        }
        let entry = self.inner.get(key).await?;
        self.state()
            .read
            .entry(key.to_vec())
            .or_insert(entry.as_ref().map(|e| e.version));
        Ok(entry)
    }

    /// One batch: the writes, conditional on the versions read; checks of
    /// the keys only read, and of the WATCHed ones.
    async fn commit(&self, watched: &HashMap<Vec<u8>, Option<u64>>) -> StoreResult<Committed> {
        let (ops, watched_at) = {
            let state = self.state();
            for (key, version) in watched {
                if state.read.get(key).is_some_and(|read| read != version) {
                    return Ok(Committed::WatchedChanged);
                }
            }
            let condition =
                |version: Option<u64>| version.map_or(Condition::Absent, Condition::Version);
            let mut ops = Vec::new();
            for (key, entry) in &state.written {
                let read = state.read.get(key).copied().flatten();
                ops.push(match (entry, read) {
                    (Some(entry), _) => WriteOp::Put {
                        key: key.clone(),
                        value: entry.value.clone(),
                        condition: condition(read),
                        expiry: match (entry.lease, entry.expires_at_us) {
                            (Some(lease), _) => Expiry::Lease(lease),
                            (None, Some(deadline)) => Expiry::At(deadline),
                            (None, None) => Expiry::Never,
                        },
                    },
                    (None, Some(version)) => WriteOp::Delete {
                        key: key.clone(),
                        condition: Condition::Version(version),
                    },
                    // Created and deleted again: absent before and after.
                    (None, None) => WriteOp::Check {
                        key: key.clone(),
                        condition: Condition::Absent,
                    },
                });
            }
            let mut checked: Vec<(&Vec<u8>, Option<u64>)> = state
                .read
                .iter()
                .filter(|(key, _)| !state.written.contains_key(*key))
                .map(|(key, version)| (key, *version))
                .collect();
            for (key, version) in watched {
                if !state.read.contains_key(key) && !state.written.contains_key(key) {
                    checked.push((key, *version));
                }
            }
            for (key, version) in checked {
                ops.push(WriteOp::Check {
                    key: key.clone(),
                    condition: condition(version),
                });
            }
            (ops, watched.keys().cloned().collect::<Vec<_>>())
        };
        if ops.is_empty() {
            return Ok(Committed::Yes);
        }
        let keys: Vec<Vec<u8>> = ops.iter().map(|op| op.key().to_vec()).collect();
        match self.inner.write(ops).await? {
            WriteOutcome::Applied { .. } => Ok(Committed::Yes),
            WriteOutcome::Rejected { failed } => {
                let watched_failed = failed
                    .iter()
                    .any(|f| keys.get(f.index).is_some_and(|k| watched_at.contains(k)));
                Ok(if watched_failed {
                    Committed::WatchedChanged
                } else {
                    Committed::ReadChanged
                })
            }
        }
    }
}

fn not_inside(what: &str) -> StoreError {
    StoreError::Unavailable(format!("{what} is not available inside MULTI"))
}

#[async_trait]
impl Store for Overlay {
    async fn get(&self, key: &[u8]) -> StoreResult<Option<Entry>> {
        self.current(key).await
    }

    async fn get_many(&self, keys: Vec<Vec<u8>>) -> StoreResult<Found> {
        let mut entries = Vec::with_capacity(keys.len());
        for key in &keys {
            entries.push(self.current(key).await?);
        }
        Ok(Found {
            entries,
            revision: 0,
        })
    }

    /// Checks the conditions against what the transaction sees and applies
    /// the ops to the overlay; the revision is the commit's, unknown yet (0).
    async fn write(&self, ops: Vec<WriteOp>) -> StoreResult<WriteOutcome> {
        let mut current = Vec::with_capacity(ops.len());
        for op in &ops {
            current.push(self.current(op.key()).await?);
        }
        let metas: Vec<Option<KeyMeta>> = current
            .iter()
            .map(|entry| {
                entry.as_ref().map(|e| KeyMeta {
                    version: e.version,
                    created_at_us: e.created_at_us,
                    updated_at_us: e.updated_at_us,
                    expires_at_us: e.expires_at_us,
                    lease: e.lease,
                })
            })
            .collect();
        let effects = match rules::decide(&ops, &metas, self.inner.now_us()) {
            Ok(effects) => effects,
            Err(failed) => return Ok(WriteOutcome::Rejected { failed }),
        };
        let mut state = self.state();
        let mut results = Vec::with_capacity(ops.len());
        for (op, effect) in ops.into_iter().zip(effects) {
            // What the overlay holds already carries a lease's deadline as
            // its own, so it answers that deadline.
            results.push(effect.result(|_| None));
            match (op, effect) {
                (WriteOp::Put { key, value, .. }, Effect::Put { meta, .. }) => {
                    let entry = Entry {
                        key: key.clone(),
                        value,
                        version: meta.version,
                        revision: 0,
                        created_at_us: meta.created_at_us,
                        updated_at_us: meta.updated_at_us,
                        expires_at_us: meta.expires_at_us,
                        lease: meta.lease,
                    };
                    state.written.insert(key, Some(entry));
                }
                (WriteOp::Delete { key, .. }, _) => {
                    state.written.insert(key, None);
                }
                _ => {}
            }
        }
        Ok(WriteOutcome::Applied {
            revision: 0,
            results,
        })
    }

    async fn scan(&self, _request: ScanRequest) -> StoreResult<ScanPage> {
        Err(not_inside("a scan"))
    }

    async fn changes(&self, _after: u64, _limit: usize) -> StoreResult<Vec<Change>> {
        Err(not_inside("the change history"))
    }

    fn feed(&self) -> Arc<Feed> {
        self.inner.feed()
    }

    async fn grant_lease(&self, _ttl_ms: u64, _owner: Option<String>) -> StoreResult<Lease> {
        Err(not_inside("a lease"))
    }

    async fn keep_lease_alive(&self, _id: LeaseId) -> StoreResult<Lease> {
        Err(not_inside("a lease"))
    }

    async fn lease(&self, _id: LeaseId) -> StoreResult<Option<Lease>> {
        Err(not_inside("a lease"))
    }

    async fn lease_keys(&self, _id: LeaseId) -> StoreResult<u64> {
        Err(not_inside("a lease"))
    }

    async fn revoke_lease(&self, _id: LeaseId) -> StoreResult<Revoked> {
        Err(not_inside("a lease"))
    }

    fn now_us(&self) -> i64 {
        self.inner.now_us()
    }

    async fn ready(&self) -> StoreResult<()> {
        self.inner.ready().await
    }

    async fn close(&self) -> StoreResult<()> {
        Ok(())
    }

    fn describe(&self) -> String {
        format!("a transaction over {}", self.inner.describe())
    }
}
