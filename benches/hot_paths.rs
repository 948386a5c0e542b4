//! Micro-benchmarks of the hot paths, without the network: a whole request
//! through the server's service (routing, key decoding, query
//! and body parsing, cache, JSON), the JSON
//! rendering of an entry, cache lookups, and the write path of the committer
//! without its sync (buffered durability).
//!
//! Run with `cargo bench --bench hot_paths`.

// A benchmark that cannot set itself up has nothing to measure: it panics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::ops::Bound;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use criterion::{Criterion, criterion_group, criterion_main};
use hyper::service::Service as _;
use kvstore::internals::{self as api, AppState, Observe};
use kvstore::server::{CursorKey, Limits};
use kvstore::storage::embedded::{Durability, EmbeddedConfig, EmbeddedStore};
use kvstore::storage::layer::cache::{CacheConfig, CachedStore};
use kvstore::storage::{Condition, Entry, Expiry, ScanRequest, Store, WriteOp};

/// The server's allocator, so that allocation costs are the server's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const VALUE: [u8; 100] = [b'x'; 100];

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Checks once, before a bench measures it, that a request is answered 200.
fn answers_ok<E: std::fmt::Debug>(
    rt: &tokio::runtime::Runtime,
    answer: impl Future<Output = Result<axum::response::Response, E>>,
) {
    let response = rt.block_on(answer).expect("response");
    assert_eq!(response.status(), StatusCode::OK);
}

fn put(key: &str) -> Vec<WriteOp> {
    vec![WriteOp::Put {
        key: key.as_bytes().to_vec(),
        value: VALUE.to_vec(),
        condition: Condition::Any,
        expiry: Expiry::Never,
    }]
}

fn open_engine(dir: &tempfile::TempDir) -> Arc<EmbeddedStore> {
    open_engine_with(dir, EmbeddedConfig::new(dir.path()).quiet_before_inline)
}

/// `quiet_before_inline` of `Duration::MAX` sends every write to the
/// committer thread.
fn open_engine_with(
    dir: &tempfile::TempDir,
    quiet_before_inline: std::time::Duration,
) -> Arc<EmbeddedStore> {
    let mut config = EmbeddedConfig::new(dir.path());
    config.durability = Durability::Buffered;
    config.quiet_before_inline = quiet_before_inline;
    Arc::new(EmbeddedStore::open(config).expect("open"))
}

fn request_path(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("temp dir");
    let engine = open_engine(&dir);
    let store: Arc<dyn Store> = Arc::new(CachedStore::new(engine, CacheConfig::default()));
    rt.block_on(async {
        store.write(put("users/42")).await.expect("put");
        for i in 0..100 {
            store.write(put(&format!("r/{i:03}"))).await.expect("put");
        }
    });
    let state = AppState {
        store,
        limits: Limits::default(),
        observe: Observe {
            request_timeout: std::time::Duration::from_secs(30),
            slow_request: std::time::Duration::from_secs(10),
            metrics: None,
        },
        auth: None,
        cursor_key: CursorKey::new(b"a benchmark's cursor secret").expect("cursor key"),
        shutdown: tokio::sync::watch::channel(false).1,
        ui: false,
    };
    let direct = api::service::<Body>(state);
    let get_request = || {
        Request::get("/v1/kv/users/42")
            .body(Body::empty())
            .expect("request")
    };
    answers_ok(&rt, direct.call(get_request()));
    c.bench_function("service: GET /v1/kv/users/42 (cache hit)", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(direct.call(get_request()).await.expect("response")) });
    });
    let put_body = format!("{{\"value\":\"{}\"}}", "x".repeat(VALUE.len()));
    let put_request = || {
        Request::put("/v1/kv/users/42")
            .header("content-type", "application/json")
            .body(Body::from(put_body.clone()))
            .expect("request")
    };
    answers_ok(&rt, direct.call(put_request()));
    c.bench_function("service: PUT /v1/kv/users/42 (no sync)", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(direct.call(put_request()).await.expect("response")) });
    });
    let batch_body = serde_json::to_string(&serde_json::json!({
        "ops": (0..100)
            .map(|i| serde_json::json!({"op": "put", "key": format!("b/{i:03}"), "value": "x".repeat(VALUE.len())}))
            .collect::<Vec<_>>()
    }))
    .expect("batch body");
    let batch_request = || {
        Request::post("/v1/batch")
            .header("content-type", "application/json")
            .body(Body::from(batch_body.clone()))
            .expect("request")
    };
    answers_ok(&rt, direct.call(batch_request()));
    c.bench_function("service: POST /v1/batch of 100 puts (no sync)", |b| {
        b.to_async(&rt).iter(|| async {
            let response = direct.call(batch_request()).await.expect("response");
            black_box(axum::body::to_bytes(response.into_body(), usize::MAX).await)
        });
    });
    for limit in [1, 100] {
        c.bench_function(
            &format!("service: GET /v1/kv?prefix=r/&limit={limit}"),
            |b| {
                b.to_async(&rt).iter(|| async {
                    let request = Request::get(format!("/v1/kv?prefix=r%2F&limit={limit}"))
                        .body(Body::empty())
                        .expect("request");
                    let response = direct.call(request).await.expect("response");
                    // The body is part of the answer's cost: render it all.
                    black_box(axum::body::to_bytes(response.into_body(), usize::MAX).await)
                });
            },
        );
    }
}

fn entry_json(c: &mut Criterion) {
    let entry = Entry {
        key: b"users/42".to_vec(),
        value: VALUE.to_vec(),
        version: 3,
        revision: 1207,
        created_at_us: 1_764_097_672_123_456,
        updated_at_us: 1_764_097_681_000_001,
        expires_at_us: None,
        lease: None,
    };
    c.bench_function("json: render a 100-byte entry", |b| {
        b.iter(|| {
            serde_json::to_vec(&api::EntryView::new(black_box(&entry), false)).expect("json")
        });
    });
}

fn cache(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = CachedStore::new(open_engine(&dir), CacheConfig::default());
    rt.block_on(async {
        for i in 0..10_000 {
            cache.write(put(&format!("key{i:06}"))).await.expect("put");
        }
        cache.get(b"absent").await.expect("get");
    });
    c.bench_function("cache: hit", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(cache.get(b"key004242").await.expect("get")) });
    });
    c.bench_function("cache: cached absence", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(cache.get(b"absent").await.expect("get")) });
    });
}

fn engine(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("temp dir");
    let engine = open_engine(&dir);
    rt.block_on(async {
        for i in 0..10_000 {
            engine.write(put(&format!("key{i:06}"))).await.expect("put");
        }
    });
    c.bench_function("engine: get (memtable)", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(engine.get(b"key004242").await.expect("get")) });
    });
    for limit in [1, 100] {
        let request = ScanRequest {
            lower: Bound::Included(b"key004000".to_vec()),
            upper: Bound::Unbounded,
            reverse: false,
            limit,
            keys_only: false,
            max_value_bytes: 4 << 20,
        };
        c.bench_function(&format!("engine: scan of {limit}"), |b| {
            b.to_async(&rt)
                .iter(|| async { black_box(engine.scan(request.clone()).await.expect("scan")) });
        });
    }
    // One writer at a time, so each write is alone: it commits on its own
    // thread. The same through the committer thread shows the hand-off.
    let committer_dir = tempfile::tempdir().expect("temp dir");
    let through_committer = open_engine_with(&committer_dir, std::time::Duration::MAX);
    for (name, engine) in [
        ("engine: put committed on its own thread, no sync", &engine),
        (
            "engine: put through the committer thread, no sync",
            &through_committer,
        ),
    ] {
        let mut n = 0u64;
        c.bench_function(name, |b| {
            b.to_async(&rt).iter(|| {
                n += 1;
                let ops = put(&format!("key{:06}", n % 10_000));
                async move { black_box(engine.write(ops).await.expect("put")) }
            });
        });
    }
    let batch: Vec<WriteOp> = (0..100)
        .flat_map(|i| put(&format!("batch{i:03}")))
        .collect();
    c.bench_function("engine: batch of 100 puts, no sync", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(engine.write(batch.clone()).await.expect("batch")) });
    });
}

criterion_group!(benches, request_path, entry_json, cache, engine);
criterion_main!(benches);
