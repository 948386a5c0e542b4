//! The fuzz targets' entry points (`kvstore::fuzzing`, see `fuzz/`)
//! under proptest, so that every `cargo test` runs a few hundred hostile
//! inputs through key decoding, cursor decoding, JSON bodies and batch
//! validation; the fuzzers run for longer by hand.

use kvstore::fuzzing;
use kvstore::types::{BatchOp, BatchOpKind, BatchRequest};
use proptest::prelude::*;

/// Short byte strings from a small alphabet, so that ranges, prefixes and
/// keys meet often.
fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop::sample::select(b"ab/\x00\xff%".to_vec()), 0..6)
}

fn op() -> impl Strategy<Value = BatchOp> {
    (
        any::<bool>(),
        "[ab/%\u{0}é]{0,4}",
        prop::option::of("[a-z]{0,70}"),
        prop::option::of("[A-Za-z0-9+/=!]{0,12}"),
        prop::option::of(0u64..3),
        prop::option::of(any::<bool>()),
        prop::option::of(0u64..3),
        prop::option::of("[0-9a-fz]{0,17}"),
    )
        .prop_map(
            |(delete, key, value, value_base64, if_version, if_absent, ttl_ms, lease)| BatchOp {
                value,
                value_base64,
                if_version,
                if_absent,
                ttl_ms,
                lease,
                ..BatchOp::new(
                    if delete {
                        BatchOpKind::Delete
                    } else {
                        BatchOpKind::Put
                    },
                    key,
                )
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn path_keys(raw in "[a-z/%+0-9A-F\u{0}é]{0,12}") {
        fuzzing::key_from_path(&raw);
    }

    #[test]
    fn cursors(
        start in prop::option::of(bytes()),
        end in prop::option::of(bytes()),
        prefix in prop::option::of(bytes()),
        reverse in any::<bool>(),
        cursor in "[A-Za-z0-9_-]{0,40}",
        key in bytes(),
    ) {
        fuzzing::cursor(
            start.as_deref(),
            end.as_deref(),
            prefix.as_deref(),
            reverse,
            &cursor,
            &key,
        );
    }

    #[test]
    fn json_bodies(body in prop::collection::vec(any::<u8>(), 0..64)) {
        fuzzing::json_bodies(&body);
    }

    #[test]
    fn json_shaped_bodies(
        name in prop::sample::select(vec!["ops", "keys", "value", "value_base64", "op"]),
        inner in "[\\[\\]{}\",:a-z0-9 ]{0,40}",
    ) {
        fuzzing::json_bodies(format!("{{\"{name}\": {inner}}}").as_bytes());
    }

    #[test]
    fn batches(ops in prop::collection::vec(op(), 0..8)) {
        fuzzing::batch_ops(BatchRequest { ops });
    }
}
