//! `kvstore serve`: open the configured store and serve the API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use kvstore::server::Limits;
use kvstore::server::RespConfig;
use kvstore::server::{self, ServerConfig};
use kvstore::stack::{self, Stack, StackConfig};
use kvstore::storage::History;
use kvstore::storage::embedded::MinFree;
use kvstore::storage::embedded::{Durability, EmbeddedConfig};
use kvstore::storage::layer::cache::{CacheConfig, CacheMode};
use kvstore::storage::layer::redis_cache::RedisConfig;
use kvstore::storage::postgres::{Pooler, PostgresConfig};

/// Where the data lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Backend {
    /// The embedded engine (fjall) in --data-dir: one server.
    Embedded,
    /// PostgreSQL at --postgres-url: many servers on one database.
    Postgres,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Embedded => "embedded",
            Backend::Postgres => "postgres",
        })
    }
}

#[derive(clap::Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "KVSTORE_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Also serve the Redis protocol (RESP2 and RESP3) on this address, on
    /// the same store (off unless given; for example 127.0.0.1:6380).
    #[arg(long, env = "KVSTORE_RESP_LISTEN", value_name = "ADDR")]
    resp_listen: Option<SocketAddr>,
    /// Let RESP's FLUSHDB and FLUSHALL delete every key (refused without
    /// it: one mistyped command would empty the store).
    #[arg(long, env = "KVSTORE_RESP_ALLOW_FLUSH")]
    resp_allow_flush: bool,
    /// Close a RESP connection that sends nothing for this many seconds
    /// (0: never, as Redis's own default `timeout 0`).
    #[arg(long, env = "KVSTORE_RESP_IDLE_TIMEOUT_SECS", default_value_t = 300)]
    resp_idle_timeout_secs: u64,
    /// Threads that serve RESP connections, apart from HTTP's (1: every
    /// connection on one thread, as Redis serves them).
    #[arg(long, env = "KVSTORE_RESP_THREADS", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    resp_threads: u64,
    /// Storage backend.
    #[arg(long, env = "KVSTORE_BACKEND", value_enum, default_value_t = Backend::Embedded)]
    backend: Backend,
    /// PostgreSQL connection URL (libpq style), for --backend postgres.
    #[arg(
        long,
        env = "KVSTORE_POSTGRES_URL",
        required_if_eq("backend", "postgres")
    )]
    postgres_url: Option<String>,
    /// PostgreSQL connections this server keeps at most.
    #[arg(long, env = "KVSTORE_POSTGRES_POOL_SIZE", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    postgres_pool_size: u64,
    /// Milliseconds to wait for a new PostgreSQL connection to one host of
    /// the URL, or for one from the pool, before answering 503 unavailable.
    #[arg(long, env = "KVSTORE_POSTGRES_CONNECT_TIMEOUT_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    postgres_connect_timeout_ms: u64,
    /// Milliseconds a statement may run before PostgreSQL cancels it; 0 for
    /// no limit.
    #[arg(
        long,
        env = "KVSTORE_POSTGRES_STATEMENT_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    postgres_statement_timeout_ms: u64,
    /// What sits between this server and PostgreSQL: `none` (or a pooler in
    /// session mode), or `transaction`, a pooler in transaction mode such as
    /// PgBouncer's `pool_mode = transaction` (unnamed statements, settings
    /// set in each transaction; needs --postgres-listen-url).
    #[arg(long, env = "KVSTORE_POSTGRES_POOLER", default_value_t = Pooler::None,
          value_parser = modes::<Pooler>(Pooler::ALL.iter().map(|p| p.name())))]
    postgres_pooler: Pooler,
    /// A direct PostgreSQL URL for LISTEN (notifications do not pass a
    /// pooler in transaction mode); default: --postgres-url.
    #[arg(
        long,
        env = "KVSTORE_POSTGRES_LISTEN_URL",
        required_if_eq("postgres_pooler", "transaction")
    )]
    postgres_listen_url: Option<String>,
    /// A read replica (a streaming standby of the primary) that reads may
    /// opt into with `?consistency=replica`; repeat the flag for more. In
    /// the environment, a comma-separated list.
    #[arg(
        long = "postgres-replica-url",
        env = "KVSTORE_POSTGRES_REPLICA_URL",
        value_name = "URL",
        value_delimiter = ','
    )]
    postgres_replica_urls: Vec<String>,
    /// PostgreSQL schema of kvstore's table and sequence; created if missing.
    #[arg(long, env = "KVSTORE_POSTGRES_SCHEMA", default_value = "public")]
    postgres_schema: String,
    /// Directory of the embedded engine's data; created if missing.
    #[arg(long, env = "KVSTORE_DATA_DIR", default_value = "./kvstore-data")]
    data_dir: PathBuf,
    /// When a write is acknowledged: after its fsync, or once in the OS's
    /// buffers with a background sync every --sync-interval-ms.
    #[arg(long, env = "KVSTORE_DURABILITY", default_value_t = Durability::Fsync,
          value_parser = modes::<Durability>(Durability::ALL.iter().map(|d| d.name())))]
    durability: Durability,
    /// Free space to keep on the data directory's file system: a number of
    /// bytes, or a percentage of the file system (`5%`); writes are refused
    /// with 507 below it, and resume once space is freed. 0 turns the guard
    /// off. Default: 256 MiB or 10% of the file system, whichever is smaller.
    #[arg(long, env = "KVSTORE_MIN_FREE_BYTES")]
    min_free_bytes: Option<MinFree>,
    /// Bytes of memory for the embedded engine's cache of table blocks, which
    /// reads that miss the memtable go through.
    #[arg(long, env = "KVSTORE_BLOCK_CACHE_BYTES", default_value_t = EmbeddedConfig::new("").block_cache_bytes,
          value_parser = clap::value_parser!(u64).range(1..))]
    block_cache_bytes: u64,
    /// Background sync interval of buffered durability, in milliseconds.
    #[arg(long, env = "KVSTORE_SYNC_INTERVAL_MS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..))]
    sync_interval_ms: u64,
    /// Milliseconds without a write after which the embedded engine flushes
    /// its memtables of 1 MiB or more to tables, so that reads stop
    /// searching them; 0 leaves a memtable in memory until it is full.
    #[arg(long, env = "KVSTORE_FLUSH_WHEN_QUIET_MS",
          default_value_t = EmbeddedConfig::new("").flush_when_quiet.map_or(0, |quiet| quiet.as_millis() as u64))]
    flush_when_quiet_ms: u64,
    /// Change history kept for watchers, in revisions: a revision is kept
    /// while it is among the last this many, or younger than
    /// --watch-history-secs, whichever keeps more.
    #[arg(long, env = "KVSTORE_WATCH_HISTORY_REVISIONS", default_value_t = History::default().revisions)]
    watch_history_revisions: u64,
    /// Change history kept for watchers, in seconds (see
    /// --watch-history-revisions).
    #[arg(long, env = "KVSTORE_WATCH_HISTORY_SECS", default_value_t = History::default().age.as_secs())]
    watch_history_secs: u64,
    /// Longest key, in bytes.
    #[arg(long, env = "KVSTORE_MAX_KEY_BYTES", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..=65_536))]
    max_key_bytes: u64,
    /// Largest value, in bytes (counted after base64 decoding).
    #[arg(long, env = "KVSTORE_MAX_VALUE_BYTES", default_value_t = 1 << 20)]
    max_value_bytes: usize,
    /// Largest request body, in bytes.
    #[arg(long, env = "KVSTORE_MAX_BODY_BYTES", default_value_t = 16 << 20)]
    max_body_bytes: usize,
    /// Seconds that in-flight requests get to finish after SIGINT or SIGTERM.
    #[arg(long, env = "KVSTORE_SHUTDOWN_TIMEOUT_SECS", default_value_t = 10)]
    shutdown_timeout_secs: u64,
    /// Read cache in front of storage: `local` (in this process), `redis`
    /// (shared by every server, at --redis-url) or `off`. Default: `local`
    /// on the embedded engine, `off` on PostgreSQL (where `local` may serve
    /// another server's writes late by the notification delay).
    #[arg(long, env = "KVSTORE_CACHE", value_parser = modes::<CacheMode>(CacheMode::ALL.iter().map(|c| c.name())))]
    cache: Option<CacheMode>,
    /// Redis URL of the shared cache, for --cache redis.
    #[arg(long, env = "KVSTORE_REDIS_URL", required_if_eq("cache", "redis"))]
    redis_url: Option<String>,
    /// Milliseconds to wait for Redis before a read goes to storage.
    #[arg(long, env = "KVSTORE_REDIS_TIMEOUT_MS", default_value_t = 250,
          value_parser = clap::value_parser!(u64).range(1..))]
    redis_timeout_ms: u64,
    /// Prefix of every Redis key, so that deployments can share a Redis.
    #[arg(long, env = "KVSTORE_REDIS_PREFIX", default_value = "kvstore:")]
    redis_prefix: String,
    /// Entries the cache holds at most ("absent" markers included).
    #[arg(long, env = "KVSTORE_CACHE_MAX_ENTRIES", default_value_t = 1_000_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    cache_max_entries: u64,
    /// Bytes the cache holds at most (keys, values and per-entry overhead).
    #[arg(long, env = "KVSTORE_CACHE_MAX_BYTES", default_value_t = 256 << 20,
          value_parser = clap::value_parser!(u64).range(1..))]
    cache_max_bytes: u64,
    /// Seconds an entry may be served from the cache; 0 keeps entries until
    /// they are replaced or evicted.
    #[arg(long, env = "KVSTORE_CACHE_TTL_SECS", default_value_t = 300)]
    cache_ttl_secs: u64,
    /// Values larger than this many bytes are not cached.
    #[arg(long, env = "KVSTORE_CACHE_MAX_VALUE_BYTES", default_value_t = CacheConfig::default().max_value_bytes)]
    cache_max_value_bytes: usize,
    /// Seconds a request may run before it is answered 503 unavailable.
    #[arg(long, env = "KVSTORE_REQUEST_TIMEOUT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    request_timeout_secs: u64,
    /// Requests slower than this many milliseconds are logged at WARN, with
    /// where the time went.
    #[arg(long, env = "KVSTORE_SLOW_MS", default_value_t = 10)]
    slow_ms: u64,
    /// Connections served at once; more wait in the listen backlog.
    #[arg(long, env = "KVSTORE_MAX_CONNECTIONS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: u64,
    /// Record Prometheus metrics and serve them at GET /metrics.
    #[arg(long, env = "KVSTORE_METRICS", default_value_t = true, action = clap::ArgAction::Set)]
    metrics: bool,
    /// Serve the web console at /ui/ (static files inside the binary; its
    /// API calls need a token like any client's).
    #[arg(long, env = "KVSTORE_UI", default_value_t = true, action = clap::ArgAction::Set)]
    ui: bool,
    #[command(flatten)]
    security: super::security::SecurityArgs,
}

/// A flag that takes one of a library type's names (which its `FromStr`
/// reads): clap lists them in the help and refuses any other.
fn modes<T>(
    names: impl IntoIterator<Item = &'static str>,
) -> impl clap::builder::TypedValueParser<Value = T>
where
    T: std::str::FromStr<Err = kvstore::InvalidValue> + Clone + Send + Sync + 'static,
{
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(names).try_map(|name: String| name.parse::<T>())
}

/// Runs the server until SIGINT or SIGTERM.
pub(crate) async fn run(args: ServeArgs) -> Result<(), String> {
    let mut limits = Limits::default();
    limits.max_key_bytes = usize::try_from(args.max_key_bytes).map_err(|e| e.to_string())?;
    limits.max_value_bytes = args.max_value_bytes;
    limits.max_body_bytes = args.max_body_bytes;
    if args.backend == Backend::Postgres && !args.security.has_cursor_secret() {
        // Each server would make its own secret in its data directory, and
        // a client behind a load balancer would see its cursors refused.
        return Err(
            "--backend postgres needs the cursor secret that every server of the \
                    deployment shares: set KVSTORE_CURSOR_SECRET or --cursor-secret-file"
                .into(),
        );
    }
    let history = History {
        revisions: args.watch_history_revisions,
        age: Duration::from_secs(args.watch_history_secs),
    };
    let backend = match args.backend {
        Backend::Embedded => {
            let mut engine = EmbeddedConfig::new(&args.data_dir);
            engine.durability = args.durability;
            engine.sync_interval = Duration::from_millis(args.sync_interval_ms);
            engine.min_free = args.min_free_bytes.unwrap_or_default();
            engine.block_cache_bytes = args.block_cache_bytes;
            engine.flush_when_quiet = (args.flush_when_quiet_ms > 0)
                .then(|| Duration::from_millis(args.flush_when_quiet_ms));
            engine.history = history;
            stack::Backend::Embedded(engine)
        }
        Backend::Postgres => {
            let url = args
                .postgres_url
                .clone()
                .ok_or("--backend postgres needs --postgres-url")?;
            let mut config = PostgresConfig::new(url);
            config.pool_size =
                usize::try_from(args.postgres_pool_size).map_err(|e| e.to_string())?;
            config.connect_timeout = Duration::from_millis(args.postgres_connect_timeout_ms);
            config.statement_timeout = Duration::from_millis(args.postgres_statement_timeout_ms);
            config.schema.clone_from(&args.postgres_schema);
            config.pooler = args.postgres_pooler;
            config.listen_url.clone_from(&args.postgres_listen_url);
            config.replica_urls.clone_from(&args.postgres_replica_urls);
            config.history = history;
            stack::Backend::Postgres(config)
        }
    };
    let mut stack_config = StackConfig::new(backend);
    let layers = &mut stack_config.layers;
    if let Some(cache) = args.cache {
        layers.cache = cache;
    }
    let cache_mode = layers.cache;
    let mut cache = CacheConfig::default();
    cache.max_entries = usize::try_from(args.cache_max_entries).map_err(|e| e.to_string())?;
    cache.max_bytes = args.cache_max_bytes;
    cache.ttl = (args.cache_ttl_secs > 0).then(|| Duration::from_secs(args.cache_ttl_secs));
    cache.max_value_bytes = args.cache_max_value_bytes;
    layers.cache_config = cache;
    layers.redis = args.redis_url.clone().map(|url| {
        let mut redis = RedisConfig::new(url);
        redis.prefix.clone_from(&args.redis_prefix);
        redis.ttl = cache.ttl.unwrap_or(Duration::from_secs(86_400));
        redis.timeout = Duration::from_millis(args.redis_timeout_ms);
        redis.max_value_bytes = cache.max_value_bytes;
        redis
    });
    let request_timeout = Duration::from_secs(args.request_timeout_secs);
    layers.request_timeout = request_timeout;
    layers.metrics = args.metrics;
    let store = Stack::build(stack_config)
        .await
        .map_err(|e| e.to_string())?
        .store;
    let security = args.security.load(&args.data_dir)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let address = listener.local_addr().map_err(|e| e.to_string())?;
    let mut config = ServerConfig::default();
    config.limits = limits;
    config.shutdown_timeout = Duration::from_secs(args.shutdown_timeout_secs);
    config.request_timeout = request_timeout;
    config.slow_request = Duration::from_millis(args.slow_ms);
    config.max_connections = usize::try_from(args.max_connections).map_err(|e| e.to_string())?;
    config.metrics = args.metrics;
    config.header_read_timeout = args.security.header_read_timeout();
    config.ui = args.ui;
    let resp = match args.resp_listen {
        None => None,
        Some(address) => {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .map_err(|e| format!("cannot listen on {address} for RESP: {e}"))?;
            let address = listener.local_addr().map_err(|e| e.to_string())?;
            tracing::info!(%address, "kvstore RESP listening");
            let mut resp_config = RespConfig::default();
            resp_config.max_connections = config.max_connections;
            // PostgreSQL's commits are durable before they are answered.
            resp_config.fsync_every_write =
                args.backend == Backend::Postgres || args.durability == Durability::Fsync;
            resp_config.allow_flush = args.resp_allow_flush;
            resp_config.threads = usize::try_from(args.resp_threads).map_err(|e| e.to_string())?;
            resp_config.idle_timeout = match args.resp_idle_timeout_secs {
                0 => Duration::MAX,
                secs => Duration::from_secs(secs),
            };
            Some((listener, resp_config))
        }
    };
    let stop = super::stop_signal();
    // Logged once every listener is bound (the RESP one too) and the signals
    // are handled: scripts and tests wait for this line before they connect
    // or signal.
    match args.backend {
        Backend::Embedded => tracing::info!(
            %address,
            engine = "embedded (fjall)",
            data_dir = %args.data_dir.display(),
            durability = %args.durability,
            min_free = %args.min_free_bytes.unwrap_or_default(),
            cache = %cache_mode,
            tls = security.tls.is_some(),
            "kvstore listening"
        ),
        Backend::Postgres => tracing::info!(
            %address,
            engine = %store.describe(),
            cache = %cache_mode,
            tls = security.tls.is_some(),
            "kvstore listening"
        ),
    }
    server::run_all(listener, resp, store, config, security, stop)
        .await
        .map_err(|e| format!("shutdown: {e}"))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::ServeArgs;

    #[derive(Parser)]
    struct Serve {
        #[command(flatten)]
        args: ServeArgs,
    }

    #[test]
    fn replica_urls_repeat_and_split_on_commas() {
        let parsed = Serve::try_parse_from([
            "serve",
            "--postgres-replica-url",
            "postgres://kv@db2/kv",
            "--postgres-replica-url",
            "postgres://kv@db3/kv,postgres://kv@db4/kv",
        ])
        .unwrap();
        assert_eq!(
            parsed.args.postgres_replica_urls,
            [
                "postgres://kv@db2/kv",
                "postgres://kv@db3/kv",
                "postgres://kv@db4/kv"
            ]
        );
        let none = Serve::try_parse_from(["serve"]).unwrap();
        assert!(none.args.postgres_replica_urls.is_empty());
    }

    #[test]
    fn the_block_cache_defaults_to_the_engines_and_cannot_be_zero() {
        let default = Serve::try_parse_from(["serve"]).unwrap();
        assert_eq!(default.args.block_cache_bytes, 32 << 20);
        let set = Serve::try_parse_from(["serve", "--block-cache-bytes", "1073741824"]).unwrap();
        assert_eq!(set.args.block_cache_bytes, 1 << 30);
        assert!(Serve::try_parse_from(["serve", "--block-cache-bytes", "0"]).is_err());
    }

    #[test]
    fn memtables_are_flushed_after_the_engines_quiet_spell_unless_zero() {
        let default = Serve::try_parse_from(["serve"]).unwrap();
        assert_eq!(default.args.flush_when_quiet_ms, 2000);
        let off = Serve::try_parse_from(["serve", "--flush-when-quiet-ms", "0"]).unwrap();
        assert_eq!(off.args.flush_when_quiet_ms, 0);
    }
}
