//! Entry points for the fuzz targets in `fuzz/` and for robustness tests:
//! each runs the server's real parsing and validation code on arbitrary
//! input (no copies), and panics only where an invariant of that code is
//! broken. Not part of the API.

// A fuzz entry point reports a broken invariant by panicking, as a test does.
#![allow(clippy::expect_used)]

use super::cursor::{CursorKey, CursorScope};
use super::types::{BatchGetRequest, BatchRequest};
use super::{Limits, handlers, request};

/// A key from the path `/v1/kv/{raw}` under the default limits. A key that
/// is accepted must pass the same checks as a key in a JSON body.
pub fn key_from_path(raw: &str) -> Option<Vec<u8>> {
    let limits = Limits::default();
    let key = request::key_from_path(&format!("/v1/kv/{raw}"), &limits).ok()?;
    let text = std::str::from_utf8(&key).expect("accepted keys are UTF-8");
    assert!(
        request::check_key(text, &limits).is_ok(),
        "a path key that a body key could not be"
    );
    Some(key)
}

/// Decodes `cursor` for the scope described by `start`, `end`, `prefix` and
/// `reverse` under a fixed secret. Any cursor accepted must lie inside the
/// scope; any key inside the scope must round-trip.
pub fn cursor(
    start: Option<&[u8]>,
    end: Option<&[u8]>,
    prefix: Option<&[u8]>,
    reverse: bool,
    cursor: &str,
    key: &[u8],
) {
    let secret = CursorKey::new(b"the fuzzing secret, 32 bytes....").expect("secret");
    let scope = CursorScope {
        start,
        end,
        prefix,
        reverse,
    };
    let inside = |k: &[u8]| {
        prefix.is_none_or(|p| k.starts_with(p))
            && start.is_none_or(|s| k >= s)
            && end.is_none_or(|e| k < e)
    };
    if let Some(decoded) = scope.decode(&secret, cursor) {
        assert!(inside(&decoded), "a cursor outside its range was accepted");
    }
    let encoded = scope.encode(&secret, key);
    let decoded = scope.decode(&secret, &encoded);
    if !key.is_empty() && inside(key) {
        assert_eq!(decoded.as_deref(), Some(key), "a cursor did not round-trip");
    } else {
        assert_eq!(decoded, None, "a cursor for a key outside was accepted");
    }
}

/// A JSON body as each POST/PUT endpoint parses and checks it.
pub fn json_bodies(body: &[u8]) {
    let limits = Limits::default();
    if let Ok((value, expiry)) = handlers::put_value(body, &limits) {
        assert!(value.len() <= limits.max_value_bytes);
        if let crate::storage::Expiry::Ttl(ttl_ms) = expiry {
            assert!((1..=super::types::MAX_TTL_MS).contains(&ttl_ms));
        }
    }
    if let Ok(batch) = request::parse_json::<BatchRequest>(body) {
        batch_ops(batch);
    }
    if let Ok(read) = request::parse_json::<BatchGetRequest>(body)
        && handlers::check_batch_get(&read, &limits).is_ok()
    {
        assert!(read.keys.len() <= super::MAX_BATCH_OPS);
    }
}

/// Validates a batch as `POST /v1/batch` does; what passes must keep the
/// documented limits (1 to 1000 ops, each key once, valid keys and values).
pub fn batch_ops(batch: BatchRequest) {
    let limits = Limits {
        max_key_bytes: 64,
        max_value_bytes: 64,
        max_body_bytes: 1 << 20,
    };
    let count = batch.ops.len();
    let Ok(ops) = handlers::batch_ops(batch, &limits) else {
        return;
    };
    assert_eq!(ops.len(), count);
    assert!((1..=super::MAX_BATCH_OPS).contains(&count));
    let mut keys: Vec<&[u8]> = ops.iter().map(|op| op.key()).collect();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), count, "a key twice in an accepted batch");
    for op in &ops {
        let key = std::str::from_utf8(op.key()).expect("UTF-8 key");
        assert!(request::check_key(key, &limits).is_ok());
        if let crate::storage::WriteOp::Put { value, .. } = op {
            assert!(value.len() <= limits.max_value_bytes);
        }
    }
}
