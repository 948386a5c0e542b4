//! The layers between the API and an engine, each a [`Store`](super::Store)
//! over another, stacked by [`crate::stack`]:
//!
//! - [`cache`]: the read cache in this process, filled and updated in
//!   revision order so that it never serves a version older than one
//!   acknowledged;
//! - [`redis_cache`]: the same cache shared by many servers in Redis;
//! - `guard`: the storage timeout, the latency histograms and the
//!   slow-request timings of every storage call.

pub mod cache;
pub(crate) mod guard;
pub mod redis_cache;
