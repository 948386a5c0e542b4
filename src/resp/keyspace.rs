//! The keyspace commands (SCAN, KEYS, RANDOMKEY, RENAME, RENAMENX, COPY,
//! FLUSHDB, FLUSHALL) and the string ranges (GETRANGE, SETRANGE).
//!
//! kvstore's keys are ordered bytes, not a hash table: iteration walks them
//! in key order. A SCAN cursor therefore cannot be a slot number; it is a
//! number this connection handed out, which [`Cursors`] maps to the last key
//! the scan examined. The next call resumes after that key, so a full
//! iteration returns every key present for all of it, once (a key written or
//! deleted during it may or may not be returned, as in Redis).
//!
//! With auth on, every listing (SCAN, KEYS, RANDOMKEY) reads only within the
//! token's readable prefixes: keys outside them are never read, so neither
//! their names nor their number leak, and a token with a narrow prefix does
//! not pay for the whole store.

use std::collections::VecDeque;
use std::hash::{BuildHasher as _, Hasher as _, RandomState};
use std::ops::Bound;

use bytes::Bytes;

use super::commands::{
    MAX_ATTEMPTS, Outcome, Right, Step, applied, checked_key, db_out_of_range, integer,
    kept_changing, read, store_error, syntax_error, too_long, update, wrong_arity,
};
use super::frame::Reply;
use super::{Access, Context, Session};
use crate::storage::changes::prefix_end;
use crate::storage::{Condition, Entry, Expiry, LeaseId, ScanRequest, WriteOp, system_now_us};

/// How many cursors a connection remembers; a cursor older than the last
/// this many is forgotten.
const MAX_CURSORS: usize = 1024;

/// Most keys one SCAN call examines, whatever COUNT asks (COUNT is a hint
/// in Redis too): bounds the work and memory of one call.
const MAX_SCAN_COUNT: usize = 10_000;

/// Keys per store read (KEYS) and per delete batch (FLUSHDB).
const PAGE: usize = 1000;

/// The SCAN cursors one connection was given, each mapped to the last key
/// its scan examined; the oldest is dropped once there are
/// [`MAX_CURSORS`].
///
/// Cursor numbers are random (below 2^63, so that clients that parse them
/// as signed 64-bit numbers work too), not counted from 1: a cursor kept
/// from another connection, or from before a reconnect, then names no
/// position here (and restarts the scan, see [`Cursors::resume`]) instead
/// of naming some other scan's position, which would skip keys silently.
pub(crate) struct Cursors {
    /// Oldest first.
    issued: VecDeque<(u64, Vec<u8>)>,
    random: RandomState,
    counter: u64,
}

impl Default for Cursors {
    fn default() -> Self {
        Cursors {
            issued: VecDeque::new(),
            random: RandomState::new(),
            counter: 0,
        }
    }
}

impl Cursors {
    /// A new cursor that resumes after `last`.
    fn issue(&mut self, last: Vec<u8>) -> u64 {
        let cursor = loop {
            self.counter = self.counter.wrapping_add(1);
            let mut hasher = self.random.build_hasher();
            hasher.write_u64(self.counter);
            let cursor = hasher.finish() >> 1;
            if cursor != 0 && self.issued.iter().all(|(c, _)| *c != cursor) {
                break cursor;
            }
        };
        if self.issued.len() >= MAX_CURSORS {
            self.issued.pop_front();
        }
        self.issued.push_back((cursor, last));
        cursor
    }

    /// Where `cursor` resumes: after a key, or from the start for 0 and for
    /// a cursor this connection does not know (never issued, or forgotten).
    /// Starting again returns keys twice, which Redis allows a scan to do,
    /// but never leaves one out; answering nothing would end the client's
    /// iteration early, and an error would end it altogether.
    ///
    /// A cursor stays valid after use, so a client that retries a call
    /// after losing its reply gets the same page again.
    fn resume(&self, cursor: u64) -> Option<&[u8]> {
        self.issued
            .iter()
            .find(|(c, _)| *c == cursor)
            .map(|(_, last)| last.as_slice())
    }
}

/// Runs one of this module's commands (`label` as in `commands::COMMANDS`).
pub(super) async fn run(
    context: &Context,
    session: &mut Session,
    label: &str,
    name: &str,
    args: &[Bytes],
) -> Outcome {
    match label {
        "scan" => scan(context, session, name, args).await,
        "keys" => match args {
            [pattern] => keys(context, session, pattern).await,
            _ => Err(wrong_arity(name)),
        },
        "randomkey" => match args {
            [] => random_key(context, session).await,
            _ => Err(wrong_arity(name)),
        },
        "rename" | "renamenx" => match args {
            [source, destination] => {
                // The value moves to a key the client may read: reading the
                // source is needed, or RENAME would disclose what it may not
                // read.
                checked_key(context, session, source, Right::Read)?;
                let source = checked_key(context, session, source, Right::Write)?;
                let destination = checked_key(context, session, destination, Right::Write)?;
                let mode = Mode::Rename {
                    nx: label == "renamenx",
                };
                transfer(context, source, destination, mode).await
            }
            _ => Err(wrong_arity(name)),
        },
        "copy" => copy(context, session, name, args).await,
        "getrange" => match args {
            [key, start, end] => {
                let key = checked_key(context, session, key, Right::Read)?;
                let (start, end) = (integer(start)?, integer(end)?);
                let value = read(context, &key).await?.map(|e| e.value);
                let part = substring(value.as_deref().unwrap_or_default(), start, end);
                Ok(Reply::Bulk(Bytes::copy_from_slice(part)))
            }
            _ => Err(wrong_arity(name)),
        },
        "setrange" => match args {
            [key, offset, value] => set_range(context, session, key, offset, value).await,
            _ => Err(wrong_arity(name)),
        },
        "flushdb" | "flushall" => flush(context, session, name, args).await,
        _ => Err(Reply::Error(String::new())),
    }
}

/// `SCAN cursor [MATCH pattern] [COUNT n] [TYPE type]`.
async fn scan(context: &Context, session: &mut Session, name: &str, args: &[Bytes]) -> Outcome {
    let [cursor, options @ ..] = args else {
        return Err(wrong_arity(name));
    };
    let cursor = std::str::from_utf8(cursor)
        .ok()
        .filter(|text| !text.starts_with('+'))
        .and_then(|text| text.parse::<u64>().ok())
        .ok_or_else(|| Reply::Error("ERR invalid cursor".into()))?;
    let (mut pattern, mut count, mut all_types) = (None, 10usize, true);
    let mut rest = options.iter();
    while let Some(option) = rest.next() {
        let value = rest.next().ok_or_else(syntax_error)?;
        if option.eq_ignore_ascii_case(b"MATCH") {
            pattern = Some(value.clone());
        } else if option.eq_ignore_ascii_case(b"COUNT") {
            let n = integer(value)?;
            if n < 1 {
                return Err(syntax_error());
            }
            count = usize::try_from(n).unwrap_or(usize::MAX);
        } else if option.eq_ignore_ascii_case(b"TYPE") {
            // Every kvstore key is a string.
            all_types = value.eq_ignore_ascii_case(b"string");
        } else {
            return Err(syntax_error());
        }
    }
    let pattern = pattern.filter(|p| p.as_ref() != b"*");
    let prefixes = readable(session, pattern.as_deref());
    let after = match cursor {
        0 => None,
        n => session.cursors.resume(n).map(<[u8]>::to_vec),
    };
    let (examined, more) = keys_after(
        context,
        &prefixes,
        after.as_deref(),
        count.min(MAX_SCAN_COUNT),
    )
    .await?;
    let next = match examined.last() {
        Some(last) if more => session.cursors.issue(last.clone()),
        _ => 0,
    };
    let glob = pattern.as_deref().map(Glob::new);
    let found = examined
        .into_iter()
        .filter(|key| all_types && glob.as_ref().is_none_or(|glob| glob.matches(key)))
        .map(|key| Reply::Bulk(key.into()))
        .collect();
    Ok(Reply::Array(vec![
        Reply::Bulk(Bytes::from(next.to_string())),
        Reply::Array(found),
    ]))
}

/// `KEYS pattern`: reads every key (within the token's readable prefixes,
/// and within the pattern's literal prefix), as Redis does; SCAN is the way
/// to list a large store.
async fn keys(context: &Context, session: &Session, pattern: &Bytes) -> Outcome {
    let prefixes = readable(session, Some(pattern));
    let glob = Glob::new(pattern);
    let mut found = Vec::new();
    let mut after = None;
    loop {
        let (page, more) = keys_after(context, &prefixes, after.as_deref(), PAGE).await?;
        after = page.last().cloned();
        found.extend(
            page.into_iter()
                .filter(|key| glob.matches(key))
                .map(|key| Reply::Bulk(key.into())),
        );
        if !more || after.is_none() {
            return Ok(Reply::Array(found));
        }
    }
}

/// `RANDOMKEY`: three reads, whatever the store's size. The first and last
/// keys bound the keyspace; a point is drawn uniformly between them (on the
/// eight bytes after their common prefix), and a coin picks the first key
/// after it or the last before it (wrapping round), so that the first and
/// last keys can come up too. Not uniform over the keys: a key next to a
/// wide gap in the key space comes up more often than its neighbours;
/// counting the keys to draw an index would read them all.
async fn random_key(context: &Context, session: &Session) -> Outcome {
    let prefixes = readable(session, None);
    let Some(first) = keys_after(context, &prefixes, None, 1)
        .await?
        .0
        .into_iter()
        .next()
    else {
        return Ok(Reply::Null);
    };
    let last = last_before(context, &prefixes, None)
        .await?
        .unwrap_or_else(|| first.clone());
    let point = between(&first, &last, random_u64());
    let picked = if random_u64() & 1 == 0 {
        let after = keys_after(context, &prefixes, Some(&point), 1).await?.0;
        after.into_iter().next().unwrap_or(first)
    } else {
        let before = last_before(context, &prefixes, Some(&point)).await?;
        before.unwrap_or(last)
    };
    Ok(Reply::Bulk(picked.into()))
}

/// The last key before `before` (or the last of all), within `prefixes`
/// (sorted, none inside another).
async fn last_before(
    context: &Context,
    prefixes: &[Vec<u8>],
    before: Option<&[u8]>,
) -> Result<Option<Vec<u8>>, Reply> {
    for prefix in prefixes.iter().rev() {
        // Every key under `prefix` sorts at or after it.
        if before.is_some_and(|before| before <= prefix.as_slice()) {
            continue;
        }
        let mut request = range_request(prefix, None, 1, true);
        if let Some(before) = before
            && prefix_end(prefix).is_none_or(|end| before < end.as_slice())
        {
            request.upper = Bound::Excluded(before.to_vec());
        }
        let page = context.store.scan(request).await.map_err(store_error)?;
        if let Some(entry) = page.entries.into_iter().next() {
            return Ok(Some(entry.key));
        }
    }
    Ok(None)
}

/// A key between `low` and `high` (`low <= high`): their common prefix,
/// then eight bytes at `draw`'s place between theirs.
fn between(low: &[u8], high: &[u8], draw: u64) -> Vec<u8> {
    let common = low.iter().zip(high).take_while(|(a, b)| a == b).count();
    let window = |key: &[u8]| {
        let mut bytes = [0u8; 8];
        for (slot, byte) in bytes.iter_mut().zip(key.iter().skip(common)) {
            *slot = *byte;
        }
        u64::from_be_bytes(bytes)
    };
    let (from, to) = (window(low), window(high));
    let span = to.saturating_sub(from);
    let offset = match span.checked_add(1) {
        Some(width) => draw % width,
        None => draw,
    };
    let mut point = low[..common].to_vec();
    point.extend_from_slice(&from.saturating_add(offset).to_be_bytes());
    point
}

/// 64 random bits from the standard library's per-process random keys;
/// enough to pick a key, not for secrets.
fn random_u64() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_i64(system_now_us());
    hasher.finish()
}

/// `COPY source destination [DB 0] [REPLACE]`.
async fn copy(context: &Context, session: &Session, name: &str, args: &[Bytes]) -> Outcome {
    let [source, destination, options @ ..] = args else {
        return Err(wrong_arity(name));
    };
    let mut replace = false;
    let mut rest = options.iter();
    while let Some(option) = rest.next() {
        if option.eq_ignore_ascii_case(b"REPLACE") {
            replace = true;
        } else if option.eq_ignore_ascii_case(b"DB") {
            let db = rest.next().ok_or_else(syntax_error)?;
            if integer(db)? != 0 {
                return Err(db_out_of_range());
            }
        } else {
            return Err(syntax_error());
        }
    }
    let source = checked_key(context, session, source, Right::Read)?;
    let destination = checked_key(context, session, destination, Right::Write)?;
    if source == destination {
        return Err(Reply::Error(
            "ERR source and destination objects are the same".into(),
        ));
    }
    transfer(context, source, destination, Mode::Copy { replace }).await
}

/// What [`transfer`] does with the source.
#[derive(Clone, Copy)]
enum Mode {
    /// Delete it in the same batch; `nx`: only when the destination is
    /// absent.
    Rename { nx: bool },
    /// Keep it; `replace`: overwrite a destination that exists.
    Copy { replace: bool },
}

/// RENAME, RENAMENX and COPY: reads both keys from one snapshot, then writes
/// one atomic batch conditional on what it read (the source's version; the
/// destination's absence when it must not be overwritten); when another
/// write came between, reads and decides again.
async fn transfer(context: &Context, source: Vec<u8>, destination: Vec<u8>, mode: Mode) -> Outcome {
    let answer = |done: bool| match mode {
        Mode::Rename { nx: false } => Reply::Simple("OK"),
        _ => Reply::Integer(i64::from(done)),
    };
    for _ in 0..MAX_ATTEMPTS {
        let found = context
            .store
            .get_many(vec![source.clone(), destination.clone()])
            .await
            .map_err(store_error)?;
        let mut entries = found.entries.into_iter();
        let (old, existing) = (entries.next().flatten(), entries.next().flatten());
        let Some(old) = old else {
            return match mode {
                Mode::Rename { .. } => Err(Reply::Error("ERR no such key".into())),
                Mode::Copy { .. } => Ok(answer(false)),
            };
        };
        // RENAME onto itself changes nothing, as in Redis (which still
        // needs the key to exist); COPY refused it before reading.
        if source == destination {
            return Ok(answer(false));
        }
        let overwrite = match mode {
            Mode::Rename { nx } => !nx,
            Mode::Copy { replace } => replace,
        };
        if existing.is_some() && !overwrite {
            return Ok(answer(false));
        }
        let lease = old.lease;
        let mut ops = Vec::with_capacity(2);
        if let Mode::Rename { .. } = mode {
            ops.push(WriteOp::Delete {
                key: source.clone(),
                condition: Condition::Version(old.version),
            });
        }
        ops.push(WriteOp::Put {
            key: destination.clone(),
            expiry: carried_expiry(&old, mode),
            value: old.value,
            condition: if overwrite {
                Condition::Any
            } else {
                Condition::Absent
            },
        });
        match applied(context, ops).await {
            Ok(true) => return Ok(answer(true)),
            Ok(false) => {}
            // The source's lease ended since the read (the put naming it
            // failed): so did the source, which the next read shows.
            Err(error) => {
                if !lease_ended(context, lease).await {
                    return Err(error);
                }
            }
        }
    }
    Err(kept_changing())
}

/// Whether `lease`, if there is one, has ended (a put naming it then
/// fails); a store that cannot say counts as not.
async fn lease_ended(context: &Context, lease: Option<LeaseId>) -> bool {
    match lease {
        None => false,
        Some(id) => matches!(context.store.lease(id).await, Ok(None)),
    }
}

/// The deadline the destination takes: the source's. A key on a lease
/// stays on it when renamed (it expires with the lease, and keepalives
/// still count), since the rename moves a key the lease already held; a
/// copy is a new key, and attaching keys to a lease is its owner's right,
/// so a copy takes the lease's current deadline as its own. A deadline is
/// carried as the time left, in whole milliseconds (the store takes a TTL):
/// it lands up to a millisecond earlier, or later by the time the write
/// took.
fn carried_expiry(entry: &Entry, mode: Mode) -> Expiry {
    if let (Some(lease), Mode::Rename { .. }) = (entry.lease, mode) {
        return Expiry::Lease(lease);
    }
    match entry.expires_at_us {
        None => Expiry::Never,
        Some(deadline) => {
            let left_ms = deadline.saturating_sub(system_now_us()) / 1000;
            Expiry::Ttl(left_ms.max(1).unsigned_abs())
        }
    }
}

/// `value[start..=end]` with Redis's rules: negative indexes count from the
/// end, both are clamped to the value, and an empty range is empty.
fn substring(value: &[u8], start: i64, end: i64) -> &[u8] {
    if start < 0 && end < 0 && start > end {
        return &[];
    }
    let len = i64::try_from(value.len()).unwrap_or(i64::MAX);
    let from_end = |index: i64| if index < 0 { len + index } else { index };
    let start = from_end(start).max(0);
    let end = from_end(end).max(0).min(len - 1);
    if len == 0 || start > end {
        return &[];
    }
    let (Ok(start), Ok(end)) = (usize::try_from(start), usize::try_from(end)) else {
        return &[];
    };
    value.get(start..=end).unwrap_or_default()
}

/// `SETRANGE key offset value`: overwrites from `offset`, padding with zero
/// bytes, and keeps the key's deadline.
async fn set_range(
    context: &Context,
    session: &Session,
    key: &Bytes,
    offset: &Bytes,
    value: &Bytes,
) -> Outcome {
    let key = checked_key(context, session, key, Right::Write)?;
    let offset = usize::try_from(integer(offset)?)
        .map_err(|_| Reply::Error("ERR offset is out of range".into()))?;
    let max = context.limits.max_value_bytes;
    // Refused before reading, as Redis refuses it, whatever the key holds.
    let end = offset
        .checked_add(value.len())
        .filter(|end| value.is_empty() || *end <= max)
        .ok_or_else(|| too_long(max))?;
    update(context, &key, |old| {
        let length = |bytes: &[u8]| Reply::Integer(i64::try_from(bytes.len()).unwrap_or(i64::MAX));
        if value.is_empty() {
            // Nothing to write: the length as it is (0 for no key).
            return Ok(Step::Answer(length(
                old.map(|e| e.value.as_slice()).unwrap_or_default(),
            )));
        }
        let mut bytes = old.map(|e| e.value.clone()).unwrap_or_default();
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[offset..end].copy_from_slice(value);
        Ok(Step::Put {
            reply: length(&bytes),
            value: bytes,
            expiry: Expiry::Keep,
        })
    })
    .await
}

/// `FLUSHDB` / `FLUSHALL [ASYNC | SYNC]`: only with `--resp-allow-flush`,
/// and with auth on only for a token that may write every key. Deletes
/// every key in atomic batches of [`PAGE`]: the flush as a whole is not one
/// revision, and a key written during it, before where it has reached, is
/// kept. ASYNC is run as SYNC: the reply comes once every key is deleted.
async fn flush(context: &Context, session: &Session, name: &str, args: &[Bytes]) -> Outcome {
    match args {
        [] => {}
        [mode] if mode.eq_ignore_ascii_case(b"ASYNC") || mode.eq_ignore_ascii_case(b"SYNC") => {}
        [_] => return Err(syntax_error()),
        _ => return Err(wrong_arity(name)),
    }
    let shown = name.to_ascii_uppercase();
    if !context.config.allow_flush {
        return Err(Reply::Error(format!(
            "ERR {shown} is disabled; start kvstore with --resp-allow-flush"
        )));
    }
    if let Some(Access::Token(rights)) = &session.rights
        && !rights.can_write(b"")
    {
        return Err(Reply::Error(format!(
            "NOPERM token '{}' may not write every key, which {shown} deletes",
            rights.name
        )));
    }
    let everything = [Vec::new()];
    let mut after = None;
    loop {
        let (page, more) = keys_after(context, &everything, after.as_deref(), PAGE).await?;
        after = page.last().cloned();
        if page.is_empty() {
            return Ok(Reply::Simple("OK"));
        }
        let deletes = page
            .into_iter()
            .map(|key| WriteOp::Delete {
                key,
                condition: Condition::Any,
            })
            .collect();
        applied(context, deletes).await?;
        if !more {
            return Ok(Reply::Simple("OK"));
        }
    }
}

/// The prefixes a listing reads, sorted and none inside another: the
/// token's readable ones (every key, the empty prefix, with auth off),
/// narrowed to the pattern's literal prefix, since no key outside it can
/// match.
fn readable(session: &Session, pattern: Option<&[u8]>) -> Vec<Vec<u8>> {
    let mut prefixes = match &session.rights {
        Some(Access::Token(rights)) => rights.read.clone(),
        _ => vec![Vec::new()],
    };
    if let Some(pattern) = pattern {
        let literal = literal_prefix(pattern);
        // Two prefixes meet only when one starts with the other; they then
        // meet in the longer one.
        prefixes = prefixes
            .into_iter()
            .filter_map(|p| {
                if literal.starts_with(&p) {
                    Some(literal.clone())
                } else {
                    p.starts_with(&literal).then_some(p)
                }
            })
            .collect();
    }
    prefixes.sort();
    prefixes.dedup();
    // Sorted, a prefix comes right after the one that covers it (or after
    // others it covers too); keep only the outermost.
    let mut outer: Vec<Vec<u8>> = Vec::with_capacity(prefixes.len());
    for prefix in prefixes {
        if !outer.last().is_some_and(|o| prefix.starts_with(o)) {
            outer.push(prefix);
        }
    }
    outer
}

/// Up to `limit` keys after `after` (or from the start) in key order,
/// within `prefixes` (sorted, none inside another), and whether more may
/// follow.
async fn keys_after(
    context: &Context,
    prefixes: &[Vec<u8>],
    after: Option<&[u8]>,
    limit: usize,
) -> Result<(Vec<Vec<u8>>, bool), Reply> {
    let mut keys = Vec::new();
    for (index, prefix) in prefixes.iter().enumerate() {
        let end = prefix_end(prefix);
        if let (Some(after), Some(end)) = (after, &end)
            && after >= end.as_slice()
        {
            continue;
        }
        let request = range_request(prefix, after, limit - keys.len(), false);
        let page = context.store.scan(request).await.map_err(store_error)?;
        keys.extend(page.entries.into_iter().map(|e| e.key));
        if keys.len() >= limit {
            return Ok((keys, page.more || index + 1 < prefixes.len()));
        }
    }
    Ok((keys, false))
}

/// A keys-only read of the keys under `prefix` (after `after`, if given).
fn range_request(prefix: &[u8], after: Option<&[u8]>, limit: usize, reverse: bool) -> ScanRequest {
    let lower = match after {
        Some(after) if after >= prefix => Bound::Excluded(after.to_vec()),
        _ => Bound::Included(prefix.to_vec()),
    };
    ScanRequest {
        lower,
        upper: prefix_end(prefix).map_or(Bound::Unbounded, Bound::Excluded),
        reverse,
        limit,
        keys_only: true,
        max_value_bytes: usize::MAX,
    }
}

/// The bytes every key matching `pattern` starts with: the pattern up to
/// its first special character (escapes taken as the byte they escape).
fn literal_prefix(pattern: &[u8]) -> Vec<u8> {
    let mut prefix = Vec::new();
    let mut rest = pattern;
    while let Some((&byte, tail)) = rest.split_first() {
        match byte {
            b'*' | b'?' | b'[' => break,
            b'\\' => match tail.split_first() {
                Some((&escaped, tail)) => {
                    prefix.push(escaped);
                    rest = tail;
                }
                None => {
                    prefix.push(byte);
                    rest = tail;
                }
            },
            _ => {
                prefix.push(byte);
                rest = tail;
            }
        }
    }
    prefix
}

/// One element of a glob pattern.
#[derive(Debug, PartialEq)]
enum Token {
    /// `*`: any bytes, none included.
    Star,
    /// `?`: any one byte.
    Any,
    /// A byte as it is (or escaped with `\`).
    Byte(u8),
    /// `[...]`: one byte among these (or, `negated`, not among them).
    Class { negated: bool, items: Vec<(u8, u8)> },
}

impl Token {
    fn matches(&self, byte: u8) -> bool {
        match self {
            Token::Star | Token::Any => true,
            Token::Byte(b) => *b == byte,
            Token::Class { negated, items } => {
                items.iter().any(|(lo, hi)| (*lo..=*hi).contains(&byte)) != *negated
            }
        }
    }
}

/// Splits a pattern as Redis's `stringmatchlen` reads it: `\` escapes the
/// next byte (a `\` at the end is itself); in a class `\` escapes too, `a-z`
/// is a range (either way round), `^` first negates, and a class without
/// its `]` runs to the end of the pattern.
fn tokens(pattern: &[u8]) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut i = 0;
    while let Some(&byte) = pattern.get(i) {
        i += 1;
        let token = match byte {
            b'*' => {
                // Several stars match what one does.
                if tokens.last() == Some(&Token::Star) {
                    continue;
                }
                Token::Star
            }
            b'?' => Token::Any,
            b'\\' => match pattern.get(i) {
                Some(&escaped) => {
                    i += 1;
                    Token::Byte(escaped)
                }
                None => Token::Byte(b'\\'),
            },
            b'[' => {
                let negated = pattern.get(i) == Some(&b'^');
                if negated {
                    i += 1;
                }
                let mut items = Vec::new();
                loop {
                    match (pattern.get(i), pattern.get(i + 1), pattern.get(i + 2)) {
                        (None, _, _) => break,
                        (Some(b']'), _, _) => {
                            i += 1;
                            break;
                        }
                        (Some(b'\\'), Some(&escaped), _) => {
                            items.push((escaped, escaped));
                            i += 2;
                        }
                        (Some(&lo), Some(b'-'), Some(&hi)) => {
                            items.push((lo.min(hi), lo.max(hi)));
                            i += 3;
                        }
                        (Some(&b), _, _) => {
                            items.push((b, b));
                            i += 1;
                        }
                    }
                }
                Token::Class { negated, items }
            }
            b => Token::Byte(b),
        };
        tokens.push(token);
    }
    tokens
}

/// A Redis glob pattern, split once, to match against many keys (KEYS and
/// SCAN's MATCH compare case-sensitively, byte by byte).
pub(crate) struct Glob(Vec<Token>);

impl Glob {
    pub(crate) fn new(pattern: &[u8]) -> Self {
        Self(tokens(pattern))
    }

    /// Linear backtracking on the last star: every other token takes
    /// exactly one byte, so trying the last star on one byte more is
    /// enough, and no pattern takes exponential time.
    pub(crate) fn matches(&self, key: &[u8]) -> bool {
        let tokens = &self.0;
        let (mut t, mut k) = (0, 0);
        // The last star seen, and the key position it is tried up to.
        let mut star: Option<(usize, usize)> = None;
        while let Some(&byte) = key.get(k) {
            match tokens.get(t) {
                Some(Token::Star) => {
                    star = Some((t, k));
                    t += 1;
                    continue;
                }
                Some(token) if token.matches(byte) => {
                    t += 1;
                    k += 1;
                    continue;
                }
                _ => {}
            }
            match star {
                Some((star_at, tried)) => {
                    star = Some((star_at, tried + 1));
                    t = star_at + 1;
                    k = tried + 1;
                }
                None => return false,
            }
        }
        tokens
            .get(t..)
            .unwrap_or_default()
            .iter()
            .all(|token| *token == Token::Star)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, key: &str) -> bool {
        Glob::new(pattern.as_bytes()).matches(key.as_bytes())
    }

    #[test]
    fn glob_matches_as_redis_does() {
        // (pattern, key, whether Redis's stringmatchlen matches)
        let cases = [
            ("*", "anything", true),
            ("h?llo", "hello", true),
            ("h?llo", "hllo", false),
            ("h*llo", "hllo", true),
            ("h*llo", "heeeello", true),
            ("h[ae]llo", "hello", true),
            ("h[ae]llo", "hillo", false),
            ("h[^e]llo", "hallo", true),
            ("h[^e]llo", "hello", false),
            ("h[a-b]llo", "hbllo", true),
            ("h[a-b]llo", "hcllo", false),
            ("h[b-a]llo", "hallo", true),
            ("h\\*llo", "h*llo", true),
            ("h\\*llo", "hello", false),
            ("[\\]]", "]", true),
            ("[]", "a", false),
            ("[^]", "a", true),
            // An unclosed class runs to the end of the pattern.
            ("a[bc", "ab", true),
            ("a[bc", "abc", false),
            // `a-]` is a range up to `]`, and the class is then unclosed.
            ("[a-]", "_", true),
            // A trailing backslash is a backslash.
            ("a\\", "a\\", true),
            ("user:*", "user:1", true),
            ("user:*", "users:1", false),
            ("*:*:*", "a:b:c", true),
            ("*:*:*", "a:bc", false),
            ("a*", "a", true),
            ("a**", "a", true),
            ("*a", "ba", true),
            ("*a", "ab", false),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYbZ", false),
            ("?", "é", false),
            ("??", "é", true),
        ];
        for (pattern, key, want) in cases {
            assert_eq!(m(pattern, key), want, "{pattern:?} against {key:?}");
        }
    }

    #[test]
    fn glob_takes_linear_time_on_a_hostile_pattern() {
        let key = "a".repeat(10_000);
        let pattern = format!("{}b", "a*".repeat(1000));
        assert!(!m(&pattern, &key));
    }

    #[test]
    fn literal_prefixes_stop_at_the_first_special_character() {
        let cases: [(&[u8], &[u8]); 6] = [
            (b"user:*", b"user:"),
            (b"user:?x", b"user:"),
            (b"a[bc]", b"a"),
            (b"a\\*b*", b"a*b"),
            (b"*", b""),
            (b"exact", b"exact"),
        ];
        for (pattern, prefix) in cases {
            assert_eq!(literal_prefix(pattern), prefix);
        }
    }

    #[test]
    fn substrings_follow_redis_indexes() {
        let v = b"This is a string";
        assert_eq!(substring(v, 0, 3), b"This");
        assert_eq!(substring(v, -3, -1), b"ing");
        assert_eq!(substring(v, 0, -1), v);
        assert_eq!(substring(v, 10, 100), b"string");
        assert_eq!(substring(v, -100, 3), b"This");
        assert_eq!(substring(v, 5, 3), b"");
        assert_eq!(substring(v, -1, -5), b"");
        assert_eq!(substring(b"", 0, -1), b"");
        assert_eq!(substring(v, i64::MIN, i64::MAX), v);
        assert_eq!(substring(v, i64::MAX, i64::MIN), b"");
    }

    #[test]
    fn a_point_between_two_keys_lies_between_them() {
        let (low, high) = (b"user:100".as_slice(), b"user:999".as_slice());
        for draw in [0, 1, u64::MAX / 2, u64::MAX] {
            let point = between(low, high, draw);
            assert!(point.as_slice() >= low, "{point:?}");
            assert!(
                point.as_slice() <= b"user:999\0\0\0\0\0".as_slice(),
                "{point:?}"
            );
        }
        // Equal bounds: the point is the bound, padded as the window is.
        assert_eq!(between(b"k", b"k", 7), b"k\0\0\0\0\0\0\0\0".to_vec());
    }

    #[test]
    fn cursors_are_random_nonzero_and_forget_the_oldest() {
        let mut cursors = Cursors::default();
        let first = cursors.issue(b"a".to_vec());
        assert_ne!(first, 0);
        assert!(first < 1 << 63);
        assert_eq!(cursors.resume(first), Some(b"a".as_slice()));
        for _ in 0..MAX_CURSORS {
            cursors.issue(b"b".to_vec());
        }
        assert_eq!(cursors.resume(first), None, "forgotten: the scan restarts");
        assert_eq!(cursors.issued.len(), MAX_CURSORS);
    }
}
