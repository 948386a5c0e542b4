//! Keys that expire, through the typed client and the `kvstore` binary:
//! `put --ttl / --keep-ttl / --lease`, the deadline in `get` and `list`,
//! `kvstore lease grant / keepalive / get / revoke`, a deadline kept across
//! export and import, and the flags refused before anything is written.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use kvstore::client::{ClientError, Event, WatchMessage, WatchRange, WatchRequest};
use kvstore::storage::{Condition, Expiry, LeaseId};
use kvstore::types::PutBody;
use serde_json::Value;

use crate::cli::{fails, json, lines, ok, text};
use crate::harness::{TestServer, send_signal, wait_child, within};

/// An RFC 3339 time of the API.
fn time(value: &Value) -> DateTime<Utc> {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("not a time: {value}"));
    DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|err| panic!("{text}: {err}"))
        .with_timezone(&Utc)
}

/// Asserts that `at` is `ttl` after a moment between `before` and now.
fn assert_deadline(at: DateTime<Utc>, before: DateTime<Utc>, ttl: TimeDelta) {
    let after = Utc::now();
    assert!(
        at >= before + ttl && at <= after + ttl,
        "{at} is not {ttl} after a moment from {before} to {after}"
    );
}

/// Sleeps until `at` (and a little more, for the clock's last tick), which
/// must be less than `bound` away.
async fn sleep_past(at: DateTime<Utc>, bound: Duration) {
    let left = (at - Utc::now()).to_std().unwrap_or_default();
    assert!(left < bound, "{at} is {left:?} away, more than {bound:?}");
    tokio::time::sleep(left + Duration::from_millis(50)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_with_a_ttl_shows_its_deadline_then_is_gone() {
    let server = TestServer::start().await;
    let url = server.base.as_str();
    let before = Utc::now();
    ok(url, &["put", "session/1", "token", "--ttl", "5s"], b"").await;
    let entry = json(&ok(url, &["get", "session/1", "--json"], b"").await);
    let deadline = time(&entry["expires_at"]);
    assert_deadline(deadline, before, TimeDelta::seconds(5));
    assert!(entry.get("lease").is_none(), "{entry}");

    // Stdout stays the exact value; the deadline goes to stderr.
    let out = ok(url, &["get", "session/1"], b"").await;
    assert_eq!(out.stdout, b"token");
    assert_eq!(
        text(&out.stderr),
        format!("expires at {}\n", entry["expires_at"].as_str().unwrap())
    );
    ok(url, &["put", "plain", "v"], b"").await;
    let out = ok(url, &["list"], b"").await;
    assert_eq!(
        lines(&out),
        [
            "plain\tv".to_owned(),
            format!(
                "session/1\ttoken\texpires at {}",
                entry["expires_at"].as_str().unwrap()
            )
        ]
    );
    assert!(text(&ok(url, &["get", "plain"], b"").await.stderr).is_empty());

    sleep_past(deadline, Duration::from_secs(6)).await;
    let err = fails(url, &["get", "session/1"], b"", 1).await;
    assert!(err.contains("the key does not exist"), "{err}");
    let out = ok(url, &["list", "--keys-only"], b"").await;
    assert_eq!(lines(&out), ["plain"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_ttl_keeps_the_deadline_and_a_plain_put_drops_it() {
    let server = TestServer::start().await;
    let url = server.base.as_str();
    ok(url, &["put", "k", "v1", "--ttl", "1m"], b"").await;
    let first = json(&ok(url, &["get", "k", "--json"], b"").await);
    assert!(first["expires_at"].is_string(), "{first}");

    ok(url, &["put", "k", "v2", "--keep-ttl"], b"").await;
    let kept = json(&ok(url, &["get", "k", "--json"], b"").await);
    assert_eq!(
        (&kept["value"], &kept["expires_at"]),
        (&"v2".into(), &first["expires_at"])
    );

    ok(url, &["put", "k", "v3"], b"").await;
    let plain = json(&ok(url, &["get", "k", "--json"], b"").await);
    assert_eq!(plain["value"], "v3");
    assert!(plain.get("expires_at").is_none(), "{plain}");

    // A new key has no deadline to keep.
    ok(url, &["put", "new", "v", "--keep-ttl"], b"").await;
    let new = json(&ok(url, &["get", "new", "--json"], b"").await);
    assert!(new.get("expires_at").is_none(), "{new}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_expiry_flags_fail_before_writing() {
    let server = TestServer::start().await;
    let url = server.base.as_str();
    let cases: [(&[&str], &str); 7] = [
        (&["--ttl", "0"], "'0' is not a positive duration"),
        (&["--ttl", "abc"], "'abc' is not a duration such as 30s"),
        (&["--ttl", "0.1ms"], "shorter than a millisecond"),
        (
            &["--ttl", "5s", "--keep-ttl"],
            "'--ttl <DURATION>' cannot be used with '--keep-ttl'",
        ),
        (
            &["--ttl", "5s", "--lease", "00000000000000ab"],
            "cannot be used with '--lease <ID>'",
        ),
        (
            &["--keep-ttl", "--lease", "00000000000000ab"],
            "cannot be used with",
        ),
        (&["--lease", "nothex"], "'nothex' is not a lease id"),
    ];
    for (flags, message) in cases {
        let mut args = vec!["put", "k", "v"];
        args.extend_from_slice(flags);
        let err = fails(url, &args, b"", 2).await;
        assert!(err.contains(message), "{flags:?}: {err}");
    }
    let err = fails(url, &["lease", "grant", "0s"], b"", 2).await;
    assert!(err.contains("not a positive duration"), "{err}");
    let err = fails(url, &["lease", "keepalive", "xyz"], b"", 2).await;
    assert!(err.contains("'xyz' is not a lease id"), "{err}");
    assert_eq!(server.client.get("k").await.unwrap(), None);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_from_grant_to_revoke() {
    let server = TestServer::start().await;
    let url = server.base.as_str();
    let before = Utc::now();
    let out = ok(url, &["lease", "grant", "30s"], b"").await;
    let granted = text(&out.stdout);
    let id = granted
        .strip_prefix("granted lease ")
        .and_then(|rest| rest.split(':').next())
        .unwrap_or_else(|| panic!("no id in: {granted}"))
        .to_owned();
    assert_eq!(id.len(), 16, "{granted}");
    assert!(granted.contains(": ttl 30s, expires at "), "{granted}");

    ok(url, &["put", "svc/a", "up", "--lease", &id], b"").await;
    let lease = json(&ok(url, &["lease", "get", &id, "--json"], b"").await);
    assert_eq!(
        (&lease["lease"], &lease["ttl_ms"], &lease["keys"]),
        (&id.as_str().into(), &30_000.into(), &1.into())
    );
    assert_deadline(time(&lease["expires_at"]), before, TimeDelta::seconds(30));
    let out = ok(url, &["lease", "get", &id], b"").await;
    assert_eq!(
        text(&out.stdout),
        format!(
            "lease {id}: ttl 30s, expires at {}, 1 key\n",
            lease["expires_at"].as_str().unwrap()
        )
    );
    let entry = json(&ok(url, &["get", "svc/a", "--json"], b"").await);
    assert_eq!(
        (&entry["lease"], &entry["expires_at"]),
        (&lease["lease"], &lease["expires_at"])
    );
    let out = ok(url, &["get", "svc/a"], b"").await;
    assert!(text(&out.stderr).ends_with(&format!(", lease {id}\n")));

    // The deadlines have microseconds: a renewal 10 ms later is later.
    tokio::time::sleep(Duration::from_millis(10)).await;
    let renewed = json(&ok(url, &["lease", "keepalive", &id, "--json"], b"").await);
    assert!(
        time(&renewed["expires_at"]) > time(&lease["expires_at"]),
        "{renewed} after {lease}"
    );
    let out = ok(url, &["lease", "keepalive", &id], b"").await;
    assert!(
        text(&out.stdout).starts_with(&format!("renewed lease {id}: ttl 30s, expires at ")),
        "{}",
        text(&out.stdout)
    );

    let out = ok(url, &["lease", "revoke", &id], b"").await;
    assert_eq!(text(&out.stdout), format!("revoked lease {id}\n"));
    fails(url, &["get", "svc/a"], b"", 1).await;
    for args in [
        &["lease", "get", &id][..],
        &["lease", "keepalive", &id],
        &["lease", "revoke", &id],
        &["put", "svc/b", "up", "--lease", &id],
    ] {
        let err = fails(url, args, b"", 1).await;
        assert!(
            err.contains(&format!("lease {id} does not exist or has expired"))
                && err.contains("(404 lease_not_found)"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(server.client.get("svc/b").await.unwrap(), None);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keepalive_moves_the_deadline_of_its_keys() {
    let server = TestServer::start().await;
    let url = server.base.as_str();
    let lease = json(&ok(url, &["lease", "grant", "30s", "--json"], b"").await);
    let id = lease["lease"].as_str().unwrap();
    ok(url, &["put", "svc/a", "up", "--lease", id], b"").await;
    // Read once before the renewal, as a client polling the key would.
    let entry = json(&ok(url, &["get", "svc/a", "--json"], b"").await);
    assert_eq!(entry["expires_at"], lease["expires_at"]);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let renewed = json(&ok(url, &["lease", "keepalive", id, "--json"], b"").await);
    let entry = json(&ok(url, &["get", "svc/a", "--json"], b"").await);
    assert_eq!(
        entry["expires_at"], renewed["expires_at"],
        "get after the keepalive"
    );
    let page = json(&ok(url, &["list", "--json"], b"").await);
    assert_eq!(
        page["items"][0]["expires_at"], renewed["expires_at"],
        "list after the keepalive"
    );
    server.stop().await;
}

/// `kvstore lease keepalive ID --every 100ms` as a child, its stdout lines
/// coming through a channel; killed when dropped, so that a failed test
/// leaves no loop behind.
struct Keepalive {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Keepalive {
    fn start(url: &str, id: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kvstore"))
            .args(["lease", "keepalive", id, "--every", "100ms"])
            .env("KVSTORE_URL", url)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kvstore lease keepalive");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Keepalive { child, lines }
    }

    /// The next `n` lines of stdout, each within 10 s.
    fn next_lines(&self, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                self.lines
                    .recv_timeout(Duration::from_secs(10))
                    .unwrap_or_else(|err| panic!("line {i}: {err}"))
            })
            .collect()
    }

    /// Its exit code (`None` if it had not exited within 10 s, or was
    /// killed by a signal) and stderr.
    fn exit(&mut self) -> (Option<i32>, String) {
        let status = wait_child(&mut self.child, Duration::from_secs(10));
        if status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            std::io::Read::read_to_string(&mut pipe, &mut stderr).expect("read stderr");
        }
        (status.and_then(|status| status.code()), stderr)
    }
}

impl Drop for Keepalive {
    fn drop(&mut self) {
        // Nothing to do when it has exited: std does not signal a reaped child.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `f` on `keepalive` off the async runtime, so that the in-process
/// server keeps serving while it waits.
async fn blocking<T: Send + 'static>(
    mut keepalive: Keepalive,
    f: impl FnOnce(&mut Keepalive) -> T + Send + 'static,
) -> (Keepalive, T) {
    tokio::task::spawn_blocking(move || {
        let result = f(&mut keepalive);
        (keepalive, result)
    })
    .await
    .expect("join")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_every_renews_until_sigterm_or_the_lease_is_gone() {
    let server = TestServer::start().await;
    let url = server.base.as_str();
    let lease = server.client.grant_lease(3000).await.unwrap();
    let id = lease.lease.clone();

    let (keepalive, seen) = blocking(Keepalive::start(url, &id), |k| k.next_lines(3)).await;
    for line in &seen {
        assert!(
            line.starts_with(&format!("renewed lease {id}: ttl 3s, expires at ")),
            "{line}"
        );
    }
    // Alive past its first deadline, thanks to the renewals.
    sleep_past(
        time(&lease.expires_at.as_str().into()),
        Duration::from_secs(4),
    )
    .await;
    let alive = server.client.lease(lease_id(&id)).await.unwrap();
    assert!(alive.expires_at > lease.expires_at, "{alive:?}");

    send_signal(keepalive.child.id(), libc::SIGTERM).unwrap();
    let (_, (code, stderr)) = blocking(keepalive, Keepalive::exit).await;
    assert_eq!(code, Some(0), "{stderr}");

    // Revoked under it: the loop ends, exit 1, saying why.
    let (keepalive, _) = blocking(Keepalive::start(url, &id), |k| k.next_lines(1)).await;
    server.client.revoke_lease(lease_id(&id)).await.unwrap();
    let (_, (code, stderr)) = blocking(keepalive, Keepalive::exit).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("keepalive, after ")
            && stderr.contains(&format!("lease {id} does not exist or has expired")),
        "{stderr}"
    );
    server.stop().await;
}

fn lease_id(text: &str) -> LeaseId {
    u64::from_str_radix(text, 16).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_then_import_keeps_deadlines() {
    let source = TestServer::start().await;
    let from = source.base.as_str();
    ok(from, &["put", "ttl", "a", "--ttl", "1m"], b"").await;
    ok(from, &["put", "plain", "b"], b"").await;
    let lease = source.client.grant_lease(120_000).await.unwrap();
    ok(from, &["put", "leased", "c", "--lease", &lease.lease], b"").await;
    let mut before = Vec::new();
    for key in ["ttl", "leased"] {
        let entry = source.client.get(key).await.unwrap().unwrap();
        before.push(serde_json::to_value(entry).unwrap());
    }

    let dump = ok(from, &["export"], b"").await;
    let records: Vec<Value> = lines(&dump)
        .iter()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(records[0]["key"], "leased");
    assert_eq!(records[0]["expires_at"], lease.expires_at.as_str());
    assert!(records[0].get("lease").is_none(), "leases are not dumped");
    assert!(records[1].get("expires_at").is_none(), "{}", records[1]);
    assert_eq!(records[2]["expires_at"], before[0]["expires_at"]);

    // And a key whose deadline passed since the dump.
    let mut input = dump.stdout.clone();
    input.extend_from_slice(
        b"{\"key\":\"gone\",\"value\":\"x\",\"expires_at\":\"2020-01-01T00:00:00Z\"}\n",
    );
    let target = TestServer::start().await;
    let to = target.base.as_str();
    let out = ok(to, &["import", "-"], &input).await;
    assert_eq!(
        text(&out.stdout),
        "imported 3 keys in 1 batch; skipped 1 key whose deadline had passed\n"
    );
    for (key, source_entry) in ["ttl", "leased"].iter().zip(&before) {
        let entry = json(&ok(to, &["get", key, "--json"], b"").await);
        let (was, now) = (
            time(&source_entry["expires_at"]),
            time(&entry["expires_at"]),
        );
        // The time left at the import, counted from the import's write: not
        // earlier, and later only by the time the batch took to apply.
        assert!(
            now >= was && now <= was + TimeDelta::seconds(5),
            "{key}: {now} for {was}"
        );
        assert!(entry.get("lease").is_none(), "{entry}");
    }
    assert!(
        target
            .client
            .get("plain")
            .await
            .unwrap()
            .unwrap()
            .expires_at
            .is_none()
    );
    assert_eq!(target.client.get("gone").await.unwrap(), None);
    let summary = json(&ok(to, &["import", "-", "--json"], &input).await);
    assert_eq!(
        summary,
        serde_json::json!({"imported": 3, "batches": 1, "skipped": 1})
    );
    for server in [source, target] {
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_puts_with_deadlines_and_names_a_missing_lease() {
    let server = TestServer::start().await;
    let client = &server.client;
    let mut watch = client.watch(WatchRequest {
        range: WatchRange::Prefix("c/".into()),
        from_revision: Some(1),
    });

    let before = Utc::now();
    client
        .put_with("c/raw", "1", Condition::Any, Expiry::Ttl(60_000))
        .await
        .unwrap();
    let body = PutBody {
        value: Some("2".into()),
        ttl_ms: Some(60_000),
        ..PutBody::default()
    };
    let answer = client
        .put_body("c/json", &body, Condition::Absent)
        .await
        .unwrap();
    assert!(answer.created);
    for key in ["c/raw", "c/json"] {
        let entry = client.get(key).await.unwrap().unwrap();
        let at = time(&Value::from(entry.expires_at.clone().unwrap()));
        assert_deadline(at, before, TimeDelta::seconds(60));
    }
    let err = client
        .put_body("c/json", &body, Condition::Absent)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Api { error, .. } if error.code == "version_mismatch"),
        "{err}"
    );

    let lease = client.grant_lease(60_000).await.unwrap();
    let id = lease_id(&lease.lease);
    client
        .put_with("c/leased", "3", Condition::Any, Expiry::Lease(id))
        .await
        .unwrap();
    client
        .put_with("c/leased", "4", Condition::Version(1), Expiry::Keep)
        .await
        .unwrap();
    let entry = client.get("c/leased").await.unwrap().unwrap();
    assert_eq!(
        (entry.value.as_deref(), entry.lease.as_deref()),
        (Some("4"), Some(lease.lease.as_str()))
    );
    assert_eq!(client.lease(id).await.unwrap().keys, Some(1));

    // The watch carries the deadlines of the puts.
    let mut puts = Vec::new();
    within(30, "the four puts in the watch", async {
        while puts.len() < 4 {
            match watch.next().await {
                Some(Ok(WatchMessage::Change(change))) => puts.extend(change.events),
                Some(Ok(WatchMessage::Progress { .. })) => {}
                other => panic!("the watch: {other:?}"),
            }
        }
    })
    .await;
    for event in &puts {
        let Event::Put {
            key,
            expires_at,
            lease: on_lease,
            ..
        } = event
        else {
            panic!("not a put: {event:?}");
        };
        assert!(expires_at.is_some(), "{event:?}");
        assert_eq!(
            on_lease.as_deref(),
            key.ends_with("leased").then_some(lease.lease.as_str()),
            "{event:?}"
        );
    }

    client.revoke_lease(id).await.unwrap();
    assert_eq!(client.get("c/leased").await.unwrap(), None);
    for err in [
        client.keep_lease_alive(id).await.unwrap_err(),
        client.lease(id).await.unwrap_err(),
        client.revoke_lease(id).await.unwrap_err(),
        client
            .put_with("c/other", "5", Condition::Any, Expiry::Lease(id))
            .await
            .unwrap_err(),
    ] {
        assert!(
            matches!(&err, ClientError::LeaseNotFound { message } if message.contains(&lease.lease)),
            "{err:?}"
        );
        assert!(!err.is_transient());
    }
    assert_eq!(client.get("c/other").await.unwrap(), None);
    server.stop().await;
}
