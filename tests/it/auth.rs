//! Tokens with read and write rights on key prefixes (`--auth-file`): 401
//! without a known token, 403 outside its rights, batches refused whole,
//! ranges clipped to what the token may read, open probes, the metrics
//! switch, reloading on SIGHUP, and the `kvstore token` helper.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use crate::harness::{Binary, TestServer, output_within, within};
use crate::requests::*;
use kvstore::client::{Client, ClientOptions};
use kvstore::server::{Auth, TokenRules, token_sha256_hex};
use kvstore::server::{Security, ServerConfig};

/// `admin` may do anything; `app` reads users/ and config/ and writes
/// users/; `reader` (stored as a hash) reads users/ only.
pub(crate) fn rules_text() -> String {
    format!(
        r#"
[[token]]
name = "admin"
token = "admin-token"
read = [""]
write = [""]

[[token]]
name = "app"
token = "app-token"
read = ["users/", "config/"]
write = ["users/"]

[[token]]
name = "reader"
sha256 = "{}"
read = ["users/"]
"#,
        token_sha256_hex("reader-token")
    )
}

fn security(metrics_open: bool) -> Security {
    let rules = TokenRules::parse(&rules_text(), false).expect("rules");
    let mut security = Security::default();
    security.auth = Some(Arc::new(Auth::from_rules(rules, metrics_open)));
    security
}

async fn server(metrics_open: bool) -> TestServer {
    let mut options = ClientOptions::default();
    options.token = Some("admin-token".into());
    TestServer::start_secured(ServerConfig::default(), security(metrics_open), &options).await
}

fn client_with(server: &TestServer, token: Option<&str>) -> Client {
    let mut options = ClientOptions::default();
    options.token = token.map(str::to_owned);
    Client::with_options(&server.base, &options).expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_or_unknown_token_is_401_and_probes_stay_open() {
    let server = server(false).await;
    let anonymous = client_with(&server, None);
    for path in ["/v1/kv/users/1", "/v1/kv", "/metrics", "/no/such/path"] {
        let response = get(&anonymous, path).await;
        expect_error(&response, StatusCode::UNAUTHORIZED, "unauthenticated");
        assert_eq!(
            response.headers[header::WWW_AUTHENTICATE],
            "Bearer realm=\"kvstore\""
        );
    }
    let response = post_json(&anonymous, "/v1/batch", &json!({"ops": []})).await;
    expect_error(&response, StatusCode::UNAUTHORIZED, "unauthenticated");
    let stranger = client_with(&server, Some("not-a-token"));
    expect_error(
        &put_raw(&stranger, "users/1", "v").await,
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
    );
    // Other schemes and a bare token are not bearer tokens.
    for value in [
        "Basic YWRtaW4tdG9rZW4=",
        "admin-token",
        "Bearer",
        "Bearer  ",
    ] {
        let response = get_with(
            &anonymous,
            "/v1/kv/users/1",
            &[(header::AUTHORIZATION, value)],
        )
        .await;
        expect_error(&response, StatusCode::UNAUTHORIZED, "unauthenticated");
    }
    // The scheme is case-insensitive.
    let response = get_with(
        &anonymous,
        "/v1/kv/users/1",
        &[(header::AUTHORIZATION, "bearer admin-token")],
    )
    .await;
    expect_error(&response, StatusCode::NOT_FOUND, "not_found");

    assert_eq!(get(&anonymous, "/healthz").await.status, StatusCode::OK);
    assert_eq!(get(&anonymous, "/readyz").await.status, StatusCode::OK);
    // Any known token may read the metrics.
    assert_eq!(
        get(&client_with(&server, Some("reader-token")), "/metrics")
            .await
            .status,
        StatusCode::OK
    );
    server.stop().await;

    let open = self::server(true).await;
    let anonymous = client_with(&open, None);
    assert_eq!(get(&anonymous, "/metrics").await.status, StatusCode::OK);
    expect_error(
        &get(&anonymous, "/v1/kv/users/1").await,
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
    );
    open.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_keys_need_the_right_to_read_or_write_them() {
    let server = server(false).await;
    let admin = &server.client;
    seed(
        admin,
        &[("users/1", "u1"), ("config/a", "c"), ("secret/x", "s")],
    )
    .await;
    let app = client_with(&server, Some("app-token"));
    let reader = client_with(&server, Some("reader-token"));

    assert_eq!(entry(&app, "users/1").await["value"], "u1");
    assert_eq!(entry(&app, "config/a").await["value"], "c");
    let denied = expect_error(
        &get(&app, "/v1/kv/secret/x").await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert!(
        denied["message"].as_str().unwrap().contains("'app'"),
        "{denied:?}"
    );
    // A key the token may not read is 403 whether or not it exists.
    expect_error(
        &get(&app, "/v1/kv/secret/absent").await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );

    assert_eq!(
        put_raw(&app, "users/2", "new").await.status,
        StatusCode::CREATED
    );
    expect_error(
        &put_raw(&app, "config/a", "changed").await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    expect_error(
        &delete(&app, "/v1/kv/config/a", &[]).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    expect_error(
        &put_raw(&reader, "users/1", "x").await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_eq!(entry(&reader, "users/1").await["value"], "u1");
    assert_eq!(
        delete(&app, "/v1/kv/users/2", &[]).await.status,
        StatusCode::NO_CONTENT
    );
    // Nothing refused was written.
    assert_eq!(entry(admin, "config/a").await["value"], "c");
    assert_eq!(entry(admin, "users/1").await["value"], "u1");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_touching_a_forbidden_key_is_refused_whole() {
    let server = server(false).await;
    let admin = &server.client;
    seed(admin, &[("users/1", "u1"), ("config/a", "c")]).await;
    let app = client_with(&server, Some("app-token"));
    let before = Snapshot::take(admin, &["users/1", "users/2", "config/a"]).await;
    let response = post_json(
        &app,
        "/v1/batch",
        &json!({"ops": [
            {"op": "put", "key": "users/2", "value": "x"},
            {"op": "delete", "key": "users/1"},
            {"op": "put", "key": "config/a", "value": "y"},
        ]}),
    )
    .await;
    let error = expect_error(&response, StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(error["index"], 2);
    assert!(
        error["message"].as_str().unwrap().starts_with("ops[2]: "),
        "{error:?}"
    );
    before.assert_unchanged(admin).await;

    let response = post_json(
        &app,
        "/v1/batch",
        &json!({"ops": [{"op": "put", "key": "users/2", "value": "x"}]}),
    )
    .await;
    assert_eq!(response.status, StatusCode::OK);

    let response = post_json(
        &app,
        "/v1/batch/get",
        &json!({"keys": ["users/1", "config/a", "secret/x"]}),
    )
    .await;
    let error = expect_error(&response, StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(error["index"], 2);
    let response = post_json(
        &app,
        "/v1/batch/get",
        &json!({"keys": ["users/1", "config/a"]}),
    )
    .await;
    assert_eq!(
        expect_json(&response, StatusCode::OK)["items"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_list_only_what_the_token_may_read() {
    let server = server(false).await;
    let admin = &server.client;
    seed_keys(
        admin,
        &[
            "a", "config/a", "config/b", "secret/x", "users/1", "users/2", "users/3", "users0",
        ],
    )
    .await;
    let reader = client_with(&server, Some("reader-token"));
    let app = client_with(&server, Some("app-token"));

    // No bounds: clipped to the one prefix the reader may read.
    assert_eq!(
        list_keys(&reader, "").await,
        ["users/1", "users/2", "users/3"]
    );
    assert_eq!(
        list_keys(&reader, "start=b&reverse=1").await,
        ["users/3", "users/2", "users/1"]
    );
    assert_eq!(list_keys(&reader, "prefix=users/2").await, ["users/2"]);
    // Every page of a walk stays inside, forwards and backwards.
    assert_eq!(
        walk(&reader, "limit=1").await.concat(),
        ["users/1", "users/2", "users/3"]
    );
    assert_eq!(
        walk(&reader, "limit=2&reverse=1").await.concat(),
        ["users/3", "users/2", "users/1"]
    );
    // Nothing readable in the range.
    expect_error(
        &get(&reader, "/v1/kv?prefix=secret/").await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    // app reads two prefixes: a range over both is refused, one at a time works.
    let error = expect_error(
        &get(&app, "/v1/kv").await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert!(
        error["message"].as_str().unwrap().contains("'config/'"),
        "{error:?}"
    );
    assert_eq!(
        list_keys(&app, "prefix=config/").await,
        ["config/a", "config/b"]
    );
    assert_eq!(
        list_keys(&app, "start=d&end=zz").await,
        ["users/1", "users/2", "users/3"]
    );
    assert_eq!(list_keys(admin, "").await.len(), 8);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_of_another_token_reads_no_more_than_its_own_rights() {
    let server = server(false).await;
    let admin = &server.client;
    seed_keys(admin, &["config/a", "secret/x", "users/1", "users/2"]).await;
    // The admin's cursor after "config/a", in the unbounded range.
    let page = list(admin, "limit=1").await;
    let cursor = page["next_cursor"].as_str().unwrap().to_owned();
    let reader = client_with(&server, Some("reader-token"));
    // Same range, reader's rights: clipped to users/, never secret/.
    assert_eq!(
        list_keys(&reader, &format!("cursor={cursor}")).await,
        ["users/1", "users/2"]
    );
    server.stop().await;
}

fn write_file(path: &std::path::Path, text: &str) {
    std::fs::write(path, text).expect("write token file");
}

fn hangup(server: &Binary) {
    crate::harness::send_signal(server.child.id(), libc::SIGHUP).expect("SIGHUP");
}

/// One keep-alive request on a raw connection, with a token.
fn raw_get(stream: &mut TcpStream, token: &str) -> String {
    let request =
        format!("GET /v1/kv/users/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n");
    stream.write_all(request.as_bytes()).expect("write");
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf).expect("read");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

async fn status_with(base: &str, token: &str) -> StatusCode {
    let mut options = ClientOptions::default();
    options.token = Some(token.into());
    let client = Client::with_options(base, &options).expect("client");
    get(&client, "/v1/kv/users/1").await.status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_token_file_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.toml");
    write_file(
        &file,
        "[[token]]\nname = \"old\"\ntoken = \"old-token\"\nread = [\"users/\"]\n",
    );
    let data = dir.path().join("data");
    let mut server = Binary::start(&data, &["--auth-file", file.to_str().unwrap()]);
    let base = format!("http://{}", server.addr);
    assert_eq!(status_with(&base, "old-token").await, StatusCode::NOT_FOUND);
    assert_eq!(
        status_with(&base, "new-token").await,
        StatusCode::UNAUTHORIZED
    );
    let addr = server.addr.clone();
    let mut kept = within(
        60,
        "a request on a new connection",
        tokio::task::spawn_blocking(move || {
            let mut stream = TcpStream::connect(addr).expect("connect");
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            assert!(raw_get(&mut stream, "old-token").starts_with("HTTP/1.1 404"));
            stream
        }),
    )
    .await
    .unwrap();

    write_file(
        &file,
        "[[token]]\nname = \"new\"\ntoken = \"new-token\"\nread = [\"users/\"]\n",
    );
    hangup(&server);
    let mut reloaded = false;
    for _ in 0..100 {
        if status_with(&base, "new-token").await == StatusCode::NOT_FOUND {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reloaded, "the new token was not accepted after SIGHUP");
    assert_eq!(
        status_with(&base, "old-token").await,
        StatusCode::UNAUTHORIZED
    );
    // The connection opened before the reload still serves, under the new rules.
    kept = within(
        60,
        "requests on the kept connection",
        tokio::task::spawn_blocking(move || {
            assert!(raw_get(&mut kept, "old-token").starts_with("HTTP/1.1 401"));
            assert!(raw_get(&mut kept, "new-token").starts_with("HTTP/1.1 404"));
            kept
        }),
    )
    .await
    .unwrap();

    // A broken file keeps the rules in force.
    write_file(&file, "[[token]]\nname = \"broken\"\n");
    hangup(&server);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(status_with(&base, "new-token").await, StatusCode::NOT_FOUND);
    drop(kept);
    assert!(server.terminate());
    let log = server.log();
    assert!(
        log.iter()
            .any(|l| l.contains("ERROR") && l.contains("previous tokens stay in force")),
        "{log:#?}"
    );
    assert!(log.iter().any(|l| l.contains("auth is on")), "{log:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auth_the_server_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Binary::start(dir.path(), &["--slow-ms", "60000"]);
    assert!(server.client.health().await.is_ok());
    let clean = server.terminate();
    let log = server.log();
    assert!(clean, "{log:#?}");
    assert!(log.iter().any(|l| l.contains("auth is off")), "{log:#?}");
    // On loopback, no warning about who can connect (other warnings, of a
    // slow machine say, are not this test's business).
    assert!(
        !log.iter().any(|l| l.contains("WARN")
            && (l.contains("other machines can reach") || l.contains("TLS is off"))),
        "{log:#?}"
    );
}

fn run_kvstore(args: &[&str], env: &[(&str, &str)], stdin: &[u8]) -> std::process::Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kvstore"));
    command
        .args(args)
        .envs(env.iter().copied())
        .env_remove("RUST_LOG");
    output_within(&mut command, stdin, Duration::from_secs(60))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_hashes_tokens_and_sends_them() {
    let out = run_kvstore(&["token", "hash"], &[], b"reader-token\n");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        token_sha256_hex("reader-token")
    );
    let out = run_kvstore(&["token", "new"], &[], b"");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].len() >= 40, "{text}");
    assert_eq!(lines[1], token_sha256_hex(lines[0]));

    let server = server(false).await;
    seed(&server.client, &[("users/1", "hello")]).await;
    let base = server.base.clone();
    let out = within(
        200,
        "three CLI commands",
        tokio::task::spawn_blocking(move || {
            let with_token = run_kvstore(
                &["get", "users/1"],
                &[("KVSTORE_URL", &base), ("KVSTORE_TOKEN", "reader-token")],
                b"",
            );
            let without = run_kvstore(&["get", "users/1"], &[("KVSTORE_URL", &base)], b"");
            let forbidden = run_kvstore(
                &["put", "users/1", "x", "--token", "reader-token"],
                &[("KVSTORE_URL", &base)],
                b"",
            );
            (with_token, without, forbidden)
        }),
    )
    .await
    .unwrap();
    assert!(out.0.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.0.stdout).trim(), "hello");
    assert_eq!(out.1.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.1.stderr).contains("401 unauthenticated"));
    assert_eq!(out.2.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.2.stderr).contains("403 forbidden"));
    server.stop().await;
}

/// A lease belongs to the token that granted it: another token may not
/// renew, read or revoke it, nor attach keys to it (a revoke must not delete
/// keys its token could not write); without a token, 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_belong_to_the_token_that_granted_them() {
    let server = server(false).await;
    let app = client_with(&server, Some("app-token"));
    let admin = &server.client;
    let granted = expect_json(
        &post_json(&app, "/v1/leases", &serde_json::json!({"ttl_ms": 60_000})).await,
        StatusCode::CREATED,
    );
    let id = granted["lease"].as_str().expect("lease id").to_owned();
    let path = format!("/v1/leases/{id}");
    put_answer(
        &put_json(
            &app,
            "users/1",
            &serde_json::json!({"value": "x", "lease": id}),
            &[],
        )
        .await,
        "users/1",
    );
    let info = expect_json(&get(&app, &path).await, StatusCode::OK);
    assert_eq!(info["keys"], 1, "{info}");
    for response in [
        get(admin, &path).await,
        post_json(admin, &format!("{path}/keepalive"), &serde_json::json!({})).await,
        delete(admin, &path, &[]).await,
        put_json(
            admin,
            "users/2",
            &serde_json::json!({"value": "x", "lease": id}),
            &[],
        )
        .await,
    ] {
        expect_error(&response, StatusCode::FORBIDDEN, "forbidden");
    }
    assert_missing(admin, "users/2").await;
    assert_eq!(entry(admin, "users/1").await["lease"], id.as_str());
    let anonymous = client_with(&server, None);
    expect_error(
        &get(&anonymous, &path).await,
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
    );
    assert_eq!(
        delete(&app, &path, &[]).await.status,
        StatusCode::NO_CONTENT
    );
    assert_missing(admin, "users/1").await;
}
