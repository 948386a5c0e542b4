//! Helpers of the HTTP API tests: raw requests, and checks of the shapes that
//! the API (docs/api.md) promises (errors, entries, timestamps, exact field sets).

use std::collections::{BTreeSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::Frame;
pub use hyper::header::{self, HeaderName};
pub use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use kvstore::client::{Client, RawResponse};
pub use serde_json::{Map, Value, json};

pub type Headers<'a> = &'a [(HeaderName, &'a str)];

pub const JSON: (HeaderName, &str) = (header::CONTENT_TYPE, "application/json");
pub const OCTETS: (HeaderName, &str) = (header::CONTENT_TYPE, "application/octet-stream");

/// The fields of an entry besides its value.
pub const ENTRY_META: [&str; 5] = ["key", "version", "revision", "created_at", "updated_at"];

/// Sends a request; a transport failure fails the test.
pub async fn send(
    client: &Client,
    method: Method,
    path: &str,
    headers: Headers<'_>,
    body: impl Into<Bytes>,
) -> RawResponse {
    client
        .send(method.clone(), path, headers, body)
        .await
        .unwrap_or_else(|err| panic!("{method} {path}: {err}"))
}

pub async fn get(client: &Client, path: &str) -> RawResponse {
    send(client, Method::GET, path, &[], Bytes::new()).await
}

pub async fn get_with(client: &Client, path: &str, headers: Headers<'_>) -> RawResponse {
    send(client, Method::GET, path, headers, Bytes::new()).await
}

pub async fn delete(client: &Client, path: &str, headers: Headers<'_>) -> RawResponse {
    send(client, Method::DELETE, path, headers, Bytes::new()).await
}

/// `PUT` of a JSON body to a key, with extra headers.
pub async fn put_json(
    client: &Client,
    key: &str,
    body: &Value,
    headers: Headers<'_>,
) -> RawResponse {
    let mut all = vec![JSON];
    all.extend_from_slice(headers);
    send(
        client,
        Method::PUT,
        &Client::key_path(key),
        &all,
        body.to_string(),
    )
    .await
}

/// `PUT` of raw value bytes to a key.
pub async fn put_raw(client: &Client, key: &str, value: impl Into<Bytes>) -> RawResponse {
    send(
        client,
        Method::PUT,
        &Client::key_path(key),
        &[OCTETS],
        value,
    )
    .await
}

/// `POST` of a JSON body.
pub async fn post_json(client: &Client, path: &str, body: &Value) -> RawResponse {
    send(client, Method::POST, path, &[JSON], body.to_string()).await
}

fn describe(response: &RawResponse) -> String {
    format!(
        "{} {}",
        response.status,
        String::from_utf8_lossy(&response.body)
    )
}

fn content_type(response: &RawResponse) -> &str {
    response
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// Asserts the status and that the body is JSON; returns the body.
pub fn expect_json(response: &RawResponse, status: StatusCode) -> Value {
    assert_eq!(response.status, status, "{}", describe(response));
    assert_eq!(
        content_type(response),
        "application/json",
        "{}",
        describe(response)
    );
    serde_json::from_slice(&response.body)
        .unwrap_or_else(|err| panic!("{err}: {}", describe(response)))
}

/// Asserts an error answer of exactly this status and code, in the documented
/// shape `{"error": {"code", "message"}}` with a non-empty message; returns the
/// error object (with any detail fields).
pub fn expect_error(response: &RawResponse, status: StatusCode, code: &str) -> Map<String, Value> {
    let body = expect_json(response, status);
    assert_fields(&body, &["error"]);
    let error = body["error"]
        .as_object()
        .unwrap_or_else(|| panic!("error is not an object: {body}"))
        .clone();
    assert_eq!(error["code"], code, "{body}");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(!message.trim().is_empty(), "empty message: {body}");
    error
}

/// Asserts a 412 `version_mismatch` of a single-key write carrying
/// `current_version` (a number, or null when the key is absent).
pub fn expect_mismatch(response: &RawResponse, current_version: Option<u64>) {
    let error = expect_error(
        response,
        StatusCode::PRECONDITION_FAILED,
        "version_mismatch",
    );
    assert_eq!(error.get("current_version"), Some(&json!(current_version)));
}

/// Asserts that the object has exactly these fields.
pub fn assert_fields(value: &Value, fields: &[&str]) {
    let have: BTreeSet<&str> = value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .keys()
        .map(String::as_str)
        .collect();
    let want: BTreeSet<&str> = fields.iter().copied().collect();
    assert_eq!(have, want, "fields of {value}");
}

/// Asserts that a read answer's `revision` is a number at least as high as
/// the revision of every entry it lists: the page was read at that revision.
pub fn assert_read_revision(answer: &Value) {
    let revision = answer["revision"]
        .as_u64()
        .unwrap_or_else(|| panic!("revision is not a number: {answer}"));
    for item in answer["items"].as_array().into_iter().flatten() {
        if let Some(written) = item.get("revision").and_then(Value::as_u64) {
            assert!(
                written <= revision,
                "entry above the read revision: {answer}"
            );
        }
    }
}

/// Asserts RFC 3339 UTC with exactly six fractional digits and `Z`.
pub fn assert_timestamp(text: &str) {
    let bytes = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| bytes[range].iter().all(u8::is_ascii_digit);
    assert!(
        bytes.len() == 27
            && digits(0..4)
            && bytes[4] == b'-'
            && bytes[7] == b'-'
            && bytes[10] == b'T'
            && bytes[13] == b':'
            && bytes[16] == b':'
            && bytes[19] == b'.'
            && digits(20..26)
            && bytes[26] == b'Z',
        "not RFC 3339 UTC with microseconds: {text}"
    );
    chrono::DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|err| panic!("{text} is not RFC 3339: {err}"));
}

/// Asserts the shape of an entry: exactly the documented fields, with `value`
/// or `value_base64` unless `keys_only`, and well-formed timestamps.
pub fn assert_entry_shape(entry: &Value, keys_only: bool) {
    let mut fields = ENTRY_META.to_vec();
    // Only on keys that expire, and on keys on a lease.
    for optional in ["expires_at", "lease"] {
        if entry.get(optional).is_some() {
            fields.push(optional);
        }
    }
    if let Some(deadline) = entry.get("expires_at") {
        assert_timestamp(deadline.as_str().unwrap_or_default());
    }
    if !keys_only {
        fields.push(if entry.get("value").is_some() {
            "value"
        } else {
            "value_base64"
        });
    }
    assert_fields(entry, &fields);
    assert!(entry["key"].is_string(), "{entry}");
    assert!(entry["version"].as_u64().is_some_and(|v| v >= 1), "{entry}");
    assert!(
        entry["revision"].as_u64().is_some_and(|r| r >= 1),
        "{entry}"
    );
    for field in ["value", "value_base64", "created_at", "updated_at"] {
        if let Some(v) = entry.get(field) {
            assert!(v.is_string(), "{field} of {entry}");
        }
    }
    assert_timestamp(entry["created_at"].as_str().unwrap_or_default());
    assert_timestamp(entry["updated_at"].as_str().unwrap_or_default());
    assert!(
        entry["created_at"].as_str() <= entry["updated_at"].as_str(),
        "{entry}"
    );
}

/// The `ETag` header of an answer.
pub fn etag(response: &RawResponse) -> &str {
    response
        .headers
        .get(header::ETAG)
        .unwrap_or_else(|| panic!("no ETag: {}", describe(response)))
        .to_str()
        .expect("ASCII ETag")
}

/// The entry of a key, checking its shape and that `ETag` is `"<version>"`;
/// `None` after a 404 `not_found`.
pub async fn find(client: &Client, key: &str) -> Option<Value> {
    let response = get(client, &Client::key_path(key)).await;
    if response.status == StatusCode::NOT_FOUND {
        expect_error(&response, StatusCode::NOT_FOUND, "not_found");
        return None;
    }
    let body = expect_json(&response, StatusCode::OK);
    assert_entry_shape(&body, false);
    assert_eq!(body["key"], key);
    assert_eq!(etag(&response), format!("\"{}\"", body["version"]));
    Some(body)
}

/// The entry of a key that must exist.
pub async fn entry(client: &Client, key: &str) -> Value {
    find(client, key)
        .await
        .unwrap_or_else(|| panic!("{key} does not exist"))
}

/// Asserts that a key does not exist.
pub async fn assert_missing(client: &Client, key: &str) {
    assert_eq!(find(client, key).await, None, "{key} exists");
}

/// Checks the answer to a successful `PUT`: 201 with `created: true` or 200
/// with `created: false`, exactly the documented fields, and
/// `ETag: "<version>"`. Returns the body.
pub fn put_answer(response: &RawResponse, key: &str) -> Value {
    assert!(
        matches!(response.status, StatusCode::OK | StatusCode::CREATED),
        "{}",
        describe(response)
    );
    let body = expect_json(response, response.status);
    assert_fields(&body, &["key", "version", "revision", "created"]);
    assert_eq!(body["key"], key);
    assert_eq!(
        body["created"],
        response.status == StatusCode::CREATED,
        "{body}"
    );
    assert_eq!(etag(response), format!("\"{}\"", body["version"]));
    body
}

/// Writes a text value; returns the checked answer.
pub async fn put_text(client: &Client, key: &str, value: &str) -> Value {
    let response = put_json(client, key, &json!({ "value": value }), &[]).await;
    put_answer(&response, key)
}

/// The revision of a new write to a key the tests do not otherwise use, which
/// tells what the last revision before it was.
pub async fn probe_revision(client: &Client) -> u64 {
    revision_of(&put_text(client, "zz-probe", "p").await)
}

pub fn revision_of(body: &Value) -> u64 {
    body["revision"]
        .as_u64()
        .unwrap_or_else(|| panic!("no revision: {body}"))
}

pub fn version_of(body: &Value) -> u64 {
    body["version"]
        .as_u64()
        .unwrap_or_else(|| panic!("no version: {body}"))
}

/// A request body sent in chunks, without a `Content-Length`.
struct Chunked(VecDeque<Bytes>);

impl hyper::body::Body for Chunked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.get_mut().0.pop_front().map(|c| Ok(Frame::data(c))))
    }
}

/// Sends a request whose body goes out with `Transfer-Encoding: chunked`, on
/// a connection of its own.
pub async fn send_chunked(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: Headers<'_>,
    chunks: Vec<Bytes>,
) -> RawResponse {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, addr.to_string());
    for (name, value) in headers {
        request = request.header(name, *value);
    }
    let request = request
        .body(Chunked(chunks.into()))
        .expect("chunked request");
    let response = sender.send_request(request).await.expect("chunked send");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("answer body").to_bytes();
    RawResponse {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// The state of some keys and the store's last revision, to check that a
/// failed request changed nothing.
pub struct Snapshot {
    entries: Vec<(String, Option<Value>)>,
    revision: u64,
}

impl Snapshot {
    pub async fn take(client: &Client, keys: &[&str]) -> Self {
        let revision = probe_revision(client).await;
        let mut entries = Vec::with_capacity(keys.len());
        for key in keys {
            entries.push(((*key).to_owned(), find(client, key).await));
        }
        Snapshot { entries, revision }
    }

    /// Asserts that the keys are as they were (the same entries, or still
    /// absent) and that no write took a revision since the snapshot.
    pub async fn assert_unchanged(&self, client: &Client) {
        for (key, before) in &self.entries {
            assert_eq!(&find(client, key).await, before, "{key} changed");
        }
        assert_eq!(
            probe_revision(client).await,
            self.revision + 1,
            "a failed request took a revision"
        );
    }
}

/// Sends a request that must fail with this status and error code and change
/// neither the given keys nor the store's revision.
macro_rules! assert_rejected {
    ($client:expr, $keys:expr, $request:expr, $status:expr, $code:expr $(,)?) => {{
        let snapshot = $crate::requests::Snapshot::take($client, $keys).await;
        $crate::requests::expect_error(&$request.await, $status, $code);
        snapshot.assert_unchanged($client).await;
    }};
}

/// Writes `value` under every key, in one batch.
pub async fn seed(client: &Client, entries: &[(&str, &str)]) {
    let ops: Vec<Value> = entries
        .iter()
        .map(|(key, value)| json!({"op": "put", "key": key, "value": value}))
        .collect();
    let response = post_json(client, "/v1/batch", &json!({ "ops": ops })).await;
    expect_json(&response, StatusCode::OK);
}

/// Writes every key with its own name as the value, in one batch.
pub async fn seed_keys(client: &Client, keys: &[&str]) {
    let entries: Vec<(&str, &str)> = keys.iter().map(|k| (*k, *k)).collect();
    seed(client, &entries).await;
}

/// One page of `GET /v1/kv?{query}`, checked for shape.
pub async fn list(client: &Client, query: &str) -> Value {
    let response = get(client, &format!("/v1/kv?{query}")).await;
    let page = expect_json(&response, StatusCode::OK);
    assert_fields(&page, &["items", "next_cursor", "revision"]);
    assert_read_revision(&page);
    let keys_only = query
        .split('&')
        .any(|p| p == "keys_only=1" || p == "keys_only=true");
    let items = page["items"].as_array().expect("items array");
    for item in items {
        assert_entry_shape(item, keys_only);
    }
    let cursor = &page["next_cursor"];
    assert!(
        cursor.is_null() || cursor.as_str().is_some_and(|c| !c.is_empty()),
        "{page}"
    );
    assert!(
        !items.is_empty() || cursor.is_null(),
        "an empty page with a cursor: {page}"
    );
    page
}

/// The keys of a page, in order.
pub fn keys(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .expect("items array")
        .iter()
        .map(|item| item["key"].as_str().expect("key").to_owned())
        .collect()
}

/// The keys of one page of `GET /v1/kv?{query}`.
pub async fn list_keys(client: &Client, query: &str) -> Vec<String> {
    keys(&list(client, query).await)
}

/// Walks every page of `GET /v1/kv?{query}`, passing each `next_cursor` back;
/// returns the pages' keys.
pub async fn walk(client: &Client, query: &str) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page_query = match &cursor {
            Some(c) => format!("{query}&cursor={c}"),
            None => query.to_owned(),
        };
        let page = list(client, &page_query).await;
        pages.push(keys(&page));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return pages,
        }
        assert!(pages.len() < 10_000, "the walk does not end");
    }
}
