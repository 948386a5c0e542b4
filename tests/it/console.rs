//! The web console at `/ui/`: how its files are served (content types, the
//! Content-Security-Policy, caching, no cookies, open with tokens on, off
//! with `--ui false`), and the console itself in a real browser
//! (tests/console/console.mjs: Debian's chromium driven by playwright-core).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::rules_text;
use crate::harness::{Binary, TestServer, needs, output_within, tool};
use crate::requests::*;
use crate::tls::make_pki;
use kvstore::client::{Client, ClientOptions, RawResponse};
use kvstore::internals::CONTENT_SECURITY_POLICY;
use kvstore::server::{Auth, TokenRules};
use kvstore::server::{Security, ServerConfig};

/// The headers every console file carries.
fn assert_console_headers(response: &RawResponse, path: &str) {
    let header = |name: HeaderName| {
        response
            .headers
            .get(&name)
            .unwrap_or_else(|| panic!("{path}: no {name}"))
            .to_str()
            .unwrap()
            .to_owned()
    };
    let policy = header(header::CONTENT_SECURITY_POLICY);
    assert_eq!(policy, CONTENT_SECURITY_POLICY, "{path}");
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(policy.contains(directive), "{path}: {policy}");
    }
    assert!(!policy.contains("unsafe"), "{path}: {policy}");
    assert_eq!(header(header::X_CONTENT_TYPE_OPTIONS), "nosniff", "{path}");
    assert_eq!(header(header::CACHE_CONTROL), "no-cache", "{path}");
    assert!(header(header::ETAG).starts_with('"'), "{path}");
    assert!(
        response.headers.get(header::SET_COOKIE).is_none(),
        "{path} sets a cookie"
    );
}

/// The files that the page names, and the modules that they import.
fn files_of_the_page(page: &str) -> Vec<String> {
    page.split(['"', '\''])
        .filter(|word| {
            Path::new(word)
                .extension()
                .is_some_and(|e| e == "js" || e == "css" || e == "svg")
                && !word.contains('/')
        })
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_served_with_a_strict_policy_and_no_cookies() {
    let server = TestServer::start().await;
    let client = &server.client;

    let page = get(client, "/ui/").await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(
        page.headers[header::CONTENT_TYPE],
        "text/html; charset=utf-8"
    );
    assert_console_headers(&page, "/ui/");
    let html = std::str::from_utf8(&page.body).unwrap();
    let files = files_of_the_page(html);
    assert!(
        files.contains(&"app.js".to_owned()) && files.contains(&"style.css".to_owned()),
        "{files:?}"
    );
    for file in files {
        let path = format!("/ui/{file}");
        let response = get(client, &path).await;
        assert_eq!(response.status, StatusCode::OK, "{path}");
        let expected = match file.rsplit_once('.').map(|(_, e)| e) {
            Some("js") => "text/javascript; charset=utf-8",
            Some("css") => "text/css; charset=utf-8",
            _ => "image/svg+xml",
        };
        assert_eq!(response.headers[header::CONTENT_TYPE], expected, "{path}");
        assert_console_headers(&response, &path);
    }

    // An unchanged file costs a 304 without a body.
    let etag = page.headers[header::ETAG].to_str().unwrap().to_owned();
    let again = get_with(client, "/ui/", &[(header::IF_NONE_MATCH, &etag)]).await;
    assert_eq!(again.status, StatusCode::NOT_MODIFIED);
    assert!(again.body.is_empty());
    assert_eq!(again.headers[header::ETAG], etag.as_str());

    // /ui is sent to /ui/, where the page's relative links resolve.
    let bare = get(client, "/ui").await;
    assert_eq!(bare.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(bare.headers[header::LOCATION], "ui/");

    // HEAD as GET, without the body.
    let head = send(client, Method::HEAD, "/ui/app.js", &[], "").await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());

    // Anything else under /ui/ is the API's 404; no path reaches a file system.
    for path in [
        "/ui/nope.js",
        "/ui/%2e%2e%2fCargo.toml",
        "/ui/a/b.js",
        "/ui/%ff",
    ] {
        let response = get(client, path).await;
        expect_error(&response, StatusCode::NOT_FOUND, "not_found");
    }
    let refused = send(client, Method::POST, "/ui/", &[], "").await;
    expect_error(
        &refused,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );

    // Counted under one route label, whatever the file.
    let metrics = get(client, "/metrics").await;
    let text = std::str::from_utf8(&metrics.body).unwrap();
    assert!(
        text.contains(r#"kvstore_http_requests_total{route="/ui",method="GET",status="200"}"#),
        "{text}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tokens_the_console_loads_without_one_and_its_calls_need_one() {
    let rules = TokenRules::parse(&rules_text(), false).unwrap();
    let mut security = Security::default();
    security.auth = Some(Arc::new(Auth::from_rules(rules, false)));
    let server =
        TestServer::start_secured(ServerConfig::default(), security, &ClientOptions::default())
            .await;
    let anonymous = &server.client;
    for path in ["/ui/", "/ui/app.js", "/ui/style.css"] {
        let response = get(anonymous, path).await;
        assert_eq!(response.status, StatusCode::OK, "{path}");
        assert_console_headers(&response, path);
    }
    assert_eq!(
        get(anonymous, "/ui").await.status,
        StatusCode::PERMANENT_REDIRECT
    );
    for path in ["/v1/kv", "/metrics", "/uix"] {
        let response = get(anonymous, path).await;
        expect_error(&response, StatusCode::UNAUTHORIZED, "unauthenticated");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ui_false_turns_the_console_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Binary::start(dir.path(), &["--ui", "false"]);
    for path in ["/ui/", "/ui", "/ui/app.js"] {
        let response = get(&server.client, path).await;
        let error = expect_error(&response, StatusCode::NOT_FOUND, "not_found");
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .contains("no such endpoint"),
            "{error:?}"
        );
    }
    assert!(server.terminate());
}

/// What the browser test needs: node, curl, Debian's chromium (or the
/// browser that KVSTORE_TEST_CHROMIUM names) and tests/console's
/// node_modules (`npm ci` there).
fn browser() -> Option<String> {
    tool("node", "apt-get install -y nodejs npm")?;
    tool("curl", "apt-get install -y curl")?;
    let chromium =
        std::env::var("KVSTORE_TEST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    needs(
        Path::new(&chromium).exists(),
        &chromium,
        "apt-get install -y chromium",
    )?;
    let modules =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console/node_modules/playwright-core");
    needs(
        modules.exists(),
        "tests/console/node_modules",
        "cd tests/console && npm ci",
    )?;
    Some(chromium)
}

/// Browse, create, edit through a conflict made by curl, see curl's writes
/// live, delete, the server charts, markup shown as text, and the token
/// prompt (over HTTPS), against the real binary; the scenarios are in
/// tests/console/console.mjs. KVSTORE_CONSOLE_SCREENSHOTS=DIR keeps
/// screenshots of the main views there (docs/console/ holds the ones the
/// docs show).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_works_in_a_real_browser() {
    let Some(chromium) = browser() else {
        return;
    };
    let (open_dir, auth_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let open = Binary::start(open_dir.path(), &[]);
    // The server with tokens speaks HTTPS only, with a certificate of a test CA.
    let pki = make_pki();
    let file = |name: &str, text: &str| {
        let path = auth_dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let (tokens, cert, key) = (
        file("tokens.toml", &rules_text()),
        file("cert.pem", &pki.cert),
        file("key.pem", &pki.key),
    );
    let auth_data = auth_dir.path().join("data");
    let auth = Binary::start(
        &auth_data,
        &[
            "--auth-file",
            &tokens,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
    );
    let mut options = ClientOptions::default();
    options.token = Some("admin-token".into());
    options.ca_cert_pem = Some(pki.ca.as_bytes().to_vec());
    let admin = Client::with_options(&format!("https://{}", auth.addr), &options).unwrap();
    seed(&admin, &[("users/1", "Ada"), ("config/app", "{}")]).await;

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console/console.mjs");
    let mut command = std::process::Command::new("node");
    command
        .arg(script)
        .args(["--open", &format!("http://{}", open.addr)])
        .args(["--auth", &format!("https://{}", auth.addr)])
        .args(["--chromium", &chromium]);
    if let Ok(dir) = std::env::var("KVSTORE_CONSOLE_SCREENSHOTS") {
        command.args(["--screenshots", &dir]);
    }
    let started = Instant::now();
    let output = tokio::task::spawn_blocking(move || {
        output_within(&mut command, b"", Duration::from_secs(240))
    })
    .await
    .unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    let err = String::from_utf8_lossy(&output.stderr);
    eprintln!(
        "{out}{err}browser test: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(output.status.success(), "{}\n{out}\n{err}", output.status);
    assert!(out.contains("\n10 passed, 0 failed"), "{out}");
}

/// The console's modules that need no page (the metrics parser and
/// quantiles, the event-stream reader), under node's test runner.
#[test]
fn the_console_modules_pass_their_unit_tests() {
    let Some(()) = tool("node", "apt-get install -y nodejs npm") else {
        return;
    };
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console/unit.test.mjs");
    let output = output_within(
        std::process::Command::new("node").arg("--test").arg(tests),
        b"",
        Duration::from_secs(120),
    );
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{out}");
    assert!(out.contains("# fail 0"), "{out}");
}
