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
    /// (a full disk, a failed sync). Answered as 503 `unavailable`.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// An invariant of kvstore itself broke (corrupt record, lost task).
    /// Answered as 500 `internal`.
    #[error("internal error: {0}")]
    Internal(String),
    /// The file system of the data directory is (nearly) full: writes are
    /// refused until space is freed, reads go on. Answered as 507
    /// `insufficient_storage`.
    #[error("insufficient storage: {0}")]
    InsufficientStorage(String),
}

impl From<fjall::Error> for StoreError {
    fn from(err: fjall::Error) -> Self {
        StoreError::Unavailable(err.to_string())
    }
}

impl From<io::Error> for StoreError {
    fn from(err: io::Error) -> Self {
        StoreError::Unavailable(err.to_string())
    }
}

/// The result of a storage operation.
pub type StoreResult<T> = Result<T, StoreError>;
