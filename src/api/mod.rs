//! The HTTP contract of API v1: routes, request parsing, limits and the error
//! shape. [`routes`] lists every route and answers every request.

pub(crate) mod auth;
mod consistency;
pub(crate) mod console;
mod cursor;
pub(crate) mod error;
#[doc(hidden)]
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod handlers;
mod leases;
mod observe;
mod render;
pub(crate) mod request;
mod routes;
pub mod types;
mod watch;

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;

pub use cursor::{CursorKey, CursorKeyError};
pub use observe::Observe;
#[cfg(feature = "internals")]
pub use render::EntryView;

use crate::storage::Store;

/// Size limits of requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Longest key, in bytes of UTF-8.
    pub max_key_bytes: usize,
    /// Largest value, counted on the decoded bytes.
    pub max_value_bytes: usize,
    /// Largest request body.
    pub max_body_bytes: usize,
}

impl Default for Limits {
    /// The API's limits: 1024-byte keys, 1 MiB values, 16 MiB bodies.
    fn default() -> Self {
        Limits {
            max_key_bytes: 1024,
            max_value_bytes: 1 << 20,
            max_body_bytes: 16 << 20,
        }
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The store the handlers read and write.
    pub store: Arc<dyn Store>,
    /// Size limits of requests.
    pub limits: Limits,
    /// Metrics and the slow-request log.
    pub observe: Observe,
    /// Token rules; `None` when auth is off (every request may do anything).
    pub auth: Option<Arc<auth::Auth>>,
    /// Signs and checks range cursors.
    pub cursor_key: CursorKey,
    /// Turns true when the server shuts down: watch streams end then.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Whether the web console is served at `/ui/`.
    pub ui: bool,
}

/// Ops in one batch, keys in one batch read, and items on one range page, at most.
pub const MAX_BATCH_OPS: usize = 1000;
pub const MAX_PAGE_LIMIT: usize = 1000;
pub const DEFAULT_PAGE_LIMIT: usize = 100;
/// A range page ends early once its values add up to this many bytes.
pub const MAX_PAGE_VALUE_BYTES: usize = 4 << 20;

/// The whole API as a hyper service: every request through
/// [`routes::dispatch`].
///
/// Generic over the request body so that benchmarks can call it without a
/// connection; the server gives it hyper's `Incoming`.
pub fn service<B>(
    state: AppState,
) -> impl hyper::service::Service<
    hyper::Request<B>,
    Response = Response,
    Error = Infallible,
    Future = impl Future<Output = Result<Response, Infallible>> + Send,
> + Clone
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    hyper::service::service_fn(move |request: hyper::Request<B>| {
        let state = state.clone();
        // Boxed: hyper keeps a slot for this future on every connection for
        // as long as it is open, sized for it; inline, it made every
        // connection, and so every open watch, 3.4 KiB larger.
        Box::pin(async move { Ok(routes::dispatch(state, request.map(Body::new)).await) })
    })
}
