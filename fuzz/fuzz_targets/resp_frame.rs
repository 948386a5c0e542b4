//! The RESP frame parser on any bytes: it never panics, and every command it
//! returns takes bytes from the buffer, so a connection's loop always ends.
#![no_main]

use bytes::BytesMut;
use kvstore::resp::frame::{FrameLimits, parse_command};
use libfuzzer_sys::fuzz_target;

// Small limits, so that the fuzzer reaches the "too big" paths.
const LIMITS: FrameLimits = FrameLimits {
    max_bulk: 4096,
    max_args: 64,
    max_inline: 256,
};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        match parse_command(&mut buf, &LIMITS) {
            Ok(Some(_)) => assert!(buf.len() < before, "a command that took no bytes"),
            Ok(None) | Err(_) => break,
        }
    }
});
