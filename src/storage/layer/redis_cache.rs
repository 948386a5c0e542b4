//! A read cache in Redis, shared by every server of a PostgreSQL deployment.
//!
//! Every server reads the same cache, so the writer keeps it fresh for all of
//! them: once the store has applied a write, and before the write is
//! answered, the writer deletes the keys it wrote from Redis. A read that
//! misses fills the cache only through a lease:
//!
//! - the read that misses leaves a lease token in the key's place (in the
//!   same script that found it missing), reads the store, and then replaces
//!   the lease with the entry, only if its own lease is still there;
//! - a write's delete removes any lease, so a read that may have seen the
//!   store before the write cannot fill the cache after it;
//! - an eviction or expiry removes the lease too, and the fill is skipped.
//!
//! Deleting instead of writing the new entry keeps this safe whatever order
//! the deletes of concurrent writes reach Redis in; the next read fills it.
//!
//! Every cache key lives under a generation (`{prefix}gen`). When Redis cannot
//! be reached, reads go to the store, and a server that saw Redis fail starts
//! a new generation as soon as it reaches Redis again, before it uses the
//! cache again: that drops every entry cached before at once, including
//! those of keys whose writers could not delete them. See docs/postgres.md
//! for what this covers and what it does not.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::error::StoreResult;
use crate::storage::layer::cache::CacheMode;
use crate::storage::{
    Change, Entry, Feed, Found, Lease, LeaseId, ReplicaReads, Revoked, ScanPage, ScanRequest,
    Store, WriteOp, WriteOutcome,
};

/// After a failure, Redis is left alone this long before it is tried again,
/// so an outage costs the requests one timeout, not one each.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// A lease lasts this long; a read slower than that does not fill the cache.
const LEASE_MS: u64 = 5_000;

/// Reads a key; on a miss, leaves a lease when there is none.
/// Answers the cached record, `M` (a miss with our lease), or `W` (a miss
/// while another read holds the lease).
const GET_SCRIPT: &str = r"
local gen = redis.call('GET', ARGV[1] .. 'gen') or '0'
local k = ARGV[1] .. gen .. ':' .. ARGV[2]
local v = redis.call('GET', k)
if v and string.sub(v, 1, 1) ~= 'L' then return v end
if v then return 'W' end
redis.call('SET', k, 'L' .. ARGV[3], 'PX', ARGV[4])
return 'M'
";

/// Replaces our lease with the record read from the store.
const FILL_SCRIPT: &str = r"
local gen = redis.call('GET', ARGV[1] .. 'gen') or '0'
local k = ARGV[1] .. gen .. ':' .. ARGV[2]
if redis.call('GET', k) == 'L' .. ARGV[3] then
  redis.call('SET', k, ARGV[4], 'PX', ARGV[5])
  return 1
end
return 0
";

/// Deletes keys (and their leases) in the current generation.
const DELETE_SCRIPT: &str = r"
local gen = redis.call('GET', ARGV[1] .. 'gen') or '0'
for i = 2, #ARGV do
  redis.call('DEL', ARGV[1] .. gen .. ':' .. ARGV[i])
end
return #ARGV - 1
";

/// How to reach the shared cache.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RedisConfig {
    /// The Redis URL (`redis://host:port/db`).
    pub url: String,
    /// Prepended to every Redis key, so that deployments can share a Redis.
    pub prefix: String,
    /// How long an entry stays in Redis.
    pub ttl: Duration,
    /// Longest wait for one Redis call before the read goes to the store.
    pub timeout: Duration,
    /// Values larger than this are not cached.
    pub max_value_bytes: usize,
}

impl RedisConfig {
    /// Defaults: prefix `kvstore:`, 300 s TTL, 250 ms timeout, values up to 64 KiB.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            prefix: "kvstore:".into(),
            ttl: Duration::from_secs(300),
            timeout: Duration::from_millis(250),
            max_value_bytes: 64 << 10,
        }
    }
}

/// What the shared cache knows of a key.
enum Cached {
    Present(Entry),
    Absent,
}

/// A cached record: `A` for an absent key; `E` and the entry's version,
/// revision, timestamps and value; or, for a key that expires, `X` and the
/// same with its deadline and lease (0 for none) before the value.
fn encode(entry: Option<&Entry>) -> Vec<u8> {
    match entry {
        None => b"A".to_vec(),
        Some(e) => {
            let mut out = Vec::with_capacity(1 + 48 + e.value.len());
            let expires = e.expires_at_us.is_some() || e.lease.is_some();
            out.push(if expires { b'X' } else { b'E' });
            out.extend_from_slice(&e.version.to_be_bytes());
            out.extend_from_slice(&e.revision.to_be_bytes());
            out.extend_from_slice(&e.created_at_us.to_be_bytes());
            out.extend_from_slice(&e.updated_at_us.to_be_bytes());
            if expires {
                out.extend_from_slice(&e.expires_at_us.unwrap_or(i64::MAX).to_be_bytes());
                out.extend_from_slice(&e.lease.unwrap_or(0).to_be_bytes());
            }
            out.extend_from_slice(&e.value);
            out
        }
    }
}

fn decode(key: &[u8], record: &[u8]) -> Option<Cached> {
    let eight = |at: usize| -> Option<[u8; 8]> { record.get(at..at + 8)?.try_into().ok() };
    let (expires_at_us, lease, value_at) = match record.first()? {
        b'A' => return Some(Cached::Absent),
        b'E' => (None, None, 33),
        b'X' => {
            let deadline = i64::from_be_bytes(eight(33)?);
            let lease = u64::from_be_bytes(eight(41)?);
            (
                (deadline != i64::MAX).then_some(deadline),
                (lease != 0).then_some(lease),
                49,
            )
        }
        _ => return None,
    };
    Some(Cached::Present(Entry {
        key: key.to_vec(),
        version: u64::from_be_bytes(eight(1)?),
        revision: u64::from_be_bytes(eight(9)?),
        created_at_us: i64::from_be_bytes(eight(17)?),
        updated_at_us: i64::from_be_bytes(eight(25)?),
        value: record.get(value_at..)?.to_vec(),
        expires_at_us,
        lease,
    }))
}

/// The keys a write may change (not those it only checks).
fn keys_of(ops: &[WriteOp]) -> Vec<Vec<u8>> {
    ops.iter()
        .filter(|op| op.writes())
        .map(|op| op.key().to_vec())
        .collect()
}

/// A [`Store`] with the shared Redis cache in front.
pub struct RedisCachedStore {
    inner: Arc<dyn Store>,
    client: redis::Client,
    config: RedisConfig,
    /// Dropped after a failure, so the next use connects afresh.
    connection: std::sync::Mutex<Option<ConnectionManager>>,
    get_script: redis::Script,
    fill_script: redis::Script,
    delete_script: redis::Script,
    /// Redis is not tried before this instant.
    retry_at: std::sync::Mutex<Option<Instant>>,
    /// A write could not delete its keys: start a new generation before the
    /// cache is used again.
    needs_new_generation: Arc<AtomicBool>,
    up: AtomicBool,
    hits: AtomicU64,
    misses: AtomicU64,
    next_lease: AtomicU64,
}

/// Why a call to Redis failed.
#[derive(Debug, thiserror::Error)]
enum RedisFailure {
    #[error(transparent)]
    Redis(redis::RedisError),
    #[error("timed out")]
    TimedOut,
}

/// The URL of a [`RedisConfig`] is not a Redis URL.
#[derive(Debug, thiserror::Error)]
#[error("bad Redis URL: {0}")]
pub struct BadRedisUrl(#[source] redis::RedisError);

impl RedisCachedStore {
    /// A cache in front of `inner`. Redis need not be up: until it is, reads
    /// go to the store.
    ///
    /// # Errors
    /// When the URL is not a Redis URL.
    pub fn new(inner: Arc<dyn Store>, config: RedisConfig) -> Result<Self, BadRedisUrl> {
        let client = redis::Client::open(config.url.as_str()).map_err(BadRedisUrl)?;
        Ok(RedisCachedStore {
            inner,
            client,
            config,
            connection: std::sync::Mutex::new(None),
            get_script: redis::Script::new(GET_SCRIPT),
            fill_script: redis::Script::new(FILL_SCRIPT),
            delete_script: redis::Script::new(DELETE_SCRIPT),
            retry_at: std::sync::Mutex::new(None),
            needs_new_generation: Arc::new(AtomicBool::new(false)),
            up: AtomicBool::new(true),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            next_lease: AtomicU64::new(u64::from(std::process::id()) << 40),
        })
    }

    /// A connection to use now, or `None` while Redis is being left alone or
    /// the cache must not be used.
    async fn connection(&self) -> Option<ConnectionManager> {
        if self
            .retry_at
            .lock()
            .ok()
            .and_then(|r| *r)
            .is_some_and(|at| Instant::now() < at)
        {
            return None;
        }
        self.connect().await
    }

    /// The current connection or a new one, after starting a new generation
    /// if one is due; `None` after counting the failure.
    async fn connect(&self) -> Option<ConnectionManager> {
        let cached = self.connection.lock().ok().and_then(|c| c.clone());
        let mut connection = match cached {
            Some(c) => c,
            None => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(self.config.timeout)
                    .set_response_timeout(self.config.timeout)
                    .set_number_of_retries(0);
                let made = tokio::time::timeout(
                    self.config.timeout,
                    ConnectionManager::new_with_config(self.client.clone(), config),
                )
                .await;
                match made {
                    Ok(Ok(c)) => {
                        if let Ok(mut slot) = self.connection.lock() {
                            *slot = Some(c.clone());
                        }
                        c
                    }
                    Ok(Err(err)) => {
                        self.failed("connect", &RedisFailure::Redis(err));
                        return None;
                    }
                    Err(_) => {
                        self.failed("connect", &RedisFailure::TimedOut);
                        return None;
                    }
                }
            }
        };
        if self.needs_new_generation.load(Ordering::Acquire) {
            let bumped: Result<i64, RedisFailure> = self
                .call(
                    redis::cmd("INCR").arg(format!("{}gen", self.config.prefix)),
                    &mut connection,
                )
                .await;
            match bumped {
                Ok(generation) => {
                    self.needs_new_generation.store(false, Ordering::Release);
                    tracing::warn!(
                        generation,
                        "started a new Redis cache generation: entries cached before Redis failed are not served"
                    );
                }
                Err(err) => {
                    self.failed("generation", &err);
                    return None;
                }
            }
        }
        Some(connection)
    }

    async fn call<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
        connection: &mut ConnectionManager,
    ) -> Result<T, RedisFailure> {
        tokio::time::timeout(self.config.timeout, cmd.query_async(connection))
            .await
            .map_err(|_| RedisFailure::TimedOut)?
            .map_err(RedisFailure::Redis)
    }

    async fn script<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
        connection: &mut ConnectionManager,
    ) -> Result<T, RedisFailure> {
        tokio::time::timeout(self.config.timeout, invocation.invoke_async(connection))
            .await
            .map_err(|_| RedisFailure::TimedOut)?
            .map_err(RedisFailure::Redis)
    }

    /// Counts and logs a failure, and leaves Redis alone for a while. Writes
    /// of other servers may have failed to reach Redis meanwhile too: a new
    /// generation starts before this server uses the cache again.
    fn failed(&self, op: &'static str, why: &RedisFailure) {
        metrics::counter!("kvstore_redis_errors_total", "op" => op).increment(1);
        self.needs_new_generation.store(true, Ordering::Release);
        if let Ok(mut connection) = self.connection.lock() {
            *connection = None;
        }
        if let Ok(mut retry_at) = self.retry_at.lock() {
            *retry_at = Some(Instant::now() + RETRY_AFTER);
        }
        if self.up.swap(false, Ordering::AcqRel) {
            tracing::warn!(
                op,
                error = %why,
                "Redis is unreachable: reads go to storage until it is back"
            );
        }
    }

    fn succeeded(&self) {
        if !self.up.swap(true, Ordering::AcqRel) {
            tracing::info!("Redis is reachable again: reads use the shared cache");
        }
    }

    /// Deletes the keys from the shared cache, trying a second time on a new
    /// connection when the first try failed: other servers may still read
    /// Redis. Unlike reads, this does not wait out the pause after a failure. When both fail, a new generation must start
    /// before anyone may trust the cache (see the module docs).
    async fn invalidate(&self, keys: &[&[u8]]) {
        // Writes do not wait out the pause after a failure: once Redis is
        // back for other servers, this server's deletes must reach it too.
        let first = self.connect().await;
        let tried = first.is_some();
        let mut done = self.try_invalidate(keys, first).await;
        if !done && tried {
            done = self.try_invalidate(keys, self.connect().await).await;
        }
        if !done {
            self.needs_new_generation.store(true, Ordering::Release);
            metrics::counter!("kvstore_redis_invalidations_missed_total").increment(1);
            tracing::warn!(
                keys = keys.len(),
                "could not delete written keys from Redis; servers that reach Redis may serve their previous values until this one starts a new cache generation"
            );
        }
    }

    async fn try_invalidate(&self, keys: &[&[u8]], connection: Option<ConnectionManager>) -> bool {
        match connection {
            Some(mut connection) => {
                let mut invocation = self.delete_script.prepare_invoke();
                invocation.arg(self.config.prefix.as_bytes());
                for key in keys {
                    invocation.arg(*key);
                }
                match self.script::<i64>(&invocation, &mut connection).await {
                    Ok(_) => {
                        self.succeeded();
                        true
                    }
                    Err(err) => {
                        self.failed("invalidate", &err);
                        false
                    }
                }
            }
            None => false,
        }
    }

    /// Drops the keys of the writes that may have written something (after
    /// an error the outcome is unknown, so the keys are dropped as after a
    /// write), and the keys whose condition failed: that wrote nothing, but
    /// told the key's current version, which another write may have made
    /// before invalidating here, and a read after the 412 must not find an
    /// older one in Redis.
    async fn forget_written(&self, keys: &[Vec<Vec<u8>>], outcomes: &[StoreResult<WriteOutcome>]) {
        let written: Vec<&[u8]> = keys
            .iter()
            .zip(outcomes)
            .flat_map(|(keys, outcome)| match outcome {
                Ok(WriteOutcome::Rejected { failed }) => failed
                    .iter()
                    .filter_map(|condition| keys.get(condition.index))
                    .map(Vec::as_slice)
                    .collect::<Vec<_>>(),
                _ => keys.iter().map(Vec::as_slice).collect(),
            })
            .collect();
        if !written.is_empty() {
            self.invalidate(&written).await;
        }
    }

    /// The number of Redis hits and misses since start.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// Starts a background task that keeps trying to start a new generation
    /// while one is due, so that other servers stop serving entries this one
    /// could not delete as soon as Redis is reachable again.
    pub(crate) fn spawn_repair(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let Some(store) = weak.upgrade() else { break };
                if store.needs_new_generation.load(Ordering::Acquire) {
                    let _ = store.connection().await;
                }
            }
        });
    }
}

#[async_trait]
impl Store for RedisCachedStore {
    async fn get(&self, key: &[u8]) -> StoreResult<Option<Entry>> {
        let Some(mut connection) = self.connection().await else {
            return self.inner.get(key).await;
        };
        let lease = self.next_lease.fetch_add(1, Ordering::Relaxed).to_string();
        let mut invocation = self.get_script.prepare_invoke();
        invocation
            .arg(self.config.prefix.as_bytes())
            .arg(key)
            .arg(&lease)
            .arg(LEASE_MS);
        let answer: Vec<u8> = match self.script(&invocation, &mut connection).await {
            Ok(answer) => answer,
            Err(err) => {
                self.failed("get", &err);
                return self.inner.get(key).await;
            }
        };
        self.succeeded();
        match answer.as_slice() {
            b"M" | b"W" => {}
            record => match decode(key, record) {
                // Past its deadline: the store answers for it (absent).
                Some(Cached::Present(entry)) if entry.expired(self.inner.now_us()) => {}
                Some(Cached::Present(entry)) => {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(Some(entry));
                }
                Some(Cached::Absent) => {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(None);
                }
                None => tracing::warn!("unreadable record in the Redis cache; reading storage"),
            },
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let found = self.inner.get(key).await?;
        // Not an entry on a lease: a keepalive moves its deadline without a
        // write to the key, so a cached copy would show the old one.
        let cacheable = found
            .as_ref()
            .is_none_or(|e| e.value.len() <= self.config.max_value_bytes && e.lease.is_none());
        if answer.as_slice() == b"M" && cacheable {
            let ttl_ms = u64::try_from(self.config.ttl.as_millis()).unwrap_or(u64::MAX);
            let mut fill = self.fill_script.prepare_invoke();
            fill.arg(self.config.prefix.as_bytes())
                .arg(key)
                .arg(&lease)
                .arg(encode(found.as_ref()))
                .arg(ttl_ms.max(1));
            if let Err(err) = self.script::<i64>(&fill, &mut connection).await {
                // Our lease stays and expires; nothing stale was written.
                self.failed("fill", &err);
            }
        }
        Ok(found)
    }

    async fn get_many(&self, keys: Vec<Vec<u8>>) -> StoreResult<Found> {
        self.inner.get_many(keys).await
    }

    async fn write(&self, ops: Vec<WriteOp>) -> StoreResult<WriteOutcome> {
        let keys = vec![keys_of(&ops)];
        let outcome = self.inner.write(ops).await;
        self.forget_written(&keys, std::slice::from_ref(&outcome))
            .await;
        outcome
    }

    async fn write_many(&self, writes: Vec<Vec<WriteOp>>) -> Vec<StoreResult<WriteOutcome>> {
        let keys: Vec<Vec<Vec<u8>>> = writes.iter().map(|ops| keys_of(ops)).collect();
        let outcomes = self.inner.write_many(writes).await;
        self.forget_written(&keys, &outcomes).await;
        outcomes
    }

    async fn scan(&self, request: ScanRequest) -> StoreResult<ScanPage> {
        self.inner.scan(request).await
    }

    async fn changes(&self, after: u64, limit: usize) -> StoreResult<Vec<Change>> {
        self.inner.changes(after, limit).await
    }

    fn feed(&self) -> Arc<Feed> {
        self.inner.feed()
    }

    async fn grant_lease(&self, ttl_ms: u64, owner: Option<String>) -> StoreResult<Lease> {
        self.inner.grant_lease(ttl_ms, owner).await
    }

    async fn keep_lease_alive(&self, id: LeaseId) -> StoreResult<Lease> {
        self.inner.keep_lease_alive(id).await
    }

    async fn lease(&self, id: LeaseId) -> StoreResult<Option<Lease>> {
        self.inner.lease(id).await
    }

    async fn lease_keys(&self, id: LeaseId) -> StoreResult<u64> {
        self.inner.lease_keys(id).await
    }

    /// The revoked keys leave the cache as deletes do. (A lease that expires
    /// needs nothing: its keys' cached entries carry its deadline.)
    async fn revoke_lease(&self, id: LeaseId) -> StoreResult<Revoked> {
        let revoked = self.inner.revoke_lease(id).await?;
        let keys: Vec<&[u8]> = revoked.keys.iter().map(Vec::as_slice).collect();
        self.invalidate(&keys).await;
        Ok(revoked)
    }

    fn now_us(&self) -> i64 {
        self.inner.now_us()
    }

    async fn ready(&self) -> StoreResult<()> {
        self.inner.ready().await
    }

    fn read_only(&self) -> Option<String> {
        self.inner.read_only()
    }

    async fn close(&self) -> StoreResult<()> {
        self.inner.close().await
    }

    fn cache_mode(&self) -> CacheMode {
        CacheMode::Redis
    }

    fn replicas(&self) -> Option<Arc<dyn ReplicaReads>> {
        self.inner.replicas()
    }

    fn report_metrics(&self) {
        let (hits, misses) = self.counts();
        metrics::counter!("kvstore_cache_hits_total").absolute(hits);
        metrics::counter!("kvstore_cache_misses_total").absolute(misses);
        metrics::gauge!("kvstore_redis_up").set(if self.up.load(Ordering::Acquire) {
            1.0
        } else {
            0.0
        });
        self.inner.report_metrics();
    }

    fn describe(&self) -> String {
        format!(
            "{} with a shared Redis cache (prefix {})",
            self.inner.describe(),
            self.config.prefix
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let entry = Entry {
            key: b"k".to_vec(),
            value: b"\x00value".to_vec(),
            version: 3,
            revision: 99,
            created_at_us: 1,
            updated_at_us: 2,
            expires_at_us: None,
            lease: None,
        };
        let expiring = Entry {
            expires_at_us: Some(-4),
            lease: Some(77),
            ..entry.clone()
        };
        for entry in [entry, expiring] {
            match decode(b"k", &encode(Some(&entry))) {
                Some(Cached::Present(e)) => assert_eq!(e, entry),
                _ => panic!("not an entry"),
            }
        }
        assert!(matches!(decode(b"k", &encode(None)), Some(Cached::Absent)));
        assert!(decode(b"k", b"E12").is_none());
    }
}
