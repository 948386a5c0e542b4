//! Cursor decoding for any scope and any cursor text: a cursor is accepted
//! only inside its range, and every key inside round-trips.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    start: Option<&'a [u8]>,
    end: Option<&'a [u8]>,
    prefix: Option<&'a [u8]>,
    reverse: bool,
    cursor: &'a str,
    key: &'a [u8],
}

fuzz_target!(|input: Input<'_>| {
    kvstore::fuzzing::cursor(
        input.start,
        input.end,
        input.prefix,
        input.reverse,
        input.cursor,
        input.key,
    );
});
