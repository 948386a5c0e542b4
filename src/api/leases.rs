//! Expiry as the API speaks it: the `ttl_ms` / `keep_ttl` / `lease` of a
//! put, lease ids, and the `/v1/leases` endpoints.
//!
//! A lease id is a random 64-bit number, shown as 16 hex digits. With auth
//! on, a lease belongs to the token that granted it: only that token may
//! renew, read or revoke it, or attach keys to it. Revoking deletes every key
//! attached, so a lease must not let one token delete keys it could not
//! write; since attaching a key needs both the key's write right and the
//! lease, every key a revoke deletes was written by the lease's owner.

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::IntoResponse as _;

use super::AppState;
use super::auth::{Access, access_of};
use super::error::ApiError;
use super::handlers::{ApiResult, json_response};
use super::render::Timestamp;
use super::request::{Query, parse_json, read_body};
use super::types::{LeaseBody, LeaseRequest, MAX_TTL_MS, check_ttl_ms, lease_text, parse_lease_id};
use crate::storage::{Expiry, Lease, LeaseId, WriteOp};

/// Checks a `ttl_ms` of a request; `at` prefixes the message (`ops[3]: `).
fn checked_ttl_ms(ttl_ms: u64, at: &str) -> Result<u64, ApiError> {
    check_ttl_ms(ttl_ms).map_err(|err| ApiError::invalid_request(format!("{at}{err}")))
}

/// What a put asks for its key's deadline; `at` prefixes messages
/// (`ops[3]: `). At most one of the three may be given.
pub(crate) fn expiry(
    ttl_ms: Option<u64>,
    keep_ttl: Option<bool>,
    lease: Option<&str>,
    at: &str,
) -> Result<Expiry, ApiError> {
    match (ttl_ms, keep_ttl.unwrap_or(false), lease) {
        (None, false, None) => Ok(Expiry::Never),
        (Some(ttl), false, None) => Ok(Expiry::Ttl(checked_ttl_ms(ttl, at)?)),
        (None, true, None) => Ok(Expiry::Keep),
        (None, false, Some(id)) => {
            Ok(Expiry::Lease(parse_lease_id(id).map_err(|err| {
                ApiError::invalid_request(format!("{at}{err}"))
            })?))
        }
        _ => Err(ApiError::invalid_request(format!(
            "{at}give at most one of ttl_ms, keep_ttl and lease"
        ))),
    }
}

/// The expiry of a raw-body put, from its query parameters.
pub(crate) fn expiry_from_query(query: &Query) -> Result<Expiry, ApiError> {
    let ttl_ms = query
        .get("ttl_ms")
        .map(|text| {
            text.parse::<u64>().map_err(|_| {
                ApiError::invalid_request(format!(
                    "ttl_ms must be a whole number of milliseconds from 1 to {MAX_TTL_MS}, not '{text}'"
                ))
            })
        })
        .transpose()?;
    expiry(
        ttl_ms,
        Some(query.flag("keep_ttl")?),
        query.get("lease"),
        "",
    )
}

/// With auth on, the leases a write attaches keys to must be the token's.
pub(crate) async fn check_attach(
    state: &AppState,
    access: &Access,
    ops: &[WriteOp],
) -> Result<(), ApiError> {
    if matches!(access, Access::Open) {
        return Ok(());
    }
    // Each lease once, however many of the batch's keys it takes.
    let mut checked = std::collections::HashSet::new();
    for (index, op) in ops.iter().enumerate() {
        if let WriteOp::Put {
            expiry: Expiry::Lease(id),
            ..
        } = op
            && checked.insert(*id)
        {
            let at = if ops.len() > 1 {
                format!("ops[{index}]: ")
            } else {
                String::new()
            };
            owned(state, access, *id)
                .await
                .map(drop)
                .map_err(|err| ApiError {
                    message: format!("{at}{}", err.message),
                    ..err
                })?;
        }
    }
    Ok(())
}

/// With auth on, the lease, when it exists and the request's token owns
/// it; with auth off, `None` (nothing to check, nothing read).
async fn owned(state: &AppState, access: &Access, id: LeaseId) -> Result<Option<Lease>, ApiError> {
    let Access::Token(rights) = access else {
        return Ok(None);
    };
    let Some(lease) = state.store.lease(id).await? else {
        return Err(crate::error::StoreError::LeaseNotFound(id).into());
    };
    if lease.owner.as_deref() != Some(rights.name.as_str()) {
        return Err(ApiError::forbidden(format!(
            "lease {} belongs to another token; token '{}' may only use leases it granted",
            lease_text(id),
            rights.name
        )));
    }
    Ok(Some(lease))
}

fn body_of(lease: &Lease, keys: Option<u64>) -> LeaseBody {
    LeaseBody {
        lease: lease_text(lease.id),
        ttl_ms: lease.ttl_ms,
        expires_at: Timestamp(lease.expires_at_us).to_string(),
        keys,
    }
}

fn lease_id_of(request: &Request) -> Result<LeaseId, ApiError> {
    let path = request.uri().path();
    let id = path
        .strip_prefix("/v1/leases/")
        .map(|rest| rest.strip_suffix("/keepalive").unwrap_or(rest))
        .unwrap_or_default();
    Ok(parse_lease_id(id)?)
}

/// `POST /v1/leases`.
pub(crate) async fn grant(State(state): State<AppState>, request: Request) -> ApiResult {
    let access = access_of(&state, request.extensions())?;
    let (parts, body) = request.into_parts();
    Query::parse(parts.uri.query(), &[])?;
    let body = read_body(&parts.headers, body, &state).await?;
    let asked: LeaseRequest = parse_json(&body)?;
    let ttl_ms = checked_ttl_ms(asked.ttl_ms, "")?;
    let owner = match &access {
        Access::Open => None,
        Access::Token(rights) => Some(rights.name.clone()),
    };
    let lease = state.store.grant_lease(ttl_ms, owner).await?;
    json_response(StatusCode::CREATED, &body_of(&lease, None))
}

/// `POST /v1/leases/{id}/keepalive`.
pub(crate) async fn keepalive(State(state): State<AppState>, request: Request) -> ApiResult {
    let access = access_of(&state, request.extensions())?;
    Query::parse(request.uri().query(), &[])?;
    let id = lease_id_of(&request)?;
    owned(&state, &access, id).await?;
    let lease = state.store.keep_lease_alive(id).await?;
    json_response(StatusCode::OK, &body_of(&lease, None))
}

/// `GET /v1/leases/{id}`.
pub(crate) async fn get(State(state): State<AppState>, request: Request) -> ApiResult {
    let access = access_of(&state, request.extensions())?;
    Query::parse(request.uri().query(), &[])?;
    let id = lease_id_of(&request)?;
    let lease = match owned(&state, &access, id).await? {
        Some(lease) => lease,
        None => state
            .store
            .lease(id)
            .await?
            .ok_or(crate::error::StoreError::LeaseNotFound(id))?,
    };
    let keys = state.store.lease_keys(id).await?;
    json_response(StatusCode::OK, &body_of(&lease, Some(keys)))
}

/// `DELETE /v1/leases/{id}`.
pub(crate) async fn revoke(State(state): State<AppState>, request: Request) -> ApiResult {
    let access = access_of(&state, request.extensions())?;
    Query::parse(request.uri().query(), &[])?;
    let id = lease_id_of(&request)?;
    owned(&state, &access, id).await?;
    state.store.revoke_lease(id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
