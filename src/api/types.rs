//! The JSON bodies of API v1, shared by the server and the client.

use serde::{Deserialize, Serialize};

/// An entry as the API shows it. Exactly one of `value` and `value_base64` is
/// present, unless the entry comes from a `keys_only` listing (neither).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryBody {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_base64: Option<String>,
    pub version: u64,
    pub revision: u64,
    pub created_at: String,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_base64: Option<String>,
    /// At most one of `ttl_ms`, `keep_ttl` and `lease` (docs/api.md, Expiry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_ttl: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
}

/// The answer to a successful `PUT`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutResponse {
    pub key: String,
    pub version: u64,
    pub revision: u64,
    pub created: bool,
}

/// The answer to `GET /v1/kv` (a range). The server renders its items as
/// [`EntryView`](super::EntryView)s, which read back as `EntryBody`s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListResponse<E = EntryBody> {
    pub items: Vec<E>,
    pub next_cursor: Option<String>,
    /// The store revision the page was read at.
    pub revision: u64,
}

/// One op of `POST /v1/batch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchOp {
    pub op: BatchOpKind,
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_base64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_version: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_absent: Option<bool>,
    /// For a put, as on [`PutBody`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_ttl: Option<bool>,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchOpKind {
    Put,
    Delete,
}

/// The body of `POST /v1/batch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    pub ops: Vec<BatchOp>,
}

/// One result of an applied batch: `version` for a put, `deleted` for a delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchResult {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<bool>,
}

/// The answer to an applied `POST /v1/batch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchResponse {
    pub revision: u64,
    pub results: Vec<BatchResult>,
}

/// The body of `POST /v1/batch/get`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchGetRequest {
    pub keys: Vec<String>,
}

/// The answer to `POST /v1/batch/get`, with items as in [`ListResponse`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchGetResponse<E = EntryBody> {
    pub items: Vec<E>,
    pub missing: Vec<String>,
    /// The store revision the entries were read at.
    pub revision: u64,
}

/// The body of `POST /v1/leases`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    pub ttl_ms: u64,
}

/// A lease as the API shows it; `keys` only in the answer to `GET`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseBody {
    pub lease: String,
    pub ttl_ms: u64,
    pub expires_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<u64>,
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: ErrorBody,
}

/// `code` and `message`, plus detail fields for some codes
/// (`current_version`; `failed` and `current_versions`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
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
    InvalidKey,
    InvalidRequest,
    Unauthenticated,
    Forbidden,
    NotFound,
    LeaseNotFound,
    MethodNotAllowed,
    Compacted,
    VersionMismatch,
    PayloadTooLarge,
    UnsupportedMediaType,
    Unavailable,
    InsufficientStorage,
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
