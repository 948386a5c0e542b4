//! A decorator around every storage call: bounded by the request timeout,
//! timed for the slow-request log, and recorded in the latency histograms
//! when metrics are on.
//!
//! The timeout lives here, not around the whole request, so that a read
//! answered by the cache pays for no timer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::error::{StoreError, StoreResult};
use crate::storage::{
    Change, Entry, Feed, Found, Lease, LeaseId, ReplicaReads, Revoked, ScanPage, ScanRequest,
    Store, WriteOp, WriteOutcome,
};
use crate::timing;

/// The storage latency histogram, labelled by `op`.
pub const STORAGE_SECONDS: &str = "kvstore_storage_operation_duration_seconds";

pub struct GuardedStore {
    inner: Arc<dyn Store>,
    timeout: Duration,
    metrics: bool,
}

impl GuardedStore {
    /// Bounds every call to `inner` by `timeout`; records latencies in the
    /// metrics when `metrics` is true.
    pub fn new(inner: Arc<dyn Store>, timeout: Duration, metrics: bool) -> Self {
        GuardedStore {
            inner,
            timeout,
            metrics,
        }
    }

    async fn call<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        let start = Instant::now();
        let output = tokio::time::timeout(self.timeout, call).await;
        let elapsed = start.elapsed();
        if self.metrics {
            metrics::histogram!(STORAGE_SECONDS, "op" => op).record(elapsed.as_secs_f64());
        }
        timing::record(|t| t.storage += elapsed);
        output.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(format!(
                "storage did not answer within {:?}; the outcome of a write is unknown, read before retrying it",
                self.timeout
            )))
        })
    }
}

#[async_trait]
impl Store for GuardedStore {
    async fn get(&self, key: &[u8]) -> StoreResult<Option<Entry>> {
        self.call("get", self.inner.get(key)).await
    }

    async fn get_many(&self, keys: Vec<Vec<u8>>) -> StoreResult<Found> {
        self.call("get_many", self.inner.get_many(keys)).await
    }

    async fn write(&self, ops: Vec<WriteOp>) -> StoreResult<WriteOutcome> {
        self.call("write", self.inner.write(ops)).await
    }

    async fn write_many(&self, writes: Vec<Vec<WriteOp>>) -> Vec<StoreResult<WriteOutcome>> {
        let count = writes.len();
        let all = async { Ok(self.inner.write_many(writes).await) };
        match self.call("write_many", all).await {
            Ok(outcomes) => outcomes,
            Err(err) => {
                let why = err.to_string();
                (0..count)
                    .map(|_| Err(StoreError::Unavailable(why.clone())))
                    .collect()
            }
        }
    }

    async fn scan(&self, request: ScanRequest) -> StoreResult<ScanPage> {
        self.call("scan", self.inner.scan(request)).await
    }

    async fn changes(&self, after: u64, limit: usize) -> StoreResult<Vec<Change>> {
        self.call("changes", self.inner.changes(after, limit)).await
    }

    fn feed(&self) -> Arc<Feed> {
        self.inner.feed()
    }

    async fn grant_lease(&self, ttl_ms: u64, owner: Option<String>) -> StoreResult<Lease> {
        self.call("grant_lease", self.inner.grant_lease(ttl_ms, owner))
            .await
    }

    async fn keep_lease_alive(&self, id: LeaseId) -> StoreResult<Lease> {
        self.call("keep_lease_alive", self.inner.keep_lease_alive(id))
            .await
    }

    async fn lease(&self, id: LeaseId) -> StoreResult<Option<Lease>> {
        self.call("lease", self.inner.lease(id)).await
    }

    async fn lease_keys(&self, id: LeaseId) -> StoreResult<u64> {
        self.call("lease_keys", self.inner.lease_keys(id)).await
    }

    async fn revoke_lease(&self, id: LeaseId) -> StoreResult<Revoked> {
        self.call("revoke_lease", self.inner.revoke_lease(id)).await
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

    fn report_metrics(&self) {
        self.inner.report_metrics();
    }

    fn replicas(&self) -> Option<Arc<dyn ReplicaReads>> {
        self.inner.replicas()
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}
