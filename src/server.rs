//! The process lifecycle: accept connections, serve the API, drain on
//! shutdown, close the store.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use tokio::sync::Semaphore;

use crate::api::{self, AppState, Observe};
use crate::storage::Store;
use crate::telemetry::Metrics;

pub use crate::api::auth::{Auth, AuthError, TokenRules, token_sha256_hex};
pub use crate::api::{CursorKey, CursorKeyError, Limits};
pub use crate::resp::RespConfig;

/// How the HTTP server behaves.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Size limits of requests.
    pub limits: Limits,
    /// How long in-flight requests may take to finish after a shutdown signal.
    pub shutdown_timeout: Duration,
    /// A request still running after this is answered 503 `unavailable`.
    pub request_timeout: Duration,
    /// Requests slower than this are logged at WARN.
    pub slow_request: Duration,
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// Whether to record metrics and serve `GET /metrics`.
    pub metrics: bool,
    /// A client must send a request's headers (and, with TLS, finish its
    /// handshake) within this, or its connection is closed.
    pub header_read_timeout: Duration,
    /// Whether to serve the web console at `/ui/`.
    pub ui: bool,
}

/// Who may do what, and how connections are protected.
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct Security {
    /// Token rules; `None` turns auth off.
    pub auth: Option<Arc<Auth>>,
    /// Serve HTTPS with this configuration; `None` serves plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The secret of range cursors; `None` takes a random one, so cursors
    /// do not outlive the process.
    pub cursor_key: Option<CursorKey>,
}

impl Default for ServerConfig {
    /// 10 s to drain on shutdown, 30 s per request, slow above 10 ms,
    /// 10,000 connections, metrics on, 30 s to send headers, the console on.
    fn default() -> Self {
        ServerConfig {
            limits: Limits::default(),
            shutdown_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            slow_request: Duration::from_millis(10),
            max_connections: 10_000,
            metrics: true,
            header_read_timeout: Duration::from_secs(30),
            ui: true,
        }
    }
}

/// Serves the API on `listener` until `shutdown` completes, lets in-flight
/// requests finish (up to the configured deadline), then closes the store so
/// that everything acknowledged is synced.
///
/// # Errors
/// When closing the store fails: the last writes may not be durable.
pub async fn run(
    listener: TcpListener,
    store: Arc<dyn Store>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    run_secured(listener, store, config, Security::default(), shutdown).await
}

/// [`run`] with tokens, TLS and a cursor secret.
///
/// # Errors
/// As [`run`]; also when no random cursor secret can be made.
pub async fn run_secured(
    listener: TcpListener,
    store: Arc<dyn Store>,
    config: ServerConfig,
    security: Security,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    run_all(listener, None, store, config, security, shutdown).await
}

/// [`run_secured`], and the Redis protocol on `resp`'s listener too, on the
/// same store: its connections are drained with the HTTP ones before the
/// store is closed.
///
/// # Errors
/// When closing the store fails: the last writes may not be durable.
pub async fn run_all(
    listener: TcpListener,
    resp: Option<(TcpListener, RespConfig)>,
    store: Arc<dyn Store>,
    config: ServerConfig,
    security: Security,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    log_exposure(&listener, &security);
    // The RESP port takes the same tokens and TLS (it has no cursors).
    let resp_security = Security {
        cursor_key: None,
        auth: security.auth.clone(),
        tls: security.tls.clone(),
    };
    let cursor_key = match security.cursor_key {
        Some(key) => key,
        None => CursorKey::random().map_err(io::Error::other)?,
    };
    let metrics = if config.metrics {
        Some(Arc::new(Metrics::install().map_err(io::Error::other)?))
    } else {
        None
    };
    let (shutting_down, shutdown_seen) = tokio::sync::watch::channel(false);
    let mut resp = match resp {
        Some((resp_listener, resp_config)) => Some(
            crate::resp::start(
                resp_listener,
                Arc::clone(&store),
                config.limits,
                resp_security,
                resp_config,
                shutdown_seen.clone(),
                config.shutdown_timeout,
            )
            .await?,
        ),
        None => None,
    };
    let service = api::service(AppState {
        store: Arc::clone(&store),
        limits: config.limits,
        observe: Observe {
            request_timeout: config.request_timeout,
            slow_request: config.slow_request,
            metrics,
        },
        auth: security.auth.clone(),
        cursor_key,
        shutdown: shutdown_seen,
        ui: config.ui,
    });
    let tls = security.tls.map(tokio_rustls::TlsAcceptor::from);
    let connections = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout);
    let graceful = GracefulShutdown::new();

    tokio::pin!(shutdown);
    loop {
        // At the cap, stop accepting: new connections wait in the kernel's
        // backlog instead of taking memory and file descriptors here.
        let permit = tokio::select! {
            permit = Arc::clone(&connections).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Out of file descriptors and the like: back off briefly
                    // rather than spin, and keep serving the open connections.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Small answers must not wait for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        let (http, service, tls) = (http.clone(), service.clone(), tls.clone());
        let watcher = graceful.watcher();
        let handshake_timeout = config.header_read_timeout;
        tokio::spawn(async move {
            let served = match tls {
                None => {
                    watcher
                        .watch(http.serve_connection(TokioIo::new(stream), service))
                        .await
                }
                // The handshake runs here, not in the accept loop, and is
                // bounded, so a silent client holds one slot for a while at most.
                // Boxed: inline, rustls's state would make every plain
                // connection's task as large as a TLS one's.
                Some(acceptor) => {
                    Box::pin(async move {
                        match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await
                        {
                            Ok(Ok(stream)) => {
                                watcher
                                    .watch(http.serve_connection(TokioIo::new(stream), service))
                                    .await
                            }
                            Ok(Err(err)) => {
                                tracing::debug!(error = %err, "TLS handshake failed");
                                Ok(())
                            }
                            Err(_) => {
                                tracing::debug!("TLS handshake timed out");
                                Ok(())
                            }
                        }
                    })
                    .await
                }
            };
            if let Err(err) = served {
                tracing::debug!(error = %err, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!("shutting down: finishing in-flight requests");
    // Watch streams never finish by themselves.
    shutting_down.send_replace(true);
    if tokio::time::timeout(config.shutdown_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            timeout = ?config.shutdown_timeout,
            "in-flight requests did not finish in time; closing anyway"
        );
    }
    if let Some(resp) = &mut resp {
        resp.stopped().await;
    }
    let closed = store.close().await;
    // Its runtime goes only now: it drives what the store opened from it.
    drop(resp);
    closed.map_err(|err| io::Error::other(err.to_string()))?;
    tracing::info!("store closed; bye");
    Ok(())
}

/// Says at start who can reach the data: auth off (and a warning when that
/// is on an address other machines can reach), TLS or not.
fn log_exposure(listener: &TcpListener, security: &Security) {
    let loopback = listener.local_addr().is_ok_and(|a| a.ip().is_loopback());
    match &security.auth {
        None if loopback => {
            tracing::info!("auth is off: every client of this address may read and write every key")
        }
        None => tracing::warn!(
            "auth is off on an address other machines can reach: anyone who can connect may read and write every key; give --auth-file"
        ),
        Some(auth) => {
            tracing::info!(file = %auth.path().display(), "auth is on: requests need a bearer token")
        }
    }
    if security.tls.is_none() && !loopback {
        tracing::warn!(
            "TLS is off: tokens and data cross the network in clear text; give --tls-cert and --tls-key"
        );
    }
}
