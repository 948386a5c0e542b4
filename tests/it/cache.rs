//! The read cache never serves a version older than one already acknowledged.
//!
//! The race that breaks a cache invalidated on write: a read misses, reads the
//! old entry from storage, stalls; a write (and a delete) run and update the
//! cache; the stalled read then fills the cache with the old entry. Writes
//! race the same way when their answers come back out of order. A store
//! wrapper holds a read or a write at exactly that point, so the interleaving
//! is forced, not hoped for.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::harness::within;
use async_trait::async_trait;
use kvstore::StoreResult;
use kvstore::storage::embedded::{EmbeddedConfig, EmbeddedStore};
use kvstore::storage::layer::cache::{CacheConfig, CachedStore};
use kvstore::storage::{
    Change, Condition, Entry, Expiry, Feed, Found, Lease, LeaseId, Revoked, ScanPage, ScanRequest,
    Store, WriteOp, WriteOutcome,
};
use tokio::sync::{Notify, Semaphore};

/// A store whose reads can be held after they have read storage, and whose
/// writes can be held after they have committed.
struct StallingStore {
    inner: EmbeddedStore,
    stall: AtomicBool,
    /// Signalled when a held read has its result.
    read_done: Notify,
    release: Semaphore,
    reads: AtomicU64,
    stall_write: AtomicBool,
    /// Signalled when a held write has committed.
    write_done: Notify,
    release_write: Semaphore,
}

impl StallingStore {
    fn open(path: &std::path::Path) -> Arc<Self> {
        Arc::new(StallingStore {
            inner: EmbeddedStore::open(EmbeddedConfig::new(path)).expect("open"),
            stall: AtomicBool::new(false),
            read_done: Notify::new(),
            release: Semaphore::new(0),
            reads: AtomicU64::new(0),
            stall_write: AtomicBool::new(false),
            write_done: Notify::new(),
            release_write: Semaphore::new(0),
        })
    }
}

#[async_trait]
impl Store for StallingStore {
    async fn get(&self, key: &[u8]) -> StoreResult<Option<Entry>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let found = self.inner.get(key).await?;
        if self.stall.swap(false, Ordering::SeqCst) {
            self.read_done.notify_one();
            let _permit = self.release.acquire().await.expect("semaphore");
        }
        Ok(found)
    }
    async fn get_many(&self, keys: Vec<Vec<u8>>) -> StoreResult<Found> {
        self.inner.get_many(keys).await
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
    async fn revoke_lease(&self, id: LeaseId) -> StoreResult<Revoked> {
        self.inner.revoke_lease(id).await
    }
    async fn write(&self, ops: Vec<WriteOp>) -> StoreResult<WriteOutcome> {
        let outcome = self.inner.write(ops).await;
        if self.stall_write.swap(false, Ordering::SeqCst) {
            self.write_done.notify_one();
            // One permit releases one held write.
            self.release_write
                .acquire()
                .await
                .expect("semaphore")
                .forget();
        }
        outcome
    }
    async fn scan(&self, request: ScanRequest) -> StoreResult<ScanPage> {
        self.inner.scan(request).await
    }
    async fn ready(&self) -> StoreResult<()> {
        self.inner.ready().await
    }
    async fn close(&self) -> StoreResult<()> {
        self.inner.close().await
    }
    fn describe(&self) -> String {
        "stalling test store".into()
    }
}

/// The default cache configuration with `change` applied.
fn cache_config(change: impl FnOnce(&mut CacheConfig)) -> CacheConfig {
    let mut config = CacheConfig::default();
    change(&mut config);
    config
}

fn put(key: &str, value: &str) -> Vec<WriteOp> {
    vec![WriteOp::Put {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        condition: Condition::Any,
        expiry: Expiry::Never,
    }]
}

fn delete(key: &str) -> Vec<WriteOp> {
    vec![WriteOp::Delete {
        key: key.as_bytes().to_vec(),
        condition: Condition::Any,
    }]
}

async fn value_of(store: &dyn Store, key: &str) -> Option<String> {
    store
        .get(key.as_bytes())
        .await
        .expect("get")
        .map(|e| String::from_utf8(e.value).expect("utf8"))
}

/// Runs a read of `key` through `cache` until it has read storage and is held.
async fn held_read(
    cache: &Arc<CachedStore>,
    backing: &StallingStore,
    key: &'static str,
) -> tokio::task::JoinHandle<Option<String>> {
    backing.stall.store(true, Ordering::SeqCst);
    let reader = {
        let cache = Arc::clone(cache);
        tokio::spawn(async move { value_of(cache.as_ref(), key).await })
    };
    within(60, "the read to be held", backing.read_done.notified()).await;
    reader
}

/// Runs a put of `k` through `cache` until it has committed and is held.
async fn held_write(
    cache: &Arc<dyn Store>,
    backing: &StallingStore,
    value: &'static str,
) -> tokio::task::JoinHandle<StoreResult<WriteOutcome>> {
    backing.stall_write.store(true, Ordering::SeqCst);
    let writer = {
        let cache = Arc::clone(cache);
        tokio::spawn(async move { cache.write(put("k", value)).await })
    };
    within(60, "the write to be held", backing.write_done.notified()).await;
    writer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_read_cannot_put_back_an_old_version() {
    let dir = tempfile::tempdir().unwrap();
    let backing = StallingStore::open(dir.path());
    // The old version is written behind the cache's back, so the read misses.
    backing.inner.write(put("k", "old")).await.unwrap();
    let cache = Arc::new(CachedStore::new(backing.clone(), CacheConfig::default()));

    let reader = held_read(&cache, &backing, "k").await;
    cache.write(put("k", "new")).await.unwrap();
    assert_eq!(value_of(cache.as_ref(), "k").await.as_deref(), Some("new"));
    cache.write(delete("k")).await.unwrap();

    backing.release.add_permits(1);
    assert_eq!(
        within(60, "the held read", reader)
            .await
            .unwrap()
            .as_deref(),
        Some("old"),
        "the held read saw storage before the writes"
    );

    // The cache shows the delete, and answers it without reading storage.
    let reads = backing.reads.load(Ordering::SeqCst);
    assert_eq!(value_of(cache.as_ref(), "k").await, None);
    assert_eq!(
        backing.reads.load(Ordering::SeqCst),
        reads,
        "absence was not served from the cache"
    );
    cache.close().await.unwrap();
}

/// A read holds `old`, then the key is rewritten and deleted, the delete's
/// slot expires, and a later read caches the key's absence (which carries no
/// revision): the held read may not fill `old` over that absence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_read_cannot_fill_over_a_later_absence() {
    let dir = tempfile::tempdir().unwrap();
    let backing = StallingStore::open(dir.path());
    backing.inner.write(put("k", "old")).await.unwrap();
    let cache = Arc::new(CachedStore::new(
        backing.clone(),
        cache_config(|config| config.ttl = Some(Duration::from_millis(50))),
    ));

    let reader = held_read(&cache, &backing, "k").await;
    cache.write(put("k", "new")).await.unwrap();
    cache.write(delete("k")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(value_of(cache.as_ref(), "k").await, None);
    backing.release.add_permits(1);
    within(60, "the held read", reader).await.unwrap();

    assert_eq!(
        value_of(cache.as_ref(), "k").await,
        None,
        "the deleted key came back"
    );
    cache.close().await.unwrap();
}

/// A write commits `old`, then is held before the cache hears of it, while a
/// later write of `new` to the same key updates the cache; when the first
/// write's answer comes back, the cache must keep `new`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_write_cannot_put_back_its_older_entry() {
    let dir = tempfile::tempdir().unwrap();
    let backing = StallingStore::open(dir.path());
    let cache: Arc<dyn Store> = Arc::new(CachedStore::new(backing.clone(), CacheConfig::default()));

    let late = held_write(&cache, &backing, "old").await;
    cache.write(put("k", "new")).await.unwrap();
    backing.release_write.add_permits(1);
    within(60, "the held write", late).await.unwrap().unwrap();

    assert_eq!(value_of(cache.as_ref(), "k").await.as_deref(), Some("new"));
    cache.close().await.unwrap();
}

/// Two writes (versions 2 and 3) are held after their commits, before
/// `cache` (over `backing`) hears of them; a write conditional on version 1
/// then fails, and its 412 tells of version 3. A read after it must not be
/// served an older version: not version 1, which the cache held, nor
/// version 2, which the first held write brings when it is released.
async fn a_failed_condition_drops_the_older_entry_it_was_told_of(
    cache: Arc<dyn Store>,
    backing: &StallingStore,
) {
    cache.write(put("k", "v1")).await.unwrap();
    assert_eq!(value_of(cache.as_ref(), "k").await.as_deref(), Some("v1"));
    // Read twice: the Redis cache fills on a miss, then serves.
    assert_eq!(value_of(cache.as_ref(), "k").await.as_deref(), Some("v1"));

    let v2 = held_write(&cache, backing, "v2").await;
    let v3 = held_write(&cache, backing, "v3").await;
    let refused = cache
        .write(vec![WriteOp::Put {
            key: b"k".to_vec(),
            value: b"on v1".to_vec(),
            condition: Condition::Version(1),
            expiry: Expiry::Never,
        }])
        .await
        .unwrap();
    let WriteOutcome::Rejected { failed } = refused else {
        panic!("expected a failed condition, got {refused:?}");
    };
    assert_eq!(failed[0].current_version, Some(3));

    // The held writes go on in order (the semaphore is fair): version 2's
    // answer reaches the cache after the refusal, before any read.
    backing.release_write.add_permits(1);
    within(60, "version 2's write", v2).await.unwrap().unwrap();
    assert_eq!(value_of(cache.as_ref(), "k").await.as_deref(), Some("v3"));
    backing.release_write.add_permits(1);
    within(60, "version 3's write", v3).await.unwrap().unwrap();
    assert_eq!(value_of(cache.as_ref(), "k").await.as_deref(), Some("v3"));
    cache.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_cache_drops_what_a_failed_condition_shows_is_old() {
    let dir = tempfile::tempdir().unwrap();
    let backing = StallingStore::open(dir.path());
    let cache = Arc::new(CachedStore::new(backing.clone(), CacheConfig::default()));
    a_failed_condition_drops_the_older_entry_it_was_told_of(cache, &backing).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_redis),
    ignore = "set KVSTORE_TEST_REDIS_URL to run it"
)]
async fn the_redis_cache_drops_what_a_failed_condition_shows_is_old() {
    let dir = tempfile::tempdir().unwrap();
    let backing = StallingStore::open(dir.path());
    let cache = redis_cache(backing.clone(), "condition-test");
    a_failed_condition_drops_the_older_entry_it_was_told_of(cache, &backing).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_read_cannot_fill_after_the_newer_entry_was_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let backing = StallingStore::open(dir.path());
    backing.inner.write(put("k", "old")).await.unwrap();
    // Room for one entry only: the next write of another key evicts "k".
    let mut config = CacheConfig::default();
    config.max_entries = 1;
    let cache = Arc::new(CachedStore::new(backing.clone(), config));

    let reader = held_read(&cache, &backing, "k").await;
    cache.write(put("k", "new")).await.unwrap();
    cache.write(put("other", "x")).await.unwrap();
    backing.release.add_permits(1);
    within(60, "the held read", reader).await.unwrap();

    assert_eq!(value_of(cache.as_ref(), "k").await.as_deref(), Some("new"));
    assert_eq!(value_of(cache.as_ref(), "k").await.as_deref(), Some("new"));
    cache.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_misses_absence_and_large_values() {
    let dir = tempfile::tempdir().unwrap();
    let backing = StallingStore::open(dir.path());
    let mut config = CacheConfig::default();
    config.max_value_bytes = 8;
    let cache = CachedStore::new(backing.clone(), config);
    cache.write(put("small", "12345678")).await.unwrap();
    cache.write(put("large", "123456789")).await.unwrap();

    let reads = |n| move |store: &StallingStore| store.reads.load(Ordering::SeqCst) - n;
    let before = reads(0)(&backing);
    // A write leaves its entry in the cache.
    assert_eq!(value_of(&cache, "small").await.as_deref(), Some("12345678"));
    assert_eq!(reads(before)(&backing), 0);
    // A value over the threshold is read from storage every time.
    assert_eq!(
        value_of(&cache, "large").await.as_deref(),
        Some("123456789")
    );
    assert_eq!(
        value_of(&cache, "large").await.as_deref(),
        Some("123456789")
    );
    assert_eq!(reads(before)(&backing), 2);
    // A missing key is read once, then answered from the cache.
    assert_eq!(value_of(&cache, "missing").await, None);
    assert_eq!(value_of(&cache, "missing").await, None);
    assert_eq!(reads(before)(&backing), 3);
    // ... until it is written.
    cache.write(put("missing", "here")).await.unwrap();
    assert_eq!(value_of(&cache, "missing").await.as_deref(), Some("here"));

    let stats = cache.stats();
    assert_eq!(stats.misses, 3);
    assert_eq!(stats.hits, 3);
    assert_eq!(stats.entries, 2, "small and missing");
    cache.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_by_entries_and_by_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let backing = StallingStore::open(dir.path());
    let by_entries = CachedStore::new(
        backing.clone(),
        cache_config(|config| {
            config.max_entries = 10;
        }),
    );
    for i in 0..100 {
        by_entries.write(put(&format!("k{i}"), "v")).await.unwrap();
    }
    assert!(by_entries.stats().entries <= 10, "{:?}", by_entries.stats());
    assert!(by_entries.stats().evictions >= 90);

    let by_bytes = CachedStore::new(
        backing.clone(),
        cache_config(|config| {
            config.max_bytes = 4096;
        }),
    );
    let value = "x".repeat(1000);
    for i in 0..100 {
        by_bytes.write(put(&format!("k{i}"), &value)).await.unwrap();
    }
    let stats = by_bytes.stats();
    assert!(stats.bytes <= 4096 && stats.entries <= 4, "{stats:?}");
    backing.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_expire_after_the_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let backing = StallingStore::open(dir.path());
    let cache = CachedStore::new(
        backing.clone(),
        cache_config(|config| {
            config.ttl = Some(Duration::from_millis(50));
        }),
    );
    cache.write(put("k", "v")).await.unwrap();
    let before = backing.reads.load(Ordering::SeqCst);
    value_of(&cache, "k").await;
    assert_eq!(backing.reads.load(Ordering::SeqCst), before);
    tokio::time::sleep(Duration::from_millis(120)).await;
    value_of(&cache, "k").await;
    assert_eq!(
        backing.reads.load(Ordering::SeqCst),
        before + 1,
        "an expired entry was served"
    );
    cache.close().await.unwrap();
}

/// Many readers and writers on a few keys, with a cache small and short-lived
/// enough to evict and expire all the time: no reader may see a key's version
/// go back, and after the writers stop every read shows the last write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reader_sees_a_version_go_back() {
    let dir = tempfile::tempdir().unwrap();
    let backing: Arc<dyn Store> =
        Arc::new(EmbeddedStore::open(EmbeddedConfig::new(dir.path())).expect("open"));
    let cache = Arc::new(CachedStore::new(
        backing,
        cache_config(|config| {
            config.max_entries = 3;
            config.ttl = Some(Duration::from_millis(2));
        }),
    ));
    const KEYS: usize = 5;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..4 {
        let cache = Arc::clone(&cache);
        tasks.push(tokio::spawn(async move {
            for n in 0..150 {
                let key = format!("k{}", (n + w) % KEYS);
                let op = if n % 7 == 0 {
                    delete(&key)
                } else {
                    put(&key, "v")
                };
                cache.write(op).await.expect("write");
            }
        }));
    }
    let mut readers = Vec::new();
    for _ in 0..4 {
        let cache = Arc::clone(&cache);
        let stop = Arc::clone(&stop);
        readers.push(tokio::spawn(async move {
            // The newest revision each key was seen at (0: never seen).
            let mut seen = [0u64; KEYS];
            let mut reads = 0u64;
            while !stop.load(Ordering::SeqCst) {
                for (i, last) in seen.iter_mut().enumerate() {
                    if let Some(entry) = cache.get(format!("k{i}").as_bytes()).await.expect("get") {
                        assert!(
                            entry.revision >= *last,
                            "k{i} went back from revision {last} to {}",
                            entry.revision
                        );
                        *last = entry.revision;
                    }
                    reads += 1;
                }
                // A cache hit never suspends: without this the readers would
                // keep the runtime's threads from the writers.
                tokio::task::yield_now().await;
            }
            reads
        }));
    }
    for task in tasks {
        within(120, "a writer", task).await.unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    for reader in readers {
        assert!(within(60, "a reader", reader).await.unwrap() > 0);
    }
    for i in 0..KEYS {
        let key = format!("k{i}");
        let cached = cache.get(key.as_bytes()).await.unwrap().map(|e| e.revision);
        let stored = cache
            .get_many(vec![key.into_bytes()])
            .await
            .unwrap()
            .entries[0]
            .as_ref()
            .map(|e| e.revision);
        assert_eq!(
            cached, stored,
            "k{i}: the cache disagrees with storage after the writers stopped"
        );
    }
    cache.close().await.unwrap();
}

// ---------------------------------------------------------------- expiry

/// An embedded store on a clock the test moves, and a way to move it.
fn clocked_store(dir: &std::path::Path) -> (Arc<EmbeddedStore>, Arc<std::sync::atomic::AtomicI64>) {
    let now = Arc::new(std::sync::atomic::AtomicI64::new(1_800_000_000_000_000));
    let mut config = EmbeddedConfig::new(dir);
    let clock = Arc::clone(&now);
    config.clock = Some(Arc::new(move || clock.load(Ordering::SeqCst)));
    (Arc::new(EmbeddedStore::open(config).unwrap()), now)
}

fn put_expiring(key: &str, expiry: Expiry) -> Vec<WriteOp> {
    vec![WriteOp::Put {
        key: key.as_bytes().to_vec(),
        value: b"v".to_vec(),
        condition: Condition::Any,
        expiry,
    }]
}

/// A cache in front of the store must not serve what expired or was
/// revoked: the expirer's deletes do not pass through it, so it checks
/// deadlines itself, and a revoke drops the lease's keys.
async fn cache_forgets_what_expires(cache: Arc<dyn Store>, now: &std::sync::atomic::AtomicI64) {
    cache
        .write(put_expiring("ttl", Expiry::Ttl(1000)))
        .await
        .unwrap();
    let lease = cache.grant_lease(5000, None).await.unwrap();
    cache
        .write(put_expiring("revoked", Expiry::Lease(lease.id)))
        .await
        .unwrap();
    let short = cache.grant_lease(3000, None).await.unwrap();
    cache
        .write(put_expiring("lapsed", Expiry::Lease(short.id)))
        .await
        .unwrap();
    for key in ["ttl", "revoked", "lapsed"] {
        // Read twice: the second is a hit when the cache holds the entry.
        assert!(value_of(cache.as_ref(), key).await.is_some(), "{key}");
        assert!(value_of(cache.as_ref(), key).await.is_some(), "{key}");
    }
    // A keepalive moves the deadline of the lease's keys, which reads show.
    now.fetch_add(1000, Ordering::SeqCst);
    let renewed = cache.keep_lease_alive(lease.id).await.unwrap();
    let seen = cache.get(b"revoked").await.unwrap().unwrap();
    assert_eq!(seen.expires_at_us, Some(renewed.expires_at_us));
    cache.revoke_lease(lease.id).await.unwrap();
    assert_eq!(value_of(cache.as_ref(), "revoked").await, None);
    now.fetch_add(3_500_000, Ordering::SeqCst);
    assert_eq!(value_of(cache.as_ref(), "ttl").await, None);
    assert_eq!(value_of(cache.as_ref(), "lapsed").await, None);
    cache.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_cache_never_serves_an_expired_or_revoked_key() {
    let dir = tempfile::tempdir().unwrap();
    let (store, now) = clocked_store(dir.path());
    let cache = CachedStore::new(store, CacheConfig::default());
    cache_forgets_what_expires(Arc::new(cache), &now).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(kvstore_test_redis),
    ignore = "set KVSTORE_TEST_REDIS_URL to run it"
)]
async fn the_redis_cache_never_serves_an_expired_or_revoked_key() {
    let dir = tempfile::tempdir().unwrap();
    let (store, now) = clocked_store(dir.path());
    cache_forgets_what_expires(redis_cache(store, "expiry-test"), &now).await;
}

/// The Redis cache over `store`, under a key prefix of this test's own.
fn redis_cache(store: Arc<dyn Store>, test: &str) -> Arc<dyn Store> {
    use kvstore::storage::layer::redis_cache::{RedisCachedStore, RedisConfig};
    let mut config = RedisConfig::new(crate::harness::redis_url());
    config.prefix = format!("{test}-{}:", std::process::id());
    Arc::new(RedisCachedStore::new(store, config).expect("the Redis cache"))
}
