//! RESP framing: commands in (RESP arrays of bulk strings, or inline lines as
//! redis-cli and `PING_INLINE` send), replies out in RESP2 or RESP3.
//!
//! A command that has not fully arrived is not read again from its start on
//! every read: the parser keeps the arguments it has found and how far the
//! current line was searched for its end, so that a command trickled in a
//! few bytes at a time costs time linear in its size. A bulk string's bytes
//! are skipped by its declared length, never scanned.

use std::ops::Range;

use bytes::{Buf, Bytes, BytesMut};

/// Limits on what a client may send.
#[derive(Debug, Clone, Copy)]
pub struct FrameLimits {
    /// Most bytes in one bulk string (a value, a key).
    pub max_bulk: usize,
    /// Most elements in one command array.
    pub max_args: usize,
    /// Most bytes of one inline command line.
    pub max_inline: usize,
}

/// A malformed frame: the connection gets `-ERR Protocol error: <message>` and is closed, as Redis does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

impl ProtocolError {
    fn new(message: &str) -> Self {
        Self(message.to_owned())
    }
}

/// Reads commands from the front of one connection's buffer.
///
/// Between calls the caller may only append to the buffer: the parser
/// remembers positions in the bytes it has seen but not yet taken.
#[derive(Debug)]
pub struct CommandParser {
    limits: FrameLimits,
    /// The array at the front of the buffer, once its count line is in.
    array: Option<PartialArray>,
    /// How many bytes of the current line, from its start, are known to
    /// hold no terminator.
    scanned: usize,
}

#[derive(Debug)]
struct PartialArray {
    args: usize,
    /// The arguments found so far, as ranges of the buffer.
    found: Vec<Range<usize>>,
    /// Where the next argument's `$N` line starts.
    next: usize,
}

enum Parsed {
    Incomplete,
    /// A command without arguments, already taken from the buffer.
    Empty,
    Command(Vec<Bytes>),
}

impl CommandParser {
    pub fn new(limits: FrameLimits) -> Self {
        Self {
            limits,
            array: None,
            scanned: 0,
        }
    }

    /// Takes one complete command from the front of `buf`, if there is one:
    /// a RESP array of bulk strings (`*2\r\n$3\r\nGET\r\n$1\r\nk\r\n`), or an
    /// inline command (a line of space-separated words ending in \n or
    /// \r\n, split as Redis's `sdssplitargs` does).
    ///
    /// `Ok(None)`: incomplete, read more; only empty commands (an empty
    /// inline line, `*0`, `*-1`), which are skipped, have then been taken
    /// from `buf`. A RESP array's arguments are zero-copy slices of the
    /// buffer. After an error the connection is to be closed.
    pub fn next_command(
        &mut self,
        buf: &mut BytesMut,
    ) -> Result<Option<Vec<Bytes>>, ProtocolError> {
        loop {
            let parsed = match self.array.take() {
                Some(array) => self.read_arguments(buf, array),
                None => match buf.first() {
                    None => return Ok(None),
                    Some(b'*') => self.read_array(buf),
                    Some(_) => self.read_inline(buf),
                },
            };
            match parsed {
                Ok(Parsed::Incomplete) => return Ok(None),
                Ok(Parsed::Empty) => continue,
                Ok(Parsed::Command(args)) => return Ok(Some(args)),
                Err(error) => {
                    self.scanned = 0;
                    return Err(error);
                }
            }
        }
    }

    fn read_array(&mut self, buf: &mut BytesMut) -> Result<Parsed, ProtocolError> {
        const INVALID_COUNT: &str = "invalid multibulk length";

        let Some(count) = self.read_header(buf, 0, "too big mbulk count string", INVALID_COUNT)?
        else {
            return Ok(Parsed::Incomplete);
        };
        if count.value <= 0 {
            // Redis skips `*0` and `*-1` (and any count below zero) silently.
            buf.advance(count.next);
            return Ok(Parsed::Empty);
        }
        let args = usize::try_from(count.value)
            .ok()
            .filter(|&n| n <= self.limits.max_args)
            .ok_or_else(|| ProtocolError::new(INVALID_COUNT))?;
        // The capacity is not taken from the client's count, which costs
        // nothing to send.
        let array = PartialArray {
            args,
            found: Vec::with_capacity(args.min(1024)),
            next: count.next,
        };
        self.read_arguments(buf, array)
    }

    /// Finds the array's remaining arguments; nothing is taken from `buf`
    /// until all of them are in.
    fn read_arguments(
        &mut self,
        buf: &mut BytesMut,
        mut array: PartialArray,
    ) -> Result<Parsed, ProtocolError> {
        const INVALID_BULK: &str = "invalid bulk length";

        while array.found.len() < array.args {
            let Some(&kind) = buf.get(array.next) else {
                self.array = Some(array);
                return Ok(Parsed::Incomplete);
            };
            if kind != b'$' {
                return Err(ProtocolError(format!(
                    "expected '$', got '{}'",
                    printable(kind)
                )));
            }
            let Some(bulk) =
                self.read_header(buf, array.next, "too big bulk count string", INVALID_BULK)?
            else {
                self.array = Some(array);
                return Ok(Parsed::Incomplete);
            };
            let len = usize::try_from(bulk.value)
                .ok()
                .filter(|&n| n <= self.limits.max_bulk)
                .ok_or_else(|| ProtocolError::new(INVALID_BULK))?;
            let end = bulk.next.saturating_add(len);
            let after = end.saturating_add(2);
            if buf.len() < after {
                // The `$N` line is read again when more has come: it is
                // short, unlike the string it announces.
                self.array = Some(array);
                return Ok(Parsed::Incomplete);
            }
            // Redis skips these two bytes unread; a client that sent a
            // length that does not match its data would otherwise have the
            // rest of the data read as the next command.
            if buf.get(end..after) != Some(b"\r\n".as_slice()) {
                return Err(ProtocolError::new("expected CRLF after bulk string"));
            }
            array.found.push(bulk.next..end);
            array.next = after;
        }
        let frame = buf.split_to(array.next).freeze();
        Ok(Parsed::Command(
            array
                .found
                .into_iter()
                .map(|range| frame.slice(range))
                .collect(),
        ))
    }

    /// Reads the number of the header line starting at `start` (its type
    /// byte, `*` or `$`, already checked). `None`: the line is not complete
    /// yet.
    fn read_header(
        &mut self,
        buf: &[u8],
        start: usize,
        too_long: &str,
        invalid: &str,
    ) -> Result<Option<Header>, ProtocolError> {
        let rest = buf.get(start..).unwrap_or_default();
        // Like Redis, a line without its '\r' is waited for until it passes
        // the inline limit; the search stops there so that an endless line
        // is not scanned further.
        let window = rest
            .get(..self.limits.max_inline.saturating_add(1))
            .unwrap_or(rest);
        let Some(cr) = find_from(window, self.scanned, b'\r') else {
            if rest.len() > self.limits.max_inline {
                return Err(ProtocolError::new(too_long));
            }
            self.scanned = window.len();
            return Ok(None);
        };
        match rest.get(cr + 1) {
            None => {
                self.scanned = cr;
                return Ok(None);
            }
            Some(b'\n') => {}
            Some(_) => return Err(ProtocolError::new(invalid)),
        }
        self.scanned = 0;
        let digits = window.get(1..cr).unwrap_or_default();
        let value = parse_redis_integer(digits).ok_or_else(|| ProtocolError::new(invalid))?;
        Ok(Some(Header {
            value,
            next: start + cr + 2,
        }))
    }

    fn read_inline(&mut self, buf: &mut BytesMut) -> Result<Parsed, ProtocolError> {
        const TOO_BIG: &str = "too big inline request";

        // A line longer than the limit is refused whether or not its '\n'
        // came in the same read (Redis refuses it only when it did not), so
        // that the limit does not depend on how the bytes were split. With
        // its "\r\n", a line of the limit's length ends at max_inline + 1.
        let bytes: &[u8] = buf;
        let window = bytes
            .get(..self.limits.max_inline.saturating_add(2))
            .unwrap_or(bytes);
        let Some(newline) = find_from(window, self.scanned, b'\n') else {
            let pending = window.strip_suffix(b"\r").unwrap_or(window);
            if pending.len() > self.limits.max_inline {
                return Err(ProtocolError::new(TOO_BIG));
            }
            self.scanned = window.len();
            return Ok(Parsed::Incomplete);
        };
        self.scanned = 0;
        let line = window.get(..newline).unwrap_or_default();
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > self.limits.max_inline {
            return Err(ProtocolError::new(TOO_BIG));
        }
        let args =
            split_args(line).ok_or_else(|| ProtocolError::new("unbalanced quotes in request"))?;
        buf.advance(newline + 1);
        if args.is_empty() {
            return Ok(Parsed::Empty);
        }
        Ok(Parsed::Command(args.into_iter().map(Bytes::from).collect()))
    }
}

/// What a header line (`*N` or `$N`) holds: its number and where the next
/// line starts.
struct Header {
    value: i64,
    next: usize,
}

/// The position of the first `byte` in `line` at or after `from`.
fn find_from(line: &[u8], from: usize, byte: u8) -> Option<usize> {
    let from = from.min(line.len());
    line.get(from..)?
        .iter()
        .position(|&b| b == byte)
        .map(|at| from + at)
}

/// Splits an inline line into arguments exactly as Redis's `sdssplitargs`:
/// words separated by blanks; `"..."` with the escapes `\xHH`, `\n`, `\r`,
/// `\t`, `\b`, `\a` and `\<any>`; `'...'` with only `\'`; a closing quote
/// followed by anything but a blank is an error. Like the C original, the
/// line ends at its first NUL byte. `None`: unbalanced quotes.
fn split_args(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    // The C code reads a NUL-terminated string; reading past the end as
    // NUL keeps its branches (and so its behaviour) one for one.
    let at = |i: usize| line.get(i).copied().unwrap_or(0);
    let is_c_space = |b: u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c);
    let mut args = Vec::new();
    let mut p = 0;
    loop {
        while at(p) != 0 && is_c_space(at(p)) {
            p += 1;
        }
        if at(p) == 0 {
            return Some(args);
        }
        let mut current = Vec::new();
        let mut in_double = false;
        let mut in_single = false;
        loop {
            let c = at(p);
            if in_double {
                if c == b'\\'
                    && at(p + 1) == b'x'
                    && let (Some(high), Some(low)) = (hex_value(at(p + 2)), hex_value(at(p + 3)))
                {
                    current.push(high * 16 + low);
                    p += 4;
                    continue;
                }
                if c == b'\\' && at(p + 1) != 0 {
                    p += 1;
                    current.push(match at(p) {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        other => other,
                    });
                } else if c == b'"' {
                    if at(p + 1) != 0 && !is_c_space(at(p + 1)) {
                        return None;
                    }
                    p += 1;
                    break;
                } else if c == 0 {
                    return None;
                } else {
                    current.push(c);
                }
            } else if in_single {
                if c == b'\\' && at(p + 1) == b'\'' {
                    p += 1;
                    current.push(b'\'');
                } else if c == b'\'' {
                    if at(p + 1) != 0 && !is_c_space(at(p + 1)) {
                        return None;
                    }
                    p += 1;
                    break;
                } else if c == 0 {
                    return None;
                } else {
                    current.push(c);
                }
            } else {
                match c {
                    b' ' | b'\n' | b'\r' | b'\t' | 0 => {
                        if c != 0 {
                            p += 1;
                        }
                        break;
                    }
                    b'"' => in_double = true,
                    b'\'' => in_single = true,
                    other => current.push(other),
                }
            }
            p += 1;
        }
        args.push(current);
    }
}

fn hex_value(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|digit| u8::try_from(digit).ok())
}

/// Parses a length as Redis's `string2ll` does: an optional '-', then
/// digits without leading zeros (but "0" itself); no '+', no spaces.
fn parse_redis_integer(digits: &[u8]) -> Option<i64> {
    let (negative, magnitude) = match digits.split_first()? {
        (b'-', rest) => (true, rest),
        _ => (false, digits),
    };
    match magnitude {
        [b'0'] if !negative => return Some(0),
        [b'1'..=b'9', ..] => {}
        _ => return None,
    }
    let mut value: i64 = 0;
    for &b in magnitude {
        if !b.is_ascii_digit() {
            return None;
        }
        let digit = i64::from(b - b'0');
        // Accumulating downwards reaches i64::MIN, which has no positive twin.
        value = value.checked_mul(10)?.checked_sub(digit)?;
    }
    if negative {
        Some(value)
    } else {
        value.checked_neg()
    }
}

/// A byte as an error message may show it: the message goes back to the
/// client on one line, so a control byte or a non-UTF-8 byte is escaped.
fn printable(b: u8) -> String {
    if b.is_ascii_graphic() || b == b' ' {
        char::from(b).to_string()
    } else {
        b.escape_ascii().to_string()
    }
}

/// A reply, written for the connection's protocol version (2 or 3).
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `+OK`
    Simple(&'static str),
    /// `-ERR ...`: the whole line after '-', e.g. "ERR unknown command 'foo'", "WRONGTYPE ...", "NOAUTH Authentication required."
    Error(String),
    Integer(i64),
    Bulk(Bytes),
    /// A null: `$-1` in RESP2, `_` in RESP3.
    Null,
    /// A null array: `*-1` in RESP2, `_` in RESP3.
    NullArray,
    Array(Vec<Reply>),
    /// `%` in RESP3; a flat array of key, value, key, value in RESP2.
    Map(Vec<(Reply, Reply)>),
    /// `#t`/`#f` in RESP3; integer 1/0 in RESP2.
    Boolean(bool),
    /// `=` verbatim string `txt:` in RESP3 (INFO uses it); a bulk string in RESP2.
    Verbatim(String),
}

impl Reply {
    /// Appends the reply to `out`, for protocol version `protocol` (3, or
    /// RESP2 for any other value).
    pub fn encode(&self, protocol: u8, out: &mut BytesMut) {
        let resp3 = protocol == 3;
        match self {
            Reply::Simple(text) => put_line(out, b'+', text),
            Reply::Error(text) => put_line(out, b'-', text),
            Reply::Integer(n) => put_header(out, b':', *n),
            Reply::Bulk(data) => put_bulk(out, b'$', data),
            Reply::Null if resp3 => out.extend_from_slice(b"_\r\n"),
            Reply::Null => out.extend_from_slice(b"$-1\r\n"),
            Reply::NullArray if resp3 => out.extend_from_slice(b"_\r\n"),
            Reply::NullArray => out.extend_from_slice(b"*-1\r\n"),
            Reply::Array(items) => {
                put_header(out, b'*', length(items.len()));
                for item in items {
                    item.encode(protocol, out);
                }
            }
            Reply::Map(pairs) => {
                if resp3 {
                    put_header(out, b'%', length(pairs.len()));
                } else {
                    put_header(out, b'*', length(pairs.len()).saturating_mul(2));
                }
                for (key, value) in pairs {
                    key.encode(protocol, out);
                    value.encode(protocol, out);
                }
            }
            Reply::Boolean(b) if resp3 => {
                out.extend_from_slice(if *b { b"#t\r\n" } else { b"#f\r\n" });
            }
            Reply::Boolean(b) => put_header(out, b':', i64::from(*b)),
            Reply::Verbatim(text) if resp3 => {
                put_header(out, b'=', length(text.len()).saturating_add(4));
                out.extend_from_slice(b"txt:");
                out.extend_from_slice(text.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            Reply::Verbatim(text) => put_bulk(out, b'$', text.as_bytes()),
        }
    }
}

fn length(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A simple string or an error: one line, so a '\r' or '\n' inside would
/// end it early and desynchronise the client; Redis turns them into
/// spaces in errors, and so do we in both.
fn put_line(out: &mut BytesMut, kind: u8, text: &str) {
    out.reserve(text.len() + 3);
    out.extend_from_slice(&[kind]);
    let start = out.len();
    out.extend_from_slice(text.as_bytes());
    for b in out.get_mut(start..).unwrap_or_default() {
        if *b == b'\r' || *b == b'\n' {
            *b = b' ';
        }
    }
    out.extend_from_slice(b"\r\n");
}

fn put_bulk(out: &mut BytesMut, kind: u8, data: &[u8]) {
    put_header(out, kind, length(data.len()));
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// `<kind><n>\r\n`, the number in decimal without going through a String.
fn put_header(out: &mut BytesMut, kind: u8, n: i64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    let mut magnitude = n.unsigned_abs();
    loop {
        start -= 1;
        if let Some(slot) = digits.get_mut(start) {
            // The remainder is below 10.
            *slot = b'0' + (magnitude % 10) as u8;
        }
        magnitude /= 10;
        if magnitude == 0 {
            break;
        }
    }
    out.extend_from_slice(&[kind]);
    if n < 0 {
        out.extend_from_slice(b"-");
    }
    out.extend_from_slice(digits.get(start..).unwrap_or_default());
    out.extend_from_slice(b"\r\n");
}

/// The commands one parser reads from `pieces` arriving one after the
/// other, and the error that ended them, if any; asserts that every command
/// takes bytes, so that a connection's loop always ends. The property the
/// proptest and the fuzz target check: any bytes read alike whole or in
/// pieces.
#[doc(hidden)]
#[cfg(any(test, feature = "fuzzing"))]
pub fn read_all<'a>(
    limits: FrameLimits,
    pieces: impl IntoIterator<Item = &'a [u8]>,
) -> (Vec<Vec<Bytes>>, Option<ProtocolError>) {
    let mut parser = CommandParser::new(limits);
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: FrameLimits = FrameLimits {
        max_bulk: 1024,
        max_args: 16,
        max_inline: 64,
    };

    fn parse(bytes: &[u8]) -> Result<Option<Vec<Bytes>>, ProtocolError> {
        CommandParser::new(LIMITS).next_command(&mut BytesMut::from(bytes))
    }

    fn command(words: &[&[u8]]) -> Vec<Bytes> {
        words.iter().map(|w| Bytes::copy_from_slice(w)).collect()
    }

    fn error(message: &str) -> Result<Option<Vec<Bytes>>, ProtocolError> {
        Err(ProtocolError(message.to_owned()))
    }

    fn encode_array(args: &[Vec<u8>]) -> Vec<u8> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            out.extend_from_slice(arg);
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    /// Every command `buf` holds, until it holds no complete one.
    fn drain(parser: &mut CommandParser, buf: &mut BytesMut) -> Vec<Vec<Bytes>> {
        let mut commands = Vec::new();
        while let Some(command) = parser.next_command(buf).unwrap() {
            commands.push(command);
        }
        commands
    }

    fn encoded(reply: &Reply, protocol: u8) -> Vec<u8> {
        let mut out = BytesMut::new();
        reply.encode(protocol, &mut out);
        out.to_vec()
    }

    #[track_caller]
    fn assert_encodes(reply: Reply, resp2: &[u8], resp3: &[u8]) {
        assert_eq!(
            encoded(&reply, 2).escape_ascii().to_string(),
            resp2.escape_ascii().to_string(),
            "RESP2 of {reply:?}"
        );
        assert_eq!(
            encoded(&reply, 3).escape_ascii().to_string(),
            resp3.escape_ascii().to_string(),
            "RESP3 of {reply:?}"
        );
    }

    #[test]
    fn replies_encode_as_redis_writes_them() {
        assert_encodes(Reply::Simple("OK"), b"+OK\r\n", b"+OK\r\n");
        assert_encodes(Reply::Simple("string"), b"+string\r\n", b"+string\r\n");
        assert_encodes(
            Reply::Error("ERR unknown command 'foo'".into()),
            b"-ERR unknown command 'foo'\r\n",
            b"-ERR unknown command 'foo'\r\n",
        );
        assert_encodes(Reply::Integer(0), b":0\r\n", b":0\r\n");
        assert_encodes(Reply::Integer(-42), b":-42\r\n", b":-42\r\n");
        assert_encodes(
            Reply::Integer(i64::MIN),
            b":-9223372036854775808\r\n",
            b":-9223372036854775808\r\n",
        );
        assert_encodes(
            Reply::Integer(i64::MAX),
            b":9223372036854775807\r\n",
            b":9223372036854775807\r\n",
        );
        assert_encodes(
            Reply::Bulk(Bytes::from_static(b"a\r\nb")),
            b"$4\r\na\r\nb\r\n",
            b"$4\r\na\r\nb\r\n",
        );
        assert_encodes(Reply::Bulk(Bytes::new()), b"$0\r\n\r\n", b"$0\r\n\r\n");
        assert_encodes(Reply::Null, b"$-1\r\n", b"_\r\n");
        assert_encodes(Reply::NullArray, b"*-1\r\n", b"_\r\n");
        assert_encodes(Reply::Array(vec![]), b"*0\r\n", b"*0\r\n");
        assert_encodes(
            Reply::Array(vec![
                Reply::Bulk(Bytes::from_static(b"v")),
                Reply::Null,
                Reply::Integer(7),
            ]),
            b"*3\r\n$1\r\nv\r\n$-1\r\n:7\r\n",
            b"*3\r\n$1\r\nv\r\n_\r\n:7\r\n",
        );
        assert_encodes(
            Reply::Map(vec![
                (
                    Reply::Bulk(Bytes::from_static(b"server")),
                    Reply::Bulk(Bytes::from_static(b"redis")),
                ),
                (Reply::Bulk(Bytes::from_static(b"proto")), Reply::Integer(3)),
            ]),
            b"*4\r\n$6\r\nserver\r\n$5\r\nredis\r\n$5\r\nproto\r\n:3\r\n",
            b"%2\r\n$6\r\nserver\r\n$5\r\nredis\r\n$5\r\nproto\r\n:3\r\n",
        );
        assert_encodes(Reply::Boolean(true), b":1\r\n", b"#t\r\n");
        assert_encodes(Reply::Boolean(false), b":0\r\n", b"#f\r\n");
        assert_encodes(
            Reply::Verbatim("# Server\r\n".into()),
            b"$10\r\n# Server\r\n\r\n",
            b"=14\r\ntxt:# Server\r\n\r\n",
        );
    }

    #[test]
    fn a_line_reply_cannot_break_the_framing() {
        assert_eq!(
            encoded(&Reply::Error("ERR bad\r\nthing".into()), 2),
            b"-ERR bad  thing\r\n"
        );
    }

    #[test]
    fn arrays_of_bulk_strings_parse() {
        assert_eq!(
            parse(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"),
            Ok(Some(command(&[b"GET", b"k"])))
        );
        assert_eq!(
            parse(b"*3\r\n$3\r\nSET\r\n$0\r\n\r\n$4\r\n\r\n\0\xff\r\n"),
            Ok(Some(command(&[b"SET", b"", b"\r\n\0\xff"])))
        );
    }

    #[test]
    fn arguments_share_the_buffer() {
        let mut buf = BytesMut::from(&b"*1\r\n$5\r\nhello\r\n"[..]);
        let start = buf.as_ptr() as usize;
        let args = CommandParser::new(LIMITS)
            .next_command(&mut buf)
            .unwrap()
            .unwrap();
        assert_eq!(args[0].as_ptr() as usize, start + 8);
    }

    #[test]
    fn empty_commands_are_skipped() {
        assert_eq!(
            parse(b"*0\r\n*-1\r\n\r\n\n   \r\nPING\r\n"),
            Ok(Some(command(&[b"PING"])))
        );
        let mut buf = BytesMut::from(&b"*0\r\n\n*1\r\n$4\r\nPI"[..]);
        assert_eq!(CommandParser::new(LIMITS).next_command(&mut buf), Ok(None));
        assert_eq!(&buf[..], b"*1\r\n$4\r\nPI");
    }

    #[test]
    fn pipelined_commands_parse_at_every_split() {
        let pipeline: &[u8] =
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nv\r\nlu\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r\nPING\r\n";
        let expected = vec![
            command(&[b"SET", b"k", b"v\r\nlu"]),
            command(&[b"GET", b"k"]),
            command(&[b"PING"]),
        ];
        let ends = [31, 51, 65];
        assert_eq!(pipeline.len(), 65);

        for split in 0..=pipeline.len() {
            let mut parser = CommandParser::new(LIMITS);
            let mut buf = BytesMut::from(&pipeline[..split]);
            let mut commands = drain(&mut parser, &mut buf);
            assert_eq!(
                commands.len(),
                ends.iter().filter(|&&end| end <= split).count()
            );
            buf.extend_from_slice(&pipeline[split..]);
            commands.extend(drain(&mut parser, &mut buf));
            assert_eq!(commands, expected, "split at {split}");
            assert!(buf.is_empty());
        }

        // One byte at a time: nothing is taken until a command is complete.
        let mut parser = CommandParser::new(LIMITS);
        let mut buf = BytesMut::new();
        let mut commands = Vec::new();
        for (i, &b) in pipeline.iter().enumerate() {
            buf.extend_from_slice(&[b]);
            let before = buf.len();
            match parser.next_command(&mut buf).unwrap() {
                Some(command) => {
                    assert!(ends.contains(&(i + 1)), "a command at byte {i}");
                    commands.push(command);
                }
                None => assert_eq!(buf.len(), before, "bytes taken at byte {i}"),
            }
        }
        assert_eq!(commands, expected);
    }

    #[test]
    fn inline_commands_split_as_redis_does() {
        assert_eq!(parse(b"PING\r\n"), Ok(Some(command(&[b"PING"]))));
        assert_eq!(parse(b"PING\n"), Ok(Some(command(&[b"PING"]))));
        assert_eq!(parse(b"PING"), Ok(None));
        assert_eq!(
            parse(b"  set  k\tv \r\n"),
            Ok(Some(command(&[b"set", b"k", b"v"])))
        );
        assert_eq!(
            parse(b"set \"a b\" \"\\x41\\n\\r\\t\\\"\\\\\\q\\xZZ\"\r\n"),
            Ok(Some(command(&[b"set", b"a b", b"A\n\r\t\"\\qxZZ"])))
        );
        assert_eq!(
            parse(b"set 'it\\'s' 'a \"b\" \\n'\n"),
            Ok(Some(command(&[b"set", b"it's", b"a \"b\" \\n"])))
        );
        assert_eq!(
            parse(b"set \"\" ''\n"),
            Ok(Some(command(&[b"set", b"", b""])))
        );
        // A quote inside a word opens a quoted part of that word.
        assert_eq!(parse(b"ab\"c d\"\n"), Ok(Some(command(&[b"abc d"]))));
        // The C original stops at a NUL byte.
        assert_eq!(parse(b"get k\0junk\n"), Ok(Some(command(&[b"get", b"k"]))));
        let mut buf = BytesMut::from(&b"PING\r\nGET k\r\nEC"[..]);
        assert_eq!(
            drain(&mut CommandParser::new(LIMITS), &mut buf),
            vec![command(&[b"PING"]), command(&[b"GET", b"k"])]
        );
        assert_eq!(&buf[..], b"EC");
    }

    #[test]
    fn malformed_frames_are_refused_with_redis_words() {
        let unbalanced = "unbalanced quotes in request";
        assert_eq!(parse(b"set \"k\n"), error(unbalanced));
        assert_eq!(parse(b"set 'k\n"), error(unbalanced));
        assert_eq!(parse(b"set \"k\"v\n"), error(unbalanced));
        assert_eq!(parse(b"set 'k'v\n"), error(unbalanced));

        let long_line = [b'a'; 65];
        assert_eq!(parse(&long_line), error("too big inline request"));
        assert_eq!(
            parse(&[&long_line[..], b"\r\n"].concat()),
            error("too big inline request")
        );
        assert_eq!(parse(&[&long_line[..64], b"\r"].concat()), Ok(None));
        assert!(
            parse(&[&long_line[..64], b"\r\n"].concat())
                .unwrap()
                .is_some()
        );

        let multibulk = "invalid multibulk length";
        assert_eq!(parse(b"*17\r\n"), error(multibulk));
        assert_eq!(parse(b"*x\r\n"), error(multibulk));
        assert_eq!(parse(b"*\r\n"), error(multibulk));
        assert_eq!(parse(b"*01\r\n"), error(multibulk));
        assert_eq!(parse(b"*+1\r\n"), error(multibulk));
        assert_eq!(parse(b"*1\rx"), error(multibulk));
        assert_eq!(parse(b"*99999999999999999999\r\n"), error(multibulk));
        assert_eq!(parse(&[b'*'; 66]), error("too big mbulk count string"));

        let bulk = "invalid bulk length";
        assert_eq!(parse(b"*1\r\n$1025\r\n"), error(bulk));
        assert_eq!(parse(b"*1\r\n$-1\r\n"), error(bulk));
        assert_eq!(parse(b"*1\r\n$x\r\n"), error(bulk));
        assert_eq!(parse(b"*1\r\n$\r\n"), error(bulk));
        assert_eq!(
            parse(&[&b"*1\r\n$"[..], &[b'1'; 65]].concat()),
            error("too big bulk count string")
        );

        assert_eq!(parse(b"*1\r\n:1\r\n"), error("expected '$', got ':'"));
        assert_eq!(parse(b"*1\r\n\r\n"), error("expected '$', got '\\r'"));
        assert_eq!(parse(b"*1\r\n\xff"), error("expected '$', got '\\xff'"));

        let crlf = "expected CRLF after bulk string";
        assert_eq!(parse(b"*1\r\n$1\r\nab\r\n"), error(crlf));
        assert_eq!(parse(b"*1\r\n$1\r\na\n\r"), error(crlf));
        assert_eq!(parse(b"*1\r\n$1\r\na\r"), Ok(None));
    }

    #[test]
    fn lengths_read_as_string2ll_reads_them() {
        assert_eq!(parse_redis_integer(b"0"), Some(0));
        assert_eq!(parse_redis_integer(b"-1"), Some(-1));
        assert_eq!(parse_redis_integer(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_redis_integer(b"-9223372036854775808"), Some(i64::MIN));
        for refused in [
            &b""[..],
            b"-",
            b"-0",
            b"00",
            b"+1",
            b" 1",
            b"1 ",
            b"9223372036854775808",
        ] {
            assert_eq!(
                parse_redis_integer(refused),
                None,
                "{}",
                refused.escape_ascii()
            );
        }
    }

    proptest! {
        #[test]
        fn commands_read_back_as_sent(
            commands in prop::collection::vec(
                prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 1..=16),
                1..4,
            ),
            split in any::<prop::sample::Index>(),
        ) {
            let bytes: Vec<u8> = commands.iter().flat_map(|c| encode_array(c)).collect();
            let split = split.index(bytes.len() + 1);
            let mut buf = BytesMut::from(&bytes[..split]);
            let mut parser = CommandParser::new(LIMITS);
            let mut parsed = drain(&mut parser, &mut buf);
            buf.extend_from_slice(&bytes[split..]);
            parsed.extend(drain(&mut parser, &mut buf));
            prop_assert!(buf.is_empty());
            let parsed: Vec<Vec<Vec<u8>>> = parsed
                .into_iter()
                .map(|c| c.into_iter().map(|a| a.to_vec()).collect())
                .collect();
            prop_assert_eq!(parsed, commands);
        }

        #[test]
        fn any_bytes_read_alike_whole_or_in_pieces(
            prefix in prop::sample::select(vec![&b""[..], &b"*"[..], &b"*2\r\n$"[..], &b"*1\r\n$3\r\n"[..], &b"\""[..]]),
            bytes in prop::collection::vec(
                prop::sample::select(vec![b'*', b'$', b'\r', b'\n', b'1', b'0', b'-', b'"', b'\'', b'\\', b'x', b' ', b'a', 0, 0xff]),
                0..200,
            ),
            noise in prop::collection::vec(any::<u8>(), 0..64),
            piece in 1..40usize,
        ) {
            let input = [prefix, &bytes[..], &noise[..]].concat();
            let whole = read_all(LIMITS, [&input[..]]);
            prop_assert_eq!(read_all(LIMITS, input.chunks(piece)), whole);
        }
    }
}
