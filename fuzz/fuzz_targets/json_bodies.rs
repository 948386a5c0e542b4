//! Any bytes as the JSON body of PUT /v1/kv/{key}, POST /v1/batch and
//! POST /v1/batch/get, through the handlers' own parsing and checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    kvstore::fuzzing::json_bodies(body);
});
