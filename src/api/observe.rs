//! What happens around every request: the request timeout, metrics by route
//! and status, a debug line per request, and the slow-request log.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use metrics::SharedString;

use super::AppState;
use super::error::ApiError;
use super::routes::Route;
use crate::telemetry::Metrics;
use crate::timing;

/// How requests are bounded and watched.
#[derive(Clone)]
pub struct Observe {
    /// Bounds the reading of a request body (storage calls are bounded by
    /// [`crate::storage::layer::guard::GuardedStore`]).
    pub request_timeout: Duration,
    /// Requests slower than this are logged at WARN with where the time went.
    pub slow_request: Duration,
    /// The Prometheus renderer; `None` when metrics are off.
    pub metrics: Option<Arc<Metrics>>,
}

/// Longest key shown in the slow-request log.
const LOGGED_KEY_CHARS: usize = 64;

/// Times `answer`, the answer to a request of `method` to `uri` on `route`,
/// and counts and logs it.
pub(crate) async fn observed(
    state: &AppState,
    route: &Route,
    method: &Method,
    uri: &Uri,
    answer: impl Future<Output = Response>,
) -> Response {
    let start = Instant::now();
    let method = method_label(method);
    let (label, waits) = (route.label, route.waits);
    let (response, timings) = timing::scope(answer).await;
    let elapsed = start.elapsed();
    let status = response.status();
    if state.observe.metrics.is_some() {
        metrics::counter!(
            "kvstore_http_requests_total",
            "route" => label,
            "method" => method,
            "status" => status_label(status)
        )
        .increment(1);
        metrics::histogram!(
            "kvstore_http_request_duration_seconds",
            "route" => label,
            "method" => method
        )
        .record(elapsed.as_secs_f64());
    }
    tracing::debug!(
        method = %method,
        route = label,
        key = logged_key(uri),
        status = status.as_u16(),
        micros = elapsed.as_micros() as u64,
        "request"
    );
    if elapsed > state.observe.slow_request && !waits {
        tracing::warn!(
            method = %method,
            route = label,
            key = logged_key(uri),
            status = status.as_u16(),
            total_ms = millis(elapsed),
            storage_ms = millis(timings.storage),
            committer_wait_ms = millis(timings.queued),
            commit_and_sync_ms = millis(timings.commit),
            "slow request"
        );
    }
    response
}

/// The key of a `/v1/kv/{key}` path, shortened for a log line.
fn logged_key(uri: &Uri) -> String {
    uri.path()
        .strip_prefix("/v1/kv/")
        .unwrap_or_default()
        .chars()
        .take(LOGGED_KEY_CHARS)
        .collect()
}

/// Labels as static strings: recording a metric allocates nothing.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        _ => "other",
    }
}

fn status_label(status: StatusCode) -> SharedString {
    match status.as_u16() {
        200 => SharedString::const_str("200"),
        201 => SharedString::const_str("201"),
        204 => SharedString::const_str("204"),
        400 => SharedString::const_str("400"),
        404 => SharedString::const_str("404"),
        412 => SharedString::const_str("412"),
        other => SharedString::from(other.to_string()),
    }
}

/// Milliseconds with microsecond precision, for log lines.
fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1e6).round() / 1e3
}

pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    let Some(metrics) = &state.observe.metrics else {
        return ApiError::not_found("metrics are turned off (--metrics false)").into_response();
    };
    let body = metrics.render(state.store.as_ref());
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}
