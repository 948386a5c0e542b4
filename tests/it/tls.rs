//! HTTPS with rustls: a CA and a server certificate made at test time
//! (rcgen), a client that trusts the CA through --ca-cert, and the ways a
//! connection must fail: an unknown CA, plain HTTP to the TLS port, a client
//! that never finishes its handshake.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

use crate::harness::{Binary, TestServer, output_within, within};
use kvstore::client::{Client, ClientError, ClientOptions};
use kvstore::server::{Security, ServerConfig};
use kvstore::storage::Condition;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// PEM texts of a test CA, and of a certificate and key it signed for
/// 127.0.0.1 and localhost.
pub(crate) struct Pki {
    pub(crate) ca: String,
    pub(crate) cert: String,
    pub(crate) key: String,
}

pub(crate) fn make_pki() -> Pki {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "kvstore test CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("server key");
    let params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .expect("server params");
    let cert = params.signed_by(&key, &issuer).expect("server certificate");
    Pki {
        ca: ca.pem(),
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

pub(crate) fn tls_security(pki: &Pki) -> Security {
    let mut security = Security::default();
    security.tls = Some(
        kvstore::tls::server_config_from_pem(pki.cert.as_bytes(), pki.key.as_bytes())
            .expect("TLS config"),
    );
    security
}

fn trusting(pki: &Pki) -> ClientOptions {
    let mut options = ClientOptions::default();
    options.ca_cert_pem = Some(pki.ca.as_bytes().to_vec());
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trusting_the_ca_talks_https() {
    let pki = make_pki();
    let server =
        TestServer::start_secured(ServerConfig::default(), tls_security(&pki), &trusting(&pki))
            .await;
    assert!(server.base.starts_with("https://127.0.0.1:"));
    let put = server
        .client
        .put("k", "over tls", Condition::Any)
        .await
        .expect("put");
    assert!(put.created);
    let entry = server.client.get("k").await.expect("get").expect("entry");
    assert_eq!(entry.value.as_deref(), Some("over tls"));

    // A client that trusts another CA refuses the server.
    let other = make_pki();
    let stranger = Client::with_options(&server.base, &trusting(&other)).expect("client");
    let err = stranger.health().await.unwrap_err();
    assert!(matches!(err, ClientError::Transport(_)), "{err}");
    assert!(err.to_string().contains("certificate"), "{err}");

    // Plain HTTP to the TLS port fails cleanly, and the server goes on.
    let plain = Client::new(&format!("http://{}", server.addr)).expect("client");
    let err = plain.health().await.unwrap_err();
    assert!(matches!(err, ClientError::Transport(_)), "{err}");
    assert!(server.client.health().await.is_ok());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_dropped_after_the_handshake_timeout() {
    let pki = make_pki();
    let mut config = ServerConfig::default();
    config.header_read_timeout = Duration::from_millis(500);
    config.max_connections = 1;
    let server = TestServer::start_secured(config, tls_security(&pki), &trusting(&pki)).await;
    let addr = server.addr;
    let elapsed = within(
        60,
        "the silent client",
        tokio::task::spawn_blocking(move || {
            let start = std::time::Instant::now();
            let mut silent = TcpStream::connect(addr).expect("connect");
            silent
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut buf = [0u8; 64];
            // Closed by the server: end of stream or a reset.
            assert!(matches!(silent.read(&mut buf), Ok(0) | Err(_)));
            let _ = silent.write_all(b"late");
            start.elapsed()
        }),
    )
    .await
    .unwrap();
    assert!(
        elapsed >= Duration::from_millis(400) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
    // Its slot (the only one) is free again.
    assert!(server.client.health().await.is_ok());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_https_and_the_cli_trusts_ca_cert() {
    let pki = make_pki();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca) = (
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
        dir.path().join("ca.pem"),
    );
    std::fs::write(&cert, &pki.cert).unwrap();
    std::fs::write(&key, &pki.key).unwrap();
    std::fs::write(&ca, &pki.ca).unwrap();
    let mut server = Binary::start(
        &dir.path().join("data"),
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let url = format!("https://{}", server.addr);
    let (put, get, untrusted) = within(
        200,
        "three CLI commands",
        tokio::task::spawn_blocking(move || {
            let run = |args: &[&str]| {
                let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kvstore"));
                command
                    .args(args)
                    .args(["--url", &url])
                    .env_remove("RUST_LOG")
                    .env_remove("KVSTORE_CA_CERT");
                output_within(&mut command, b"", Duration::from_secs(60))
            };
            let ca = ca.to_str().unwrap();
            (
                run(&["put", "k", "v", "--ca-cert", ca]),
                run(&["get", "k", "--ca-cert", ca]),
                run(&["get", "k"]),
            )
        }),
    )
    .await
    .unwrap();
    assert!(put.status.success(), "{put:?}");
    assert!(get.status.success(), "{get:?}");
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "v");
    // Without --ca-cert the system's roots (if any) do not know the test CA.
    assert!(
        matches!(untrusted.status.code(), Some(2 | 3)),
        "{untrusted:?}"
    );
    assert!(server.terminate());
}
