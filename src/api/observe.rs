//! What happens around every request: the request timeout, metrics by route
//! and status, a debug line per request, and the slow-request log.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use metrics::{Counter, Histogram};

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
    let (label, waits) = (route.label, route.waits);
    let (response, timings) = timing::scope(answer).await;
    let elapsed = start.elapsed();
    let status = response.status();
    if state.observe.metrics.is_some() {
        route.metrics.record(label, method, status, elapsed);
    }
    let method = METHODS[method_index(method)];
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

/// The methods with a label of their own, in the order of [`method_index`];
/// any other is counted as `other`.
const METHODS: [&str; 6] = ["GET", "PUT", "POST", "DELETE", "HEAD", "other"];

fn method_index(method: &Method) -> usize {
    match *method {
        Method::GET => 0,
        Method::PUT => 1,
        Method::POST => 2,
        Method::DELETE => 3,
        Method::HEAD => 4,
        _ => 5,
    }
}

/// The statuses whose counters are kept resolved; any other status is
/// looked up in the recorder each time.
const STATUSES: [&str; 6] = ["200", "201", "204", "400", "404", "412"];

/// A route's request counters and duration histograms, each resolved on its
/// first use: building a metric's key and looking it up in the recorder on
/// every request cost more than the recording itself.
pub(crate) struct RouteMetrics {
    requests: [[OnceLock<Counter>; STATUSES.len()]; METHODS.len()],
    durations: [OnceLock<Histogram>; METHODS.len()],
}

impl RouteMetrics {
    pub(crate) const fn new() -> Self {
        RouteMetrics {
            requests: [const { [const { OnceLock::new() }; STATUSES.len()] }; METHODS.len()],
            durations: [const { OnceLock::new() }; METHODS.len()],
        }
    }

    /// Counts one request to the route `label` and records how long it took.
    fn record(&self, label: &'static str, method: &Method, status: StatusCode, took: Duration) {
        let index = method_index(method);
        let method = METHODS[index];
        let status = status.as_str();
        let requests = |status: String| {
            metrics::counter!(
                "kvstore_http_requests_total",
                "route" => label,
                "method" => method,
                "status" => status
            )
        };
        match STATUSES.iter().position(|known| *known == status) {
            Some(known) => self.requests[index][known]
                .get_or_init(|| requests(STATUSES[known].to_owned()))
                .increment(1),
            None => requests(status.to_owned()).increment(1),
        }
        self.durations[index]
            .get_or_init(|| {
                metrics::histogram!(
                    "kvstore_http_request_duration_seconds",
                    "route" => label,
                    "method" => method
                )
            })
            .record(took.as_secs_f64());
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
