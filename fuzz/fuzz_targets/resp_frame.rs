//! The RESP frame parser on any bytes: it never panics, every command it
//! returns takes bytes from the buffer (so a connection's loop always ends),
//! and the bytes read the same whether they arrive at once or in pieces.
#![no_main]

use kvstore::fuzzing::{FrameLimits, read_all};
use libfuzzer_sys::fuzz_target;

// Small limits, so that the fuzzer reaches the "too big" paths.
const LIMITS: FrameLimits = FrameLimits {
    max_bulk: 4096,
    max_args: 64,
    max_inline: 256,
};

fuzz_target!(|data: &[u8]| {
    // The first byte says how the rest arrives: in pieces of 1 to 256 bytes.
    let Some((&piece, input)) = data.split_first() else {
        return;
    };
    let size = usize::from(piece) + 1;
    let whole = read_all(LIMITS, [input]);
    let pieces = read_all(LIMITS, input.chunks(size));
    assert_eq!(whole, pieces, "whole and in pieces of {size}");
});
