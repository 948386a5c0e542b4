//! The RESP frame parser on any bytes: it never panics, every command it
//! returns takes bytes from the buffer (so a connection's loop always ends),
//! and the bytes read the same whether they arrive at once or in pieces.
#![no_main]

use bytes::{Bytes, BytesMut};
use kvstore::resp::frame::{CommandParser, FrameLimits, ProtocolError};
use libfuzzer_sys::fuzz_target;

// Small limits, so that the fuzzer reaches the "too big" paths.
const LIMITS: FrameLimits = FrameLimits {
    max_bulk: 4096,
    max_args: 64,
    max_inline: 256,
};

fn read_all<'a>(
    pieces: impl Iterator<Item = &'a [u8]>,
) -> (Vec<Vec<Bytes>>, Option<ProtocolError>) {
    let mut parser = CommandParser::new(LIMITS);
    let mut buf = BytesMut::new();
    let mut commands = Vec::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            match parser.next_command(&mut buf) {
                Ok(Some(command)) => {
                    assert!(buf.len() < before, "a command that took no bytes");
                    commands.push(command);
                }
                Ok(None) => break,
                Err(error) => return (commands, Some(error)),
            }
        }
    }
    (commands, None)
}

fuzz_target!(|data: &[u8]| {
    // The first byte says how the rest arrives: in pieces of 1 to 256 bytes.
    let Some((&piece, input)) = data.split_first() else {
        return;
    };
    let whole = read_all(std::iter::once(input));
    let pieces = read_all(input.chunks(usize::from(piece) + 1));
    assert_eq!(
        whole,
        pieces,
        "whole and in pieces of {}",
        usize::from(piece) + 1
    );
});
