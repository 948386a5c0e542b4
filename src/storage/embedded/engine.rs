//! The engine's handles (fjall's database and kvstore's keyspaces), and
//! opening them: with the syncs fjall leaves out, and with the damaged file
//! named when the data is corrupt.

use std::path::{Path, PathBuf};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, Readable};

use super::{KEYSPACES_DIR, MAX_JOURNALING_BYTES, REVISION_KEY};
use crate::error::{StoreError, StoreResult};

/// The engine's handles, replaced together when the engine is reopened.
pub(super) struct Engine {
    pub(super) db: Database,
    pub(super) kv: Keyspace,
    pub(super) meta: Keyspace,
    /// The change log: one record per commit group, keyed by its first
    /// revision (see [`crate::storage::changes`]).
    pub(super) changes: Keyspace,
    /// What expires, by deadline; the keys of each lease; the leases (see
    /// [`super::expiry`]).
    pub(super) deadlines: Keyspace,
    pub(super) lease_keys: Keyspace,
    pub(super) leases: Keyspace,
}

impl Engine {
    /// Opens the engine in `path`, with a block cache of this size; also
    /// gives the revision it holds.
    pub(super) fn open(path: &Path, block_cache_bytes: u64) -> StoreResult<(Self, u64)> {
        let db = Database::builder(path)
            .cache_size(block_cache_bytes)
            .manual_journal_persist(true)
            .max_journaling_size(MAX_JOURNALING_BYTES)
            .open()
            .map_err(|err| open_failed(path, err))?;
        let kv = db.keyspace("kv", KeyspaceCreateOptions::default)?;
        let meta = db.keyspace("meta", KeyspaceCreateOptions::default)?;
        let changes = db.keyspace("changes", KeyspaceCreateOptions::default)?;
        let deadlines = db.keyspace("deadlines", KeyspaceCreateOptions::default)?;
        let lease_keys = db.keyspace("lease_keys", KeyspaceCreateOptions::default)?;
        let leases = db.keyspace("leases", KeyspaceCreateOptions::default)?;
        // fjall creates `keyspaces/<id>` without an fsync of `keyspaces/`: a
        // power cut would take the new folder away, and with it every write
        // its journal holds for that keyspace. Syncing both levels here, before
        // the first write, makes the folders as durable as the journal.
        crate::files::sync_dir(&path.join(KEYSPACES_DIR))?;
        crate::files::sync_dir(path)?;
        let engine = Engine {
            db,
            kv,
            meta,
            changes,
            deadlines,
            lease_keys,
            leases,
        };
        let revision = engine.revision_in(&engine.db.snapshot())?;
        Ok((engine, revision))
    }

    /// Every keyspace of the engine.
    pub(super) fn keyspaces(&self) -> [&Keyspace; 6] {
        [
            &self.kv,
            &self.changes,
            &self.deadlines,
            &self.lease_keys,
            &self.leases,
            &self.meta,
        ]
    }

    /// The store revision a snapshot (or the engine itself) holds.
    pub(super) fn revision_in(&self, view: &impl Readable) -> StoreResult<u64> {
        match view.get(&self.meta, REVISION_KEY)? {
            Some(raw) => Ok(u64::from_le_bytes(raw.as_ref().try_into().map_err(
                |_| StoreError::Corrupt("the revision record is not 8 bytes".into()),
            )?)),
            None => Ok(0),
        }
    }
}

/// fjall's errors name no file. An open that fails on corrupt data names the
/// files that can hold the damage, so that the operator knows what to restore.
fn open_failed(path: &Path, err: fjall::Error) -> StoreError {
    if !crate::error::is_corruption(&err) {
        return err.into();
    }
    let (suspects, or_else) = match err {
        fjall::Error::JournalRecovery(_)
        | fjall::Error::InvalidTrailer
        | fjall::Error::InvalidTag(_)
        | fjall::Error::Decompress(_) => (
            files_in(path, |file| file.extension().is_some_and(|e| e == "jnl")),
            "",
        ),
        fjall::Error::InvalidVersion(_) => (vec![path.join("version")], ""),
        // fjall reads every table's trailer, index and filter at open, and
        // the version file that lists a keyspace's tables.
        _ => (
            files_in(&path.join("keyspaces"), |_| true)
                .iter()
                .flat_map(|keyspace| files_in(&keyspace.join("tables"), |_| true))
                .collect(),
            " (or a keyspace's version file)",
        ),
    };
    // A big store has hundreds of tables.
    const SHOWN: usize = 20;
    let mut named: Vec<String> = suspects
        .iter()
        .take(SHOWN)
        .map(|file| file.display().to_string())
        .collect();
    if suspects.len() > SHOWN {
        named.push(format!("and {} more", suspects.len() - SHOWN));
    }
    let place = match named.as_slice() {
        [] => format!("under {}", path.display()),
        [file] => file.clone(),
        files => format!("one of {}", files.join(", ")),
    };
    match StoreError::from(err) {
        StoreError::Corrupt(why) => {
            StoreError::Corrupt(format!("{why}; the damaged file is {place}{or_else}"))
        }
        other => other,
    }
}

/// The entries of `dir` whose path passes `keep`, sorted; none if `dir`
/// cannot be read.
fn files_in(dir: &Path, keep: impl Fn(&Path) -> bool) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|file| keep(file))
        .collect();
    files.sort();
    files
}
