//! Keys that expire, and leases, against a real server on every backend, as
//! docs/api.md ("Expiry: TTL and leases") describes them.

use std::time::Duration;

use chrono::DateTime;
use hyper::StatusCode;
use serde_json::{Value, json};

use crate::harness::{TestServer, within};
use crate::requests::*;
use kvstore::client::Client;
use kvstore::server::ServerConfig;

/// Microseconds since the epoch of an RFC 3339 timestamp.
fn micros(text: &Value) -> i64 {
    DateTime::parse_from_rfc3339(text.as_str().unwrap_or_default())
        .unwrap_or_else(|err| panic!("{text}: {err}"))
        .timestamp_micros()
}

async fn put_with(c: &Client, key: &str, body: Value) -> Value {
    put_answer(&put_json(c, key, &body, &[]).await, key)
}

/// The changes to `key` after `after`, waiting up to 5 s for at least one.
async fn changes_of(c: &Client, key: &str, after: u64) -> Vec<Value> {
    let path = format!("/v1/changes?key={key}&after={after}&wait_ms=5000");
    let page = expect_json(&get(c, &path).await, StatusCode::OK);
    page["changes"].as_array().cloned().unwrap_or_default()
}

/// Waits until `key` has been deleted after `after`; gives that change.
async fn deletion_of(c: &Client, key: &str, after: u64) -> Value {
    within(10, &format!("the deletion of {key}"), async {
        let mut after = after;
        loop {
            for change in changes_of(c, key, after).await {
                after = revision_of(&change);
                if change["events"][0]["type"] == "delete" {
                    return change;
                }
            }
        }
    })
    .await
}

async fn grant(c: &Client, ttl_ms: u64) -> Value {
    let body = expect_json(
        &post_json(c, "/v1/leases", &json!({ "ttl_ms": ttl_ms })).await,
        StatusCode::CREATED,
    );
    assert_fields(&body, &["lease", "ttl_ms", "expires_at"]);
    assert_eq!(body["ttl_ms"], ttl_ms);
    body
}

fn lease_path(lease: &Value, rest: &str) -> String {
    format!(
        "/v1/leases/{}{rest}",
        lease["lease"].as_str().unwrap_or_default()
    )
}

for_each_backend! {

async fn a_key_with_a_ttl_shows_its_deadline_then_vanishes_and_is_deleted_with_an_event() {
    let server = TestServer::start().await;
    let c = &server.client;
    let written = put_with(c, "session", json!({"value": "s", "ttl_ms": 1500})).await;
    let stored = entry(c, "session").await;
    let lifetime = micros(&stored["expires_at"]) - micros(&stored["updated_at"]);
    assert!((1_500_000..2_500_000).contains(&lifetime), "{stored}");
    assert!(stored.get("lease").is_none(), "{stored}");
    let change = deletion_of(c, "session", revision_of(&written)).await;
    assert_eq!(
        change["events"],
        json!([{"type": "delete", "key": "session", "version": 1, "reason": "expired"}])
    );
    assert_missing(c, "session").await;
    let page = list(c, "prefix=sess").await;
    assert_eq!(keys(&page), Vec::<String>::new());
}

async fn a_write_without_ttl_clears_the_deadline_and_keep_ttl_keeps_it() {
    let server = TestServer::start().await;
    let c = &server.client;
    put_with(c, "k", json!({"value": "1", "ttl_ms": 60_000})).await;
    let first = entry(c, "k").await;
    put_with(c, "k", json!({"value": "2", "keep_ttl": true})).await;
    let kept = entry(c, "k").await;
    assert_eq!((kept["version"].clone(), kept["expires_at"].clone()), (json!(2), first["expires_at"].clone()));
    put_text(c, "k", "3").await;
    assert!(entry(c, "k").await.get("expires_at").is_none());
    // keep_ttl on a key without a deadline, or a new key: none.
    put_with(c, "new", json!({"value": "x", "keep_ttl": true})).await;
    assert!(entry(c, "new").await.get("expires_at").is_none());
    // A raw body takes the same as query parameters.
    let raw = send(c, hyper::Method::PUT, "/v1/kv/raw?ttl_ms=60000", &[OCTETS], "bytes").await;
    put_answer(&raw, "raw");
    assert!(entry(c, "raw").await.get("expires_at").is_some());
}

async fn conditions_and_batches_carry_deadlines() {
    let server = TestServer::start().await;
    let c = &server.client;
    put_text(c, "cas", "1").await;
    let cas = put_json(c, "cas", &json!({"value": "2", "ttl_ms": 60_000}), &[(hyper::header::IF_MATCH, "\"1\"")]).await;
    put_answer(&cas, "cas");
    assert!(entry(c, "cas").await.get("expires_at").is_some());
    let stale = put_json(c, "cas", &json!({"value": "3", "ttl_ms": 60_000}), &[(hyper::header::IF_MATCH, "\"1\"")]).await;
    expect_mismatch(&stale, Some(2));
    let batch = post_json(c, "/v1/batch", &json!({"ops": [
        {"op": "put", "key": "b1", "value": "x", "ttl_ms": 60_000},
        {"op": "put", "key": "cas", "value": "4", "keep_ttl": true, "if_version": 2},
        {"op": "put", "key": "b2", "value": "y"},
    ]})).await;
    expect_json(&batch, StatusCode::OK);
    let got = expect_json(&post_json(c, "/v1/batch/get", &json!({"keys": ["b1", "cas", "b2"]})).await, StatusCode::OK);
    let items = got["items"].as_array().cloned().unwrap_or_default();
    assert!(items[0].get("expires_at").is_some() && items[1].get("expires_at").is_some(), "{got}");
    assert!(items[2].get("expires_at").is_none(), "{got}");
}

async fn a_key_rewritten_before_its_deadline_is_not_deleted() {
    let server = TestServer::start().await;
    let c = &server.client;
    put_with(c, "k", json!({"value": "short", "ttl_ms": 300})).await;
    let rewritten = put_text(c, "k", "forever").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(entry(c, "k").await["value"], "forever");
    let path = format!("/v1/changes?key=k&after={}", revision_of(&rewritten));
    let page = expect_json(&get(c, &path).await, StatusCode::OK);
    assert_eq!(page["changes"], json!([]), "{page}");
}

async fn a_lease_holds_keys_until_it_is_revoked_in_one_revision() {
    let server = TestServer::start().await;
    let c = &server.client;
    let lease = grant(c, 60_000).await;
    let id = lease["lease"].clone();
    for key in ["svc/a", "svc/b"] {
        put_with(c, key, json!({"value": "up", "lease": id})).await;
    }
    let attached = entry(c, "svc/a").await;
    assert_eq!((attached["lease"].clone(), attached["expires_at"].clone()), (id.clone(), lease["expires_at"].clone()));
    let info = expect_json(&get(c, &lease_path(&lease, "")).await, StatusCode::OK);
    assert_eq!(info["keys"], 2, "{info}");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let renewed = expect_json(&post_json(c, &lease_path(&lease, "/keepalive"), &json!({})).await, StatusCode::OK);
    assert!(micros(&renewed["expires_at"]) > micros(&lease["expires_at"]), "{renewed}");
    // Written again without lease or keep_ttl, a key leaves the lease.
    put_text(c, "svc/b", "detached").await;
    put_with(c, "svc/b", json!({"value": "again", "lease": id})).await;
    let before = probe_revision(c).await;
    let revoked = delete(c, &lease_path(&lease, ""), &[]).await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT);
    let page = expect_json(&get(c, &format!("/v1/changes?prefix=svc/&after={before}&wait_ms=5000")).await, StatusCode::OK);
    let changes = page["changes"].as_array().cloned().unwrap_or_default();
    assert_eq!(changes.len(), 1, "{page}");
    let mut events = changes[0]["events"].as_array().cloned().unwrap_or_default();
    events.sort_by_key(|e| e["key"].as_str().map(str::to_owned));
    assert_eq!(Value::from(events), json!([
        {"type": "delete", "key": "svc/a", "version": 1, "reason": "lease_revoked"},
        {"type": "delete", "key": "svc/b", "version": 3, "reason": "lease_revoked"},
    ]));
    assert_missing(c, "svc/a").await;
    assert_missing(c, "svc/b").await;
    for response in [
        get(c, &lease_path(&lease, "")).await,
        post_json(c, &lease_path(&lease, "/keepalive"), &json!({})).await,
        delete(c, &lease_path(&lease, ""), &[]).await,
        put_json(c, "svc/c", &json!({"value": "x", "lease": id}), &[]).await,
    ] {
        expect_error(&response, StatusCode::NOT_FOUND, "lease_not_found");
    }
    assert_missing(c, "svc/c").await;
}

async fn an_expired_lease_deletes_its_keys_in_one_revision() {
    let server = TestServer::start().await;
    let c = &server.client;
    // Long enough for the three puts on a loaded machine.
    let lease = grant(c, 1500).await;
    let mut last = 0;
    for key in ["l/1", "l/2", "l/3"] {
        last = revision_of(&put_with(c, key, json!({"value": "v", "lease": lease["lease"]})).await);
    }
    let change = deletion_of(c, "l/1", last).await;
    let events = change["events"].as_array().cloned().unwrap_or_default();
    assert_eq!(events.len(), 1, "{change}");
    let page = expect_json(&get(c, &format!("/v1/changes?prefix=l/&after={last}")).await, StatusCode::OK);
    assert_eq!(page["changes"].as_array().map(Vec::len), Some(1), "{page}");
    let all = page["changes"][0]["events"].as_array().cloned().unwrap_or_default();
    assert_eq!(all.len(), 3, "{page}");
    assert!(all.iter().all(|e| e["reason"] == "expired"), "{page}");
    expect_error(&get(c, &lease_path(&lease, "")).await, StatusCode::NOT_FOUND, "lease_not_found");
}

async fn bad_expiry_is_refused_and_changes_nothing() {
    let server = TestServer::start().await;
    let c = &server.client;
    put_text(c, "k", "kept").await;
    let snapshot = Snapshot::take(c, &["k"]).await;
    for body in [
        json!({"value": "x", "ttl_ms": 0}),
        json!({"value": "x", "ttl_ms": -5}),
        json!({"value": "x", "ttl_ms": 1.5}),
        json!({"value": "x", "ttl_ms": "10"}),
        json!({"value": "x", "ttl_ms": 10, "keep_ttl": true}),
        json!({"value": "x", "ttl_ms": 10, "lease": "00000000000000ab"}),
        json!({"value": "x", "keep_ttl": true, "lease": "00000000000000ab"}),
        json!({"value": "x", "lease": "not-hex"}),
        json!({"value": "x", "lease": "0"}),
        json!({"value": "x", "keep_ttl": "yes"}),
    ] {
        let response = put_json(c, "k", &body, &[]).await;
        expect_error(&response, StatusCode::BAD_REQUEST, "invalid_request");
    }
    for query in ["ttl_ms=0", "ttl_ms=abc", "ttl_ms=-1", "ttl_ms=5&keep_ttl=1", "lease=zz"] {
        let response = send(c, hyper::Method::PUT, &format!("/v1/kv/k?{query}"), &[OCTETS], "x").await;
        expect_error(&response, StatusCode::BAD_REQUEST, "invalid_request");
    }
    let mixed = send(c, hyper::Method::PUT, "/v1/kv/k?ttl_ms=5", &[JSON], r#"{"value": "x"}"#).await;
    expect_error(&mixed, StatusCode::BAD_REQUEST, "invalid_request");
    let batch = post_json(c, "/v1/batch", &json!({"ops": [
        {"op": "put", "key": "k", "value": "x"},
        {"op": "delete", "key": "other", "ttl_ms": 5},
    ]})).await;
    expect_error(&batch, StatusCode::BAD_REQUEST, "invalid_request");
    let unknown = put_json(c, "k", &json!({"value": "x", "lease": "00000000000000ab"}), &[]).await;
    expect_error(&unknown, StatusCode::NOT_FOUND, "lease_not_found");
    for body in [json!({"ttl_ms": 0}), json!({}), json!({"ttl_ms": 5, "extra": 1})] {
        expect_error(&post_json(c, "/v1/leases", &body).await, StatusCode::BAD_REQUEST, "invalid_request");
    }
    expect_error(&get(c, "/v1/leases/xyz").await, StatusCode::BAD_REQUEST, "invalid_request");
    snapshot.assert_unchanged(c).await;
}

}

// ---------------------------------------------------------------- embedded

/// A read that runs while the expirer is still deleting sees the keys it
/// has not reached yet as absent already: the snapshot of `batch/get` is
/// below the revision that deletes the key, and the key is missing. The
/// server runs on a clock the test moves, so that 30,000 keys get one
/// deadline and pass it at one instant: the expirer then has 30 rounds to go
/// when the read runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_keys_are_invisible_before_they_are_deleted() {
    let now = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(1_800_000_000_000_000));
    let clock = std::sync::Arc::clone(&now);
    let server = TestServer::start_with(ServerConfig::default(), move |engine| {
        engine.clock = Some(std::sync::Arc::new(move || {
            clock.load(std::sync::atomic::Ordering::SeqCst)
        }));
    })
    .await;
    let c = &server.client;
    const KEYS: usize = 30_000;
    let mut written = 0;
    for chunk in (0..KEYS).collect::<Vec<_>>().chunks(1000) {
        let ops: Vec<Value> = chunk
            .iter()
            .map(|i| json!({"op": "put", "key": format!("m/{i:05}"), "value": "v", "ttl_ms": 1000}))
            .collect();
        let answer = expect_json(
            &post_json(c, "/v1/batch", &json!({ "ops": ops })).await,
            StatusCode::OK,
        );
        written = revision_of(&answer);
    }
    let last = format!("m/{:05}", KEYS - 1);
    now.fetch_add(2_000_000, std::sync::atomic::Ordering::SeqCst);
    let read = expect_json(
        &post_json(c, "/v1/batch/get", &json!({"keys": [last]})).await,
        StatusCode::OK,
    );
    assert_eq!(read["missing"], json!([last]), "{read}");
    let deleted = deletion_of(c, &last, written).await;
    assert!(
        revision_of(&read) < revision_of(&deleted),
        "the read came after the delete, so it shows nothing (read at {}, deleted at {})",
        revision_of(&read),
        revision_of(&deleted)
    );
}

/// The read cache is not told when the expirer deletes a key: it takes an
/// entry past its deadline for a miss. A wall clock that steps back after
/// the delete (an NTP correction) must not bring the cached entry back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_stepping_back_does_not_bring_an_expired_key_back_from_the_cache() {
    let now = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(1_800_000_000_000_000));
    let clock = std::sync::Arc::clone(&now);
    let server = TestServer::start_with(ServerConfig::default(), move |engine| {
        engine.clock = Some(std::sync::Arc::new(move || {
            clock.load(std::sync::atomic::Ordering::SeqCst)
        }));
    })
    .await;
    let c = &server.client;
    let written = revision_of(&put_with(c, "k", json!({"value": "v", "ttl_ms": 1000})).await);
    // Read while live, which puts the entry in the cache.
    expect_json(&get(c, "/v1/kv/k").await, StatusCode::OK);
    now.fetch_add(2_000_000, std::sync::atomic::Ordering::SeqCst);
    deletion_of(c, "k", written).await;
    now.fetch_sub(2_000_000, std::sync::atomic::Ordering::SeqCst);
    expect_error(
        &get(c, "/v1/kv/k").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
}

/// Deadlines are stored with the data: keys and a lease that expire while
/// the server is down (killed with SIGKILL) are gone for every read as soon
/// as it is back, and are then deleted, each with its event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_that_expire_while_the_server_is_down_are_gone_at_restart() {
    use crate::harness::Binary;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut server = Binary::start(dir.path(), &[]);
    let c = &server.client;
    put_with(c, "short", json!({"value": "s", "ttl_ms": 2000})).await;
    put_with(c, "long", json!({"value": "l", "ttl_ms": 600_000})).await;
    let lease = grant(c, 2000).await;
    let written =
        revision_of(&put_with(c, "leased", json!({"value": "x", "lease": lease["lease"]})).await);
    server.child.kill().expect("SIGKILL");
    server.wait();
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let server = Binary::start(dir.path(), &[]);
    let c = &server.client;
    let read = expect_json(
        &post_json(
            c,
            "/v1/batch/get",
            &json!({"keys": ["short", "long", "leased"]}),
        )
        .await,
        StatusCode::OK,
    );
    assert_eq!(read["missing"], json!(["short", "leased"]), "{read}");
    assert!(entry(c, "long").await.get("expires_at").is_some());
    for (key, version) in [("short", 1), ("leased", 1)] {
        let change = deletion_of(c, key, written.saturating_sub(3)).await;
        assert_eq!(
            change["events"],
            json!([{"type": "delete", "key": key, "version": version, "reason": "expired"}])
        );
    }
    expect_error(
        &get(c, &lease_path(&lease, "")).await,
        StatusCode::NOT_FOUND,
        "lease_not_found",
    );
}
