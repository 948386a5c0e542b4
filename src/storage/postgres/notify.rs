//! Invalidations across servers: every write NOTIFYs the keys it wrote, and a
//! listening connection hands them to the local cache.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio_postgres::AsyncMessage;

use super::connect::Connector;
use super::sql::ident;

/// PostgreSQL's limit on a notification payload is 8000 bytes.
const MAX_NOTIFY_PAYLOAD: usize = 7900;

/// What a notification of a write tells the caches of other servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// These keys were written at `revision`; `written_at_us` is the database
    /// clock when the write was made, to measure the notification delay.
    Keys {
        revision: u64,
        written_at_us: i64,
        keys: Vec<Vec<u8>>,
    },
    /// Notifications may have been lost (the listening connection broke):
    /// forget everything and serve nothing from the cache until `Resumed`.
    Lost,
    /// Listening again: forget everything, then serve from the cache again.
    Resumed,
}

/// Parses `revision:written_at_us:hexkey,hexkey,...`.
fn parse_notification(payload: &str) -> Option<Invalidation> {
    let mut parts = payload.splitn(3, ':');
    let revision = parts.next()?.parse().ok()?;
    let written_at_us = parts.next()?.parse().ok()?;
    let keys = parts
        .next()?
        .split(',')
        .map(decode_hex)
        .collect::<Option<Vec<_>>>()?;
    Some(Invalidation::Keys {
        revision,
        written_at_us,
        keys,
    })
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn encode_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Splits the keys of a write into notification payloads under PostgreSQL's
/// size limit.
pub(super) fn notification_payloads(
    revision: i64,
    written_at_us: i64,
    keys: &[&[u8]],
) -> Vec<String> {
    let head = format!("{revision}:{written_at_us}:");
    let mut payloads = Vec::new();
    let mut current = head.clone();
    for key in keys {
        let hex = encode_hex(key);
        if current.len() > head.len() && current.len() + 1 + hex.len() > MAX_NOTIFY_PAYLOAD {
            payloads.push(std::mem::replace(&mut current, head.clone()));
        }
        if current.len() > head.len() {
            current.push(',');
        }
        current.push_str(&hex);
    }
    if current.len() > head.len() {
        payloads.push(current);
    }
    payloads
}

/// What a listening connection reports to its owner.
pub(super) struct Hearing {
    /// LISTEN is in place (again): whatever was sent before may have been missed.
    pub listening: Box<dyn Fn() + Send + Sync>,
    /// A notification's payload.
    pub heard: Box<dyn Fn(&str) + Send + Sync>,
    /// The connection broke (why); it is made again every 500 ms.
    pub lost: Box<dyn Fn(&str) + Send + Sync>,
}

/// What the writes of other servers tell a local cache, from their
/// notifications: the keys to forget, or everything when one is unreadable or
/// the connection broke.
pub(super) fn invalidations(on: Arc<dyn Fn(Invalidation) + Send + Sync>) -> Hearing {
    let (resumed, heard, lost) = (Arc::clone(&on), Arc::clone(&on), on);
    let warned = AtomicBool::new(false);
    Hearing {
        listening: Box::new(move || resumed(Invalidation::Resumed)),
        heard: Box::new(move |payload| match parse_notification(payload) {
            Some(invalidation) => heard(invalidation),
            None => {
                tracing::warn!(payload, "unreadable notification; clearing the cache");
                heard(Invalidation::Lost);
                heard(Invalidation::Resumed);
            }
        }),
        lost: Box::new(move |err| {
            if !warned.swap(true, Ordering::AcqRel) {
                tracing::warn!(error = %err, "lost the PostgreSQL notification connection; the local cache is bypassed until it is back");
            }
            lost(Invalidation::Lost);
            metrics::counter!("kvstore_cache_listen_failures_total").increment(1);
        }),
    }
}

/// Listens on `channel` until the store closes, connecting again after a
/// failure.
pub(super) async fn keep_listening(
    connector: Arc<Connector>,
    channel: String,
    closed: Arc<AtomicBool>,
    hearing: Hearing,
) {
    while !closed.load(Ordering::Acquire) {
        match listen_once(&connector, &channel, &hearing, &closed).await {
            Ok(()) => break,
            Err(err) => {
                (hearing.lost)(&err);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Listens until the connection breaks (an error) or the store closes (`Ok`).
/// Its pings also watch the primary for every connection: when it stops
/// answering, its host is condemned, which ends the pool's connections to it.
async fn listen_once(
    connector: &Connector,
    channel: &str,
    hearing: &Hearing,
    closed: &AtomicBool,
) -> Result<(), String> {
    let opened = connector.open().await.map_err(|e| e.to_string())?;
    let (client, mut connection, host) = (opened.client, opened.connection, opened.host);
    let mut condemned = opened.condemned;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n.payload().to_owned()).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::debug!(error = %err, "notification connection ended");
                    break;
                }
            }
        }
    });
    let result = async {
        client
            .batch_execute(&format!("LISTEN {}", ident(channel)))
            .await
            .map_err(|e| e.to_string())?;
        // Anything sent before LISTEN took effect may have been missed.
        (hearing.listening)();
        tracing::info!(channel, "listening for the notifications of other servers");
        let mut ping = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                payload = rx.recv() => match payload {
                    Some(payload) => (hearing.heard)(&payload),
                    None => return Err("the notification connection closed".to_owned()),
                },
                _ = condemned.changed() => {
                    return Err("the notification connection's host stopped answering".to_owned());
                }
                _ = ping.tick() => {
                    if closed.load(Ordering::Acquire) {
                        return Ok(());
                    }
                    // A dead connection that the kernel has not noticed yet
                    // shows up here within a few seconds.
                    match tokio::time::timeout(Duration::from_secs(2), client.simple_query("SELECT 1")).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(err)) => return Err(err.to_string()),
                        Err(_) => {
                            connector.condemn(host);
                            return Err("the notification connection does not answer".to_owned());
                        }
                    }
                }
            }
        }
    }
    .await;
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_round_trip_and_stay_under_the_limit() {
        let long = vec![0xabu8; 1024];
        let keys: Vec<&[u8]> = vec![b"a", &long, &long, &long, &long, b"\x00\xff"];
        let payloads = notification_payloads(42, 7, &keys);
        assert!(payloads.len() > 1);
        let mut seen = Vec::new();
        for payload in &payloads {
            assert!(payload.len() <= MAX_NOTIFY_PAYLOAD);
            match parse_notification(payload) {
                Some(Invalidation::Keys {
                    revision,
                    written_at_us,
                    keys,
                }) => {
                    assert_eq!((revision, written_at_us), (42, 7));
                    seen.extend(keys);
                }
                other => panic!("{other:?}"),
            }
        }
        let want: Vec<Vec<u8>> = keys.iter().map(|k| k.to_vec()).collect();
        assert_eq!(seen, want);
    }
}
