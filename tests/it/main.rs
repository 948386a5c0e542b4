//! kvstore's integration tests, in one test binary so that the harness is
//! compiled and linked once.
//!
//! - [`harness`]: servers in the test process or as the real binary, the
//!   backends a test body runs on, PostgreSQL schemas and proxies, deadlines
//!   for every wait, and plfs (a file system that loses power).
//! - [`requests`]: raw HTTP requests, and checks of the shapes docs/api.md
//!   promises.
//!
//! Tests that need PostgreSQL or Redis are ignored, with the reason, unless
//! `KVSTORE_TEST_POSTGRES_URL` / `KVSTORE_TEST_REDIS_URL` were set when the
//! tests were built; under `CI=true` an unset variable fails the run
//! (`harness::ci_sets_every_service`).

// A test fails by panicking: unwrap and expect are how it says what broke.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod harness;
#[macro_use]
mod requests;

mod api;
mod api_batch;
mod api_range;
mod auth;
mod cache;
mod cli;
mod cli_expiry;
mod concurrency;
mod console;
mod corruption;
mod crash;
mod disk_full;
mod durability;
mod expiry;
mod expiry_postgres;
mod failing_disk;
mod journal;
mod model;
mod multi_server;
mod ops;
mod postgres;
mod quiet_flush;
mod replicas;
mod resp;
mod robustness;
mod tls;
mod watch;
mod watch_client;
mod watch_postgres;
