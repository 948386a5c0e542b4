//! `GET /v1/watch` (Server-Sent Events) and `GET /v1/changes` (JSON pages):
//! the store's changes to a range, by revision, resumable.

use std::convert::Infallible;
use std::ops::Bound;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::stream::{self, Stream};
use serde::Serialize;
use serde_json::json;

use super::AppState;
use super::auth::{self, access_of};
use super::error::ApiError;
use super::handlers::{ApiResult, page_limit, range_params, requested_range, sized_json_response};
use super::render::ChangeView;
use super::request::{Query, check_key};
use crate::error::StoreError;
use crate::storage::{Change, KeyRange, Watcher};

/// A watch that has had nothing to say for this long says how far it has
/// got (`event: progress`); the API promises at most 10 s.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// SSE comments keep idle connections open through proxies that close quiet
/// ones; the API promises at least every 15 s.
const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(15);
/// `wait_ms` of `/v1/changes`, at most.
const MAX_WAIT_MS: u64 = 60_000;
const DEFAULT_CHANGES_LIMIT: usize = 100;

/// The range a watch names (`key`, `prefix`, `start`/`end`, or every key),
/// clipped to what the request's token may read.
fn watched_range(query: &Query, state: &AppState, request: &Request) -> Result<KeyRange, ApiError> {
    let access = access_of(state, request.extensions())?;
    let (start, end, prefix) = range_params(query, state)?;
    if let Some(key) = query.get("key") {
        if start.is_some() || end.is_some() || prefix.is_some() {
            return Err(ApiError::invalid_request(
                "key cannot be combined with prefix, start or end",
            ));
        }
        check_key(key, &state.limits)
            .map_err(|err| ApiError::invalid_key(format!("key: {}", err.message)))?;
        access.check_read(key.as_bytes(), "")?;
        return Ok(KeyRange {
            lower: Bound::Included(key.as_bytes().to_vec()),
            upper: Bound::Included(key.as_bytes().to_vec()),
        });
    }
    let (low, high) = access.clip(requested_range(start, end, prefix.as_deref()))?;
    Ok(KeyRange {
        lower: auth::lower_bound(low),
        upper: auth::upper_bound(high),
    })
}

/// A revision parameter: a whole number.
pub(crate) fn revision_param(query: &Query, name: &str) -> Result<Option<u64>, ApiError> {
    query
        .get(name)
        .map(|text| {
            text.parse::<u64>().map_err(|_| {
                ApiError::invalid_request(format!(
                    "{name} must be a revision (a whole number), not '{text}'"
                ))
            })
        })
        .transpose()
}

/// Where a watch starts: after the `Last-Event-ID` a reconnecting client
/// sends, else at `from_revision`, else after the latest revision.
fn watch_start(query: &Query, request: &Request) -> Result<Option<u64>, ApiError> {
    if let Some(last) = request.headers().get("last-event-id") {
        let last = last
            .to_str()
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok())
            .ok_or_else(|| {
                ApiError::invalid_request("Last-Event-ID must be a revision (a whole number)")
            })?;
        return Ok(Some(last + 1));
    }
    match revision_param(query, "from_revision")? {
        Some(0) => Err(ApiError::invalid_request(
            "from_revision must be 1 or more (leave it out to watch from the next revision)",
        )),
        from => Ok(from),
    }
}

pub(crate) async fn watch(State(state): State<AppState>, request: Request) -> ApiResult {
    let query = Query::parse(
        request.uri().query(),
        &["key", "prefix", "start", "end", "from_revision"],
    )?;
    let range = watched_range(&query, &state, &request)?;
    let from = watch_start(&query, &request)?;
    let store = state.store.clone();
    let watcher = Watcher::start(store.feed(), store, range, from).await?;
    let stream = watch_stream(watcher, state.shutdown.clone());
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE_EVERY))
        .into_response();
    // Proxies such as nginx buffer responses unless told not to.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// What the stream of one watch does next.
enum Step {
    Running(Watcher, tokio::sync::watch::Receiver<bool>),
    Ended,
}

fn watch_stream(
    watcher: Watcher,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    stream::unfold(Step::Running(watcher, shutdown), |step| async move {
        let Step::Running(mut watcher, mut shutdown) = step else {
            return None;
        };
        let next = tokio::select! {
            next = watcher.next(PROGRESS_EVERY) => next,
            // The server is shutting down: end the stream so that the
            // connection can close; the client resumes elsewhere.
            () = shutting_down(&mut shutdown) => return None,
        };
        let event = match next {
            Ok(Some(change)) => change_event(&change),
            Ok(None) => {
                let revision = watcher.progress();
                SseEvent::default()
                    .id(revision.to_string())
                    .event("progress")
                    .data(json!({ "revision": revision }).to_string())
            }
            Err(StoreError::Compacted {
                compact_revision,
                revision,
            }) => {
                metrics::counter!("kvstore_watch_compacted_total").increment(1);
                let event = SseEvent::default().event("compacted").data(
                    json!({"compact_revision": compact_revision, "revision": revision}).to_string(),
                );
                return Some((Ok(event), Step::Ended));
            }
            Err(err) => {
                tracing::debug!(error = %err, "a watch ended");
                return None;
            }
        };
        Some((Ok(event), Step::Running(watcher, shutdown)))
    })
}

fn change_event(change: &Change) -> SseEvent {
    let data = serde_json::to_string(&ChangeView::new(change))
        .unwrap_or_else(|_| json!({"revision": change.revision, "events": []}).to_string());
    SseEvent::default()
        .id(change.revision.to_string())
        .event("change")
        .data(data)
}

#[derive(Serialize)]
struct ChangesPage<'a> {
    changes: Vec<ChangeView<'a>>,
    revision: u64,
}

pub(crate) async fn changes(State(state): State<AppState>, request: Request) -> ApiResult {
    let query = Query::parse(
        request.uri().query(),
        &["key", "prefix", "start", "end", "after", "limit", "wait_ms"],
    )?;
    let range = watched_range(&query, &state, &request)?;
    let after = revision_param(&query, "after")?;
    let limit = page_limit(&query, DEFAULT_CHANGES_LIMIT)?;
    let wait = match query.get("wait_ms") {
        None => Duration::ZERO,
        Some(text) => text
            .parse::<u64>()
            .ok()
            .filter(|ms| *ms <= MAX_WAIT_MS)
            .map(Duration::from_millis)
            .ok_or_else(|| {
                ApiError::invalid_request(format!(
                    "wait_ms must be a whole number from 0 to {MAX_WAIT_MS}, not '{text}'"
                ))
            })?,
    };
    let store = state.store.clone();
    let mut watcher = Watcher::start(
        store.feed(),
        store,
        range,
        after.map(|a| a.saturating_add(1)),
    )
    .await?;
    let mut found: Vec<Change> = Vec::new();
    let mut shutdown = state.shutdown.clone();
    let deadline = tokio::time::Instant::now() + wait;
    while found.len() < limit {
        // Only the first change is waited for; the rest are what is there.
        let wait = if found.is_empty() {
            deadline.saturating_duration_since(tokio::time::Instant::now())
        } else {
            Duration::ZERO
        };
        let next = tokio::select! {
            next = watcher.next(wait) => next?,
            () = shutting_down(&mut shutdown) => None,
        };
        match next {
            Some(change) => found.push(change),
            None => break,
        }
    }
    let revision = match found.last() {
        Some(last) if found.len() == limit => last.revision,
        last => watcher
            .progress()
            .max(last.map_or(0, |change| change.revision)),
    };
    let page = ChangesPage {
        changes: found.iter().map(ChangeView::new).collect(),
        revision,
    };
    let capacity = 64 + found.iter().map(Change::weight).sum::<usize>() * 2;
    sized_json_response(StatusCode::OK, &page, capacity)
}

/// Completes when the server starts shutting down (never, when nothing can
/// tell it to).
async fn shutting_down(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    if shutdown.wait_for(|down| *down).await.is_err() {
        std::future::pending::<()>().await;
    }
}
