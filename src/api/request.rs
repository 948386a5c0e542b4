//! Turning the parts of an HTTP request into checked values: keys, query
//! parameters, conditions, bodies and values. Every failure is an [`ApiError`]
//! in the documented shape; nothing here panics on any input.

use axum::body::Body;
use axum::http::{HeaderMap, header};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http_body_util::BodyExt as _;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::{AppState, Limits};
use crate::storage::Condition;

/// Checks a key given as text (JSON bodies, decoded paths).
pub(crate) fn check_key(key: &str, limits: &Limits) -> Result<(), ApiError> {
    if key.is_empty() {
        return Err(ApiError::invalid_key("the key is empty"));
    }
    if key.len() > limits.max_key_bytes {
        return Err(ApiError::invalid_key(format!(
            "the key is {} bytes; at most {} are allowed",
            key.len(),
            limits.max_key_bytes
        )));
    }
    if key.as_bytes().contains(&0) {
        return Err(ApiError::invalid_key("the key contains a NUL byte"));
    }
    Ok(())
}

/// Strictly percent-decodes `raw` into UTF-8: every `%` must start a valid
/// two-digit hex escape, and the bytes must be UTF-8. With `plus_is_space`,
/// `+` means a space (query strings).
pub(crate) fn percent_decode_strict(raw: &str, plus_is_space: bool) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let hi = bytes.get(i + 1).and_then(|c| (*c as char).to_digit(16))?;
                let lo = bytes.get(i + 2).and_then(|c| (*c as char).to_digit(16))?;
                out.push(u8::try_from(hi * 16 + lo).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The key named by a `/v1/kv/{key}` path (still percent-encoded).
pub(crate) fn key_from_path(path: &str, limits: &Limits) -> Result<Vec<u8>, ApiError> {
    let raw = path.strip_prefix("/v1/kv/").unwrap_or_default();
    let key = percent_decode_strict(raw, false)
        .ok_or_else(|| ApiError::invalid_key("the key is not valid percent-encoded UTF-8"))?;
    check_key(&key, limits)?;
    Ok(key.into_bytes())
}

/// Query parameters, decoded. A parameter may appear once, and only the
/// parameters an endpoint knows are accepted, so a typo is an error rather
/// than a silently different request.
pub(crate) struct Query(Vec<(String, String)>);

impl Query {
    pub fn parse(raw: Option<&str>, known: &[&str]) -> Result<Self, ApiError> {
        let mut params: Vec<(String, String)> = Vec::new();
        for pair in raw.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let name = percent_decode_strict(name, true).ok_or_else(|| {
                ApiError::invalid_request("the query string is not valid percent-encoded UTF-8")
            })?;
            let value = percent_decode_strict(value, true).ok_or_else(|| {
                ApiError::invalid_request(format!(
                    "query parameter '{name}' is not valid percent-encoded UTF-8"
                ))
            })?;
            if !known.contains(&name.as_str()) {
                return Err(ApiError::invalid_request(format!(
                    "unknown query parameter '{name}'; this endpoint takes: {}",
                    known.join(", ")
                )));
            }
            if params.iter().any(|(n, _)| *n == name) {
                return Err(ApiError::invalid_request(format!(
                    "query parameter '{name}' is given more than once"
                )));
            }
            params.push((name, value));
        }
        Ok(Query(params))
    }

    /// A parameter's value; an empty value counts as absent.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, v)| n == name && !v.is_empty())
            .map(|(_, v)| v.as_str())
    }

    /// A flag: `1`/`true` or `0`/`false`, absent meaning false.
    pub fn flag(&self, name: &str) -> Result<bool, ApiError> {
        match self.get(name) {
            None | Some("0" | "false") => Ok(false),
            Some("1" | "true") => Ok(true),
            Some(other) => Err(ApiError::invalid_request(format!(
                "query parameter '{name}' must be 1, true, 0 or false, not '{other}'"
            ))),
        }
    }
}

/// What a request body holds, by its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyKind {
    Json,
    Raw,
}

/// The body kind, refusing media types the endpoint does not take. A missing
/// `Content-Type` means JSON.
pub(crate) fn body_kind(headers: &HeaderMap, allow_raw: bool) -> Result<BodyKind, ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(BodyKind::Json);
    };
    let media = value
        .to_str()
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match media.as_str() {
        "application/json" => Ok(BodyKind::Json),
        "application/octet-stream" if allow_raw => Ok(BodyKind::Raw),
        _ => Err(ApiError::unsupported_media_type(format!(
            "Content-Type '{media}' is not accepted here; send application/json{}",
            if allow_raw {
                " or application/octet-stream"
            } else {
                ""
            }
        ))),
    }
}

/// Reads the whole body, refusing one over the limit before reading it when
/// its `Content-Length` says so, and as soon as it crosses the limit
/// otherwise; a body still arriving after `timeout` is refused with 503.
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    state: &AppState,
) -> Result<Bytes, ApiError> {
    let (limits, timeout) = (&state.limits, state.observe.request_timeout);
    let too_large = || {
        ApiError::payload_too_large(format!(
            "the request body is over {} bytes",
            limits.max_body_bytes
        ))
    };
    if let Some(length) = headers.get(header::CONTENT_LENGTH) {
        let length: u64 = length
            .to_str()
            .ok()
            .and_then(|l| l.parse().ok())
            .ok_or_else(|| ApiError::invalid_request("Content-Length is not a number"))?;
        if length > limits.max_body_bytes as u64 {
            return Err(too_large());
        }
    }
    let collected = tokio::time::timeout(
        timeout,
        http_body_util::Limited::new(body, limits.max_body_bytes).collect(),
    )
    .await
    .map_err(|_| {
        ApiError::unavailable(format!(
            "the request body did not arrive within {timeout:?}; nothing was written"
        ))
    })?;
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(err) => Err(ApiError::invalid_request(format!(
            "could not read the request body: {err}"
        ))),
    }
}

/// Parses a JSON body into `T`, answering `invalid_request` with serde's
/// account of what is wrong.
pub(crate) fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|err| ApiError::invalid_request(format!("invalid JSON body: {err}")))
}

/// The value bytes given as `value` or `value_base64` (exactly one of them).
/// `what` names the place in the request for error messages.
pub(crate) fn decode_value(
    value: Option<String>,
    value_base64: Option<String>,
    limits: &Limits,
    what: &str,
) -> Result<Vec<u8>, ApiError> {
    let bytes = match (value, value_base64) {
        (Some(text), None) => text.into_bytes(),
        (None, Some(encoded)) => STANDARD.decode(encoded.as_bytes()).map_err(|err| {
            ApiError::invalid_request(format!(
                "{what}: value_base64 is not standard base64: {err}"
            ))
        })?,
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid_request(format!(
                "{what}: give either value or value_base64, not both"
            )));
        }
        (None, None) => {
            return Err(ApiError::invalid_request(format!(
                "{what}: a value is required (value or value_base64)"
            )));
        }
    };
    check_value_size(bytes.len(), limits)?;
    Ok(bytes)
}

pub(crate) fn check_value_size(len: usize, limits: &Limits) -> Result<(), ApiError> {
    if len > limits.max_value_bytes {
        return Err(ApiError::payload_too_large(format!(
            "the value is {len} bytes; at most {} are allowed",
            limits.max_value_bytes
        )));
    }
    Ok(())
}

/// A version number as an entity tag: `"3"` or `3`.
fn parse_version_tag(tag: &str) -> Option<u64> {
    let tag = tag.trim();
    let bare = tag
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(tag);
    bare.parse().ok().filter(|v| *v > 0)
}

/// The write condition from `If-Match` / `If-None-Match`, if any.
/// `If-Match: *` means "the key exists".
pub(crate) fn write_condition(headers: &HeaderMap) -> Result<Option<Condition>, ApiError> {
    let text = |name: header::HeaderName| -> Result<Option<&str>, ApiError> {
        headers
            .get(&name)
            .map(|v| {
                v.to_str()
                    .map_err(|_| ApiError::invalid_request(format!("{name} is not ASCII")))
            })
            .transpose()
    };
    match (text(header::IF_MATCH)?, text(header::IF_NONE_MATCH)?) {
        (Some(_), Some(_)) => Err(ApiError::invalid_request(
            "give If-Match or If-None-Match, not both",
        )),
        (Some(tag), None) if tag.trim() == "*" => Ok(Some(Condition::Exists)),
        (Some(tag), None) => parse_version_tag(tag)
            .map(|v| Some(Condition::Version(v)))
            .ok_or_else(|| {
                ApiError::invalid_request(format!(
                    "If-Match must be a version such as \"3\" (a positive integer) or *, not '{tag}'"
                ))
            }),
        (None, Some(tag)) if tag.trim() == "*" => Ok(Some(Condition::Absent)),
        (None, Some(tag)) => Err(ApiError::invalid_request(format!(
            "If-None-Match supports only *, not '{tag}'"
        ))),
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_key_bytes: 8,
            max_value_bytes: 4,
            max_body_bytes: 64,
        }
    }

    #[test]
    fn keys_from_paths() {
        let l = limits();
        assert_eq!(key_from_path("/v1/kv/a/b", &l).unwrap(), b"a/b");
        assert_eq!(key_from_path("/v1/kv/a%20b", &l).unwrap(), b"a b");
        assert_eq!(key_from_path("/v1/kv/a+b", &l).unwrap(), b"a+b");
        assert_eq!(key_from_path("/v1/kv/%C3%A9", &l).unwrap(), "é".as_bytes());
        for bad in [
            "/v1/kv/",
            "/v1/kv/%",
            "/v1/kv/%4",
            "/v1/kv/%zz",
            "/v1/kv/%FF",
            "/v1/kv/a%00",
            "/v1/kv/123456789",
        ] {
            let err = key_from_path(bad, &l).unwrap_err();
            assert_eq!(err.code, "invalid_key", "{bad}");
        }
    }

    #[test]
    fn query_parameters() {
        let q = Query::parse(
            Some("prefix=a%2Fb+c&limit=5&reverse=true"),
            &["prefix", "limit", "reverse"],
        )
        .unwrap();
        assert_eq!(q.get("prefix"), Some("a/b c"));
        assert_eq!(q.get("limit"), Some("5"));
        assert!(q.flag("reverse").unwrap());
        assert!(!q.flag("keys_only").unwrap());
        assert!(Query::parse(Some("limit=1&limit=2"), &["limit"]).is_err());
        assert!(Query::parse(Some("limt=1"), &["limit"]).is_err());
        assert!(Query::parse(Some("limit=%ZZ"), &["limit"]).is_err());
        let q = Query::parse(Some("raw=yes"), &["raw"]).unwrap();
        assert!(q.flag("raw").is_err());
    }

    #[test]
    fn conditions_from_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(write_condition(&h).unwrap(), None);
        h.insert(header::IF_MATCH, "\"3\"".parse().unwrap());
        assert_eq!(write_condition(&h).unwrap(), Some(Condition::Version(3)));
        h.insert(header::IF_MATCH, "4".parse().unwrap());
        assert_eq!(write_condition(&h).unwrap(), Some(Condition::Version(4)));
        h.insert(header::IF_MATCH, "*".parse().unwrap());
        assert_eq!(write_condition(&h).unwrap(), Some(Condition::Exists));
        for bad in ["\"x\"", "0", "-1", "W/\"1\""] {
            h.insert(header::IF_MATCH, bad.parse().unwrap());
            assert!(write_condition(&h).is_err(), "{bad}");
        }
        h.remove(header::IF_MATCH);
        h.insert(header::IF_NONE_MATCH, "*".parse().unwrap());
        assert_eq!(write_condition(&h).unwrap(), Some(Condition::Absent));
        h.insert(header::IF_MATCH, "1".parse().unwrap());
        assert!(write_condition(&h).is_err());
    }

    #[test]
    fn values() {
        let l = limits();
        assert_eq!(
            decode_value(Some("abc".into()), None, &l, "v").unwrap(),
            b"abc"
        );
        assert_eq!(
            decode_value(None, Some("AAE=".into()), &l, "v").unwrap(),
            [0, 1]
        );
        assert_eq!(decode_value(Some("".into()), None, &l, "v").unwrap(), b"");
        assert_eq!(
            decode_value(None, Some("!!".into()), &l, "v")
                .unwrap_err()
                .code,
            "invalid_request"
        );
        assert_eq!(
            decode_value(None, None, &l, "v").unwrap_err().code,
            "invalid_request"
        );
        assert_eq!(
            decode_value(Some("a".into()), Some("".into()), &l, "v")
                .unwrap_err()
                .code,
            "invalid_request"
        );
        assert_eq!(
            decode_value(Some("abcde".into()), None, &l, "v")
                .unwrap_err()
                .code,
            "payload_too_large"
        );
        assert_eq!(
            decode_value(None, Some("AAAAAAA=".into()), &l, "v")
                .unwrap_err()
                .code,
            "payload_too_large"
        );
    }
}
