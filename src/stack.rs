//! The store that `kvstore serve` serves, built in one place: the engine,
//! then the guard (the storage timeout and latency histograms), then the read
//! cache, and the parts one backend needs (PostgreSQL's invalidation listener
//! behind a local cache, the Redis cache's repair task). The server and the
//! tests build it here, so that the tests run what the server runs.
//!
//! ```text
//!   cache (CachedStore | RedisCachedStore | none)
//!     └─ guard (GuardedStore)
//!          └─ engine (EmbeddedStore | PostgresStore)
//! ```

use std::sync::Arc;
use std::time::Duration;

use crate::error::StoreError;
use crate::storage::Store;
use crate::storage::embedded::{EmbeddedConfig, EmbeddedStore};
use crate::storage::layer::cache::{CacheConfig, CacheMode, CachedStore};
use crate::storage::layer::guard::GuardedStore;
use crate::storage::layer::redis_cache::{BadRedisUrl, RedisCachedStore, RedisConfig};
use crate::storage::postgres::{Invalidation, PostgresConfig, PostgresStore};

/// Where the data lives.
#[derive(Clone)]
pub enum Backend {
    /// The embedded engine: one server.
    Embedded(EmbeddedConfig),
    /// PostgreSQL: many servers on one database.
    Postgres(PostgresConfig),
}

/// The engine and the layers over it.
#[derive(Clone)]
#[non_exhaustive]
pub struct StackConfig {
    /// Where the data lives.
    pub backend: Backend,
    /// The layers over the engine.
    pub layers: Layers,
}

impl StackConfig {
    /// The default stack on `backend`: a local cache on the embedded engine,
    /// none on PostgreSQL (where a local cache may serve another server's
    /// writes late by the notification delay); see [`Layers::new`].
    pub fn new(backend: Backend) -> Self {
        let cache = match backend {
            Backend::Embedded(_) => CacheMode::Local,
            Backend::Postgres(_) => CacheMode::Off,
        };
        StackConfig {
            backend,
            layers: Layers::new(cache),
        }
    }
}

/// Everything between the HTTP layer and the engine.
#[derive(Clone)]
#[non_exhaustive]
pub struct Layers {
    /// The read cache: off, in this process, or shared in Redis.
    pub cache: CacheMode,
    /// Bounds of a local cache.
    pub cache_config: CacheConfig,
    /// The shared cache, for [`CacheMode::Redis`].
    pub redis: Option<RedisConfig>,
    /// How long a storage call may take before it is answered 503.
    pub request_timeout: Duration,
    /// Record storage latencies in the metrics.
    pub metrics: bool,
}

impl Layers {
    /// `cache`, with the default bounds, a 30 s storage timeout and metrics on.
    pub fn new(cache: CacheMode) -> Self {
        Layers {
            cache,
            cache_config: CacheConfig::default(),
            redis: None,
            request_timeout: Duration::from_secs(30),
            metrics: true,
        }
    }
}

/// Why the stack could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StackError {
    /// The embedded engine did not open its data directory.
    #[error("cannot open {path}: {source}")]
    Embedded {
        /// The data directory.
        path: String,
        /// Why it did not open.
        #[source]
        source: StoreError,
    },
    /// PostgreSQL could not be reached or its schema made.
    #[error("cannot open PostgreSQL: {0}")]
    Postgres(#[source] StoreError),
    /// The Redis cache was asked for without a URL.
    #[error("--cache redis needs a Redis URL")]
    NoRedisUrl,
    /// The Redis cache's URL is not a Redis URL.
    #[error("the Redis cache: {0}")]
    Redis(#[source] BadRedisUrl),
    /// The listener of PostgreSQL's invalidations did not start.
    #[error("listening for PostgreSQL's invalidations: {0}")]
    Listen(#[source] StoreError),
}

/// The built stack.
pub struct Stack {
    /// What the API serves: the engine under the guard and the cache.
    pub store: Arc<dyn Store>,
    /// The engine alone.
    pub engine: Arc<dyn Store>,
}

impl Stack {
    /// Opens the engine `config` names and builds the layers over it.
    ///
    /// # Errors
    /// When the engine cannot be opened, or the cache cannot be set up.
    pub async fn build(config: StackConfig) -> Result<Stack, StackError> {
        let engine = Engine::open(&config).await?;
        Self::over(engine, &config.layers)
    }

    /// Builds `layers` over an engine that is already open (a test's store
    /// with hooks, say).
    ///
    /// # Errors
    /// When the cache cannot be set up.
    pub fn over_store(store: Arc<dyn Store>, layers: &Layers) -> Result<Stack, StackError> {
        let engine = Engine {
            store,
            postgres: None,
        };
        Self::over(engine, layers)
    }

    fn over(engine: Engine, config: &Layers) -> Result<Stack, StackError> {
        let guarded: Arc<dyn Store> = Arc::new(GuardedStore::new(
            engine.store.clone(),
            config.request_timeout,
            config.metrics,
        ));
        let store: Arc<dyn Store> = match config.cache {
            CacheMode::Off => guarded,
            CacheMode::Local => match &engine.postgres {
                None => Arc::new(CachedStore::new(guarded, config.cache_config)),
                Some(postgres) => local_cache_over_postgres(guarded, postgres, config)?,
            },
            CacheMode::Redis => {
                let mut redis = config.redis.clone().ok_or(StackError::NoRedisUrl)?;
                if let Some(postgres) = &engine.postgres {
                    // Deployments on other schemas of one database may share
                    // a Redis: their keys must not meet.
                    redis.prefix = format!("{}{}:", redis.prefix, postgres.schema());
                }
                let cached =
                    Arc::new(RedisCachedStore::new(guarded, redis).map_err(StackError::Redis)?);
                cached.spawn_repair();
                cached
            }
        };
        Ok(Stack {
            store,
            engine: engine.store,
        })
    }
}

/// An open engine, with its concrete type for what only it offers.
struct Engine {
    store: Arc<dyn Store>,
    postgres: Option<Arc<PostgresStore>>,
}

impl Engine {
    async fn open(config: &StackConfig) -> Result<Engine, StackError> {
        match &config.backend {
            Backend::Embedded(embedded) => {
                let embedded = embedded.clone();
                let path = embedded.path.display().to_string();
                // Opening replays the journal: blocking work.
                let opened = tokio::task::spawn_blocking(move || EmbeddedStore::open(embedded))
                    .await
                    .map_err(|e| StoreError::Internal(format!("opening the store: {e}")))
                    .and_then(|opened| opened)
                    .map_err(|source| StackError::Embedded { path, source })?;
                Ok(Engine {
                    store: Arc::new(opened),
                    postgres: None,
                })
            }
            Backend::Postgres(postgres) => {
                let mut postgres = postgres.clone();
                // Only a local cache needs to hear of other servers' writes.
                postgres.notify = config.layers.cache == CacheMode::Local;
                let store = Arc::new(
                    PostgresStore::open(postgres)
                        .await
                        .map_err(StackError::Postgres)?,
                );
                Ok(Engine {
                    store: store.clone(),
                    postgres: Some(store),
                })
            }
        }
    }
}

/// A local cache kept coherent with the other servers' writes through
/// PostgreSQL's LISTEN/NOTIFY.
fn local_cache_over_postgres(
    guarded: Arc<dyn Store>,
    postgres: &PostgresStore,
    config: &Layers,
) -> Result<Arc<dyn Store>, StackError> {
    let cached = Arc::new(
        CachedStore::new(guarded, config.cache_config)
            .with_coherence(", kept coherent through LISTEN/NOTIFY"),
    );
    // Until the first LISTEN is in place, other servers' writes would be
    // missed.
    cached.set_bypass(true);
    let weak = Arc::downgrade(&cached);
    postgres
        .listen(Arc::new(move |event| {
            if let Some(cache) = weak.upgrade() {
                apply_invalidation(&cache, event);
            }
        }))
        .map_err(StackError::Listen)?;
    tracing::warn!(
        "--cache local on PostgreSQL: after a write on another server, this server may serve the \
         previous value until the notification arrives (milliseconds; see docs/postgres.md). \
         Use --cache off or --cache redis to read every acknowledged write on every server"
    );
    Ok(cached)
}

/// Applies what the notification listener reports to the local cache.
fn apply_invalidation(cache: &CachedStore, event: Invalidation) {
    match event {
        Invalidation::Keys {
            revision,
            written_at_us,
            keys,
        } => {
            for key in &keys {
                cache.invalidate(key, revision);
            }
            let now_us = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
            let delay = (now_us - written_at_us).max(0) as f64 / 1e6;
            metrics::histogram!("kvstore_cache_invalidation_delay_seconds").record(delay);
        }
        Invalidation::Lost => cache.set_bypass(true),
        Invalidation::Resumed => cache.set_bypass(false),
    }
}
