//! What can fail inside the library.
//!
//! A missing key is not an error: stores answer `Ok(None)`. Errors here are the
//! faults a caller cannot fix by changing its request.

use std::io;

/// A failure of the storage backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend could not be reached, timed out, or refused the operation
    /// (after a failed sync, say). Answered as 503 `unavailable`.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// An invariant of kvstore itself broke (a lost task, say). Answered as
    /// 500 `internal`, asking for a bug report.
    #[error("internal error: {0}")]
    Internal(String),
    /// Stored data failed its checks (a checksum, a header, a record that does
    /// not decode). Answered as 500 `internal` too, since a retry reads the
    /// same bytes, but what helps is restoring the data, not a bug report.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The file system of the data directory is (nearly) full: writes are
    /// refused until space is freed, reads go on. Answered as 507
    /// `insufficient_storage`.
    #[error("insufficient storage: {0}")]
    InsufficientStorage(String),
    /// A read of the change history began before the oldest revision still
    /// kept. Answered as 410 `compacted`.
    #[error(
        "revision {compact_revision} is the oldest still kept (the store is at {revision}); \
         list again and watch from the list's revision + 1"
    )]
    Compacted {
        /// The oldest revision that can still be watched.
        compact_revision: u64,
        /// The store's current revision.
        revision: u64,
    },
    /// A lease named by a request does not exist or has expired. Answered as
    /// 404 `lease_not_found`.
    #[error("lease {0:016x} does not exist or has expired; grant a new one")]
    LeaseNotFound(u64),
}

impl From<fjall::Error> for StoreError {
    /// Corrupt data is `Internal`, logged at `error`: a retry reads the same
    /// bytes, so 503 (which tells clients to retry) would be wrong, and an
    /// operator must hear of it. Every other engine error (a failed read or
    /// write, a refusal after a failed sync, a lock held by another process)
    /// is `Unavailable`.
    fn from(err: fjall::Error) -> Self {
        if is_corruption(&err) {
            tracing::error!(error = %err, "stored data is corrupt");
            return StoreError::Corrupt(err.to_string());
        }
        StoreError::Unavailable(err.to_string())
    }
}

/// Whether fjall found bytes on disk that do not check out (a checksum, a
/// header, a tag, a length, a format version), rather than failing to read
/// or write them.
pub(crate) fn is_corruption(err: &fjall::Error) -> bool {
    use fjall::{Error, LsmError};
    match err {
        // The journal's own checks, and the database's format version.
        Error::JournalRecovery(_)
        | Error::InvalidVersion(_)
        | Error::Decompress(_)
        | Error::InvalidTrailer
        | Error::InvalidTag(_)
        | Error::Unrecoverable => true,
        // The tables' and version files' checks.
        Error::Storage(
            LsmError::ChecksumMismatch { .. }
            | LsmError::Decompress(_)
            | LsmError::InvalidVersion(_)
            | LsmError::Unrecoverable
            | LsmError::InvalidTag(_)
            | LsmError::InvalidTrailer
            | LsmError::InvalidHeader(_)
            | LsmError::Utf8(_),
        ) => true,
        // A table read past its end, or at an offset that cannot be (a
        // damaged block handle makes a negative seek: EINVAL).
        Error::Storage(LsmError::Io(io)) => matches!(
            io.kind(),
            io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput
        ),
        _ => false,
    }
}

impl From<io::Error> for StoreError {
    fn from(err: io::Error) -> Self {
        StoreError::Unavailable(err.to_string())
    }
}

/// A value given as text that does not read back: a flag's value, a lease
/// id, a `ttl_ms`. The message says what was given and what is taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidValue(pub(crate) String);

/// The result of a storage operation.
pub type StoreResult<T> = Result<T, StoreError>;

#[cfg(test)]
mod tests {
    use super::*;
    use fjall::LsmError;

    #[test]
    fn corrupt_data_is_corrupt_and_failed_io_unavailable() {
        let corrupt = [
            fjall::Error::JournalRecovery(fjall::JournalRecoveryError::ChecksumMismatch),
            fjall::Error::InvalidTrailer,
            fjall::Error::Storage(LsmError::Unrecoverable),
            fjall::Error::Storage(LsmError::InvalidHeader("Block")),
            fjall::Error::Storage(LsmError::Io(io::ErrorKind::UnexpectedEof.into())),
        ];
        for err in corrupt {
            let shown = err.to_string();
            assert!(
                matches!(StoreError::from(err), StoreError::Corrupt(_)),
                "{shown}"
            );
        }
        let unavailable = [
            fjall::Error::Poisoned,
            fjall::Error::Locked,
            fjall::Error::Io(io::Error::from_raw_os_error(libc::EIO)),
            fjall::Error::Storage(LsmError::Io(io::Error::from_raw_os_error(libc::EIO))),
        ];
        for err in unavailable {
            let shown = err.to_string();
            assert!(
                matches!(StoreError::from(err), StoreError::Unavailable(_)),
                "{shown}"
            );
        }
    }
}
