//! The key of a `/v1/kv/{key}` path: strict percent-decoding, UTF-8 and the
//! key rules, on any text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|raw: &str| {
    let _ = kvstore::fuzzing::key_from_path(raw);
});
