//! Where a request's time went, for the slow-request log.
//!
//! The HTTP layer opens a scope per request; the storage layers below add to
//! it without knowing about HTTP. Outside a scope, recording does nothing.

use std::cell::Cell;
use std::future::Future;
use std::time::Duration;

/// Time spent below the HTTP layer, by phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    /// Waiting in and calling the storage backend (all of it, the phases
    /// below included).
    pub storage: Duration,
    /// Waiting for the committer to take the write.
    pub queued: Duration,
    /// The commit of the write's group, its sync included.
    pub commit: Duration,
}

tokio::task_local! {
    static TIMINGS: Cell<Timings>;
}

/// Runs `future` in a fresh scope and returns what was recorded in it.
pub async fn scope<F: Future>(future: F) -> (F::Output, Timings) {
    TIMINGS
        .scope(Cell::new(Timings::default()), async move {
            let output = future.await;
            (output, TIMINGS.with(Cell::get))
        })
        .await
}

/// Adds to the current request's timings, if there is a scope.
pub fn record(update: impl FnOnce(&mut Timings)) {
    let _ = TIMINGS.try_with(|cell| {
        let mut timings = cell.get();
        update(&mut timings);
        cell.set(timings);
    });
}
