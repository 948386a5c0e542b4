//! Thin handlers: check the request, call the store, shape the answer.

use std::collections::HashSet;
use std::ops::Bound;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;

use super::auth::{self, access_of};
use super::consistency::{READ_PARAMS, ReadFrom};
use super::cursor::CursorScope;
use super::error::ApiError;
use super::leases;
use super::render::EntryView;
use super::request::{
    BodyKind, Query, body_kind, check_key, check_value_size, decode_value, key_from_path,
    parse_json, read_body, write_condition,
};
use super::types::ErrorCode;
use super::types::{
    BatchGetRequest, BatchGetResponse, BatchOpKind, BatchRequest, BatchResponse, BatchResult,
    ListResponse, PutBody, PutResponse,
};
use super::{
    AppState, DEFAULT_PAGE_LIMIT, Limits, MAX_BATCH_OPS, MAX_PAGE_LIMIT, MAX_PAGE_VALUE_BYTES,
};
use crate::storage::{Condition, Expiry, OpResult, ScanRequest, WriteOp, WriteOutcome};

pub(crate) type ApiResult = Result<Response, ApiError>;

pub(crate) fn json_response<T: Serialize>(status: StatusCode, body: &T) -> ApiResult {
    // serde_json's own starting size.
    sized_json_response(status, body, 128)
}

/// A JSON answer written into a buffer of `capacity` bytes: a page of entries
/// sized up front is not copied again each time the buffer doubles.
pub(crate) fn sized_json_response<T: Serialize>(
    status: StatusCode,
    body: &T,
    capacity: usize,
) -> ApiResult {
    let mut bytes = Vec::with_capacity(capacity);
    serde_json::to_writer(&mut bytes, body)
        .map_err(|err| ApiError::internal(format!("encoding the answer: {err}")))?;
    let mut response = (status, bytes).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

fn with_etag(mut response: Response, version: u64) -> Response {
    if let Ok(tag) = HeaderValue::from_str(&format!("\"{version}\"")) {
        response.headers_mut().insert(header::ETAG, tag);
    }
    response
}

fn key_text(key: Vec<u8>) -> String {
    // Keys are checked to be UTF-8 before they are stored.
    String::from_utf8(key).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Whether the client asked for the raw value bytes.
fn wants_raw(query: &Query, headers: &HeaderMap) -> Result<bool, ApiError> {
    if query.flag("raw")? {
        return Ok(true);
    }
    Ok(headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| {
            accept.split(',').any(|media| {
                media
                    .split(';')
                    .next()
                    .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/octet-stream"))
            })
        }))
}

pub(crate) async fn get_key(State(state): State<AppState>, request: Request) -> ApiResult {
    let key = key_from_path(request.uri().path(), &state.limits)?;
    access_of(&state, request.extensions())?.check_read(&key, "")?;
    let query = Query::parse(
        request.uri().query(),
        &["raw", READ_PARAMS[0], READ_PARAMS[1]],
    )?;
    let raw = wants_raw(&query, request.headers())?;
    let read_from = ReadFrom::parse(&query)?;
    let from_replica = match read_from.replicas(&state) {
        Some((replicas, min_revision)) => replicas.get(&key, min_revision).await,
        None => None,
    };
    let (entry, served) = read_from
        .or_primary(from_replica, state.store.get(&key))
        .await?;
    let entry =
        entry.ok_or_else(|| served.mark_error(ApiError::not_found("the key does not exist")))?;
    let version = entry.version;
    let response = if raw {
        let mut response = (StatusCode::OK, entry.value).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        response
    } else {
        json_response(StatusCode::OK, &EntryView::new(&entry, false))?
    };
    Ok(served.mark(with_etag(response, version)))
}

pub(crate) async fn put_key(State(state): State<AppState>, request: Request) -> ApiResult {
    let (parts, body) = request.into_parts();
    let key = key_from_path(parts.uri.path(), &state.limits)?;
    let access = access_of(&state, &parts.extensions)?;
    access.check_write(&key, "")?;
    let query = Query::parse(parts.uri.query(), &["ttl_ms", "keep_ttl", "lease"])?;
    let condition = write_condition(&parts.headers)?.unwrap_or(Condition::Any);
    let kind = body_kind(&parts.headers, true)?;
    let body = read_body(&parts.headers, body, &state).await?;
    let (value, expiry) = match kind {
        BodyKind::Raw => {
            check_value_size(body.len(), &state.limits)?;
            (body.to_vec(), leases::expiry_from_query(&query)?)
        }
        BodyKind::Json => {
            if query
                .get("ttl_ms")
                .or(query.get("keep_ttl"))
                .or(query.get("lease"))
                .is_some()
            {
                return Err(ApiError::invalid_request(
                    "a JSON body carries ttl_ms, keep_ttl and lease as fields, not as query parameters",
                ));
            }
            put_value(&body, &state.limits)?
        }
    };
    let ops = vec![WriteOp::Put {
        key: key.clone(),
        value,
        condition,
        expiry,
    }];
    leases::check_attach(&state, &access, &ops).await?;
    let outcome = state.store.write(ops).await?;
    match outcome {
        WriteOutcome::Applied { revision, results } => {
            let Some(OpResult::Put {
                version, created, ..
            }) = results.first().cloned()
            else {
                return Err(ApiError::internal("a put had no put result"));
            };
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let body = PutResponse {
                key: key_text(key),
                version,
                revision,
                created,
            };
            Ok(with_etag(json_response(status, &body)?, version))
        }
        WriteOutcome::Rejected { failed } => Err(ApiError::version_mismatch(
            failed.first().and_then(|f| f.current_version),
        )),
    }
}

pub(crate) async fn delete_key(State(state): State<AppState>, request: Request) -> ApiResult {
    let key = key_from_path(request.uri().path(), &state.limits)?;
    access_of(&state, request.extensions())?.check_write(&key, "")?;
    Query::parse(request.uri().query(), &[])?;
    let condition = write_condition(request.headers())?;
    if condition == Some(Condition::Absent) {
        return Err(ApiError::invalid_request(
            "If-None-Match: * cannot be used with DELETE",
        ));
    }
    // Without a condition, an absent key is a 404 and takes no revision.
    let outcome = state
        .store
        .write(vec![WriteOp::Delete {
            key,
            condition: condition.unwrap_or(Condition::Exists),
        }])
        .await?;
    match outcome {
        WriteOutcome::Applied { .. } => Ok(StatusCode::NO_CONTENT.into_response()),
        WriteOutcome::Rejected { failed } if condition.is_some() => Err(
            ApiError::version_mismatch(failed.first().and_then(|f| f.current_version)),
        ),
        WriteOutcome::Rejected { .. } => Err(ApiError::not_found("the key does not exist")),
    }
}

pub(crate) fn range_bound(
    query: &Query,
    name: &str,
    state: &AppState,
) -> Result<Option<Vec<u8>>, ApiError> {
    query
        .get(name)
        .map(|text| {
            check_key(text, &state.limits)
                .map(|()| text.as_bytes().to_vec())
                .map_err(|err| ApiError::invalid_request(format!("{name}: {}", err.message)))
        })
        .transpose()
}

/// The `limit` parameter of a page: 1 to [`MAX_PAGE_LIMIT`], `default`
/// when absent.
pub(crate) fn page_limit(query: &Query, default: usize) -> Result<usize, ApiError> {
    let Some(text) = query.get("limit") else {
        return Ok(default);
    };
    text.parse::<usize>()
        .ok()
        .filter(|n| (1..=MAX_PAGE_LIMIT).contains(n))
        .ok_or_else(|| {
            ApiError::invalid_request(format!(
                "limit must be a whole number from 1 to {MAX_PAGE_LIMIT}, not '{text}'"
            ))
        })
}

/// The `start`, `end` and `prefix` parameters of a range, checked.
pub(crate) fn range_params(query: &Query, state: &AppState) -> Result<RangeParams, ApiError> {
    let start = range_bound(query, "start", state)?;
    let end = range_bound(query, "end", state)?;
    let prefix = range_bound(query, "prefix", state)?;
    if prefix.is_some() && (start.is_some() || end.is_some()) {
        return Err(ApiError::invalid_request(
            "prefix cannot be combined with start or end",
        ));
    }
    Ok((start, end, prefix))
}

/// `start`, `end` and `prefix`, each when given.
pub(crate) type RangeParams = (Option<Vec<u8>>, Option<Vec<u8>>, Option<Vec<u8>>);

/// The keys a range's parameters name, as `[low, high)`.
pub(crate) fn requested_range(
    start: Option<Vec<u8>>,
    end: Option<Vec<u8>>,
    prefix: Option<&[u8]>,
) -> auth::Range {
    match prefix {
        Some(p) => (Some(p.to_vec()), crate::storage::changes::prefix_end(p)),
        None => (start, end),
    }
}

pub(crate) async fn list(State(state): State<AppState>, request: Request) -> ApiResult {
    let query = Query::parse(
        request.uri().query(),
        &[
            "start",
            "end",
            "prefix",
            "limit",
            "cursor",
            "keys_only",
            "reverse",
            READ_PARAMS[0],
            READ_PARAMS[1],
        ],
    )?;
    let read_from = ReadFrom::parse(&query)?;
    let (start, end, prefix) = range_params(&query, &state)?;
    let limit = page_limit(&query, DEFAULT_PAGE_LIMIT)?;
    let keys_only = query.flag("keys_only")?;
    let reverse = query.flag("reverse")?;
    let scope = CursorScope {
        start: start.as_deref(),
        end: end.as_deref(),
        prefix: prefix.as_deref(),
        reverse,
    };
    let after = query
        .get("cursor")
        .map(|cursor| {
            scope.decode(&state.cursor_key, cursor).ok_or_else(|| {
                ApiError::invalid_request(
                    "the cursor was not issued by this server for this range; pass back \
                     next_cursor with the same start, end, prefix and reverse",
                )
            })
        })
        .transpose()?;

    // A token lists only what it may read: the range clipped to its one
    // readable prefix there, or refused.
    let (low, high) = access_of(&state, request.extensions())?.clip(requested_range(
        start.clone(),
        end.clone(),
        prefix.as_deref(),
    ))?;
    // The cursor continues after its key, never before the (clipped) range.
    let (lower, upper) = match after {
        Some(after) if reverse => (
            auth::lower_bound(low),
            match high {
                Some(high) if high <= after => Bound::Excluded(high),
                _ => Bound::Excluded(after),
            },
        ),
        Some(after) => (
            match low {
                Some(low) if low > after => Bound::Included(low),
                _ => Bound::Excluded(after),
            },
            auth::upper_bound(high),
        ),
        None => (auth::lower_bound(low), auth::upper_bound(high)),
    };
    let scan = ScanRequest {
        lower,
        upper,
        reverse,
        limit,
        keys_only,
        max_value_bytes: MAX_PAGE_VALUE_BYTES,
    };
    let from_replica = match read_from.replicas(&state) {
        Some((replicas, min_revision)) => replicas.scan(&scan, min_revision).await,
        None => None,
    };
    let (page, served) = read_from
        .or_primary(from_replica, state.store.scan(scan))
        .await?;
    let next_cursor = match page.entries.last() {
        Some(last) if page.more => Some(scope.encode(&state.cursor_key, &last.key)),
        _ => None,
    };
    let items: Vec<EntryView> = page
        .entries
        .iter()
        .map(|entry| EntryView::new(entry, keys_only))
        .collect();
    let capacity = page_len_hint(&items) + next_cursor.as_ref().map_or(0, String::len);
    sized_json_response(
        StatusCode::OK,
        &ListResponse {
            items,
            next_cursor,
            revision: page.revision,
        },
        capacity,
    )
    .map(|response| served.mark(response))
}

/// Reads and parses a JSON body of one of the POST endpoints, and its
/// query parameters, of which it takes `known`.
async fn json_body<T: serde::de::DeserializeOwned>(
    request: Request,
    state: &AppState,
    known: &[&str],
) -> Result<(T, Query), ApiError> {
    let (parts, body) = request.into_parts();
    let query = Query::parse(parts.uri.query(), known)?;
    body_kind(&parts.headers, false)?;
    let body = read_body(&parts.headers, body, state).await?;
    Ok((parse_json(&body)?, query))
}

/// The value and expiry of a JSON `PUT` body.
pub(crate) fn put_value(body: &[u8], limits: &Limits) -> Result<(Vec<u8>, Expiry), ApiError> {
    let put: PutBody = parse_json(body)?;
    let expiry = leases::expiry(put.ttl_ms, put.keep_ttl, put.lease.as_deref(), "")?;
    Ok((
        decode_value(put.value, put.value_base64, limits, "body")?,
        expiry,
    ))
}

/// Checks a batch and turns it into the store's write ops.
pub(crate) fn batch_ops(request: BatchRequest, limits: &Limits) -> Result<Vec<WriteOp>, ApiError> {
    if request.ops.is_empty() {
        return Err(ApiError::invalid_request(
            "ops is empty; give 1 to 1000 ops",
        ));
    }
    if request.ops.len() > MAX_BATCH_OPS {
        return Err(ApiError::invalid_request(format!(
            "{} ops given; a batch takes at most {MAX_BATCH_OPS}",
            request.ops.len()
        )));
    }
    let mut seen = HashSet::with_capacity(request.ops.len());
    let mut ops = Vec::with_capacity(request.ops.len());
    for (index, op) in request.ops.into_iter().enumerate() {
        let at = format!("ops[{index}]");
        check_key(&op.key, limits)
            .map_err(|err| ApiError::invalid_key(format!("{at}: {}", err.message)))?;
        if !seen.insert(op.key.clone()) {
            return Err(ApiError::invalid_request(format!(
                "{at}: key '{}' appears more than once in the batch",
                op.key
            )));
        }
        let condition = match (op.if_version, op.if_absent) {
            (Some(_), Some(true)) => {
                return Err(ApiError::invalid_request(format!(
                    "{at}: give if_version or if_absent, not both"
                )));
            }
            (Some(0), _) => {
                return Err(ApiError::invalid_request(format!(
                    "{at}: if_version must be 1 or more"
                )));
            }
            (Some(v), _) => Condition::Version(v),
            (None, Some(true)) => Condition::Absent,
            (None, _) => Condition::Any,
        };
        let key = op.key.into_bytes();
        ops.push(match op.op {
            BatchOpKind::Put => WriteOp::Put {
                key,
                value: decode_value(op.value, op.value_base64, limits, &at)?,
                condition,
                expiry: leases::expiry(
                    op.ttl_ms,
                    op.keep_ttl,
                    op.lease.as_deref(),
                    &format!("{at}: "),
                )?,
            },
            BatchOpKind::Delete => {
                if op.value.is_some() || op.value_base64.is_some() {
                    return Err(ApiError::invalid_request(format!(
                        "{at}: a delete takes no value"
                    )));
                }
                if op.ttl_ms.is_some() || op.keep_ttl.is_some() || op.lease.is_some() {
                    return Err(ApiError::invalid_request(format!(
                        "{at}: a delete takes no ttl_ms, keep_ttl or lease"
                    )));
                }
                if condition == Condition::Absent {
                    return Err(ApiError::invalid_request(format!(
                        "{at}: if_absent applies to puts only"
                    )));
                }
                WriteOp::Delete { key, condition }
            }
        });
    }
    Ok(ops)
}

pub(crate) async fn batch(State(state): State<AppState>, request: Request) -> ApiResult {
    let access = access_of(&state, request.extensions())?;
    let (body, _): (BatchRequest, _) = json_body(request, &state, &[]).await?;
    let ops = batch_ops(body, &state.limits)?;
    // All or nothing here too: one forbidden op refuses the whole batch.
    for (index, op) in ops.iter().enumerate() {
        access
            .check_write(op.key(), &format!("ops[{index}]: "))
            .map_err(|err| err.with_detail("index", json!(index)))?;
    }
    leases::check_attach(&state, &access, &ops).await?;
    let keys: Vec<String> = ops.iter().map(|op| key_text(op.key().to_vec())).collect();
    match state.store.write(ops).await? {
        WriteOutcome::Applied { revision, results } => {
            let results = keys
                .into_iter()
                .zip(results)
                .map(|(key, result)| match result {
                    OpResult::Put { version, .. } => BatchResult {
                        key,
                        version: Some(version),
                        deleted: None,
                    },
                    OpResult::Deleted { existed } => BatchResult {
                        key,
                        version: None,
                        deleted: Some(existed),
                    },
                    // The HTTP API has no check-only op: this batch made none.
                    OpResult::Checked => BatchResult {
                        key,
                        version: None,
                        deleted: None,
                    },
                })
                .collect();
            json_response(StatusCode::OK, &BatchResponse { revision, results })
        }
        WriteOutcome::Rejected { failed } => {
            let indexes: Vec<usize> = failed.iter().map(|f| f.index).collect();
            let versions: Vec<Option<u64>> = failed.iter().map(|f| f.current_version).collect();
            Err(ApiError::new(
                ErrorCode::VersionMismatch,
                format!(
                    "{} condition(s) failed (ops {indexes:?}); nothing was written",
                    indexes.len()
                ),
            )
            .with_detail("failed", json!(indexes))
            .with_detail("current_versions", json!(versions)))
        }
    }
}

pub(crate) async fn batch_get(State(state): State<AppState>, request: Request) -> ApiResult {
    let access = access_of(&state, request.extensions())?;
    let (body, query): (BatchGetRequest, _) = json_body(request, &state, &READ_PARAMS).await?;
    let read_from = ReadFrom::parse(&query)?;
    check_batch_get(&body, &state.limits)?;
    for (index, key) in body.keys.iter().enumerate() {
        access
            .check_read(key.as_bytes(), &format!("keys[{index}]: "))
            .map_err(|err| err.with_detail("index", json!(index)))?;
    }
    let keys: Vec<Vec<u8>> = body.keys.iter().map(|k| k.as_bytes().to_vec()).collect();
    let from_replica = match read_from.replicas(&state) {
        Some((replicas, min_revision)) => replicas.get_many(&keys, min_revision).await,
        None => None,
    };
    let (found, served) = read_from
        .or_primary(from_replica, state.store.get_many(keys))
        .await?;
    let mut items = Vec::with_capacity(found.entries.len());
    let mut missing = Vec::new();
    for (key, entry) in body.keys.into_iter().zip(&found.entries) {
        match entry {
            Some(entry) => items.push(EntryView::new(entry, false)),
            None => missing.push(key),
        }
    }
    let capacity = page_len_hint(&items) + missing.iter().map(|k| k.len() + 3).sum::<usize>();
    sized_json_response(
        StatusCode::OK,
        &BatchGetResponse {
            items,
            missing,
            revision: found.revision,
        },
        capacity,
    )
    .map(|response| served.mark(response))
}

/// About how many bytes of JSON a page of entries renders to, with the
/// object around it.
fn page_len_hint(items: &[EntryView]) -> usize {
    64 + items.iter().map(EntryView::json_len_hint).sum::<usize>()
}

/// Checks the keys of a batch read.
pub(crate) fn check_batch_get(body: &BatchGetRequest, limits: &Limits) -> Result<(), ApiError> {
    if body.keys.len() > MAX_BATCH_OPS {
        return Err(ApiError::invalid_request(format!(
            "{} keys given; a batch read takes at most {MAX_BATCH_OPS}",
            body.keys.len()
        )));
    }
    for (index, key) in body.keys.iter().enumerate() {
        check_key(key, limits)
            .map_err(|err| ApiError::invalid_key(format!("keys[{index}]: {}", err.message)))?;
    }
    Ok(())
}

pub(crate) async fn healthz() -> ApiResult {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

pub(crate) async fn readyz(State(state): State<AppState>) -> ApiResult {
    state.store.ready().await?;
    // A node whose disk is full still serves reads: it stays ready, so that a
    // load balancer keeps sending it the reads it can answer, and says why
    // its writes are refused.
    match state.store.read_only() {
        None => json_response(StatusCode::OK, &json!({"status": "ready"})),
        Some(reason) => json_response(
            StatusCode::OK,
            &json!({"status": "ready", "writes": "refused", "reason": reason}),
        ),
    }
}

pub(crate) fn no_route(request: &Request) -> ApiError {
    ApiError::not_found(format!(
        "no such endpoint: {} {}; see the API documentation",
        request.method(),
        request.uri().path()
    ))
}
