//! Following the store's changes: `GET /v1/watch` as a typed stream that
//! resumes by itself when its connection drops, and `GET /v1/changes` pages.
//!
//! ```no_run
//! use kvstore::client::{Client, ClientError, WatchMessage, WatchRange, WatchRequest};
//!
//! # async fn run() -> Result<(), ClientError> {
//! let client = Client::new("http://127.0.0.1:7070")?;
//! let mut changes = client.watch(WatchRequest {
//!     range: WatchRange::Prefix("users/".into()),
//!     from_revision: None,
//! });
//! while let Some(message) = changes.next().await {
//!     match message {
//!         Ok(WatchMessage::Change(change)) => println!("{change:?}"),
//!         Ok(WatchMessage::Progress { .. }) => {}
//!         // Compacted: list the range again, watch from its revision + 1.
//!         Err(err) => return Err(err),
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! The stream reads the Server-Sent Events itself: the protocol is a few
//! lines of text, and the crates that parse it bring their own HTTP stacks or
//! stream adapters for what is here one loop over the body's frames.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::header::{self, HeaderName};
use hyper::{Method, Response};
use rand::rngs::SmallRng;
use rand::{RngExt as _, SeedableRng as _};
use serde::{Deserialize, Serialize};

use super::{Client, ClientError, QueryString, RawResponse, error_chain};
use crate::error::InvalidValue;

/// The first wait before reconnecting; it doubles with every failure in a
/// row, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between two attempts: a restarted server is found again
/// within this long.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A connection that brings nothing for this long is taken for dead: the
/// server sends a progress message or a keep-alive comment at least every
/// 15 s, so only a half-open connection (a peer gone without a word) stays
/// this quiet.
const IDLE_TIMEOUT: Duration = Duration::from_secs(45);
/// The most bytes of one message: the largest change (a batch of 16 MiB of
/// values, base64-encoded, in JSON) fits; a stream without message ends does
/// not take all the memory.
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The keys a watch or a changes page covers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum WatchRange {
    /// Every key (that the token may read).
    #[default]
    All,
    /// One key.
    Key(String),
    /// The keys that begin with this.
    Prefix(String),
    /// From `start` (inclusive) to `end` (exclusive); `None` leaves that side
    /// open.
    Span {
        /// The first key (inclusive).
        start: Option<String>,
        /// The key to stop before (exclusive).
        end: Option<String>,
    },
}

impl WatchRange {
    fn add_to(&self, query: &mut QueryString) {
        match self {
            WatchRange::All => {}
            WatchRange::Key(key) => query.text("key", Some(key)),
            WatchRange::Prefix(prefix) => query.text("prefix", Some(prefix)),
            WatchRange::Span { start, end } => {
                query.text("start", start.as_deref());
                query.text("end", end.as_deref());
            }
        }
    }
}

/// What to watch, and from where.
#[derive(Debug, Clone, Default)]
pub struct WatchRequest {
    /// The keys to watch.
    pub range: WatchRange,
    /// The first revision to deliver; `None` for the changes after the
    /// revision the store is at when the watch starts.
    pub from_revision: Option<u64>,
}

/// What to ask `GET /v1/changes` for.
#[derive(Debug, Clone, Default)]
pub struct ChangesRequest {
    /// The keys to ask about.
    pub range: WatchRange,
    /// Revisions above this one; `None` for the store's current revision.
    pub after: Option<u64>,
    /// At most this many revisions (the server allows 1 to 1000, default 100).
    pub limit: Option<usize>,
    /// How long the server may hold the answer while there is no change yet
    /// (up to 60 s); `None` answers at once.
    pub wait: Option<Duration>,
}

/// One revision's events inside the watched range, in the server's shape
/// (`{"revision": r, "events": [...]}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The revision of the write or batch.
    pub revision: u64,
    /// What it did to each key in the range.
    pub events: Vec<Event>,
}

/// A write of one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "EventBody", into = "EventBody")]
pub enum Event {
    /// The key's new entry, as GET shows it (its revision is the change's).
    Put {
        /// The key.
        key: String,
        /// Its new value.
        value: Value,
        /// Its new version.
        version: u64,
        /// When the key was created (RFC 3339).
        created_at: String,
        /// When it was last written (RFC 3339).
        updated_at: String,
        /// When the key expires, if it has a deadline.
        expires_at: Option<String>,
        /// The lease the key is attached to.
        lease: Option<String>,
    },
    /// The key is gone: `version` is the one it removed, `reason` says why
    /// (`deleted`, `expired`, `lease_revoked`, or what a newer server adds).
    Delete {
        /// The key.
        key: String,
        /// The version it had.
        version: u64,
        /// Why it is gone.
        reason: String,
    },
}

impl Event {
    /// The key the event is about.
    pub fn key(&self) -> &str {
        match self {
            Event::Put { key, .. } | Event::Delete { key, .. } => key,
        }
    }
}

/// A value as the API carries it: text when its bytes are UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// UTF-8 bytes (sent as `value`).
    Text(String),
    /// Any other bytes (sent as `value_base64`).
    Bytes(Bytes),
}

impl Value {
    /// The value of an entry or a put event, from its `value` or
    /// `value_base64` (exactly one); `key` names it in the error.
    ///
    /// # Errors
    /// When neither or both are there, or the base64 does not decode.
    pub fn from_fields(
        key: &str,
        value: Option<String>,
        value_base64: Option<String>,
    ) -> Result<Self, InvalidValue> {
        match (value, value_base64) {
            (Some(text), None) => Ok(Value::Text(text)),
            (None, Some(encoded)) => Ok(Value::Bytes(
                STANDARD
                    .decode(&encoded)
                    .map_err(|err| InvalidValue(format!("value_base64 of '{key}': {err}")))?
                    .into(),
            )),
            _ => Err(InvalidValue(format!(
                "the entry of '{key}' needs exactly one of value and value_base64"
            ))),
        }
    }

    /// The bytes of the value.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Value::Text(text) => text.as_bytes(),
            Value::Bytes(bytes) => bytes,
        }
    }
}

/// An [`Event`] as it is on the wire.
#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum EventBody {
    Put {
        key: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        value: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        value_base64: Option<String>,
        version: u64,
        created_at: String,
        updated_at: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lease: Option<String>,
    },
    Delete {
        key: String,
        version: u64,
        reason: String,
    },
}

impl TryFrom<EventBody> for Event {
    type Error = InvalidValue;

    fn try_from(body: EventBody) -> Result<Self, Self::Error> {
        Ok(match body {
            EventBody::Put {
                key,
                value,
                value_base64,
                version,
                created_at,
                updated_at,
                expires_at,
                lease,
            } => Event::Put {
                value: Value::from_fields(&key, value, value_base64)?,
                key,
                version,
                created_at,
                updated_at,
                expires_at,
                lease,
            },
            EventBody::Delete {
                key,
                version,
                reason,
            } => Event::Delete {
                key,
                version,
                reason,
            },
        })
    }
}

impl From<Event> for EventBody {
    fn from(event: Event) -> Self {
        match event {
            Event::Put {
                key,
                value,
                version,
                created_at,
                updated_at,
                expires_at,
                lease,
            } => {
                let (value, value_base64) = match value {
                    Value::Text(text) => (Some(text), None),
                    Value::Bytes(bytes) => (None, Some(STANDARD.encode(bytes))),
                };
                EventBody::Put {
                    key,
                    value,
                    value_base64,
                    version,
                    created_at,
                    updated_at,
                    expires_at,
                    lease,
                }
            }
            Event::Delete {
                key,
                version,
                reason,
            } => EventBody::Delete {
                key,
                version,
                reason,
            },
        }
    }
}

/// The answer to `GET /v1/changes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangesPage {
    /// The revisions in the range, oldest first.
    pub changes: Vec<Change>,
    /// Where the next page's `after` starts: the last revision listed, or the
    /// revision up to which the range is known unchanged.
    pub revision: u64,
}

/// What a watch delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchMessage {
    /// The events of one revision.
    Change(Change),
    /// Nothing in the range changed up to `revision`.
    Progress {
        /// The store's revision.
        revision: u64,
    },
}

impl Client {
    /// Follows the changes to a range, from `request.from_revision` or from
    /// the next revision, each revision once and in order.
    ///
    /// The stream connects on its first [`WatchStream::next`]. When its
    /// connection drops after that (the server restarts, the network
    /// breaks, a 5xx), it reconnects with a growing, jittered wait of at most
    /// 5 s, for as long as it is polled, sending the last message's id as
    /// `Last-Event-ID`: the consumer sees every revision exactly once across
    /// reconnects. Each reconnect is logged (tracing, at `warn`).
    ///
    /// It ends with an error, after which it yields `None`:
    /// [`ClientError::Compacted`] when the start is older than the history
    /// kept or the watch fell that far behind; any error of the first
    /// connection (so that a wrong URL or token fails at once); and errors
    /// that another attempt would meet again (4xx, an answer that is not
    /// API v1).
    pub fn watch(&self, request: WatchRequest) -> WatchStream {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos() as u64)
            ^ u64::from(std::process::id());
        WatchStream {
            client: self.clone(),
            range: request.range,
            from_revision: request.from_revision,
            last_event_id: None,
            delivered: None,
            body: None,
            parser: SseParser::default(),
            connected: false,
            failures: 0,
            rng: SmallRng::seed_from_u64(seed),
            ended: false,
        }
    }

    /// One page of the changes to a range (`GET /v1/changes`).
    ///
    /// # Errors
    /// [`ClientError::Compacted`] when `after` is older than the history
    /// kept; transport and server errors.
    pub async fn changes(&self, request: &ChangesRequest) -> Result<ChangesPage, ClientError> {
        let mut query = QueryString::default();
        request.range.add_to(&mut query);
        query.number("after", request.after);
        query.number("limit", request.limit.map(|limit| limit as u64));
        query.number(
            "wait_ms",
            request
                .wait
                .map(|wait| u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)),
        );
        self.send(Method::GET, &query.after("/v1/changes"), &[], Bytes::new())
            .await?
            .into_result()
    }
}

/// The changes to a range as they happen; see [`Client::watch`].
pub struct WatchStream {
    client: Client,
    range: WatchRange,
    /// Where the first connection starts, and every later one until a
    /// message has come.
    from_revision: Option<u64>,
    /// The `id` of the last change or progress message, sent back as
    /// `Last-Event-ID` on reconnecting.
    last_event_id: Option<String>,
    /// The highest revision delivered (or known unchanged): what comes again
    /// after a reconnect is not delivered twice.
    delivered: Option<u64>,
    body: Option<Incoming>,
    parser: SseParser,
    /// Whether a connection has ever been made.
    connected: bool,
    /// Failed attempts since the last message, for the backoff.
    failures: u32,
    rng: SmallRng,
    ended: bool,
}

impl WatchStream {
    /// The next message, or `None` once the stream has ended (after an
    /// error); see [`Client::watch`] for which errors end it.
    pub async fn next(&mut self) -> Option<Result<WatchMessage, ClientError>> {
        while !self.ended {
            match self.step().await {
                Ok(Some(message)) => return Some(Ok(message)),
                Ok(None) => {}
                Err(err) if self.connected && err.is_transient() => {
                    self.body = None;
                    self.parser = SseParser::default();
                    let wait = self.backoff();
                    tracing::warn!(error = %err, ?wait, "the watch lost its connection; reconnecting");
                    tokio::time::sleep(wait).await;
                }
                Err(err) => {
                    self.ended = true;
                    return Some(Err(err));
                }
            }
        }
        None
    }

    /// Reads on (connecting first when there is no connection): a message,
    /// `None` for one to skip or a keep-alive, or why the connection failed.
    async fn step(&mut self) -> Result<Option<WatchMessage>, ClientError> {
        if let Some(event) = self.parser.next_event()? {
            return self.message(event);
        }
        if self.body.is_none() {
            self.body = Some(self.connect().await?);
        }
        let Some(body) = &mut self.body else {
            return Ok(None);
        };
        let frame = tokio::time::timeout(IDLE_TIMEOUT, body.frame())
            .await
            .map_err(|_| {
                ClientError::Transport(format!("nothing came for {}s", IDLE_TIMEOUT.as_secs()))
            })?;
        match frame {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    self.parser.push(&data)?;
                }
                Ok(None)
            }
            Some(Err(err)) => Err(ClientError::Transport(error_chain(&err))),
            None => Err(ClientError::Transport(
                "the server ended the watch's connection".into(),
            )),
        }
    }

    /// Opens a connection where the stream stands: after the last message's
    /// id, or at the start revision.
    async fn connect(&mut self) -> Result<Incoming, ClientError> {
        let mut query = QueryString::default();
        self.range.add_to(&mut query);
        let mut headers = vec![(header::ACCEPT, "text/event-stream")];
        match &self.last_event_id {
            Some(id) => headers.push((HeaderName::from_static("last-event-id"), id)),
            None => {
                // "The next revision" must name one revision on every
                // attempt, or a reconnect before the first message would
                // skip what was written in between.
                if self.from_revision.is_none() {
                    self.from_revision = Some(self.next_revision().await?);
                }
                query.number("from_revision", self.from_revision);
            }
        }
        let response = self
            .client
            .start(
                Method::GET,
                &query.after("/v1/watch"),
                &headers,
                Bytes::new(),
            )
            .await?;
        if !response.status().is_success() {
            return Err(RawResponse::read(response).await?.into_error());
        }
        check_event_stream(&response)?;
        self.connected = true;
        Ok(response.into_body())
    }

    /// The first revision after the store's current one, for the range.
    async fn next_revision(&self) -> Result<u64, ClientError> {
        let page = self
            .client
            .changes(&ChangesRequest {
                range: self.range.clone(),
                limit: Some(1),
                ..ChangesRequest::default()
            })
            .await?;
        // A write between the page's start and its answer is listed in it.
        Ok(page
            .changes
            .first()
            .map_or(page.revision.saturating_add(1), |change| change.revision))
    }

    /// What one event means for the consumer.
    fn message(&mut self, event: SseEvent) -> Result<Option<WatchMessage>, ClientError> {
        let protocol = |err: serde_json::Error| {
            ClientError::Protocol(format!("{err} in the watch's '{}' message", event.kind))
        };
        let message = match event.kind.as_str() {
            "change" => {
                let change: Change = serde_json::from_str(&event.data).map_err(protocol)?;
                (change.revision, WatchMessage::Change(change))
            }
            "progress" => {
                #[derive(Deserialize)]
                struct Progress {
                    revision: u64,
                }
                let progress: Progress = serde_json::from_str(&event.data).map_err(protocol)?;
                let revision = progress.revision;
                (revision, WatchMessage::Progress { revision })
            }
            "compacted" => {
                #[derive(Deserialize)]
                struct Compacted {
                    compact_revision: u64,
                    revision: u64,
                }
                let compacted: Compacted = serde_json::from_str(&event.data).map_err(protocol)?;
                self.ended = true;
                return Err(ClientError::Compacted {
                    compact_revision: compacted.compact_revision,
                    revision: compacted.revision,
                });
            }
            // A kind a newer server sends: not this client's business.
            _ => return Ok(None),
        };
        self.failures = 0;
        if let Some(id) = event.id {
            self.last_event_id = Some(id);
        }
        let (revision, message) = message;
        if self
            .delivered
            .is_some_and(|delivered| revision <= delivered)
        {
            return Ok(None);
        }
        self.delivered = Some(revision);
        Ok(Some(message))
    }

    /// How long to wait before the next attempt: doubling with each failure
    /// in a row up to [`MAX_BACKOFF`], and drawn from its upper half so that
    /// the watchers of a restarted server do not all come back at once.
    fn backoff(&mut self) -> Duration {
        let ceiling = FIRST_BACKOFF
            .saturating_mul(1 << self.failures.min(16))
            .min(MAX_BACKOFF);
        self.failures = self.failures.saturating_add(1);
        let half = ceiling / 2;
        half + half.mul_f64(self.rng.random::<f64>())
    }
}

/// A 2xx that is not an event stream (a proxy's page, say) is no watch.
fn check_event_stream(response: &Response<Incoming>) -> Result<(), ClientError> {
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    if content_type.starts_with("text/event-stream") {
        Ok(())
    } else {
        Err(ClientError::Protocol(format!(
            "a watch answered with '{content_type}', not text/event-stream"
        )))
    }
}

/// One Server-Sent Event.
#[derive(Debug, PartialEq, Eq)]
struct SseEvent {
    id: Option<String>,
    /// `event:`, or `message` when there is none.
    kind: String,
    data: String,
}

/// Server-Sent Events (the WHATWG "event stream" format) cut out of the
/// bytes as they come.
#[derive(Default)]
struct SseParser {
    /// What has come and is not read yet: a line is split off its front
    /// without moving the rest.
    buffer: BytesMut,
    /// How much of `buffer` is known to hold no line end.
    scanned: usize,
    id: Option<String>,
    kind: Option<String>,
    data: Option<String>,
}

impl SseParser {
    fn push(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        if self.buffer.len() + bytes.len() > MAX_MESSAGE_BYTES {
            return Err(ClientError::Protocol(format!(
                "a watch message of more than {} MiB",
                MAX_MESSAGE_BYTES >> 20
            )));
        }
        self.buffer.extend_from_slice(bytes);
        Ok(())
    }

    /// The next complete event in what has come, if any.
    fn next_event(&mut self) -> Result<Option<SseEvent>, ClientError> {
        while let Some(line) = self.next_line() {
            let line = std::str::from_utf8(&line)
                .map_err(|_| ClientError::Protocol("a watch message that is not UTF-8".into()))?;
            if line.is_empty() {
                if let Some(data) = self.data.take() {
                    return Ok(Some(SseEvent {
                        id: self.id.take(),
                        kind: self.kind.take().unwrap_or_else(|| "message".into()),
                        data,
                    }));
                }
                // An event without data is no event.
                self.id = None;
                self.kind = None;
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
                None => (line, ""),
            };
            match field {
                "data" => match &mut self.data {
                    Some(data) => {
                        data.push('\n');
                        data.push_str(value);
                    }
                    None => self.data = Some(value.to_owned()),
                },
                "event" => self.kind = Some(value.to_owned()),
                "id" if !value.contains('\0') => self.id = Some(value.to_owned()),
                // Comments (keep-alives), `retry` (the backoff is ours) and
                // unknown fields.
                _ => {}
            }
        }
        Ok(None)
    }

    /// The next whole line, without its end (`\r\n`, `\n` or `\r`).
    fn next_line(&mut self) -> Option<BytesMut> {
        let found = self
            .buffer
            .get(self.scanned..)
            .unwrap_or_default()
            .iter()
            .position(|byte| matches!(byte, b'\n' | b'\r'));
        let Some(offset) = found else {
            self.scanned = self.buffer.len();
            return None;
        };
        let end = self.scanned + offset;
        let terminator = match (self.buffer.get(end), self.buffer.get(end + 1)) {
            (Some(b'\r'), Some(b'\n')) => 2,
            // A `\r` last: its `\n` may be in the next chunk.
            (Some(b'\r'), None) => {
                self.scanned = end;
                return None;
            }
            _ => 1,
        };
        let mut line = self.buffer.split_to(end + terminator);
        line.truncate(end);
        self.scanned = 0;
        Some(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut parser = SseParser::default();
        let mut found = Vec::new();
        for chunk in chunks {
            parser.push(chunk).unwrap();
            while let Some(event) = parser.next_event().unwrap() {
                found.push(event);
            }
        }
        found
    }

    fn event(id: Option<&str>, kind: &str, data: &str) -> SseEvent {
        SseEvent {
            id: id.map(str::to_owned),
            kind: kind.into(),
            data: data.into(),
        }
    }

    #[test]
    fn events_are_cut_at_blank_lines_whatever_the_chunks() {
        let stream = b":keep-alive\n\nid: 7\nevent: change\ndata: {\"a\":\ndata:1}\n\n\
            event:progress\r\nid:8\r\ndata: {}\r\n\r\ndata\rdata: x\r\r\n";
        let expected = vec![
            event(Some("7"), "change", "{\"a\":\n1}"),
            event(Some("8"), "progress", "{}"),
            event(None, "message", "\nx"),
        ];
        assert_eq!(events(&[stream]), expected);
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(events(&bytes), expected);
        let halves: Vec<&[u8]> = stream.chunks(stream.len() / 2 + 1).collect();
        assert_eq!(events(&halves), expected);
    }

    #[test]
    fn an_unfinished_event_is_not_dispatched() {
        assert_eq!(events(&[b"id: 1\nevent: change\ndata: {}\n"]), vec![]);
        // A `\r` last may be the first half of a `\r\n`.
        assert_eq!(events(&[b"data: x\r\r"]), vec![]);
        assert_eq!(
            events(&[b"id: 1\n\ndata: x\n\n"]),
            vec![event(None, "message", "x")]
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut parser = SseParser::default();
        parser.push(b"data: \xff\xfe\n\n").unwrap();
        assert!(matches!(parser.next_event(), Err(ClientError::Protocol(_))));
        let mut parser = SseParser::default();
        let big = vec![b'x'; MAX_MESSAGE_BYTES];
        parser.push(&big).unwrap();
        assert!(matches!(parser.push(b"x"), Err(ClientError::Protocol(_))));
    }

    #[test]
    fn events_read_back_as_the_server_writes_them() {
        let text = r#"{"revision":9,"events":[{"type":"put","key":"a","value":"1","version":4,"created_at":"t1","updated_at":"t2"},{"type":"put","key":"b","value_base64":"/w==","version":1,"created_at":"t","updated_at":"t","expires_at":"t3","lease":"00000000000000ab"},{"type":"delete","key":"d","version":2,"reason":"expired"}]}"#;
        let change: Change = serde_json::from_str(text).unwrap();
        assert_eq!(
            change.events[1],
            Event::Put {
                key: "b".into(),
                value: Value::Bytes(Bytes::from_static(b"\xff")),
                version: 1,
                created_at: "t".into(),
                updated_at: "t".into(),
                expires_at: Some("t3".into()),
                lease: Some("00000000000000ab".into()),
            }
        );
        assert_eq!(serde_json::to_string(&change).unwrap(), text);
        for bad in [
            r#"{"type":"put","key":"a","version":1,"created_at":"t","updated_at":"t"}"#,
            r#"{"type":"put","key":"a","value_base64":"%%","version":1,"created_at":"t","updated_at":"t"}"#,
            r#"{"type":"rename","key":"a"}"#,
        ] {
            assert!(serde_json::from_str::<Event>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn backoff_grows_to_its_bound_with_jitter() {
        let client = Client::new("http://127.0.0.1:1").unwrap();
        let mut stream = client.watch(WatchRequest::default());
        let waits: Vec<Duration> = (0..12).map(|_| stream.backoff()).collect();
        assert!(waits[0] >= FIRST_BACKOFF / 2 && waits[0] <= FIRST_BACKOFF);
        for wait in &waits[7..] {
            assert!(*wait >= MAX_BACKOFF / 2 && *wait <= MAX_BACKOFF, "{wait:?}");
        }
    }
}
