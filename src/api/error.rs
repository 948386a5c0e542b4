//! `ApiError`: every error answer of the API, in one shape
//! (`{"error": {"code", "message", ...details}}`).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::types::ErrorCode;
use crate::error::{InvalidValue, StoreError};

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    pub details: Map<String, Value>,
}

impl ApiError {
    /// An error answered with `code`'s own status.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            status: code.status(),
            code,
            message: message.into(),
            details: Map::new(),
        }
    }

    pub fn invalid_key(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidKey, message)
    }

    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message)
    }

    /// No token, or one the server does not know (auth on).
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthenticated, message)
    }

    /// The token is known but has no right to this key or range.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            ErrorCode::MethodNotAllowed,
            "this method is not allowed on this path; see the API documentation",
        )
    }

    /// A failed If-Match / If-None-Match condition of a single-key write.
    pub fn version_mismatch(current_version: Option<u64>) -> Self {
        let message = match current_version {
            Some(v) => format!("the condition failed: the key is at version {v}"),
            None => "the condition failed: the key does not exist".to_owned(),
        };
        Self::new(ErrorCode::VersionMismatch, message)
            .with_detail("current_version", json!(current_version))
    }

    pub fn payload_too_large(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::PayloadTooLarge, message)
    }

    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::UnsupportedMediaType, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }

    /// The disk is (nearly) full: writes are refused until space is freed.
    pub fn insufficient_storage(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InsufficientStorage, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            ErrorCode::Internal,
            format!(
                "{}; this is a bug in kvstore, please report it with this message",
                message.into()
            ),
        )
    }

    pub fn with_detail(mut self, name: &str, value: Value) -> Self {
        self.details.insert(name.to_owned(), value);
        self
    }
}

impl From<InvalidValue> for ApiError {
    fn from(err: InvalidValue) -> Self {
        ApiError::invalid_request(err.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Unavailable(why) => ApiError::unavailable(why),
            StoreError::Internal(why) => ApiError::internal(why),
            StoreError::Corrupt(why) => ApiError::new(
                ErrorCode::Internal,
                format!(
                    "stored data is corrupt ({why}); retrying will not help: restore the \
                     data directory from a backup (docs/durability.md, Corruption)"
                ),
            ),
            StoreError::InsufficientStorage(why) => ApiError::insufficient_storage(why),
            err @ StoreError::LeaseNotFound(_) => {
                ApiError::new(ErrorCode::LeaseNotFound, err.to_string())
            }
            err @ StoreError::Compacted {
                compact_revision,
                revision,
            } => ApiError::new(ErrorCode::Compacted, err.to_string())
                .with_detail("compact_revision", json!(compact_revision))
                .with_detail("revision", json!(revision)),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // A full disk is logged once, when writes start being refused, not
        // once for every write refused.
        if self.status.is_server_error() && self.status != StatusCode::INSUFFICIENT_STORAGE {
            tracing::warn!(status = %self.status, code = %self.code, message = %self.message, "request failed");
        }
        let mut error = self.details;
        error.insert("code".to_owned(), Value::from(self.code.as_str()));
        error.insert("message".to_owned(), Value::from(self.message));
        let body = serde_json::to_vec(&json!({ "error": error })).unwrap_or_else(|_| {
            b"{\"error\":{\"code\":\"internal\",\"message\":\"error body\"}}".to_vec()
        });
        let mut response = (self.status, body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }
}
