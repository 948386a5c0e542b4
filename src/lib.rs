//! kvstore: a low-latency, durable key-value store with an HTTP/JSON API.
//!
//! # Layout
//!
//! - [`api`]: the HTTP contract (routes, request parsing, limits, the error
//!   shape); [`api::router`] lists every route, [`api::types`] holds the JSON
//!   bodies shared with the client.
//! - [`storage`]: the [`storage::Store`] trait every backend implements, and
//!   [`storage::embedded`], the default engine (fjall with our own group commit).
//! - [`server`]: the process lifecycle: accept loop, graceful shutdown.
//! - [`client`]: a typed async client of the API, used by the CLI and the tests.
//! - [`error`]: what can fail inside the library.
//! - `src/main.rs`: the `kvstore` binary (argument parsing and wiring only).

pub mod api;
pub mod cache;
pub mod client;
pub mod error;
pub mod server;
pub mod storage;
pub mod telemetry;
pub mod timing;
