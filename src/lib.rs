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
//!   backend, for many servers on one database; [`storage::rules`], what a
//!   write does (conditions, versions, timestamps, expiry), decided once for
//!   both; [`storage::feed`], the live change feed that watchers follow; and
//!   [`storage::layer`], the stores over a store: the read cache that never
//!   serves a version older than one acknowledged, the same cache shared in
//!   Redis, and the guard (storage timeout and latency).
//! - [`stack`]: the store that `kvstore serve` serves, built in one place:
//!   the engine, the guard and the cache, for the server and the tests alike.
//! - [`resp`]: the Redis protocol (RESP2 and RESP3) on the same store.
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
            type Err = String;

            fn from_str(name: &str) -> Result<Self, String> {
                Self::ALL.iter().copied().find(|v| v.name() == name).ok_or_else(|| {
                    let names: Vec<&str> = Self::ALL.iter().map(|v| v.name()).collect();
                    format!("{name:?}: the {} is one of {}", $what, names.join(", "))
                })
            }
        }
    };
}

pub mod api;
pub mod client;
pub mod error;
pub mod files;
pub mod resp;
pub mod server;
pub mod stack;
pub mod storage;
pub mod telemetry;
pub mod timing;
pub mod tls;

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
            Err("\"sync\": the durability is one of fsync, buffered".to_owned())
        );
    }
}
