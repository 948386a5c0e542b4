//! Connecting to the primary among the URL's hosts, and letting go of a host
//! that stopped answering.
//!
//! A URL may name every node of a replicated cluster
//! (`postgres://kv@db1:5432,db2:5432,db3:5432/kv`): each new connection tries
//! the hosts in turn and keeps the first that accepts writes (the
//! `target_session_attrs=read-write` check of libpq), so that after a
//! failover new connections reach the new primary. Two things differ from
//! libpq's loop, for a host that hangs instead of refusing (a frozen machine,
//! a cut network: its kernel, or a middlebox, may still accept the TCP
//! connection):
//!
//! - The connect timeout bounds the whole attempt on one host, the startup
//!   and the read-write check included, not only the TCP handshake; a host
//!   that ran out of time is tried last for a while, and given at most 1 s
//!   (a live server answers in milliseconds), so that connections reach a
//!   new primary as soon as it is promoted instead of waiting out the old
//!   one.
//! - The host that took the last connection is tried first, so a failover
//!   costs one timeout, not one per connection.
//!
//! A connection that hangs once established is noticed by the listening
//! connections' pings (see `notify.rs`), which then condemn its host: every
//! connection to it ends at once, failing the statements that wait on it
//! (503) instead of leaving them, and their pooled connections, stuck until
//! the host wakes up.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::config::{Host, TargetSessionAttrs};
use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::{Client, Config, Connection, NoTls, Socket};

use crate::error::{StoreError, StoreResult};

/// How long a host that ran out of time, or was condemned, is tried after
/// the others.
const SUSPECT_FOR: Duration = Duration::from_secs(30);
/// The longest attempt on a host under suspicion.
const SUSPECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Opens connections to whichever host of the URL accepts writes.
pub(super) struct Connector {
    hosts: Vec<Node>,
    /// The host that took the last connection: tried first.
    preferred: AtomicUsize,
    /// The longest attempt on one host.
    timeout: Duration,
}

/// One host of the URL.
struct Node {
    /// The URL's settings with only this host.
    config: Config,
    /// Bumped when the host stops answering: every connection to it ends.
    condemned: watch::Sender<u64>,
    /// When the host last ran out of time or was condemned.
    suspect_since: Mutex<Option<Instant>>,
}

/// A connection just opened, and where to.
pub(super) struct Opened {
    pub client: Client,
    pub connection: Connection<Socket, NoTlsStream>,
    /// The index of its host, to condemn it.
    pub host: usize,
    /// Changes when its host is condemned.
    pub condemned: watch::Receiver<u64>,
}

impl Connector {
    /// One attempt per host of `config`, each at most `timeout`; every
    /// session must accept writes.
    pub(super) fn new(config: &Config, timeout: Duration) -> StoreResult<Self> {
        Self::with_sessions(config, timeout, TargetSessionAttrs::ReadWrite)
    }

    /// One attempt per host of a read replica's `config`, each at most
    /// `timeout`: any session will do (a standby refuses writes, and one
    /// promoted since serves reads as well).
    pub(super) fn for_replica(config: &Config, timeout: Duration) -> StoreResult<Self> {
        Self::with_sessions(config, timeout, TargetSessionAttrs::Any)
    }

    fn with_sessions(
        config: &Config,
        timeout: Duration,
        sessions: TargetSessionAttrs,
    ) -> StoreResult<Self> {
        let count = config.get_hosts().len().max(config.get_hostaddrs().len());
        if count == 0 {
            return Err(StoreError::Unavailable(
                "bad PostgreSQL URL: it names no host".into(),
            ));
        }
        let hosts = (0..count)
            .map(|i| Node {
                config: only_host(config, i, sessions),
                condemned: watch::Sender::new(0),
                suspect_since: Mutex::new(None),
            })
            .collect();
        Ok(Connector {
            hosts,
            preferred: AtomicUsize::new(0),
            timeout,
        })
    }

    /// Connects to the first host that accepts writes: the one that took the
    /// last connection first, hosts under suspicion last.
    pub(super) async fn open(&self) -> Result<Opened, tokio_postgres::Error> {
        let mut last_error = None;
        for (host, suspect) in self.order() {
            let node = &self.hosts[host];
            let condemned = node.condemned.subscribe();
            let timeout = if suspect {
                self.timeout.min(SUSPECT_TIMEOUT)
            } else {
                self.timeout
            };
            match tokio::time::timeout(timeout, node.config.connect(NoTls)).await {
                Ok(Ok((client, connection))) => {
                    self.preferred.store(host, Ordering::Relaxed);
                    return Ok(Opened {
                        client,
                        connection,
                        host,
                        condemned,
                    });
                }
                Ok(Err(err)) => last_error = Some(err),
                Err(_) => {
                    tracing::warn!(host = %describe(&node.config), "PostgreSQL host did not answer in time; trying it last for a while");
                    self.suspect(host);
                    // The driver's own "timeout waiting for server" error
                    // (the constructor its blocking client uses): the pool
                    // wants a driver error, and this one says what happened.
                    last_error = Some(tokio_postgres::Error::__private_api_timeout());
                }
            }
        }
        Err(last_error.unwrap_or_else(tokio_postgres::Error::__private_api_timeout))
    }

    /// Ends every connection to `host`, which stopped answering.
    pub(super) fn condemn(&self, host: usize) {
        if let Some(node) = self.hosts.get(host) {
            tracing::warn!(host = %describe(&node.config), "PostgreSQL host stopped answering; dropping its connections");
            self.suspect(host);
            node.condemned.send_modify(|generation| *generation += 1);
        }
    }

    /// Ends every connection to every host.
    pub(super) fn condemn_all(&self) {
        for host in 0..self.hosts.len() {
            self.condemn(host);
        }
    }

    /// The hosts, `host:port` each, for logs and metrics.
    pub(super) fn describe_hosts(&self) -> String {
        self.hosts
            .iter()
            .map(|node| describe(&node.config))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn suspect(&self, host: usize) {
        if let Some(Ok(mut since)) = self.hosts.get(host).map(|n| n.suspect_since.lock()) {
            *since = Some(Instant::now());
        }
    }

    /// The hosts from the preferred one round, those under suspicion last;
    /// each with whether it is under suspicion.
    fn order(&self) -> Vec<(usize, bool)> {
        let count = self.hosts.len();
        let first = self.preferred.load(Ordering::Relaxed);
        let mut order: Vec<(usize, bool)> = (0..count)
            .map(|i| (first + i) % count)
            .map(|i| (i, self.is_suspect(i)))
            .collect();
        order.sort_by_key(|&(_, suspect)| suspect);
        order
    }

    fn is_suspect(&self, host: usize) -> bool {
        self.hosts[host]
            .suspect_since
            .lock()
            .ok()
            .and_then(|since| *since)
            .is_some_and(|since| since.elapsed() < SUSPECT_FOR)
    }
}

/// Runs a connection until it closes or its host is condemned (which drops
/// it, failing whatever waits on it).
pub(super) async fn drive(
    connection: Connection<Socket, NoTlsStream>,
    mut condemned: watch::Receiver<u64>,
) {
    tokio::select! {
        result = connection => {
            if let Err(err) = result {
                tracing::debug!(error = %err, "PostgreSQL connection ended");
            }
        }
        _ = condemned.changed() => {}
    }
}

/// The pool's way to connect: through the [`Connector`], each connection
/// driven until its host is condemned.
pub(super) struct PoolConnect(pub std::sync::Arc<Connector>);

impl deadpool_postgres::Connect for PoolConnect {
    fn connect(
        &self,
        _: &Config,
    ) -> BoxFuture<'_, Result<(Client, JoinHandle<()>), tokio_postgres::Error>> {
        Box::pin(async move {
            let opened = self.0.open().await?;
            let task = tokio::spawn(drive(opened.connection, opened.condemned));
            Ok((opened.client, task))
        })
    }
}

/// `config` with only its `i`th host (and that host's address and port).
fn only_host(config: &Config, i: usize, sessions: TargetSessionAttrs) -> Config {
    let mut one = Config::new();
    if let Some(user) = config.get_user() {
        one.user(user);
    }
    if let Some(password) = config.get_password() {
        one.password(password);
    }
    if let Some(dbname) = config.get_dbname() {
        one.dbname(dbname);
    }
    if let Some(options) = config.get_options() {
        one.options(options);
    }
    if let Some(name) = config.get_application_name() {
        one.application_name(name);
    }
    if let Some(timeout) = config.get_connect_timeout() {
        one.connect_timeout(*timeout);
    }
    if let Some(timeout) = config.get_tcp_user_timeout() {
        one.tcp_user_timeout(*timeout);
    }
    if let Some(interval) = config.get_keepalives_interval() {
        one.keepalives_interval(interval);
    }
    if let Some(retries) = config.get_keepalives_retries() {
        one.keepalives_retries(retries);
    }
    one.ssl_mode(config.get_ssl_mode())
        .ssl_negotiation(config.get_ssl_negotiation())
        .channel_binding(config.get_channel_binding())
        .keepalives(config.get_keepalives())
        .keepalives_idle(config.get_keepalives_idle())
        // Every connection to the primary writes, and its reads must see
        // every acknowledged write: only the primary will do there.
        .target_session_attrs(sessions);
    match config.get_hosts().get(i) {
        Some(Host::Tcp(host)) => {
            one.host(host);
        }
        Some(Host::Unix(path)) => {
            one.host_path(path);
        }
        None => {}
    }
    if let Some(addr) = config.get_hostaddrs().get(i) {
        one.hostaddr(*addr);
    }
    let ports = config.get_ports();
    if let Some(port) = ports.get(i).or_else(|| ports.first()) {
        one.port(*port);
    }
    one
}

/// `host:port` of a single-host config, for logs.
fn describe(config: &Config) -> String {
    let host = match (config.get_hostaddrs().first(), config.get_hosts().first()) {
        (Some(addr), _) => addr.to_string(),
        (None, Some(Host::Tcp(host))) => host.clone(),
        (None, Some(Host::Unix(path))) => path.display().to_string(),
        (None, None) => String::new(),
    };
    format!(
        "{host}:{}",
        config.get_ports().first().copied().unwrap_or(5432)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_host_keeps_the_settings_and_its_own_port() {
        let config: Config =
            "postgres://kv:pw@a:5433,b:5434,c:5435/db?connect_timeout=3&keepalives_idle=7"
                .parse()
                .unwrap();
        let connector = Connector::new(&config, Duration::from_secs(1)).unwrap();
        let described: Vec<String> = connector
            .hosts
            .iter()
            .map(|n| describe(&n.config))
            .collect();
        assert_eq!(described, ["a:5433", "b:5434", "c:5435"]);
        let second = &connector.hosts[1].config;
        assert_eq!(second.get_user(), Some("kv"));
        assert_eq!(second.get_password(), Some(&b"pw"[..]));
        assert_eq!(second.get_dbname(), Some("db"));
        assert_eq!(second.get_connect_timeout(), Some(&Duration::from_secs(3)));
        assert_eq!(second.get_keepalives_idle(), Duration::from_secs(7));
        assert_eq!(
            second.get_target_session_attrs(),
            TargetSessionAttrs::ReadWrite
        );
    }

    #[test]
    fn the_last_good_host_goes_first_and_suspects_last() {
        let config: Config = "host=a,b,c port=1,2,3".parse().unwrap();
        let connector = Connector::new(&config, Duration::from_secs(1)).unwrap();
        let hosts = |c: &Connector| c.order().into_iter().map(|(i, _)| i).collect::<Vec<_>>();
        assert_eq!(hosts(&connector), [0, 1, 2]);
        connector.preferred.store(1, Ordering::Relaxed);
        assert_eq!(hosts(&connector), [1, 2, 0]);
        connector.condemn(1);
        assert_eq!(connector.order(), [(2, false), (0, false), (1, true)]);
    }

    #[tokio::test]
    async fn a_host_that_accepts_but_never_answers_times_out() {
        // A listener that accepts connections and never reads: a frozen server.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let config: Config = format!("host=127.0.0.1 port={port} user=kv")
            .parse()
            .unwrap();
        let connector = Connector::new(&config, Duration::from_millis(200)).unwrap();
        let started = Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(5), connector.open())
            .await
            .unwrap();
        assert!(result.is_err());
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(connector.is_suspect(0));
        drop(listener);
    }
}
