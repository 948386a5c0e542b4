//! The HTTP contract of API v1: routes, request parsing, limits and the error
//! shape. [`router`] is the only place routes are listed.

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
pub mod types;
mod watch;

use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::Method;
use axum::middleware;
use axum::response::{IntoResponse as _, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use futures_util::future::Either;
use hyper_util::service::TowerToHyperService;

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

/// The whole API as a hyper service. Requests to `/v1/kv/{key}` (GET, PUT and
/// DELETE), the hottest, go straight to their handlers, with the same
/// authentication, metrics and logs as through the router; every other
/// request goes through the router.
///
/// Routing a read through axum (matching, the middleware's boxed futures and
/// `Next`, extracting the state) cost a quarter of the reads per second at 16
/// connections.
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
    let routed = TowerToHyperService::new(router(state.clone()));
    hyper::service::service_fn(move |request: hyper::Request<B>| {
        let direct = matches!(
            *request.method(),
            Method::GET | Method::PUT | Method::DELETE
        ) && request.uri().path().starts_with("/v1/kv/");
        if direct {
            let state = state.clone();
            // Boxed: hyper keeps a slot for the service's future on every
            // connection, sized for the largest one; inline, this future made
            // every connection (and every open watch) 8 KiB larger.
            Either::Left(Box::pin(async move {
                let method = request.method().clone();
                let uri = request.uri().clone();
                let mut request = request.map(Body::new);
                let answer = async {
                    if let Some(refusal) = auth::admit(&state, &mut request) {
                        return refusal;
                    }
                    let handled = match method {
                        Method::GET => handlers::get_key(State(state.clone()), request).await,
                        Method::PUT => handlers::put_key(State(state.clone()), request).await,
                        _ => handlers::delete_key(State(state.clone()), request).await,
                    };
                    handled.into_response()
                };
                Ok(observe::observed(&state, observe::KEY_ROUTE, &method, &uri, answer).await)
            }))
        } else {
            Either::Right(hyper::service::Service::call(&routed, request))
        }
    })
}

/// The whole API as one router.
pub fn router(state: AppState) -> Router {
    let router = Router::new()
        .route("/v1/kv", get(handlers::list))
        .route(
            "/v1/kv/",
            get(handlers::get_key)
                .put(handlers::put_key)
                .delete(handlers::delete_key),
        )
        .route(
            "/v1/kv/{*key}",
            get(handlers::get_key)
                .put(handlers::put_key)
                .delete(handlers::delete_key),
        )
        .route("/v1/batch", post(handlers::batch))
        .route("/v1/batch/get", post(handlers::batch_get))
        .route("/v1/leases", post(leases::grant))
        .route("/v1/leases/{id}", get(leases::get).delete(leases::revoke))
        .route("/v1/leases/{id}/keepalive", post(leases::keepalive))
        .route("/v1/watch", get(watch::watch))
        .route("/v1/changes", get(watch::changes))
        .route("/healthz", get(handlers::healthz))
        .route("/readyz", get(handlers::readyz))
        .route("/metrics", get(observe::metrics));
    let router = if state.ui {
        router
            .route("/ui", get(console::redirect))
            .route(console::ROOT, get(console::index))
            .route("/ui/{file}", get(console::file))
    } else {
        router
    };
    let router = router
        .fallback(handlers::no_route)
        .method_not_allowed_fallback(handlers::method_not_allowed);
    // Inside `observe`, so refusals are timed and counted like any answer.
    let router = if state.auth.is_some() {
        router.layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
    } else {
        router
    };
    router
        .layer(middleware::from_fn_with_state(
            state.clone(),
            observe::observe,
        ))
        .with_state(state)
}
