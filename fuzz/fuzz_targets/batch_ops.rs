//! Batch validation on structured batches (any keys, values, conditions,
//! expiries and op kinds), past what random JSON reaches.
#![no_main]

use arbitrary::Arbitrary;
use kvstore::types::{BatchOp, BatchOpKind, BatchRequest};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Op {
    delete: bool,
    key: String,
    value: Option<String>,
    value_base64: Option<String>,
    if_version: Option<u64>,
    if_absent: Option<bool>,
    ttl_ms: Option<u64>,
    keep_ttl: Option<bool>,
    lease: Option<String>,
}

fuzz_target!(|ops: Vec<Op>| {
    let ops = ops
        .into_iter()
        .map(|op| BatchOp {
            op: if op.delete {
                BatchOpKind::Delete
            } else {
                BatchOpKind::Put
            },
            key: op.key,
            value: op.value,
            value_base64: op.value_base64,
            if_version: op.if_version,
            if_absent: op.if_absent,
            ttl_ms: op.ttl_ms,
            keep_ttl: op.keep_ttl,
            lease: op.lease,
        })
        .collect();
    kvstore::fuzzing::batch_ops(BatchRequest { ops });
});
