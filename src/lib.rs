//! kvstore: a low-latency, durable key-value store with an HTTP/JSON API.
//!
//! # Layout
//!
//! - [`api`]: the HTTP contract (routes, request parsing, limits, the error
//!   shape); [`api::router`] lists every route, [`api::types`] holds the JSON
//!   bodies shared with the client.
//! - [`storage`]: the [`storage::Store`] trait every backend implements;
//!   [`storage::embedded`], the default engine (fjall with our own group
//!   commit, one file per job); [`storage::postgres`], the PostgreSQL
//!   backend, for many servers on one database; and [`storage::layer`], the
//!   stores over a store: the read cache that never serves a version older
//!   than one acknowledged, the same cache shared in Redis, and the guard
//!   (storage timeout and latency).
//! - [`stack`]: the store that `kvstore serve` serves, built in one place:
//!   the engine, the guard and the cache, for the server and the tests alike.
//! - [`server`]: the process lifecycle: accept loop, connection cap, graceful
//!   shutdown.
//! - [`telemetry`]: the Prometheus recorder behind `GET /metrics`;
//!   [`timing`]: where a request's time went, for the slow-request log.
//! - [`tls`]: rustls configurations of the server and the client.
//! - [`client`]: a typed async client of the API, used by the CLI, the bench
//!   tool and the tests.
//! - [`error`]: what can fail inside the library.
//! - [`files`]: directories and small files made durable (parents fsynced,
//!   atomic replacement).
//! - `src/main.rs`: the `kvstore` binary (argument parsing and wiring only).

pub mod api;
pub mod client;
pub mod error;
pub mod files;
pub mod server;
pub mod stack;
pub mod storage;
pub mod telemetry;
pub mod timing;
pub mod tls;
