//! The JSON bodies of API v1, shared by the server and the client.

use serde::{Deserialize, Serialize};

use crate::error::InvalidValue;
use crate::storage::LeaseId;

/// The longest `ttl_ms` taken: 100 years, far inside the range of a deadline
/// in microseconds.
pub const MAX_TTL_MS: u64 = 100 * 365 * 24 * 3600 * 1000;

/// A lease id as the API writes it: 16 hex digits.
pub fn lease_text(id: LeaseId) -> String {
    format!("{id:016x}")
}

/// A lease id as the API reads it: 1 to 16 hex digits, not all zero.
///
/// # Errors
/// When `text` is not such an id.
pub fn parse_lease_id(text: &str) -> Result<LeaseId, InvalidValue> {
    let valid = !text.is_empty() && text.len() <= 16 && text.bytes().all(|b| b.is_ascii_hexdigit());
    valid
        .then(|| u64::from_str_radix(text, 16).ok())
        .flatten()
        .filter(|id| *id != 0)
        .ok_or_else(|| {
            InvalidValue(format!(
                "'{text}' is not a lease id; a lease id is the 16 hex digits POST /v1/leases gave"
            ))
        })
}

/// Checks a `ttl_ms`: 1 to [`MAX_TTL_MS`].
///
/// # Errors
/// When it is 0 or longer.
pub fn check_ttl_ms(ttl_ms: u64) -> Result<u64, InvalidValue> {
    if ttl_ms == 0 || ttl_ms > MAX_TTL_MS {
        return Err(InvalidValue(format!(
            "ttl_ms must be a whole number of milliseconds from 1 to {MAX_TTL_MS}, not {ttl_ms}"
        )));
    }
    Ok(ttl_ms)
}

/// An entry as the API shows it. Exactly one of `value` and `value_base64` is
/// present, unless the entry comes from a `keys_only` listing (neither).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryBody {
    /// The key.
    pub key: String,
    /// The value, when its bytes are UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The value in base64, when its bytes are not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_base64: Option<String>,
    /// 1 when the key was created, plus one for every write since.
    pub version: u64,
    /// The store revision of the write that produced this version.
    pub revision: u64,
    /// When the key was created (RFC 3339).
    pub created_at: String,
    /// When it was last written (RFC 3339).
    pub updated_at: String,
    /// When the key expires (its own deadline, or its lease's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// The lease the key is attached to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
}

/// The JSON body of `PUT /v1/kv/{key}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutBody {
    /// The value as UTF-8 text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The value in base64, for any bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_base64: Option<String>,
    /// At most one of `ttl_ms`, `keep_ttl` and `lease` (docs/api.md, Expiry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// Keep the key's current deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_ttl: Option<bool>,
    /// Attach the key to this lease (its 16 hex digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
}

/// The answer to a successful `PUT`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutResponse {
    /// The key.
    pub key: String,
    /// Its new version.
    pub version: u64,
    /// The revision of the write.
    pub revision: u64,
    /// Whether the put created the key.
    pub created: bool,
}

/// The answer to `GET /v1/kv` (a range). The server renders its items as
/// `EntryView`s, which read back as `EntryBody`s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListResponse<E = EntryBody> {
    /// The entries of the page, in key order.
    pub items: Vec<E>,
    /// Where the next page starts; `None` on the last page.
    pub next_cursor: Option<String>,
    /// The store revision the page was read at.
    pub revision: u64,
}

/// One op of `POST /v1/batch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchOp {
    /// Put or delete.
    pub op: BatchOpKind,
    /// The key.
    pub key: String,
    /// For a put, the value as UTF-8 text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// For a put, the value in base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_base64: Option<String>,
    /// Apply only if the key is at this version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_version: Option<u64>,
    /// Apply only if the key does not exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_absent: Option<bool>,
    /// For a put, as on [`PutBody`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// For a put, as on [`PutBody`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_ttl: Option<bool>,
    /// For a put, as on [`PutBody`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
}

impl BatchOp {
    /// An op on `key` with no value, condition or expiry yet.
    pub fn new(op: BatchOpKind, key: impl Into<String>) -> Self {
        BatchOp {
            op,
            key: key.into(),
            value: None,
            value_base64: None,
            if_version: None,
            if_absent: None,
            ttl_ms: None,
            keep_ttl: None,
            lease: None,
        }
    }
}

/// What an op of a batch does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchOpKind {
    /// Writes a value.
    Put,
    /// Removes a key.
    Delete,
}

/// The body of `POST /v1/batch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// The ops, applied all or none, in order.
    pub ops: Vec<BatchOp>,
}

/// One result of an applied batch: `version` for a put, `deleted` for a delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchResult {
    /// The key.
    pub key: String,
    /// For a put, the key's new version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// For a delete, whether the key existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<bool>,
}

/// The answer to an applied `POST /v1/batch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchResponse {
    /// The revision of the batch.
    pub revision: u64,
    /// One per op, in the order of the ops.
    pub results: Vec<BatchResult>,
}

/// The body of `POST /v1/batch/get`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchGetRequest {
    /// The keys to read (at most 1000).
    pub keys: Vec<String>,
}

/// The answer to `POST /v1/batch/get`, with items as in [`ListResponse`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchGetResponse<E = EntryBody> {
    /// The entries found, in the order asked.
    pub items: Vec<E>,
    /// The keys not found.
    pub missing: Vec<String>,
    /// The store revision the entries were read at.
    pub revision: u64,
}

/// The body of `POST /v1/leases`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    /// How long the lease lives without a keepalive.
    pub ttl_ms: u64,
}

/// A lease as the API shows it; `keys` only in the answer to `GET`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseBody {
    /// The lease id (16 hex digits).
    pub lease: String,
    /// What a keepalive renews it for.
    pub ttl_ms: u64,
    /// When it expires (RFC 3339).
    pub expires_at: String,
    /// How many keys are attached to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<u64>,
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// The code, the message and the details.
    pub error: ErrorBody,
}

/// `code` and `message`, plus detail fields for some codes
/// (`current_version`; `failed` and `current_versions`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, as a program reads it.
    pub code: ErrorCode,
    /// What went wrong, as a person reads it.
    pub message: String,
    /// Detail fields of some codes.
    #[serde(flatten)]
    pub details: serde_json::Map<String, serde_json::Value>,
}

/// The `code` of an error answer (docs/api.md, "Errors"): one list for the
/// server that sends them and the clients that read them, each with its one
/// HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// 400: the key is not valid.
    InvalidKey,
    /// 400: the request is not valid.
    InvalidRequest,
    /// 401: no valid token.
    Unauthenticated,
    /// 403: the token may not do this.
    Forbidden,
    /// 404: no such key or route.
    NotFound,
    /// 404: no such lease, or it expired.
    LeaseNotFound,
    /// 405: the route does not take this method.
    MethodNotAllowed,
    /// 410: the revision asked for is older than the history kept.
    Compacted,
    /// 412: a condition did not hold.
    VersionMismatch,
    /// 413: the body or a value is too large.
    PayloadTooLarge,
    /// 415: the body is not JSON where JSON is needed.
    UnsupportedMediaType,
    /// 503: storage is unavailable or too slow; retry later.
    Unavailable,
    /// 507: the data directory's file system is (nearly) full.
    InsufficientStorage,
    /// 500: a bug, or stored data that is corrupt.
    Internal,
    /// A code this build does not know, from a newer server.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The code as it is written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidKey => "invalid_key",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::LeaseNotFound => "lease_not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Compacted => "compacted",
            ErrorCode::VersionMismatch => "version_mismatch",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::InsufficientStorage => "insufficient_storage",
            ErrorCode::Internal => "internal",
            ErrorCode::Unknown => "unknown",
        }
    }

    /// The HTTP status the server answers this code with.
    pub fn status(self) -> hyper::StatusCode {
        use hyper::StatusCode;
        match self {
            ErrorCode::InvalidKey | ErrorCode::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthenticated => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::NotFound | ErrorCode::LeaseNotFound => StatusCode::NOT_FOUND,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::Compacted => StatusCode::GONE,
            ErrorCode::VersionMismatch => StatusCode::PRECONDITION_FAILED,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::InsufficientStorage => StatusCode::INSUFFICIENT_STORAGE,
            ErrorCode::Internal | ErrorCode::Unknown => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// So that a code can be checked against the documented text.
impl PartialEq<&str> for ErrorCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}
