//! kvstore: a low-latency, durable key-value store with an HTTP/JSON API.
//!
//! # Using the crate
//!
//! The root re-exports what a program reaches for first: the [`Client`] of
//! the HTTP API; the [`Stack`] that turns a [`StackConfig`] into the store
//! `kvstore serve` serves; the [`server`] that serves a [`Store`] under a
//! [`ServerConfig`] and [`Security`]; and the [`StoreError`] every store call
//! can fail with. The public modules hold the rest of each part:
//!
//! - [`client`]: the typed async client, its requests (ranges, watches,
//!   change pages) and its errors.
//! - [`server`]: [`server::run`] and its variants, and the server's
//!   configuration (limits, tokens, the cursor secret, the Redis protocol).
//! - [`stack`]: the engine and the layers over it, built in one place, for
//!   the server and the tests alike.
//! - [`storage`]: the [`Store`] trait and its types; the engines
//!   ([`storage::embedded`], fjall with our own group commit, and
//!   [`storage::postgres`], for many servers on one database) and their
//!   configurations; [`storage::rules`], what a write does (conditions,
//!   versions, timestamps, expiry), decided once for both engines; and
//!   [`storage::layer`], the read caches over a store.
//! - [`types`]: the JSON bodies of the API, as the server writes them and the
//!   client reads them, with the error codes both sides share.
//! - [`tls`]: rustls configurations of the server and the client.
//!
//! `examples/` shows both uses: a client program, and the stack and server
//! inside a program of its own.
//!
//! # Layout
//!
//! Beside the public modules above, private ones:
//!
//! - `api`: the HTTP contract (routes, request parsing, limits, the error
//!   shape); `api::routes` lists every route, `api::types` is [`types`].
//! - `resp`: the Redis protocol (RESP2 and RESP3) on the same store.
//! - `storage` also holds, privately, the change records (`changes`), the
//!   live feed watchers follow (`feed`), and the guard layer (storage timeout
//!   and latency).
//! - `telemetry`: the Prometheus recorder behind `GET /metrics`; `timing`:
//!   where a request's time went, for the slow-request log.
//! - `error`: what can fail inside the library (re-exported at the root).
//! - `files`: directories and small files made durable (parents fsynced,
//!   atomic replacement).
//! - `src/main.rs`, `src/cli/` and `src/loadgen/`: the `kvstore` binary
//!   (argument parsing and wiring, and the load generator of `kvstore
//!   bench`), not part of the library.
//!
//! The `fuzzing` and `internals` features expose entry points for `fuzz/`,
//! `benches/` and `tests/` (the parsers, the service without a listener,
//! the embedded engine's commit hook and clock):
//! they are not part of the library's API.

/// An enum whose variants a flag names (`--durability fsync`): the list of
/// them, each one's name, `Display` and `FromStr`, from one table.
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident ($what:literal) {
            $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every variant, in the order a help text lists them.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The name a flag takes.
            pub fn name(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::error::InvalidValue;

            fn from_str(name: &str) -> Result<Self, Self::Err> {
                Self::ALL.iter().copied().find(|v| v.name() == name).ok_or_else(|| {
                    let names: Vec<&str> = Self::ALL.iter().map(|v| v.name()).collect();
                    $crate::error::InvalidValue(format!(
                        "{name:?}: the {} is one of {}",
                        $what,
                        names.join(", ")
                    ))
                })
            }
        }
    };
}

mod api;
pub mod client;
mod error;
mod files;
mod resp;
pub mod server;
pub mod stack;
pub mod storage;
mod telemetry;
mod timing;
pub mod tls;

/// The JSON bodies of the HTTP API, as the server writes them and the client
/// reads them (and the other way round for requests).
pub use api::types;

// What a user of the crate reaches for first; the rest lives in the public
// modules above.
/// The typed client of the HTTP API.
pub use client::{Client, ClientError, ClientOptions};
/// What the store can fail with, and a value given as text that does not read.
pub use error::{InvalidValue, StoreError, StoreResult};
/// Serving the store: the server's configuration ([`server::run`] and its
/// variants serve a store under it).
pub use server::{Security, ServerConfig};
/// The store that `kvstore serve` serves, built from its configuration.
pub use stack::{Backend, Stack, StackConfig};
/// The store trait every backend and layer implements.
pub use storage::Store;

/// The fuzz targets' entry points (fuzz/): not part of the library's API.
#[doc(hidden)]
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    pub use crate::api::fuzzing::*;
    pub use crate::resp::frame::{FrameLimits, read_all};
}

/// The HTTP service without a listener, and what the tests compare the
/// server's answers with, for benches/ and tests/: not part of the library's
/// API.
#[doc(hidden)]
#[cfg(feature = "internals")]
pub mod internals {
    pub use crate::api::console::CONTENT_SECURITY_POLICY;
    pub use crate::api::{AppState, EntryView, Observe, service};
}

#[cfg(test)]
mod tests {
    use crate::storage::embedded::Durability;
    use crate::storage::layer::cache::CacheMode;

    #[test]
    fn named_enums_read_back_their_names_and_refuse_others() {
        for mode in Durability::ALL {
            assert_eq!(mode.to_string().parse::<Durability>(), Ok(*mode));
        }
        for mode in CacheMode::ALL {
            assert_eq!(mode.to_string().parse::<CacheMode>(), Ok(*mode));
        }
        assert_eq!(
            "sync".parse::<Durability>(),
            Err(crate::error::InvalidValue(
                "\"sync\": the durability is one of fsync, buffered".to_owned()
            ))
        );
    }
}
