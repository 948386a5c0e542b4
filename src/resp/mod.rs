//! The Redis protocol (RESP2 and RESP3) on the same store as the HTTP API:
//! redis-cli, redis-benchmark and Redis client libraries work against
//! kvstore, with every acknowledged write synced, per-key versions and the
//! change history.
//!
//! - [`frame`]: the frame parser (arrays of bulk strings and inline
//!   commands) and the reply encoder for both protocol versions.
//! - [`commands`]: the commands, each mapped onto [`Store`] calls; the keys
//!   are the API's (UTF-8, no NUL, at most `--max-key-bytes`), so a key
//!   written with SET is the one `GET /v1/kv/{key}` reads, with its version,
//!   revision and deadline.
//! - [`keyspace`]: SCAN, KEYS, RANDOMKEY, RENAME, COPY, FLUSHDB and the
//!   string ranges, on kvstore's ordered keys.
//! - [`transaction`]: MULTI/EXEC/WATCH, as one conditional batch.
//! - [`versioned`]: kvstore's own `KV.*` commands: versions, revisions and
//!   writes conditional on a version.
//!
//! A connection reads what the client has sent, runs every complete command
//! in it in order, and sends all their replies in one write: pipelining
//! costs one write per read, and a read later in a pipeline sees the
//! writes before it. A reply to a write is sent only after the store has
//! made it durable, as on HTTP.

pub mod commands;
pub mod frame;
pub mod keyspace;
pub mod transaction;
pub mod versioned;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::api::Limits;
use crate::api::auth::{Auth, Rights};
use crate::server::Security;
use crate::storage::Store;
use frame::{CommandParser, FrameLimits, ProtocolError, Reply};

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longer idle timeouts (in effect none) are cut to this, so that a deadline
/// can always be computed.
const LONGEST_IDLE_TIMEOUT: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Writes of one pipeline handed to the store in one call, at most.
const MAX_PIPELINED_WRITES: usize = 1024;

/// How the RESP front door behaves.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct RespConfig {
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// A connection that sends nothing for this long is closed
    /// (`Duration::MAX`: never).
    pub idle_timeout: Duration,
    /// Most arguments of one command.
    pub max_args: usize,
    /// Most bytes a connection may have buffered without a complete command.
    pub max_buffered: usize,
    /// Whether every write is synced before its reply (what `CONFIG GET
    /// appendfsync` and `INFO` report: `always`, else `everysec`).
    pub fsync_every_write: bool,
    /// Whether FLUSHDB and FLUSHALL may delete every key
    /// (`--resp-allow-flush`); refused unless the operator chose it.
    pub allow_flush: bool,
    /// Threads that serve the RESP connections, in a runtime of their own
    /// (`--resp-threads`).
    pub threads: usize,
}

impl Default for RespConfig {
    /// 10,000 connections, 5 minutes idle, 1,048,576 arguments (Redis's
    /// limit is far higher; MSET of a million keys is already a lot),
    /// 64 MiB buffered, every write synced, FLUSHDB refused, one thread.
    fn default() -> Self {
        RespConfig {
            max_connections: 10_000,
            idle_timeout: Duration::from_secs(300),
            max_args: 1 << 20,
            max_buffered: 64 << 20,
            fsync_every_write: true,
            allow_flush: false,
            threads: 1,
        }
    }
}

/// What every connection shares.
pub(crate) struct Context {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) limits: Limits,
    pub(crate) auth: Option<Arc<Auth>>,
    pub(crate) config: RespConfig,
    pub(crate) started: Instant,
    pub(crate) connections: AtomicU64,
    next_id: AtomicU64,
    metrics: Arc<commands::CommandMetrics>,
}

impl Context {
    /// The same context over another store: a transaction's overlay.
    pub(crate) fn with_store(&self, store: Arc<dyn Store>) -> Context {
        Context {
            store,
            limits: self.limits,
            auth: self.auth.clone(),
            config: self.config,
            started: self.started,
            connections: AtomicU64::new(self.connections.load(Ordering::Relaxed)),
            next_id: AtomicU64::new(0),
            metrics: Arc::clone(&self.metrics),
        }
    }
}

/// One client's state.
pub(crate) struct Session {
    pub(crate) id: u64,
    /// 2 or 3, as HELLO chose.
    pub(crate) protocol: u8,
    /// What the client may do: everything with auth off; nothing before
    /// AUTH with auth on.
    pub(crate) rights: Option<Access>,
    pub(crate) name: Option<String>,
    pub(crate) addr: Option<SocketAddr>,
    /// QUIT was sent: reply, then close.
    pub(crate) quit: bool,
    /// The SCAN cursors this connection was given, each with where it
    /// resumes.
    pub(crate) cursors: keyspace::Cursors,
    /// MULTI's queue and WATCH's keys.
    pub(crate) transaction: transaction::Transaction,
}

/// The rights of an authenticated (or unauthenticated, with auth off) client.
#[derive(Debug, Clone)]
pub(crate) enum Access {
    Open,
    Token(Arc<Rights>),
}

/// The RESP front door running on its own thread (see [`start`]).
pub(crate) struct RespServer {
    stopped: Option<tokio::sync::oneshot::Receiver<()>>,
    /// Dropped (with the server) to let the runtime go, once the store is
    /// closed. The thread is not joined: a server dropped before its
    /// shutdown was sent (a task cancelled with its runtime) would wait for
    /// a [`serve`] that only the shutdown ends.
    _release: std::sync::mpsc::Sender<()>,
}

impl RespServer {
    /// Once [`serve`] has returned: every RESP connection has closed.
    pub(crate) async fn stopped(&mut self) {
        if let Some(stopped) = self.stopped.take() {
            let _ = stopped.await;
        }
    }
}

/// Starts [`serve`] on a runtime of its own with `config.threads` workers,
/// on a thread of its own. With one worker every RESP connection is served
/// by one thread, as Redis serves them: sharing the server's runtime, whose
/// workers are one per core, a commit's replies woke tasks on every worker
/// and each worker parked and woke again per commit group, which cost a SET
/// about 11% more CPU on two cores (see docs/resp.md). The runtime outlives
/// [`serve`] until the [`RespServer`] is dropped, after the store is closed:
/// connections the store opened from it (PostgreSQL's pool) are driven by it.
///
/// The runtime is built on its thread, which owns it from the start: a
/// runtime dropped where this is called, inside the server's own runtime,
/// would panic instead of returning the error.
///
/// # Errors
/// When the listener cannot be moved to the new runtime, the runtime cannot
/// be built, or the thread cannot start.
pub(crate) async fn start(
    listener: TcpListener,
    store: Arc<dyn Store>,
    limits: Limits,
    security: Security,
    config: RespConfig,
    shutdown: watch::Receiver<bool>,
    drain: Duration,
) -> io::Result<RespServer> {
    let listener = listener.into_std()?;
    let (started_tx, started) = tokio::sync::oneshot::channel::<io::Result<()>>();
    let (stopped_tx, stopped) = tokio::sync::oneshot::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("kvstore-resp".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(config.threads.max(1))
                .thread_name("kvstore-resp")
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => {
                    let _ = started_tx.send(Err(err));
                    return;
                }
            };
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => {
                        let _ = started_tx.send(Ok(()));
                        serve(listener, store, limits, &security, config, shutdown, drain).await;
                    }
                    Err(err) => {
                        let _ = started_tx.send(Err(err));
                    }
                }
            });
            let _ = stopped_tx.send(());
            let _ = released.recv();
            runtime.shutdown_timeout(Duration::from_secs(1));
        })?;
    started
        .await
        .unwrap_or_else(|_| Err(io::Error::other("the RESP thread ended before serving")))?;
    Ok(RespServer {
        stopped: Some(stopped),
        _release: release,
    })
}

/// Serves RESP on `listener` until `shutdown` turns true; then stops
/// accepting, lets each connection finish the commands it has read, and
/// returns once every connection has closed (or after `drain`).
pub(crate) async fn serve(
    listener: TcpListener,
    store: Arc<dyn Store>,
    limits: Limits,
    security: &Security,
    config: RespConfig,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let auth = security.auth.clone();
    let tls = security.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let context = Arc::new(Context {
        store,
        limits,
        auth,
        config,
        started: Instant::now(),
        connections: AtomicU64::new(0),
        next_id: AtomicU64::new(1),
        metrics: Arc::new(commands::CommandMetrics::new()),
    });
    let cap = config.max_connections.max(1);
    let slots = Arc::new(Semaphore::new(cap));
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = stopped(&mut shutdown) => break,
        };
        let (stream, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "RESP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(&mut shutdown) => break,
        };
        let _ = stream.set_nodelay(true);
        let context = Arc::clone(&context);
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            context.connections.fetch_add(1, Ordering::Relaxed);
            let served = match tls {
                None => connection(stream, addr, &context, shutdown).await,
                // Bounded, as HTTP's handshake is: a silent client holds a
                // slot for a while at most.
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => connection(stream, addr, &context, shutdown).await,
                        Ok(Err(err)) => Err(err),
                        Err(_) => Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "TLS handshake timed out",
                        )),
                    }
                }
            };
            if let Err(err) = served {
                tracing::debug!(error = %err, "RESP connection ended with an error");
            }
            context.connections.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    drop(listener);
    // Every slot back means every connection has closed.
    let all = u32::try_from(cap).unwrap_or(u32::MAX);
    if tokio::time::timeout(drain, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(timeout = ?drain, "RESP connections did not finish in time; closing anyway");
    }
}

/// Runs the writes a pipeline has gathered, in one call to the store, and
/// appends their replies in order.
async fn flush(
    context: &Context,
    writes: &mut Vec<commands::BlindWrite>,
    protocol: u8,
    output: &mut BytesMut,
) {
    if writes.is_empty() {
        return;
    }
    let started = Instant::now();
    let (ops, answers): (Vec<_>, Vec<_>) = writes
        .drain(..)
        .map(|write| (write.ops, (write.answer, write.label)))
        .unzip();
    // A lone write goes the way an HTTP write does: when nothing else is in
    // flight, the embedded engine commits it on this thread, without the
    // hand-off to its committer that a group takes.
    let outcomes = if ops.len() == 1 {
        let mut ops = ops;
        match ops.pop() {
            Some(only) => vec![context.store.write(only).await],
            None => Vec::new(),
        }
    } else {
        context.store.write_many(ops).await
    };
    let labels: Vec<&'static str> = answers.iter().map(|(_, label)| *label).collect();
    commands::count_blind(context, &labels, started.elapsed());
    for ((answer, _), outcome) in answers.into_iter().zip(outcomes) {
        answer.reply(outcome).encode(protocol, output);
    }
}

/// Once the server is shutting down (or its signal is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // The guard `wait_for` gives is not `Send`: dropped here, not held in a
    // `select!` across an await.
    let _ = shutdown.wait_for(|stop| *stop).await.map(|_| ());
}

async fn connection(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    addr: SocketAddr,
    context: &Context,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let mut session = Session {
        id: context.next_id.fetch_add(1, Ordering::Relaxed),
        protocol: 2,
        rights: context.auth.is_none().then_some(Access::Open),
        name: None,
        addr: Some(addr),
        quit: false,
        cursors: keyspace::Cursors::default(),
        transaction: transaction::Transaction::default(),
    };
    let mut parser = CommandParser::new(FrameLimits {
        // A key or a value: the larger of the two limits.
        max_bulk: context
            .limits
            .max_value_bytes
            .max(context.limits.max_key_bytes),
        max_args: context.config.max_args,
        max_inline: 64 << 10,
    });
    let mut input = BytesMut::with_capacity(16 << 10);
    let mut output = BytesMut::with_capacity(16 << 10);
    let mut writes = Vec::new();
    // One timer and one wait for the shutdown for the connection's life,
    // not one of each per read (about 3% of a GET's CPU): the timer fires
    // at most once per idle timeout, and is moved on if a read came since.
    let idle_timeout = context.config.idle_timeout.min(LONGEST_IDLE_TIMEOUT);
    let mut idle_since;
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);
    let stop = stopped(&mut shutdown);
    tokio::pin!(stop);
    loop {
        // Every complete command buffered, in order; their replies go out
        // together. A run of writes that need nothing read first goes to
        // the store in one call, to be committed under one sync.
        let failure = loop {
            match parser.next_command(&mut input) {
                Ok(Some(args)) => {
                    let label = commands::label_of(&args);
                    if let Some(write) = commands::blind_write(context, &session, label, &args) {
                        writes.push(write);
                        if writes.len() == MAX_PIPELINED_WRITES {
                            flush(context, &mut writes, session.protocol, &mut output).await;
                        }
                        continue;
                    }
                    flush(context, &mut writes, session.protocol, &mut output).await;
                    let reply = commands::execute(context, &mut session, label, args).await;
                    reply.encode(session.protocol, &mut output);
                    if session.quit {
                        break None;
                    }
                }
                Ok(None) => break None,
                Err(ProtocolError(why)) => break Some(why),
            }
        };
        flush(context, &mut writes, session.protocol, &mut output).await;
        if let Some(why) = &failure {
            Reply::Error(format!("ERR Protocol error: {why}"))
                .encode(session.protocol, &mut output);
        }
        if !output.is_empty() {
            stream.write_all(&output).await?;
            output.clear();
        }
        if failure.is_some() || session.quit {
            return Ok(());
        }
        if input.len() > context.config.max_buffered {
            Reply::Error("ERR Protocol error: too much data without a complete command".into())
                .encode(session.protocol, &mut output);
            stream.write_all(&output).await?;
            return Ok(());
        }
        idle_since = tokio::time::Instant::now();
        let read = loop {
            tokio::select! {
                // A client that never stops sending still sees the shutdown.
                biased;
                () = &mut stop => return Ok(()),
                read = stream.read_buf(&mut input) => break read,
                () = &mut idle => {
                    let deadline = idle_since + idle_timeout;
                    if tokio::time::Instant::now() >= deadline {
                        return Ok(());
                    }
                    idle.as_mut().reset(deadline);
                }
            }
        };
        match read {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(err) => return Err(err),
        }
    }
}
