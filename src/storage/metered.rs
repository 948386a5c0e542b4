//! A decorator that measures every storage call: latency histograms by
//! operation for the metrics, and the request's storage time for the slow log.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;

use super::{Entry, ScanPage, ScanRequest, Store, WriteOp, WriteOutcome};
use crate::error::StoreResult;
use crate::timing;

/// The storage latency histogram, labelled by `op`.
pub const STORAGE_SECONDS: &str = "kvstore_storage_operation_duration_seconds";

pub struct MeteredStore {
    inner: Arc<dyn Store>,
}

impl MeteredStore {
    pub fn new(inner: Arc<dyn Store>) -> Self {
        MeteredStore { inner }
    }
}

async fn measured<T>(op: &'static str, call: impl Future<Output = T>) -> T {
    let start = Instant::now();
    let output = call.await;
    let elapsed = start.elapsed();
    metrics::histogram!(STORAGE_SECONDS, "op" => op).record(elapsed.as_secs_f64());
    timing::record(|t| t.storage += elapsed);
    output
}

#[async_trait]
impl Store for MeteredStore {
    async fn get(&self, key: &[u8]) -> StoreResult<Option<Entry>> {
        measured("get", self.inner.get(key)).await
    }

    async fn get_many(&self, keys: Vec<Vec<u8>>) -> StoreResult<Vec<Option<Entry>>> {
        measured("get_many", self.inner.get_many(keys)).await
    }

    async fn write(&self, ops: Vec<WriteOp>) -> StoreResult<WriteOutcome> {
        measured("write", self.inner.write(ops)).await
    }

    async fn scan(&self, request: ScanRequest) -> StoreResult<ScanPage> {
        measured("scan", self.inner.scan(request)).await
    }

    async fn ready(&self) -> StoreResult<()> {
        self.inner.ready().await
    }

    async fn close(&self) -> StoreResult<()> {
        self.inner.close().await
    }

    fn report_metrics(&self) {
        self.inner.report_metrics();
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}
