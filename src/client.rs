//! A typed async client of API v1, over a pooled hyper connection.
//!
//! [`Client::send`] is the raw layer (any method, path, headers and body);
//! the typed methods build on it with the bodies of [`crate::api::types`].
//! [`Client::watch`] and [`Client::changes`] (in [`watch`](self::WatchStream))
//! follow the store's changes. Keys may expire: [`Client::put_with`] and
//! [`Client::put_body`] give a write a deadline ([`Expiry`]), and
//! [`Client::grant_lease`] makes a deadline that many keys share.

mod watch;

pub use watch::{
    Change, ChangesPage, ChangesRequest, Event, Value, WatchMessage, WatchRange, WatchRequest,
    WatchStream,
};

use std::error::Error as StdError;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderName};
use hyper::{Method, Request, Response, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::types::lease_text;
use crate::api::types::{
    BatchGetRequest, BatchGetResponse, BatchRequest, BatchResponse, EntryBody, ErrorBody,
    ErrorCode, ErrorResponse, LeaseBody, LeaseRequest, ListResponse, PutBody, PutResponse,
};
use crate::storage::{Condition, Expiry, LeaseId};

/// Characters of a key sent as they are in a path; `/` needs no escape.
const PATH_SAFE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'/');

/// Characters of a query value sent as they are.
const QUERY_SAFE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// The most ops in a batch, keys in a batch read and items in a page
/// (API v1).
pub const MAX_ITEMS: usize = 1000;

/// What can go wrong calling the server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached, or the connection broke.
    #[error("cannot reach the server: {0}")]
    Transport(String),
    /// The server answered with an error.
    #[error("{status}: {} ({})", error.message, error.code)]
    Api {
        /// The HTTP status.
        status: StatusCode,
        /// The error body: its code, message and details.
        error: ErrorBody,
    },
    /// The answer was not what API v1 describes.
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
    /// A watch or changes request started before the history the server
    /// keeps (410 `compacted`, or `event: compacted` once a watch fell that
    /// far behind): list the range again and watch from the list's
    /// `revision + 1`.
    #[error(
        "the changes before revision {compact_revision} are no longer kept (the store is at \
         revision {revision}): list the range again and watch from its revision + 1"
    )]
    Compacted {
        /// The oldest revision still watchable.
        compact_revision: u64,
        /// The store's current revision.
        revision: u64,
    },
    /// The lease does not exist or has expired (404 `lease_not_found`): a
    /// write that named it wrote nothing, and a keepalive came too late.
    /// Only a new lease helps.
    #[error("{message} (404 lease_not_found)")]
    LeaseNotFound {
        /// The server's message, which names the lease.
        message: String,
    },
}

impl ClientError {
    /// Whether the same request may fare better later: the server could not
    /// be reached or failed (5xx), which says nothing about the request.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Transport(_) => true,
            ClientError::Api { status, .. } => status.is_server_error(),
            ClientError::Protocol(_)
            | ClientError::Compacted { .. }
            | ClientError::LeaseNotFound { .. } => false,
        }
    }
}

/// An error and its sources on one line: hyper's own `Display` stops at
/// "client error (Connect)", and the cause (connection refused, ...) is what
/// a user needs.
fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// A value read as raw bytes, with its version (from the `ETag`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawValue {
    /// The value.
    pub value: Bytes,
    /// Its version.
    pub version: u64,
}

/// An answer as it came.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// The HTTP status.
    pub status: StatusCode,
    /// The headers.
    pub headers: hyper::HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl RawResponse {
    /// Reads the whole body of an answer.
    async fn read(response: Response<Incoming>) -> Result<Self, ClientError> {
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|err| ClientError::Transport(error_chain(&err)))?
            .to_bytes();
        Ok(RawResponse {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// The body parsed as JSON.
    ///
    /// # Errors
    /// When the body is not JSON of that shape.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ClientError> {
        serde_json::from_slice(&self.body).map_err(|err| {
            ClientError::Protocol(format!("{err} in {}", String::from_utf8_lossy(&self.body)))
        })
    }

    /// Success bodies as `T`, error answers as [`ClientError::Api`].
    fn into_result<T: DeserializeOwned>(self) -> Result<T, ClientError> {
        if self.status.is_success() {
            self.json()
        } else {
            Err(self.into_error())
        }
    }

    fn into_error(self) -> ClientError {
        match self.json::<ErrorResponse>() {
            Ok(body) if body.error.code == ErrorCode::LeaseNotFound => ClientError::LeaseNotFound {
                message: body.error.message,
            },
            Ok(body) => compacted(&body.error).unwrap_or(ClientError::Api {
                status: self.status,
                error: body.error,
            }),
            Err(err) => err,
        }
    }
}

/// A `compacted` error with both of its revisions as [`ClientError::Compacted`],
/// so that a 410 and a watch's `event: compacted` read the same.
fn compacted(error: &ErrorBody) -> Option<ClientError> {
    if error.code != ErrorCode::Compacted {
        return None;
    }
    let revision = |name: &str| error.details.get(name).and_then(serde_json::Value::as_u64);
    Some(ClientError::Compacted {
        compact_revision: revision("compact_revision")?,
        revision: revision("revision")?,
    })
}

/// A query string built one parameter at a time, its values percent-encoded.
#[derive(Default)]
struct QueryString(Vec<String>);

impl QueryString {
    fn text(&mut self, name: &str, value: Option<&str>) {
        if let Some(value) = value {
            self.0
                .push(format!("{name}={}", utf8_percent_encode(value, QUERY_SAFE)));
        }
    }

    fn number(&mut self, name: &str, value: Option<u64>) {
        if let Some(value) = value {
            self.0.push(format!("{name}={value}"));
        }
    }

    fn flag(&mut self, name: &str, on: bool) {
        if on {
            self.0.push(format!("{name}=1"));
        }
    }

    /// `path`, followed by the query when there is one.
    fn after(&self, path: &str) -> String {
        if self.0.is_empty() {
            path.to_owned()
        } else {
            format!("{path}?{}", self.0.join("&"))
        }
    }
}

/// Options of a range read; `None` leaves a parameter out.
#[derive(Debug, Clone, Default)]
pub struct ListParams {
    /// The first key (inclusive).
    pub start: Option<String>,
    /// The key to stop before (exclusive).
    pub end: Option<String>,
    /// Only the keys that begin with this.
    pub prefix: Option<String>,
    /// At most this many items per page (the server allows 1 to 1000).
    pub limit: Option<usize>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Leave the values out.
    pub keys_only: bool,
    /// From the last key down.
    pub reverse: bool,
}

/// How a client authenticates and whom it trusts.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ClientOptions {
    /// Sent as `Authorization: Bearer TOKEN` with every request.
    pub token: Option<String>,
    /// PEM CA certificate(s) that `https://` servers must chain to; the
    /// system's roots when `None`.
    pub ca_cert_pem: Option<Vec<u8>>,
}

/// A client of one kvstore server.
#[derive(Clone)]
pub struct Client {
    base: String,
    http: HyperClient<HttpsConnector<HttpConnector>, Full<Bytes>>,
    authorization: Option<hyper::header::HeaderValue>,
}

impl Client {
    /// A client of the server at `base_url` (`http://host:port` or
    /// `https://host:port`), with no token, trusting the system's roots.
    ///
    /// # Errors
    /// When the URL is not an `http://` or `https://` URL.
    pub fn new(base_url: &str) -> Result<Self, ClientError> {
        Self::with_options(base_url, &ClientOptions::default())
    }

    /// A client with a token and/or a CA of its own.
    ///
    /// # Errors
    /// When the URL is not an `http://` or `https://` URL, the token cannot
    /// be a header, or the CA does not parse.
    pub fn with_options(base_url: &str, options: &ClientOptions) -> Result<Self, ClientError> {
        let base = base_url.trim_end_matches('/').to_owned();
        let https = base.starts_with("https://");
        if !https && !base.starts_with("http://") {
            return Err(ClientError::Transport(format!(
                "'{base_url}' is not an http:// or https:// URL"
            )));
        }
        let authorization = options
            .token
            .as_ref()
            .map(|token| {
                let mut value = hyper::header::HeaderValue::try_from(format!("Bearer {token}"))
                    .map_err(|_| {
                        ClientError::Transport("the token cannot be sent in a header".into())
                    })?;
                value.set_sensitive(true);
                Ok::<_, ClientError>(value)
            })
            .transpose()?;
        // Plain HTTP needs no roots; loading the system's is left to https.
        let tls = match (&options.ca_cert_pem, https) {
            (Some(pem), _) => crate::tls::client_config(Some(pem)),
            (None, true) => crate::tls::client_config(None),
            (None, false) => crate::tls::client_config_without_roots(),
        }
        .map_err(|err| ClientError::Transport(err.to_string()))?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        connector.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let http = HyperClient::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Client {
            base,
            http,
            authorization,
        })
    }

    /// The path of a key, percent-encoded.
    pub fn key_path(key: &str) -> String {
        format!("/v1/kv/{}", utf8_percent_encode(key, PATH_SAFE))
    }

    /// Sends one request and reads the whole answer.
    ///
    /// # Errors
    /// [`ClientError::Transport`] when the server cannot be reached.
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        headers: &[(HeaderName, &str)],
        body: impl Into<Bytes>,
    ) -> Result<RawResponse, ClientError> {
        let response = self.start(method, path_and_query, headers, body).await?;
        RawResponse::read(response).await
    }

    /// Sends one request; the answer's body is left to read as it comes
    /// (a watch's never ends).
    async fn start(
        &self,
        method: Method,
        path_and_query: &str,
        headers: &[(HeaderName, &str)],
        body: impl Into<Bytes>,
    ) -> Result<Response<Incoming>, ClientError> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path_and_query}", self.base));
        if let Some(authorization) = &self.authorization
            && !headers
                .iter()
                .any(|(name, _)| name == header::AUTHORIZATION)
        {
            request = request.header(header::AUTHORIZATION, authorization.clone());
        }
        for (name, value) in headers {
            request = request.header(name, *value);
        }
        let request = request
            .body(Full::new(body.into()))
            .map_err(|err| ClientError::Transport(format!("bad request: {err}")))?;
        self.http
            .request(request)
            .await
            .map_err(|err| ClientError::Transport(error_chain(&err)))
    }

    async fn send_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.send(
            Method::POST,
            path,
            &[(header::CONTENT_TYPE, "application/json")],
            body,
        )
        .await?
        .into_result()
    }

    /// The entry of `key`, or `None` when it does not exist.
    ///
    /// # Errors
    /// Transport and server errors.
    pub async fn get(&self, key: &str) -> Result<Option<EntryBody>, ClientError> {
        let response = self
            .send(Method::GET, &Self::key_path(key), &[], Bytes::new())
            .await?;
        if response.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        response.into_result().map(Some)
    }

    /// The value of `key` as raw bytes (binary-safe, no JSON), or `None` when
    /// the key does not exist.
    ///
    /// # Errors
    /// Transport and server errors; [`ClientError::Protocol`] when the answer
    /// has no `ETag`.
    pub async fn get_raw(&self, key: &str) -> Result<Option<RawValue>, ClientError> {
        let response = self
            .send(
                Method::GET,
                &Self::key_path(key),
                &[(header::ACCEPT, "application/octet-stream")],
                Bytes::new(),
            )
            .await?;
        match response.status {
            StatusCode::NOT_FOUND => Ok(None),
            status if status.is_success() => {
                let version = response
                    .headers
                    .get(header::ETAG)
                    .and_then(|tag| tag.to_str().ok())
                    .and_then(|tag| tag.trim_matches('"').parse().ok())
                    .ok_or_else(|| ClientError::Protocol("a value without an ETag".into()))?;
                Ok(Some(RawValue {
                    value: response.body,
                    version,
                }))
            }
            _ => Err(response.into_error()),
        }
    }

    /// Writes `value` (any bytes) under `key`, if `condition` holds. The key
    /// is left without a deadline, as [`Client::put_with`] with
    /// [`Expiry::Never`] leaves it.
    ///
    /// # Errors
    /// [`ClientError::Api`] with code `version_mismatch` when the condition fails.
    pub async fn put(
        &self,
        key: &str,
        value: impl Into<Bytes>,
        condition: Condition,
    ) -> Result<PutResponse, ClientError> {
        self.put_with(key, value, condition, Expiry::Never).await
    }

    /// Writes `value` (any bytes) under `key`, if `condition` holds, with the
    /// deadline `expiry` asks for: [`Expiry::Ttl`] in milliseconds (1 or
    /// more), [`Expiry::Keep`] the key's current one, [`Expiry::Lease`] its
    /// lease's, [`Expiry::Never`] none.
    ///
    /// # Errors
    /// [`ClientError::Api`] with code `version_mismatch` when the condition
    /// fails; [`ClientError::LeaseNotFound`] when the lease is gone.
    pub async fn put_with(
        &self,
        key: &str,
        value: impl Into<Bytes>,
        condition: Condition,
        expiry: Expiry,
    ) -> Result<PutResponse, ClientError> {
        let mut query = QueryString::default();
        match expiry {
            Expiry::Never => {}
            Expiry::Ttl(ttl_ms) => query.number("ttl_ms", Some(ttl_ms)),
            // The HTTP API takes a time to live: the time left by this
            // machine's clock.
            Expiry::At(deadline_us) => query.number(
                "ttl_ms",
                Some(
                    u64::try_from(
                        deadline_us.saturating_sub(crate::storage::system_now_us()) / 1000,
                    )
                    .unwrap_or(0)
                    .max(1),
                ),
            ),
            Expiry::Keep => query.flag("keep_ttl", true),
            Expiry::Lease(id) => query.text("lease", Some(&lease_text(id))),
        }
        let path = query.after(&Self::key_path(key));
        self.put_request(&path, "application/octet-stream", condition, value)
            .await
    }

    /// Writes a JSON `PUT` body (`value` or `value_base64`, and `ttl_ms`,
    /// `keep_ttl` or `lease`) under `key`, if `condition` holds.
    ///
    /// # Errors
    /// As [`Client::put_with`]; [`ClientError::Api`] with code
    /// `invalid_request` for a body that is not one the API takes.
    pub async fn put_body(
        &self,
        key: &str,
        body: &PutBody,
        condition: Condition,
    ) -> Result<PutResponse, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.put_request(&Self::key_path(key), "application/json", condition, body)
            .await
    }

    /// A single-key `PUT` of `body`, of `content_type`, if `condition` holds.
    async fn put_request(
        &self,
        path_and_query: &str,
        content_type: &str,
        condition: Condition,
        body: impl Into<Bytes>,
    ) -> Result<PutResponse, ClientError> {
        let tag = condition_header(condition);
        let mut headers = vec![(header::CONTENT_TYPE, content_type)];
        headers.extend(
            tag.as_ref()
                .map(|(name, value)| (name.clone(), value.as_str())),
        );
        self.send(Method::PUT, path_and_query, &headers, body)
            .await?
            .into_result()
    }

    /// Deletes `key`; `Ok(false)` when it did not exist.
    ///
    /// # Errors
    /// [`ClientError::Api`] with code `version_mismatch` when `if_version` fails.
    pub async fn delete(&self, key: &str, if_version: Option<u64>) -> Result<bool, ClientError> {
        let tag = if_version.map(|v| format!("\"{v}\""));
        let headers: Vec<(HeaderName, &str)> = tag
            .as_deref()
            .map(|t| (header::IF_MATCH, t))
            .into_iter()
            .collect();
        let response = self
            .send(Method::DELETE, &Self::key_path(key), &headers, Bytes::new())
            .await?;
        match response.status {
            StatusCode::NO_CONTENT => Ok(true),
            StatusCode::NOT_FOUND if if_version.is_none() => Ok(false),
            _ => Err(response.into_error()),
        }
    }

    /// One page of a range read.
    ///
    /// # Errors
    /// Transport and server errors.
    pub async fn list(&self, params: &ListParams) -> Result<ListResponse, ClientError> {
        let mut query = QueryString::default();
        query.text("start", params.start.as_deref());
        query.text("end", params.end.as_deref());
        query.text("prefix", params.prefix.as_deref());
        query.text("cursor", params.cursor.as_deref());
        query.number("limit", params.limit.map(|limit| limit as u64));
        query.flag("keys_only", params.keys_only);
        query.flag("reverse", params.reverse);
        self.send(Method::GET, &query.after("/v1/kv"), &[], Bytes::new())
            .await?
            .into_result()
    }

    /// Every page of a range read, one after the other, following
    /// `next_cursor`; `params.cursor` is where the walk starts.
    pub fn pages(&self, params: ListParams) -> Pages<'_> {
        Pages {
            client: self,
            params,
            done: false,
        }
    }

    /// Whether the server is up (`GET /healthz`).
    ///
    /// # Errors
    /// Transport errors, and [`ClientError::Api`] when it answers with an error.
    pub async fn health(&self) -> Result<(), ClientError> {
        let response = self
            .send(Method::GET, "/healthz", &[], Bytes::new())
            .await?;
        if response.status.is_success() {
            Ok(())
        } else {
            Err(response.into_error())
        }
    }

    /// An atomic batch of writes.
    ///
    /// # Errors
    /// [`ClientError::Api`] with code `version_mismatch` (and `failed`,
    /// `current_versions` in its details) when a condition fails.
    pub async fn batch(&self, request: &BatchRequest) -> Result<BatchResponse, ClientError> {
        self.send_json("/v1/batch", request).await
    }

    /// Several keys read from one consistent view.
    ///
    /// # Errors
    /// Transport and server errors.
    pub async fn batch_get(&self, keys: Vec<String>) -> Result<BatchGetResponse, ClientError> {
        self.send_json("/v1/batch/get", &BatchGetRequest { keys })
            .await
    }

    /// A new lease that expires `ttl_ms` milliseconds from now unless it is
    /// kept alive; keys written with [`Expiry::Lease`] expire with it.
    ///
    /// # Errors
    /// [`ClientError::Api`] with code `invalid_request` for a `ttl_ms` of 0
    /// or over 100 years.
    pub async fn grant_lease(&self, ttl_ms: u64) -> Result<LeaseBody, ClientError> {
        self.send_json("/v1/leases", &LeaseRequest { ttl_ms }).await
    }

    /// Renews a lease for its full `ttl_ms`, from now.
    ///
    /// # Errors
    /// [`ClientError::LeaseNotFound`] when it expired or was revoked.
    pub async fn keep_lease_alive(&self, id: LeaseId) -> Result<LeaseBody, ClientError> {
        let path = format!("{}/keepalive", Self::lease_path(id));
        self.send(Method::POST, &path, &[], Bytes::new())
            .await?
            .into_result()
    }

    /// A lease, with the number of keys attached to it (`keys`).
    ///
    /// # Errors
    /// [`ClientError::LeaseNotFound`] when it expired or was revoked.
    pub async fn lease(&self, id: LeaseId) -> Result<LeaseBody, ClientError> {
        self.send(Method::GET, &Self::lease_path(id), &[], Bytes::new())
            .await?
            .into_result()
    }

    /// Ends a lease now, deleting every key attached to it (in one revision).
    ///
    /// # Errors
    /// [`ClientError::LeaseNotFound`] when it had already expired or was
    /// revoked.
    pub async fn revoke_lease(&self, id: LeaseId) -> Result<(), ClientError> {
        let response = self
            .send(Method::DELETE, &Self::lease_path(id), &[], Bytes::new())
            .await?;
        if response.status.is_success() {
            Ok(())
        } else {
            Err(response.into_error())
        }
    }

    fn lease_path(id: LeaseId) -> String {
        format!("/v1/leases/{}", lease_text(id))
    }
}

/// The header that makes a single-key write conditional, if any.
fn condition_header(condition: Condition) -> Option<(HeaderName, String)> {
    match condition {
        Condition::Any => None,
        Condition::Version(v) => Some((header::IF_MATCH, format!("\"{v}\""))),
        Condition::Exists => Some((header::IF_MATCH, "*".to_owned())),
        Condition::Absent => Some((header::IF_NONE_MATCH, "*".to_owned())),
    }
}

/// A walk over the pages of a range read; see [`Client::pages`].
pub struct Pages<'a> {
    client: &'a Client,
    params: ListParams,
    done: bool,
}

impl Pages<'_> {
    /// Asks for at most `limit` items in the pages to come.
    pub fn set_page_limit(&mut self, limit: usize) {
        self.params.limit = Some(limit);
    }

    /// The cursor that continues the walk where it stands; `None` once the
    /// range is exhausted.
    pub fn cursor(&self) -> Option<&str> {
        if self.done {
            None
        } else {
            self.params.cursor.as_deref()
        }
    }

    /// The items of the next page, or `None` once the range is exhausted.
    ///
    /// # Errors
    /// Transport and server errors; the walk can go on after a transport
    /// error, from the page that failed.
    pub async fn next_page(&mut self) -> Result<Option<Vec<EntryBody>>, ClientError> {
        if self.done {
            return Ok(None);
        }
        let page = self.client.list(&self.params).await?;
        self.done = page.next_cursor.is_none();
        self.params.cursor = page.next_cursor;
        Ok(Some(page.items))
    }
}
