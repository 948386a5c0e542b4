//! How to reach PostgreSQL.

use std::time::Duration;

use crate::error::{StoreError, StoreResult};
use crate::storage::History;

/// The keepalive idle time of a URL that does not set one.
const LIBPQ_KEEPALIVES_IDLE: Duration = Duration::from_secs(2 * 60 * 60);

/// How to reach PostgreSQL.
#[derive(Clone)]
#[non_exhaustive]
pub struct PostgresConfig {
    /// A libpq-style URL or key=value string; it may name several hosts
    /// (the nodes of a replicated cluster), of which kvstore uses the one
    /// that accepts writes.
    pub url: String,
    /// Connections the pool keeps at most.
    pub pool_size: usize,
    /// Longest wait for a new connection to one host, and for a free one
    /// from the pool.
    pub connect_timeout: Duration,
    /// Statements running longer are cancelled by the server.
    pub statement_timeout: Duration,
    /// The schema that holds kvstore's table and sequence (created if missing).
    pub schema: String,
    /// Send a notification for every write, for the caches of other servers
    /// (`--cache local`).
    pub notify: bool,
    /// How the connections name themselves in `pg_stat_activity`.
    pub application_name: String,
    /// How much change history to keep for watchers.
    pub history: History,
    /// What sits between kvstore and PostgreSQL.
    pub pooler: Pooler,
    /// A direct connection for LISTEN, needed behind a pooler in transaction
    /// mode (see [`Pooler::Transaction`]); `url` when unset.
    pub listen_url: Option<String>,
    /// Read replicas (streaming standbys of the primary), one URL each, that
    /// reads may opt into (see `replicas.rs`); none by default.
    pub replica_urls: Vec<String>,
}

named_enum! {
    /// What sits between kvstore and PostgreSQL, which decides how
    /// statements and settings are sent.
    pub enum Pooler ("pooler") {
        /// Nothing, or a pooler in session mode: a connection is one server
        /// session. Statements are prepared once per connection and kept,
        /// and the settings are startup options.
        None = "none",
        /// A pooler in transaction mode (PgBouncer's `pool_mode =
        /// transaction`), which hands the server connection to another
        /// client after each transaction: the next one may run on a session
        /// that knows none of the first one's prepared statements or
        /// settings, and a notification goes to whichever client holds the
        /// session that listened. Statements are unnamed (parsed and planned
        /// at each execution), every statement runs in a transaction that
        /// sets the settings with `SET LOCAL`, and LISTEN uses `listen_url`,
        /// which must then be set.
        Transaction = "transaction",
    }
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &redact(&self.url))
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("schema", &self.schema)
            .field("notify", &self.notify)
            .field("application_name", &self.application_name)
            .field("history", &self.history)
            .field("pooler", &self.pooler)
            .field("listen_url", &self.listen_url.as_deref().map(redact))
            .field(
                "replica_urls",
                &self
                    .replica_urls
                    .iter()
                    .map(|u| redact(u))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl PostgresConfig {
    /// Defaults: 16 connections, a 5 s connect timeout, a 30 s statement
    /// timeout, schema `public`, no notifications, the default history.
    pub fn new(url: impl Into<String>) -> Self {
        PostgresConfig {
            url: url.into(),
            pool_size: 16,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
            schema: "public".into(),
            notify: false,
            application_name: "kvstore".into(),
            history: History::default(),
            pooler: Pooler::None,
            listen_url: None,
            replica_urls: Vec::new(),
        }
    }

    /// The connection settings of every connection kvstore opens.
    pub(super) fn pg_config(&self) -> StoreResult<tokio_postgres::Config> {
        let mut config: tokio_postgres::Config = self
            .url
            .parse()
            .map_err(|e| StoreError::Unavailable(format!("bad PostgreSQL URL: {e}")))?;
        config.connect_timeout(self.connect_timeout);
        // A host whose machine died or whose network is cut answers nothing,
        // not even a reset: TCP gives up on it after about 10 s instead of
        // the kernel's 15 minutes. The URL may say otherwise.
        if config.get_keepalives_idle() == LIBPQ_KEEPALIVES_IDLE {
            config.keepalives_idle(Duration::from_secs(5));
        }
        if config.get_keepalives_interval().is_none() {
            config.keepalives_interval(Duration::from_secs(2));
        }
        if config.get_keepalives_retries().is_none() {
            config.keepalives_retries(3);
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(Duration::from_secs(10));
        }
        config.application_name(&self.application_name);
        // A pooler in transaction mode refuses startup options (PgBouncer
        // 1.18 does): there the settings are set in each transaction.
        if self.pooler == Pooler::None {
            let mut options = vec![config.get_options().unwrap_or_default().to_owned()];
            options.extend(
                self.settings()
                    .iter()
                    .map(|(name, value)| format!("-c {name}={value}")),
            );
            config.options(options.join(" ").trim_start());
        }
        Ok(config)
    }

    /// The connection settings of the connections to the replica at `url`:
    /// the primary's, but for the URL.
    pub(super) fn replica_config(&self, url: &str) -> StoreResult<tokio_postgres::Config> {
        PostgresConfig {
            url: url.to_owned(),
            ..self.clone()
        }
        .pg_config()
    }

    /// The connection settings of the connections that LISTEN: direct ones
    /// at `listen_url` when it is set.
    pub(super) fn listen_config(&self) -> StoreResult<tokio_postgres::Config> {
        match &self.listen_url {
            Some(url) => PostgresConfig {
                url: url.clone(),
                pooler: Pooler::None,
                listen_url: None,
                ..self.clone()
            }
            .pg_config(),
            None => self.pg_config(),
        }
    }

    /// The settings every statement runs with, as `SET LOCAL` statements
    /// for a pooler in transaction mode; `None` elsewhere, where they are
    /// the connection's startup options.
    pub(super) fn local_settings(&self) -> Option<String> {
        (self.pooler == Pooler::Transaction).then(|| {
            self.settings()
                .iter()
                .map(|(name, value)| format!("SET LOCAL {name} = {value}"))
                .collect::<Vec<_>>()
                .join("; ")
        })
    }

    /// The server settings kvstore runs with. Every statement is short:
    /// compiling one with JIT (which a poor estimate on a table not analyzed
    /// yet can trigger) costs far more than it runs.
    fn settings(&self) -> Vec<(&'static str, String)> {
        let mut settings = vec![("jit", "off".to_owned())];
        let timeout_ms = self.statement_timeout.as_millis();
        if timeout_ms > 0 {
            settings.push(("statement_timeout", timeout_ms.to_string()));
        }
        settings
    }

    /// The notification channel of this schema.
    pub fn channel(&self) -> String {
        format!("kvstore_{}", self.schema)
    }

    /// The channel on which a server that advanced the change feed's
    /// watermark tells the others to look.
    pub fn feed_channel(&self) -> String {
        format!("kvstore_feed_{}", self.schema)
    }
}

/// The URL without its password, for logs.
pub(super) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &credentials[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ if url.contains("password") => "(key=value settings)".to_owned(),
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact("postgres://kv:secret@db:5432/kv"),
            "postgres://kv:***@db:5432/kv"
        );
        assert_eq!(
            redact("postgres://postgres@127.0.0.1/test"),
            "postgres://postgres@127.0.0.1/test"
        );
    }

    #[test]
    fn behind_a_transaction_pooler_settings_are_local_and_listen_is_direct() {
        let mut config = PostgresConfig::new("postgres://kv@pooler/kv");
        let options = |c: &tokio_postgres::Config| c.get_options().map(str::to_owned);
        assert_eq!(
            options(&config.pg_config().unwrap()).as_deref(),
            Some("-c jit=off -c statement_timeout=30000")
        );
        assert_eq!(config.local_settings(), None);

        config.pooler = Pooler::Transaction;
        config.listen_url = Some("postgres://kv@db/kv".into());
        // PgBouncer 1.18 refuses the startup parameter `options`.
        assert_eq!(options(&config.pg_config().unwrap()), None);
        assert_eq!(
            config.local_settings().as_deref(),
            Some("SET LOCAL jit = off; SET LOCAL statement_timeout = 30000")
        );
        let listen = config.listen_config().unwrap();
        assert_eq!(
            listen.get_hosts(),
            [tokio_postgres::config::Host::Tcp("db".into())]
        );
        assert!(options(&listen).is_some_and(|o| o.contains("statement_timeout")));

        config.statement_timeout = Duration::ZERO;
        assert_eq!(
            config.local_settings().as_deref(),
            Some("SET LOCAL jit = off")
        );
    }
}
