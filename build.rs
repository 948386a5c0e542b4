//! Tells the integration tests which services they may use. A test that
//! needs PostgreSQL or Redis is built as ignored, with the reason, when its
//! URL variable is unset, so that `cargo test` reports it as ignored rather
//! than passing it without running it.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    for (variable, cfg) in [
        ("KVSTORE_TEST_POSTGRES_URL", "kvstore_test_postgres"),
        ("KVSTORE_TEST_REDIS_URL", "kvstore_test_redis"),
        ("KVSTORE_TEST_PGBOUNCER_URL", "kvstore_test_pgbouncer"),
    ] {
        println!("cargo::rerun-if-env-changed={variable}");
        println!("cargo::rustc-check-cfg=cfg({cfg})");
        if std::env::var(variable).is_ok_and(|url| !url.is_empty()) {
            println!("cargo::rustc-cfg={cfg}");
        }
    }
}
