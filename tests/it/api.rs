//! The single-key endpoints and the operational ones, against a real server,
//! as docs/api.md describes them. Ranges and batches are in `api_range.rs` and
//! `api_batch.rs`.

use crate::harness::{Backend, TestServer};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;

use crate::requests::*;
use kvstore::client::Client;
use kvstore::server::Limits;
use kvstore::server::ServerConfig;

/// A server under the default limits with `change` applied.
async fn server_with_limits(change: impl FnOnce(&mut Limits)) -> TestServer {
    let mut config = ServerConfig::default();
    change(&mut config.limits);
    TestServer::start_with(config, |_| {}).await
}

/// A server whose values may be 8 bytes and bodies 64 bytes.
async fn small_server() -> TestServer {
    server_with_limits(|limits| {
        limits.max_value_bytes = 8;
        limits.max_body_bytes = 64;
    })
    .await
}

// ---------------------------------------------------------------- PUT

for_each_backend! {

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_creates_with_201_then_updates_with_200() {
    let server = TestServer::start().await;
    let c = &server.client;
    let created = put_text(c, "greeting", "hello").await;
    assert_eq!(
        (version_of(&created), &created["created"]),
        (1, &json!(true))
    );
    let updated = put_text(c, "greeting", "world").await;
    assert_eq!(
        (version_of(&updated), &updated["created"]),
        (2, &json!(false))
    );
    assert_eq!(revision_of(&updated), revision_of(&created) + 1);

    let stored = entry(c, "greeting").await;
    assert_eq!(stored["value"], "world");
    assert_eq!(stored["version"], 2);
    assert_eq!(stored["revision"], updated["revision"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_count_writes_to_a_key() {
    let server = TestServer::start().await;
    for expected in 1..=5u64 {
        let body = put_text(&server.client, "k", &expected.to_string()).await;
        assert_eq!(version_of(&body), expected);
    }
    assert_eq!(entry(&server.client, "k").await["version"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_takes_the_next_revision_across_keys() {
    let server = TestServer::start().await;
    let c = &server.client;
    let mut last = revision_of(&put_text(c, "a", "1").await);
    for key in ["b", "a", "c", "b"] {
        let revision = revision_of(&put_text(c, key, "x").await);
        assert_eq!(revision, last + 1, "write to {key}");
        last = revision;
    }
    // Each entry carries the revision of its own last write.
    assert_eq!(revision_of(&entry(c, "b").await), last);
    assert_eq!(revision_of(&entry(c, "c").await), last - 1);
    assert_eq!(revision_of(&entry(c, "a").await), last - 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_value_base64_stores_the_decoded_bytes() {
    let server = TestServer::start().await;
    let c = &server.client;
    let bytes = [0u8, 1, 0xff, 0xfe, b'a'];
    let encoded = STANDARD.encode(bytes);
    let response = put_json(c, "bin", &json!({ "value_base64": encoded }), &[]).await;
    expect_json(&response, StatusCode::CREATED);

    // Not UTF-8: shown as value_base64 only.
    let stored = entry(c, "bin").await;
    assert_eq!(stored["value_base64"], encoded.as_str());
    assert!(stored.get("value").is_none(), "{stored}");
    let raw = get(c, "/v1/kv/bin?raw=1").await;
    assert_eq!(raw.body.as_ref(), bytes);

    // Base64 of UTF-8 bytes is shown back as text.
    let response = put_json(
        c,
        "text",
        &json!({"value_base64": STANDARD.encode("héllo")}),
        &[],
    )
    .await;
    expect_json(&response, StatusCode::CREATED);
    let stored = entry(c, "text").await;
    assert_eq!(stored["value"], "héllo");
    assert!(stored.get("value_base64").is_none(), "{stored}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_raw_octet_stream_body() {
    let server = TestServer::start().await;
    let c = &server.client;
    let bytes: Vec<u8> = (0..=255).collect();
    let response = put_raw(c, "raw", bytes.clone()).await;
    let body = expect_json(&response, StatusCode::CREATED);
    assert_eq!(body["version"], 1);
    assert_eq!(etag(&response), "\"1\"");

    let stored = entry(c, "raw").await;
    assert_eq!(stored["value_base64"], STANDARD.encode(&bytes).as_str());
    assert_eq!(get(c, "/v1/kv/raw?raw=1").await.body.as_ref(), bytes);

    // A media type with parameters, and UTF-8 bytes shown as text.
    let response = send(
        c,
        Method::PUT,
        "/v1/kv/raw",
        &[(
            header::CONTENT_TYPE,
            "Application/Octet-Stream; charset=binary",
        )],
        "plain text",
    )
    .await;
    expect_json(&response, StatusCode::OK);
    assert_eq!(entry(c, "raw").await["value"], "plain text");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_json_media_types() {
    let server = TestServer::start().await;
    let c = &server.client;
    let body = json!({"value": "v"}).to_string();
    for (key, headers) in [
        ("no-type", &[][..]),
        (
            "charset",
            &[(header::CONTENT_TYPE, "application/json; charset=utf-8")][..],
        ),
        ("upper", &[(header::CONTENT_TYPE, "APPLICATION/JSON")][..]),
    ] {
        let response = send(
            c,
            Method::PUT,
            &Client::key_path(key),
            headers,
            body.clone(),
        )
        .await;
        expect_json(&response, StatusCode::CREATED);
        assert_eq!(entry(c, key).await["value"], "v");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_values_are_allowed() {
    let server = TestServer::start().await;
    let c = &server.client;
    expect_json(
        &put_json(c, "json", &json!({"value": ""}), &[]).await,
        StatusCode::CREATED,
    );
    expect_json(
        &put_json(c, "b64", &json!({"value_base64": ""}), &[]).await,
        StatusCode::CREATED,
    );
    expect_json(&put_raw(c, "raw", Bytes::new()).await, StatusCode::CREATED);
    for key in ["json", "b64", "raw"] {
        assert_eq!(entry(c, key).await["value"], "", "{key}");
        let raw = get(c, &format!("/v1/kv/{key}?raw=1")).await;
        assert_eq!(raw.status, StatusCode::OK);
        assert!(raw.body.is_empty(), "{key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_match_writes_only_the_named_version() {
    let server = TestServer::start().await;
    let c = &server.client;
    put_text(c, "k", "v1").await;

    for (tag, expected) in [("\"1\"", 2), ("2", 3), (" \"3\" ", 4), ("*", 5)] {
        let response = put_json(c, "k", &json!({"value": tag}), &[(header::IF_MATCH, tag)]).await;
        let body = put_answer(&response, "k");
        assert_eq!(body["version"], expected, "If-Match: {tag}");
        assert_eq!(body["created"], false);
    }
    assert_eq!(entry(c, "k").await["value"], "*");

    for tag in ["\"4\"", "4", "\"6\""] {
        let response = put_json(
            c,
            "k",
            &json!({"value": "stale"}),
            &[(header::IF_MATCH, tag)],
        )
        .await;
        expect_mismatch(&response, Some(5));
    }
    let stored = entry(c, "k").await;
    assert_eq!(
        (stored["value"].as_str(), version_of(&stored)),
        (Some("*"), 5)
    );
    assert_rejected!(
        c,
        &["k"],
        put_json(c, "k", &json!({"value": "x"}), &[(header::IF_MATCH, "1")]),
        StatusCode::PRECONDITION_FAILED,
        "version_mismatch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_match_on_an_absent_key_fails_with_a_null_version() {
    let server = TestServer::start().await;
    let c = &server.client;
    for tag in ["\"1\"", "1", "*"] {
        let response = put_json(
            c,
            "absent",
            &json!({"value": "x"}),
            &[(header::IF_MATCH, tag)],
        )
        .await;
        expect_mismatch(&response, None);
        assert_missing(c, "absent").await;
    }
    // Also after the key existed once.
    put_text(c, "gone", "x").await;
    assert_eq!(
        delete(c, "/v1/kv/gone", &[]).await.status,
        StatusCode::NO_CONTENT
    );
    let response = put_json(
        c,
        "gone",
        &json!({"value": "x"}),
        &[(header::IF_MATCH, "1")],
    )
    .await;
    expect_mismatch(&response, None);
    assert_missing(c, "gone").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_none_match_star_creates_only() {
    let server = TestServer::start().await;
    let c = &server.client;
    let star = [(header::IF_NONE_MATCH, "*")];
    let response = put_json(c, "once", &json!({"value": "first"}), &star).await;
    assert_eq!(expect_json(&response, StatusCode::CREATED)["version"], 1);

    let response = put_json(c, "once", &json!({"value": "second"}), &star).await;
    expect_mismatch(&response, Some(1));
    assert_eq!(entry(c, "once").await["value"], "first");
    assert_rejected!(
        c,
        &["once"],
        put_json(c, "once", &json!({"value": "third"}), &star),
        StatusCode::PRECONDITION_FAILED,
        "version_mismatch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_condition_headers_are_refused() {
    let server = TestServer::start().await;
    let c = &server.client;
    put_text(c, "k", "v").await;
    let both = [(header::IF_MATCH, "\"1\""), (header::IF_NONE_MATCH, "*")];
    let cases: &[Headers<'_>] = &[
        &both,
        &[(header::IF_MATCH, "\"x\"")],
        &[(header::IF_MATCH, "0")],
        &[(header::IF_MATCH, "-1")],
        &[(header::IF_MATCH, "W/\"1\"")],
        &[(header::IF_NONE_MATCH, "\"1\"")],
    ];
    for key in ["k", "absent"] {
        for headers in cases {
            assert_rejected!(
                c,
                &[key],
                put_json(c, key, &json!({"value": "new"}), headers),
                StatusCode::BAD_REQUEST,
                "invalid_request"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_may_hold_slashes_and_percent_encoded_characters() {
    let server = TestServer::start().await;
    let c = &server.client;

    // `/` needs no encoding; encoded or not it is the same key.
    let response = put_json(c, "users/42/profile", &json!({"value": "p"}), &[]).await;
    assert_eq!(
        expect_json(&response, StatusCode::CREATED)["key"],
        "users/42/profile"
    );
    let encoded = get(c, "/v1/kv/users%2F42%2fprofile").await;
    assert_eq!(
        expect_json(&encoded, StatusCode::OK)["key"],
        "users/42/profile"
    );

    // Characters that must be encoded in a path, and `+`, which is not a space.
    for key in [
        "a b?c#d%e&f",
        "a+b",
        "é/日本語",
        "sp ace/",
        "/lead",
        "tab\tnew\nline",
    ] {
        let response = put_json(c, key, &json!({"value": key}), &[]).await;
        let body = expect_json(&response, StatusCode::CREATED);
        assert_eq!(body["key"], key);
        assert_eq!(entry(c, key).await["value"], key);
    }
    assert_missing(c, "a b").await;
    // Raw UTF-8 in the path and its percent-encoding name one key.
    let raw = get(c, "/v1/kv/é/日本語").await;
    assert_eq!(expect_json(&raw, StatusCode::OK)["key"], "é/日本語");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_json_bodies_are_refused() {
    let server = TestServer::start().await;
    let c = &server.client;
    put_text(c, "exists", "before").await;
    let bodies = [
        r#"{"value": "a", "extra": 1}"#,
        r#"{"value": "a", "value_base64": "YQ=="}"#,
        r#"{"value": "", "value_base64": ""}"#,
        r#"{"value_base64": "!!not base64"}"#,
        r#"{"value_base64": "YQ"}"#,
        r#"{"value": 5}"#,
        r#"{"value": ["a"]}"#,
        r#"{"value": {"a": 1}}"#,
        r#"{"value_base64": true}"#,
        r#"{"value": null}"#,
        r#"{"value": "\ud800"}"#,
        r#"{"value": "a""#,
        r#"{"value":"#,
        "{}",
        "null",
        "[]",
        "\"a\"",
        "hello",
        "",
    ];
    for key in ["exists", "absent"] {
        for body in bodies {
            assert_rejected!(
                c,
                &[key],
                send(c, Method::PUT, &Client::key_path(key), &[JSON], body),
                StatusCode::BAD_REQUEST,
                "invalid_request"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_content_types_get_415() {
    let server = TestServer::start().await;
    let c = &server.client;
    put_text(c, "exists", "before").await;
    for media in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
        "application/jsonx",
    ] {
        let headers = [(header::CONTENT_TYPE, media)];
        for key in ["exists", "absent"] {
            let body = json!({"value": "x"}).to_string();
            assert_rejected!(
                c,
                &[key],
                send(c, Method::PUT, &Client::key_path(key), &headers, body),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_over_the_limit_get_413_however_they_are_sent() {
    let server = small_server().await;
    let c = &server.client;
    put_text(c, "exists", "before").await;

    // At the limit: 8 bytes, also as 4 two-byte characters, as JSON escapes
    // (48 bytes of JSON, 8 of value) and as base64 (12 characters).
    let fits = [
        json!({"value": "12345678"}),
        json!({"value": "éééé"}),
        json!({"value_base64": STANDARD.encode([0xffu8; 8])}),
    ];
    for (i, body) in fits.iter().enumerate() {
        let key = format!("fits{i}");
        expect_json(&put_json(c, &key, body, &[]).await, StatusCode::CREATED);
    }
    let escaped = r#"{"value":"\u0041\u0041\u0041\u0041\u0041\u0041\u0041\u0041"}"#;
    let response = send(c, Method::PUT, "/v1/kv/escaped", &[JSON], escaped).await;
    expect_json(&response, StatusCode::CREATED);
    assert_eq!(entry(c, "escaped").await["value"], "AAAAAAAA");
    expect_json(
        &put_raw(c, "raw-fits", vec![0u8; 8]).await,
        StatusCode::CREATED,
    );

    // One byte over, counted on the decoded bytes.
    let over = [
        json!({"value": "123456789"}),
        json!({"value": "ééééa"}),
        json!({"value_base64": STANDARD.encode([0xffu8; 9])}),
    ];
    for key in ["exists", "absent"] {
        for body in &over {
            assert_rejected!(
                c,
                &[key],
                put_json(c, key, body, &[]),
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large"
            );
        }
        assert_rejected!(
            c,
            &[key],
            put_raw(c, key, vec![0u8; 9]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_get_413() {
    let server = server_with_limits(|limits| limits.max_body_bytes = 64).await;
    let c = &server.client;
    put_text(c, "exists", "before").await;
    let long = "x".repeat(80);
    for key in ["exists", "absent"] {
        assert_rejected!(
            c,
            &[key],
            put_raw(c, key, long.clone()),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large"
        );
        assert_rejected!(
            c,
            &[key],
            put_json(c, key, &json!({ "value": long }), &[]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large"
        );
    }
    let batch = json!({"ops": [{"op": "put", "key": "absent", "value": long}]});
    assert_rejected!(
        c,
        &["absent"],
        post_json(c, "/v1/batch", &batch),
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large"
    );
    let response = post_json(c, "/v1/batch/get", &json!({ "keys": [long] })).await;
    expect_error(
        &response,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_bodies_are_limited_without_a_content_length() {
    let server = server_with_limits(|limits| limits.max_body_bytes = 64).await;
    let c = &server.client;
    let chunks = |n: usize| vec![Bytes::from_static(&[b'x'; 16]); n];

    // Under the limit, a chunked body is read as any other.
    let response = send_chunked(
        server.addr,
        Method::PUT,
        "/v1/kv/small",
        &[OCTETS],
        chunks(4),
    )
    .await;
    expect_json(&response, StatusCode::CREATED);
    assert_eq!(entry(c, "small").await["value"], "x".repeat(64));

    assert_rejected!(
        c,
        &["big"],
        send_chunked(server.addr, Method::PUT, "/v1/kv/big", &[OCTETS], chunks(5)),
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large"
    );
    assert_rejected!(
        c,
        &["small"],
        send_chunked(
            server.addr,
            Method::PUT,
            "/v1/kv/small",
            &[OCTETS],
            chunks(5)
        ),
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_query_parameters_are_refused() {
    let server = TestServer::start().await;
    let c = &server.client;
    put_text(c, "k", "v").await;
    let body = json!({"value": "new"}).to_string();
    for path in ["/v1/kv/k?foo=1", "/v1/kv/k?raw=1&raw=1", "/v1/kv/k?Raw=1"] {
        let response = get(c, path).await;
        expect_error(&response, StatusCode::BAD_REQUEST, "invalid_request");
    }
    for path in ["/v1/kv/k?raw=1", "/v1/kv/k?foo=1"] {
        assert_rejected!(
            c,
            &["k"],
            send(c, Method::PUT, path, &[JSON], body.clone()),
            StatusCode::BAD_REQUEST,
            "invalid_request"
        );
        assert_rejected!(
            c,
            &["k"],
            delete(c, path, &[]),
            StatusCode::BAD_REQUEST,
            "invalid_request"
        );
    }
}

// ---------------------------------------------------------------- GET

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_answers_the_entry_with_exactly_its_fields() {
    let server = TestServer::start().await;
    let c = &server.client;
    let put = put_text(c, "users/42", "hello").await;
    let response = get(c, "/v1/kv/users/42").await;
    let body = expect_json(&response, StatusCode::OK);
    assert_fields(
        &body,
        &[
            "key",
            "value",
            "version",
            "revision",
            "created_at",
            "updated_at",
        ],
    );
    assert_entry_shape(&body, false);
    assert_eq!(body["key"], "users/42");
    assert_eq!(body["value"], "hello");
    assert_eq!(body["version"], 1);
    assert_eq!(body["revision"], put["revision"]);
    assert_eq!(body["created_at"], body["updated_at"]);
    assert_eq!(etag(&response), "\"1\"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_keeps_created_at_and_moves_updated_at() {
    let server = TestServer::start().await;
    let c = &server.client;
    put_text(c, "k", "1").await;
    let first = entry(c, "k").await;
    put_text(c, "k", "2").await;
    let second = entry(c, "k").await;
    assert_eq!(second["created_at"], first["created_at"]);
    // Fixed-width UTC timestamps order as text.
    assert!(
        second["updated_at"].as_str() > first["updated_at"].as_str(),
        "{first} then {second}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_key_starts_again_at_version_1() {
    let server = TestServer::start().await;
    let c = &server.client;
    put_text(c, "k", "1").await;
    put_text(c, "k", "2").await;
    let old = entry(c, "k").await;
    assert_eq!(old["version"], 2);
    assert_eq!(
        delete(c, "/v1/kv/k", &[]).await.status,
        StatusCode::NO_CONTENT
    );
    assert_missing(c, "k").await;

    let body = put_text(c, "k", "3").await;
    assert_eq!((version_of(&body), &body["created"]), (1, &json!(true)));
    let new = entry(c, "k").await;
    assert_eq!(new["version"], 1);
    assert!(revision_of(&new) > revision_of(&old));
    assert!(
        new["created_at"].as_str() > old["updated_at"].as_str(),
        "{old} then {new}"
    );
    assert_eq!(new["created_at"], new["updated_at"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_reads_answer_the_value_bytes() {
    let server = TestServer::start().await;
    let c = &server.client;
    let bytes = vec![0u8, 0xff, b'{', b'"'];
    put_raw(c, "bin", bytes.clone()).await;
    put_raw(c, "bin", bytes.clone()).await;
    let accept = |media| [(header::ACCEPT, media)];
    let requests = [
        get(c, "/v1/kv/bin?raw=1").await,
        get(c, "/v1/kv/bin?raw=true").await,
        get_with(c, "/v1/kv/bin", &accept("application/octet-stream")).await,
        get_with(
            c,
            "/v1/kv/bin",
            &accept("text/html, application/octet-stream;q=0.9"),
        )
        .await,
    ];
    for response in &requests {
        assert_eq!(response.status, StatusCode::OK);
        assert_eq!(response.body.as_ref(), bytes);
        assert_eq!(etag(response), "\"2\"");
        assert_eq!(
            response
                .headers
                .get(header::CONTENT_TYPE)
                .map(|v| v.as_bytes()),
            Some(&b"application/octet-stream"[..])
        );
    }
    for path in ["/v1/kv/bin?raw=0", "/v1/kv/bin?raw=false"] {
        let body = expect_json(&get(c, path).await, StatusCode::OK);
        assert_eq!(body["value_base64"], STANDARD.encode(&bytes).as_str());
    }
    let json_accept = get_with(c, "/v1/kv/bin", &accept("application/json")).await;
    expect_json(&json_accept, StatusCode::OK);
    expect_error(
        &get(c, "/v1/kv/bin?raw=yes").await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    // A missing key is a JSON error, also when the raw bytes were asked for.
    expect_error(
        &get(c, "/v1/kv/none?raw=1").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let response = get_with(c, "/v1/kv/none", &accept("application/octet-stream")).await;
    expect_error(&response, StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_key_is_404_not_found() {
    let server = TestServer::start().await;
    let c = &server.client;
    expect_error(
        &get(c, "/v1/kv/nothing").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    put_text(c, "a/b", "v").await;
    for key in ["a", "a/", "a/b/", "A/b"] {
        assert_missing(c, key).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_keys_get_400_invalid_key_on_every_method() {
    let server = TestServer::start().await;
    let c = &server.client;
    let too_long = format!("/v1/kv/{}", "a".repeat(1025));
    let too_long_chars = format!("/v1/kv/{}", "%C3%A9".repeat(513));
    let paths = [
        "/v1/kv/",
        too_long.as_str(),
        too_long_chars.as_str(),
        "/v1/kv/%00",
        "/v1/kv/a%00b",
        "/v1/kv/%zz",
        "/v1/kv/%",
        "/v1/kv/a%",
        "/v1/kv/%4",
        "/v1/kv/%FF",
        "/v1/kv/%C3",
        "/v1/kv/a%C3%28",
    ];
    let body = json!({"value": "x"}).to_string();
    let before = probe_revision(c).await;
    for path in paths {
        for method in [Method::GET, Method::PUT, Method::DELETE] {
            let response = send(c, method.clone(), path, &[JSON], body.clone()).await;
            let error = expect_error(&response, StatusCode::BAD_REQUEST, "invalid_key");
            assert!(!error.contains_key("current_version"), "{method} {path}");
        }
    }
    assert_eq!(
        probe_revision(c).await,
        before + 1,
        "an invalid key was written"
    );

    // The limit is 1024 bytes, not characters.
    for key in ["a".repeat(1024), "é".repeat(512)] {
        expect_json(
            &put_json(c, &key, &json!({"value": "x"}), &[]).await,
            StatusCode::CREATED,
        );
        assert_eq!(entry(c, &key).await["key"], key.as_str());
    }
}

// ---------------------------------------------------------------- DELETE

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_answers_204_then_404() {
    let server = TestServer::start().await;
    let c = &server.client;
    put_text(c, "k", "v").await;
    let response = delete(c, "/v1/kv/k", &[]).await;
    assert_eq!(response.status, StatusCode::NO_CONTENT);
    assert!(response.body.is_empty());
    assert_missing(c, "k").await;
    expect_error(
        &delete(c, "/v1/kv/k", &[]).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    expect_error(
        &delete(c, "/v1/kv/never", &[]).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_with_if_match() {
    let server = TestServer::start().await;
    let c = &server.client;
    for (stale, current) in [("\"1\"", "\"2\""), ("1", "2"), ("\"3\"", "*")] {
        put_text(c, "k", "v").await;
        put_text(c, "k", "v").await;
        // Version 2 now; a stale tag fails and deletes nothing.
        expect_mismatch(
            &delete(c, "/v1/kv/k", &[(header::IF_MATCH, stale)]).await,
            Some(2),
        );
        assert_rejected!(
            c,
            &["k"],
            delete(c, "/v1/kv/k", &[(header::IF_MATCH, stale)]),
            StatusCode::PRECONDITION_FAILED,
            "version_mismatch"
        );
        let response = delete(c, "/v1/kv/k", &[(header::IF_MATCH, current)]).await;
        assert_eq!(
            response.status,
            StatusCode::NO_CONTENT,
            "If-Match: {current}"
        );
        assert!(response.body.is_empty());
        assert_missing(c, "k").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_with_if_match_on_an_absent_key_is_412_not_404() {
    let server = TestServer::start().await;
    let c = &server.client;
    for tag in ["\"1\"", "7", "*"] {
        let response = delete(c, "/v1/kv/absent", &[(header::IF_MATCH, tag)]).await;
        expect_mismatch(&response, None);
        assert_rejected!(
            c,
            &["absent"],
            delete(c, "/v1/kv/absent", &[(header::IF_MATCH, tag)]),
            StatusCode::PRECONDITION_FAILED,
            "version_mismatch"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_deletes_take_no_revision() {
    let server = TestServer::start().await;
    let c = &server.client;
    put_text(c, "k", "v").await;
    let bad_headers: [Headers<'_>; 3] = [
        &[(header::IF_MATCH, "x")],
        &[(header::IF_NONE_MATCH, "*")],
        &[(header::IF_MATCH, "1"), (header::IF_NONE_MATCH, "*")],
    ];
    for key in ["k", "absent"] {
        for headers in bad_headers {
            assert_rejected!(
                c,
                &[key],
                delete(c, &Client::key_path(key), headers),
                StatusCode::BAD_REQUEST,
                "invalid_request"
            );
        }
    }
    assert_rejected!(
        c,
        &["absent"],
        delete(c, "/v1/kv/absent", &[]),
        StatusCode::NOT_FOUND,
        "not_found"
    );

    // A successful delete takes the next revision.
    let before = probe_revision(c).await;
    assert_eq!(
        delete(c, "/v1/kv/k", &[]).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(probe_revision(c).await, before + 2);
}

// ---------------------------------------------------------------- operations and routing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness() {
    let server = TestServer::start().await;
    for path in ["/healthz", "/readyz"] {
        let response = get(&server.client, path).await;
        assert_eq!(response.status, StatusCode::OK, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_in_prometheus_text_format() {
    let server = TestServer::start().await;
    put_text(&server.client, "k", "v").await;
    assert_eq!(
        get(&server.client, &Client::key_path("k")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(&server.client, &Client::key_path("absent"))
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    // A method and a status outside the labels kept resolved per route.
    assert_eq!(
        send(
            &server.client,
            Method::PATCH,
            &Client::key_path("k"),
            &[],
            Bytes::new()
        )
        .await
        .status,
        StatusCode::METHOD_NOT_ALLOWED
    );
    let response = get(&server.client, "/metrics").await;
    assert_eq!(response.status, StatusCode::OK);
    let content_type = response
        .headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.as_bytes());
    assert!(content_type.is_some_and(|t| t.starts_with(b"text/plain")));
    let text = String::from_utf8(response.body.to_vec()).expect("UTF-8 metrics");
    // The recorder is shared by every server of this test process, so only
    // the presence of series is checked, not their counts.
    for series in [
        "# TYPE kvstore_http_requests_total counter",
        "kvstore_http_requests_total{route=\"/v1/kv/{key}\",method=\"PUT\",status=\"201\"}",
        "kvstore_http_requests_total{route=\"/v1/kv/{key}\",method=\"GET\",status=\"404\"}",
        "kvstore_http_requests_total{route=\"/v1/kv/{key}\",method=\"GET\",status=\"200\"}",
        "kvstore_http_requests_total{route=\"/v1/kv/{key}\",method=\"other\",status=\"405\"}",
        "kvstore_http_request_duration_seconds_count{route=\"/v1/kv/{key}\",method=\"GET\"}",
        "# TYPE kvstore_http_request_duration_seconds histogram",
        "kvstore_storage_operation_duration_seconds_bucket{op=\"write\"",
        "process_resident_memory_bytes",
    ] {
        assert!(text.contains(series), "missing {series} in:\n{text}");
    }
    // The embedded engine's commit groups and its local cache (PostgreSQL
    // runs without a cache by default).
    if Backend::current() == Backend::Embedded {
        for series in [
            "# TYPE kvstore_commit_duration_seconds histogram",
            "kvstore_commit_group_writes_bucket",
            "kvstore_commit_queue_depth",
            "kvstore_cache_hits_total",
            "kvstore_cache_misses_total",
            "kvstore_cache_evictions_total",
            "kvstore_cache_entries",
            "kvstore_cache_bytes",
        ] {
            assert!(text.contains(series), "missing {series} in:\n{text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_are_404_json_errors() {
    let server = TestServer::start().await;
    let c = &server.client;
    for (method, path) in [
        (Method::GET, "/"),
        (Method::GET, "/v2/kv/a"),
        (Method::GET, "/v1/kvx"),
        (Method::GET, "/v1"),
        (Method::PUT, "/v1/kva"),
        (Method::POST, "/v1/batch/put"),
        (Method::POST, "/v1/batchx"),
        (Method::GET, "/healthz/x"),
    ] {
        let response = send(c, method, path, &[], Bytes::new()).await;
        expect_error(&response, StatusCode::NOT_FOUND, "not_found");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_methods_are_405_method_not_allowed() {
    let server = TestServer::start().await;
    let c = &server.client;
    let body = json!({"value": "x"}).to_string();
    for (method, path) in [
        (Method::PATCH, "/v1/kv/a"),
        (Method::POST, "/v1/kv/a"),
        (Method::PUT, "/v1/kv"),
        (Method::DELETE, "/v1/kv"),
        (Method::POST, "/v1/kv"),
        (Method::GET, "/v1/batch"),
        (Method::PUT, "/v1/batch"),
        (Method::GET, "/v1/batch/get"),
        (Method::POST, "/healthz"),
        (Method::DELETE, "/readyz"),
    ] {
        assert_rejected!(
            c,
            &["a"],
            send(c, method, path, &[JSON], body.clone()),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed"
        );
    }
    // The answer names the methods the path takes.
    for (path, allowed) in [
        ("/v1/kv/a", &["GET", "PUT", "DELETE"][..]),
        ("/v1/kv", &["GET"]),
        ("/v1/batch", &["POST"]),
    ] {
        let response = send(c, Method::PATCH, path, &[], Bytes::new()).await;
        expect_error(
            &response,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        );
        let allow = response.headers.get(header::ALLOW).map(|v| v.to_str());
        let allow = allow.and_then(Result::ok).unwrap_or_default();
        for method in allowed {
            assert!(
                allow.split(',').any(|m| m.trim() == *method),
                "{path}: {allow}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_backend_answers_503_unavailable() {
    let server = TestServer::start().await;
    let c = &server.client;
    put_text(c, "k", "v").await;
    server.store.close().await.expect("close the store");

    let response = get(c, "/readyz").await;
    expect_error(&response, StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    assert_eq!(get(c, "/healthz").await.status, StatusCode::OK);
    let writes = [
        put_json(c, "k", &json!({"value": "w"}), &[]).await,
        put_json(c, "new", &json!({"value": "w"}), &[]).await,
        delete(c, "/v1/kv/k", &[]).await,
        post_json(
            c,
            "/v1/batch",
            &json!({"ops": [{"op": "delete", "key": "k"}]}),
        )
        .await,
    ];
    for response in &writes {
        expect_error(response, StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    }
    assert_eq!(entry(c, "k").await["value"], "v");
    assert_missing(c, "new").await;
    server.stop().await;
}

}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revisions_and_data_survive_a_restart() {
    let server = TestServer::start().await;
    put_text(&server.client, "a/b", "v").await;
    let before = revision_of(&put_text(&server.client, "a/b", "w").await);
    let dir = server.stop().await.expect("data dir");
    let path = dir.path().to_path_buf();
    let server = TestServer::start_in(Some(dir), path, ServerConfig::default(), |_| {}).await;
    let stored = entry(&server.client, "a/b").await;
    assert_eq!(
        (stored["value"].as_str(), version_of(&stored)),
        (Some("w"), 2)
    );
    assert_eq!(revision_of(&stored), before);
    // Revisions go on from where they were, also after a delete.
    assert_eq!(
        delete(&server.client, "/v1/kv/a/b", &[]).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(probe_revision(&server.client).await, before + 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_answers_500_internal() {
    let server = TestServer::start().await;
    put_text(&server.client, "fine", "v").await;
    let dir = server.stop().await.expect("data dir");
    let path = dir.path().to_path_buf();
    {
        // Fault injection below the API: a record too short to hold its header.
        let db = fjall::Database::builder(&path).open().expect("open fjall");
        let kv = db
            .keyspace("kv", fjall::KeyspaceCreateOptions::default)
            .expect("kv keyspace");
        kv.insert("broken", "x").expect("insert");
        db.persist(fjall::PersistMode::SyncAll).expect("persist");
    }
    let server = TestServer::start_in(Some(dir), path, ServerConfig::default(), |_| {}).await;
    let c = &server.client;
    for path in ["/v1/kv/broken", "/v1/kv", "/v1/kv?prefix=b"] {
        let error = expect_error(
            &get(c, path).await,
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
        );
        // Damaged data is no bug to report: the answer says to restore it.
        assert!(
            error["message"]
                .as_str()
                .is_some_and(|m| m.contains("corrupt") && m.contains("backup")),
            "{error:?}"
        );
    }
    let response = post_json(c, "/v1/batch/get", &json!({"keys": ["fine", "broken"]})).await;
    expect_error(&response, StatusCode::INTERNAL_SERVER_ERROR, "internal");
    assert_eq!(entry(c, "fine").await["value"], "v");
    server.stop().await;
}
