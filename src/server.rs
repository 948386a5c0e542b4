//! The process lifecycle: accept connections, serve the router, drain on
//! shutdown, close the store.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use tokio::sync::Semaphore;

use crate::api::{self, AppState, Limits, Observe};
use crate::storage::Store;
use crate::telemetry::Metrics;

/// How the HTTP server behaves.
#[derive(Debug, Clone, Copy)]
pub struct ServerConfig {
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
}

impl Default for ServerConfig {
    /// 10 s to drain on shutdown, 30 s per request, slow above 10 ms,
    /// 10,000 connections, metrics on.
    fn default() -> Self {
        ServerConfig {
            limits: Limits::default(),
            shutdown_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            slow_request: Duration::from_millis(10),
            max_connections: 10_000,
            metrics: true,
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
    let metrics = if config.metrics {
        Some(Arc::new(Metrics::install().map_err(io::Error::other)?))
    } else {
        None
    };
    let router = api::router(AppState {
        store: Arc::clone(&store),
        limits: config.limits,
        observe: Observe {
            request_timeout: config.request_timeout,
            slow_request: config.slow_request,
            metrics,
        },
    });
    let connections = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let service = TowerToHyperService::new(router);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new());
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
        let connection = http.serve_connection(TokioIo::new(stream), service.clone());
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!("shutting down: finishing in-flight requests");
    if tokio::time::timeout(config.shutdown_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            timeout = ?config.shutdown_timeout,
            "in-flight requests did not finish in time; closing anyway"
        );
    }
    store
        .close()
        .await
        .map_err(|err| io::Error::other(err.to_string()))?;
    tracing::info!("store closed; bye");
    Ok(())
}
