//! PostgreSQL's errors as the store's: what a client should do about them.

use deadpool_postgres::PoolError;

use crate::error::StoreError;

/// Maps a driver error: a full disk is `InsufficientStorage` (507); lost
/// connections, timeouts, cancellations, other shortages, and a server that
/// is no longer the primary are `Unavailable` (503); anything else is a bug
/// (500).
pub(super) fn map_pg(err: &tokio_postgres::Error) -> StoreError {
    match err.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            let class = code.get(..2).unwrap_or_default();
            if *db.code() == tokio_postgres::error::SqlState::DISK_FULL {
                StoreError::InsufficientStorage(format!(
                    "PostgreSQL: {} ({code}); writes resume once space is freed on the database server",
                    db.message()
                ))
            } else if *db.code() == tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION {
                // A demoted primary, or a standby the URL names alone: the
                // client should retry once a primary is back.
                StoreError::Unavailable(format!(
                    "PostgreSQL: {} ({code}); the server is not the primary (a failover is under way, or the URL names a standby)",
                    db.message()
                ))
            } else if matches!(class, "08" | "40" | "53" | "57" | "58" | "55") {
                StoreError::Unavailable(format!("PostgreSQL: {} ({code})", db.message()))
            } else {
                StoreError::Internal(format!("PostgreSQL: {} ({code})", db.message()))
            }
        }
        None => StoreError::Unavailable(format!("PostgreSQL: {err}")),
    }
}

pub(super) fn map_pool(err: PoolError) -> StoreError {
    match err {
        PoolError::Timeout(kind) => StoreError::Unavailable(format!(
            "PostgreSQL did not answer in time ({kind:?} of a connection)"
        )),
        PoolError::Backend(err) => map_pg(&err),
        PoolError::Closed => StoreError::Unavailable("the store is closed".into()),
        other => StoreError::Unavailable(format!("PostgreSQL pool: {other}")),
    }
}

/// Whether the error says the connection is gone (and the statement did not
/// run on it).
pub(super) fn is_lost_connection(err: &tokio_postgres::Error) -> bool {
    err.is_closed()
        || err.as_db_error().is_some_and(|db| {
            let code = db.code().code();
            code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
        })
}

/// Counts the transactions tried again, by cause: contention that
/// operators see nowhere else, since the client only sees a slower answer.
pub const RETRIES: &str = "kvstore_postgres_retries_total";

/// Whether the transaction may simply be tried again: a deadlock, a
/// serialization failure, or a revision that was settled as a gap before the
/// write could log it (see `watch.rs`), which a new revision cures. Every
/// caller that gets `true` tries again, so the retry is counted here, in
/// [`RETRIES`].
pub(super) fn is_retryable(err: &tokio_postgres::Error) -> bool {
    let Some(db) = err.as_db_error() else {
        return false;
    };
    let cause = match db.code().code() {
        "40P01" => "deadlock",
        "40001" => "serialization",
        "23505" if db.constraint() == Some(REVISIONS_KEY) => "settled_gap",
        _ => return false,
    };
    metrics::counter!(RETRIES, "cause" => cause).increment(1);
    true
}

/// The primary key of `kv_revisions`, on which a late write meets the gap
/// that settled its revision.
const REVISIONS_KEY: &str = "kv_revisions_pkey";
