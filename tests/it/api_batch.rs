//! `POST /v1/batch` (atomic writes) and `POST /v1/batch/get`.

use crate::harness::TestServer;
use crate::requests::*;
use kvstore::client::{Client, RawResponse};
use kvstore::server::ServerConfig;

async fn batch(client: &Client, ops: Value) -> RawResponse {
    post_json(client, "/v1/batch", &json!({ "ops": ops })).await
}

async fn batch_get(client: &Client, keys: Value) -> RawResponse {
    post_json(client, "/v1/batch/get", &json!({ "keys": keys })).await
}

/// An applied batch's answer, checked for shape.
fn applied(response: &RawResponse) -> Value {
    let body = expect_json(response, StatusCode::OK);
    assert_fields(&body, &["revision", "results"]);
    body
}

/// A batch read's answer, checked for shape; items are full entries.
fn read(response: &RawResponse) -> Value {
    let body = expect_json(response, StatusCode::OK);
    assert_fields(&body, &["items", "missing", "revision"]);
    assert_read_revision(&body);
    for item in body["items"].as_array().expect("items") {
        assert_entry_shape(item, false);
    }
    body
}

fn put_op(key: &str) -> Value {
    json!({"op": "put", "key": key, "value": "v"})
}

/// `count` distinct keys.
fn many_keys(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("k{i:04}")).collect()
}

for_each_backend! {

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_applies_mixed_ops_in_order_under_one_revision() {
    let server = TestServer::start().await;
    let c = &server.client;
    for _ in 0..3 {
        put_text(c, "b", "old").await;
    }
    put_text(c, "d", "old").await;
    put_text(c, "d", "old").await;

    let before = probe_revision(c).await;
    let response = batch(
        c,
        json!([
            {"op": "put", "key": "a", "value": "1"},
            {"op": "put", "key": "b", "value_base64": "/wA=", "if_version": 3},
            {"op": "put", "key": "c", "value": "x", "if_absent": true},
            {"op": "delete", "key": "d", "if_version": 2},
            {"op": "delete", "key": "e"},
            {"op": "put", "key": "f/é", "value": ""},
        ]),
    )
    .await;
    let body = applied(&response);
    let revision = revision_of(&body);
    assert_eq!(revision, before + 1);
    assert_eq!(
        body["results"],
        json!([
            {"key": "a", "version": 1},
            {"key": "b", "version": 4},
            {"key": "c", "version": 1},
            {"key": "d", "deleted": true},
            {"key": "e", "deleted": false},
            {"key": "f/é", "version": 1},
        ])
    );

    for (key, field, value, version) in [
        ("a", "value", "1", 1),
        ("b", "value_base64", "/wA=", 4),
        ("c", "value", "x", 1),
        ("f/é", "value", "", 1),
    ] {
        let stored = entry(c, key).await;
        assert_eq!(stored[field], value, "{key}");
        assert_eq!(version_of(&stored), version, "{key}");
        assert_eq!(revision_of(&stored), revision, "{key}");
    }
    assert_missing(c, "d").await;
    assert_missing(c, "e").await;
    assert_eq!(probe_revision(c).await, revision + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_condition_writes_nothing_and_names_every_failure() {
    let server = TestServer::start().await;
    let c = &server.client;
    put_text(c, "x", "x").await;
    put_text(c, "y", "y").await;
    put_text(c, "y", "y").await;
    put_text(c, "gone", "g").await;

    let keys = ["new", "x", "y", "z", "gone", "w", "v"];
    let snapshot = Snapshot::take(c, &keys).await;
    let response = batch(
        c,
        json!([
            {"op": "put", "key": "new", "value": "n"},
            {"op": "put", "key": "x", "value": "x2", "if_version": 2},
            {"op": "put", "key": "y", "value": "y2", "if_absent": true},
            {"op": "put", "key": "z", "value": "z", "if_version": 1},
            {"op": "delete", "key": "gone"},
            {"op": "delete", "key": "w", "if_version": 1},
            {"op": "put", "key": "v", "value": "v", "if_absent": true},
        ]),
    )
    .await;
    let error = expect_error(
        &response,
        StatusCode::PRECONDITION_FAILED,
        "version_mismatch",
    );
    let mut fields: Vec<&str> = error.keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(fields, ["code", "current_versions", "failed", "message"]);
    assert_eq!(error["failed"], json!([1, 2, 3, 5]));
    assert_eq!(error["current_versions"], json!([1, 2, null, null]));
    snapshot.assert_unchanged(c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconditional_delete_of_an_absent_key_is_no_failure() {
    let server = TestServer::start().await;
    let c = &server.client;
    let before = probe_revision(c).await;
    let body = applied(&batch(c, json!([{"op": "delete", "key": "none"}])).await);
    assert_eq!(body["results"], json!([{"key": "none", "deleted": false}]));
    assert_eq!(revision_of(&body), before + 1);
    assert_missing(c, "none").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_batches_are_refused_and_write_nothing() {
    let server = TestServer::start().await;
    let c = &server.client;
    put_text(c, "exists", "before").await;
    let fresh = put_op("fresh");
    let long = "k".repeat(1025);
    let too_many: Vec<Value> = many_keys(1001).iter().map(|k| put_op(k)).collect();
    let invalid_request = |ops: Value| (json!({ "ops": ops }), "invalid_request");
    let invalid_key = |ops: Value| (json!({ "ops": ops }), "invalid_key");
    let cases = [
        invalid_request(json!([fresh, put_op("fresh")])),
        invalid_request(json!([fresh, {"op": "delete", "key": "fresh"}])),
        invalid_request(json!(too_many)),
        invalid_request(json!([])),
        invalid_request(json!({"op": "put"})),
        invalid_request(json!(null)),
        invalid_key(json!([fresh, put_op("")])),
        invalid_key(json!([fresh, put_op("a\u{0}b")])),
        invalid_key(json!([fresh, put_op(&long)])),
        invalid_key(json!([fresh, {"op": "delete", "key": ""}])),
        invalid_request(
            json!([fresh, {"op": "put", "key": "exists", "value": "x", "if_version": 0}]),
        ),
        invalid_request(json!([fresh, {"op": "delete", "key": "exists", "if_version": 0}])),
        invalid_request(
            json!([fresh, {"op": "put", "key": "exists", "value": "x", "if_version": -1}]),
        ),
        invalid_request(
            json!([fresh, {"op": "put", "key": "exists", "value": "x", "if_version": "1"}]),
        ),
        invalid_request(json!([fresh, {"op": "delete", "key": "exists", "value": "x"}])),
        invalid_request(json!([fresh, {"op": "delete", "key": "exists", "value_base64": ""}])),
        invalid_request(json!([fresh, {"op": "delete", "key": "exists", "if_absent": true}])),
        invalid_request(
            json!([fresh, {"op": "put", "key": "exists", "value": "x", "if_version": 1, "if_absent": true}]),
        ),
        invalid_request(json!([fresh, {"op": "put", "key": "exists"}])),
        invalid_request(
            json!([fresh, {"op": "put", "key": "exists", "value": "a", "value_base64": "YQ=="}]),
        ),
        invalid_request(json!([fresh, {"op": "put", "key": "exists", "value_base64": "!!"}])),
        invalid_request(json!([fresh, {"op": "put", "key": "exists", "value": 1}])),
        invalid_request(json!([fresh, {"op": "get", "key": "exists"}])),
        invalid_request(json!([fresh, {"key": "exists", "value": "x"}])),
        invalid_request(json!([fresh, {"op": "put", "value": "x"}])),
        invalid_request(json!([fresh, {"op": "put", "key": 7, "value": "x"}])),
        invalid_request(json!([fresh, {"op": "put", "key": "exists", "value": "x", "ttl": 5}])),
        invalid_request(json!([fresh, "put"])),
        (json!({"ops": [fresh], "atomic": true}), "invalid_request"),
        (json!({}), "invalid_request"),
        (json!([fresh]), "invalid_request"),
    ];
    for (body, code) in &cases {
        assert_rejected!(
            c,
            &["fresh", "exists"],
            post_json(c, "/v1/batch", body),
            StatusCode::BAD_REQUEST,
            code
        );
    }
    for text in ["", "{", "{\"ops\": [", "ops"] {
        assert_rejected!(
            c,
            &["fresh", "exists"],
            send(c, Method::POST, "/v1/batch", &[JSON], text),
            StatusCode::BAD_REQUEST,
            "invalid_request"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_values_over_the_limit_get_413() {
    let mut config = ServerConfig::default();
    config.limits.max_value_bytes = 8;
    let server = TestServer::start_with(config, |_| {}).await;
    let c = &server.client;
    let fits = json!([
        {"op": "put", "key": "a", "value": "12345678"},
        {"op": "put", "key": "b", "value_base64": "AAAAAAAAAAA="},
    ]);
    applied(&batch(c, fits).await);
    for over in [
        json!({"op": "put", "key": "b", "value": "123456789"}),
        json!({"op": "put", "key": "b", "value_base64": "AAAAAAAAAAAA"}),
    ] {
        let ops = json!({"ops": [put_op("fresh"), over]});
        assert_rejected!(
            c,
            &["fresh", "b"],
            post_json(c, "/v1/batch", &ops),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_of_1000_are_the_most() {
    let server = TestServer::start().await;
    let c = &server.client;
    let keys = many_keys(1000);
    let ops: Vec<Value> = keys.iter().map(|k| put_op(k)).collect();
    let body = applied(&batch(c, json!(ops)).await);
    let revision = revision_of(&body);
    let results = body["results"].as_array().expect("results");
    assert_eq!(results.len(), 1000);
    for (result, key) in results.iter().zip(&keys) {
        assert_eq!(result, &json!({"key": key, "version": 1}));
    }

    let read_all = read(&batch_get(c, json!(keys)).await);
    let items = read_all["items"].as_array().expect("items");
    assert_eq!(items.len(), 1000);
    assert!(items.iter().all(|item| item["revision"] == revision));
    assert_eq!(read_all["missing"], json!([]));

    let too_many = many_keys(1001);
    let response = batch_get(c, json!(too_many)).await;
    expect_error(&response, StatusCode::BAD_REQUEST, "invalid_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_endpoints_take_only_json() {
    let server = TestServer::start().await;
    let c = &server.client;
    let body = json!({"ops": [put_op("fresh")]}).to_string();
    for media in [
        "application/octet-stream",
        "text/plain",
        "application/x-www-form-urlencoded",
    ] {
        let headers = [(header::CONTENT_TYPE, media)];
        assert_rejected!(
            c,
            &["fresh"],
            send(c, Method::POST, "/v1/batch", &headers, body.clone()),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type"
        );
        let response = send(c, Method::POST, "/v1/batch/get", &headers, r#"{"keys":[]}"#).await;
        expect_error(
            &response,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        );
    }
    // Without a Content-Type the body is taken as JSON.
    let response = send(c, Method::POST, "/v1/batch", &[], body.clone()).await;
    applied(&response);
    let response = send(
        c,
        Method::POST,
        "/v1/batch/get",
        &[],
        r#"{"keys":["fresh"]}"#,
    )
    .await;
    assert_eq!(read(&response)["missing"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_endpoints_refuse_unknown_query_parameters() {
    let server = TestServer::start().await;
    let c = &server.client;
    let body = json!({"ops": [put_op("fresh")]});
    assert_rejected!(
        c,
        &["fresh"],
        post_json(c, "/v1/batch?atomic=1", &body),
        StatusCode::BAD_REQUEST,
        "invalid_request"
    );
    let response = post_json(c, "/v1/batch/get?raw=1", &json!({"keys": ["a"]})).await;
    expect_error(&response, StatusCode::BAD_REQUEST, "invalid_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_get_answers_items_in_the_order_asked() {
    let server = TestServer::start().await;
    let c = &server.client;
    put_text(c, "c", "3").await;
    put_text(c, "a", "1").await;
    put_raw(c, "b", vec![0xffu8, 0xfe]).await;
    put_text(c, "a", "1 again").await;

    let body = read(&batch_get(c, json!(["b", "none", "a", "c", "also/none"])).await);
    assert_eq!(keys(&body), ["b", "a", "c"]);
    for item in body["items"].as_array().expect("items") {
        let key = item["key"].as_str().expect("key");
        assert_eq!(item, &entry(c, key).await, "{key}");
    }
    assert_eq!(body["items"][0]["value_base64"], "//4=");
    assert_eq!(body["missing"], json!(["none", "also/none"]));

    // The read's revision is the store's: "a" was the last write.
    assert_eq!(body["revision"], entry(c, "a").await["revision"]);

    let body = read(&batch_get(c, json!(["x", "y"])).await);
    let revision = entry(c, "a").await["revision"].clone();
    assert_eq!(
        body,
        json!({"items": [], "missing": ["x", "y"], "revision": revision})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_get_refuses_bad_requests() {
    let server = TestServer::start().await;
    let c = &server.client;
    let long = "k".repeat(1025);
    for keys in [json!(["a", ""]), json!(["a\u{0}"]), json!([long])] {
        let response = batch_get(c, keys).await;
        expect_error(&response, StatusCode::BAD_REQUEST, "invalid_key");
    }
    for body in [
        json!({"keys": "a"}),
        json!({"keys": [1]}),
        json!({"keys": null}),
        json!({"keys": ["a"], "raw": true}),
        json!({}),
        json!(["a"]),
    ] {
        let response = post_json(c, "/v1/batch/get", &body).await;
        expect_error(&response, StatusCode::BAD_REQUEST, "invalid_request");
    }
    for text in ["", "{\"keys\": [", "keys"] {
        let response = send(c, Method::POST, "/v1/batch/get", &[JSON], text).await;
        expect_error(&response, StatusCode::BAD_REQUEST, "invalid_request");
    }
}

}
