//! How to reach PostgreSQL.

use std::time::Duration;

use crate::error::{StoreError, StoreResult};
use crate::storage::History;

/// The keepalive idle time of a URL that does not set one.
const LIBPQ_KEEPALIVES_IDLE: Duration = Duration::from_secs(2 * 60 * 60);

/// How to reach PostgreSQL.
#[derive(Clone)]
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
        // Every statement is short: compiling one with JIT (which a poor
        // estimate on a table not analyzed yet can trigger) costs far more
        // than it runs.
        let mut options = vec![
            config.get_options().unwrap_or_default().to_owned(),
            "-c jit=off".to_owned(),
        ];
        let timeout_ms = self.statement_timeout.as_millis();
        if timeout_ms > 0 {
            options.push(format!("-c statement_timeout={timeout_ms}"));
        }
        config.options(options.join(" ").trim_start());
        Ok(config)
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
}
