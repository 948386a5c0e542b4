//! The commands of the RESP front door, each mapped onto [`Store`] calls.
//!
//! Writes are the store's writes: a SET is one durable write with a new
//! version and revision, a DEL of several keys or an MSET one atomic batch.
//! Commands that read and then write (INCR, APPEND, GETDEL, SET ... GET,
//! EXPIRE, ...) write conditionally on the version they read and try again
//! if another write came between, so they are atomic without a lock. A
//! change of deadline (EXPIRE, PERSIST) rewrites the key with its value, so
//! it takes a new version and revision and watchers see it: in kvstore a
//! deadline is part of the entry.
//!
//! Errors are worded as Redis words them, so that clients recognize them.

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;
use std::time::Instant;

use bytes::Bytes;
use metrics::{Counter, Histogram};

use super::frame::Reply;
use super::{Access, Context, Session};
use crate::error::StoreError;
use crate::storage::{
    Condition, Entry, Expiry, OpResult, ScanRequest, WriteOp, WriteOutcome, system_now_us,
};

/// A command's answer: its reply, or the error reply that ends it early.
pub(super) type Outcome = Result<Reply, Reply>;

/// How many times a read-modify-write command retries when another write
/// changed its key between its read and its write.
pub(super) const MAX_ATTEMPTS: usize = 64;

/// The version of Redis whose commands these answer as; clients read it
/// (`redis_version`) to choose what to send.
const REDIS_VERSION: &str = "7.2.0";

/// The commands this front door knows, as their metrics label, with their
/// arity as Redis counts it: the number of words with the name, or at least
/// that many when negative.
const COMMANDS: &[(&str, i32)] = &[
    ("append", 3),
    ("auth", -2),
    ("client", -2),
    ("command", -1),
    ("config", -2),
    ("copy", -3),
    ("dbsize", 1),
    ("decr", 2),
    ("decrby", 3),
    ("discard", 1),
    ("del", -2),
    ("echo", 2),
    ("exec", 1),
    ("exists", -2),
    ("expire", -3),
    ("expireat", -3),
    ("expiretime", 2),
    ("flushall", -1),
    ("flushdb", -1),
    ("get", 2),
    ("getdel", 2),
    ("getex", -2),
    ("getrange", 4),
    ("getset", 3),
    ("hello", -1),
    ("incr", 2),
    ("incrby", 3),
    ("incrbyfloat", 3),
    ("info", -1),
    ("keys", 2),
    ("kv.del", -2),
    ("kv.get", 2),
    ("kv.revision", 1),
    ("kv.set", -3),
    ("mget", -2),
    ("mset", -3),
    ("msetnx", -3),
    ("multi", 1),
    ("persist", 2),
    ("pexpire", -3),
    ("pexpireat", -3),
    ("pexpiretime", 2),
    ("ping", -1),
    ("psetex", 4),
    ("pttl", 2),
    ("quit", -1),
    ("randomkey", 1),
    ("rename", 3),
    ("renamenx", 3),
    ("reset", 1),
    ("scan", -2),
    ("select", 2),
    ("set", -3),
    ("setex", 4),
    ("setnx", 3),
    ("setrange", 4),
    ("strlen", 2),
    ("time", 1),
    ("ttl", 2),
    ("type", 2),
    ("unlink", -2),
    ("unwatch", 1),
    ("watch", -2),
];

/// A command's name as this front door knows it, lowercase (Redis's error
/// messages name commands so), which is also its metrics label: `unknown`
/// for a command it does not know. Found once per command, without copying
/// the name.
pub(crate) fn label_of(args: &[Bytes]) -> &'static str {
    let name = args.first().map_or(&[][..], |name| name.as_ref());
    COMMANDS
        .iter()
        .find(|(known, _)| known.as_bytes().eq_ignore_ascii_case(name))
        .map_or("unknown", |&(known, _)| known)
}

/// Whether a known command has as many words as it takes. Checked before a
/// command is queued inside MULTI, as Redis does, so that EXEC refuses a
/// transaction holding one that could only fail; outside MULTI each command
/// checks its own words.
pub(crate) fn arity_holds(label: &str, words: usize) -> bool {
    COMMANDS
        .iter()
        .find(|(known, _)| *known == label)
        .is_some_and(|&(_, arity)| {
            let words = i64::try_from(words).unwrap_or(i64::MAX);
            let arity = i64::from(arity);
            if arity < 0 {
                words >= -arity
            } else {
                words == arity
            }
        })
}

/// Each command's counter and duration histogram, resolved on its first use
/// and kept by the front door: building a metric's key and looking it up in
/// the recorder on every command was about 3% of a GET's CPU.
pub(crate) struct CommandMetrics {
    handles: HashMap<&'static str, OnceLock<(Counter, Histogram)>>,
}

impl CommandMetrics {
    pub(crate) fn new() -> Self {
        let labels = COMMANDS.iter().map(|(name, _)| *name).chain(["unknown"]);
        CommandMetrics {
            handles: labels.map(|label| (label, OnceLock::new())).collect(),
        }
    }

    /// Counts one command of [`label_of`] `label` that took `took`.
    fn count(&self, label: &'static str, took: std::time::Duration) {
        let Some(handles) = self.handles.get(label) else {
            return;
        };
        let (counter, histogram) = handles.get_or_init(|| {
            (
                metrics::counter!("kvstore_resp_commands_total", "command" => label),
                metrics::histogram!("kvstore_resp_command_duration_seconds", "command" => label),
            )
        });
        counter.increment(1);
        histogram.record(took.as_secs_f64());
    }
}

/// A write that needs nothing read first, so that it can join the other
/// writes of a pipeline in one call to the store ([`Store::write_many`]):
/// its ops, and how its reply follows from their outcome.
pub(crate) struct BlindWrite {
    pub(crate) ops: Vec<WriteOp>,
    pub(crate) answer: Answer,
    pub(crate) label: &'static str,
}

/// How a blind write's reply follows from its outcome.
#[derive(Clone, Copy)]
pub(crate) enum Answer {
    /// `+OK`, or a null when a condition (NX, XX) failed.
    OkOrNull,
    /// 1, or 0 when a condition failed.
    Flag,
    /// How many keys the deletes found.
    Deleted,
}

impl Answer {
    pub(crate) fn reply(self, outcome: Result<WriteOutcome, StoreError>) -> Reply {
        match (self, outcome) {
            (_, Err(err)) => store_error(err),
            (Answer::OkOrNull, Ok(WriteOutcome::Applied { .. })) => Reply::Simple("OK"),
            (Answer::OkOrNull, Ok(WriteOutcome::Rejected { .. })) => Reply::Null,
            (Answer::Flag, Ok(outcome)) => {
                Reply::Integer(i64::from(matches!(outcome, WriteOutcome::Applied { .. })))
            }
            (Answer::Deleted, Ok(WriteOutcome::Applied { results, .. })) => Reply::Integer(
                results
                    .iter()
                    .filter(|r| matches!(r, OpResult::Deleted { existed: true }))
                    .count() as i64,
            ),
            (Answer::Deleted, Ok(WriteOutcome::Rejected { .. })) => Reply::Integer(0),
        }
    }
}

/// The command as a [`BlindWrite`], when it is one and the client may run
/// it; `None` for any other command (run it with [`execute`]), or a
/// blind write refused before the store (a bad argument, a key outside the
/// token's rights): then `execute` gives that error in its turn.
pub(crate) fn blind_write(
    context: &Context,
    session: &Session,
    label: &'static str,
    args: &[Bytes],
) -> Option<BlindWrite> {
    let (_, args) = args.split_first()?;
    session.rights.as_ref()?;
    // Inside MULTI, writes are queued, not run.
    if session.transaction.open() {
        return None;
    }
    prepare_write(context, session, label, label, args)
        .ok()
        .flatten()
}

/// Runs one command, whose [`label_of`] is `label`, and gives its reply.
pub(crate) async fn execute(
    context: &Context,
    session: &mut Session,
    label: &'static str,
    all: Vec<Bytes>,
) -> Reply {
    let Some((name, args)) = all.split_first() else {
        return Reply::Error("ERR empty command".into());
    };
    // With auth on, only these may come before AUTH (as in Redis).
    if session.rights.is_none() && !matches!(label, "auth" | "hello" | "quit" | "reset") {
        return Reply::Error("NOAUTH Authentication required.".into());
    }
    if session.transaction.open() && !super::transaction::runs_inside_multi(label) {
        if label == "unknown" {
            session.transaction.fail();
            return unknown_command(&String::from_utf8_lossy(name), args);
        }
        if !arity_holds(label, all.len()) {
            session.transaction.fail();
            return wrong_arity(label);
        }
        return super::transaction::queue(session, label, all);
    }
    let started = Instant::now();
    let reply = match run(context, session, label, label, args).await {
        Ok(reply) => reply,
        // Redis names an unknown command as the client spelled it.
        Err(_) if label == "unknown" => unknown_command(&String::from_utf8_lossy(name), args),
        Err(error) => error,
    };
    context.metrics.count(label, started.elapsed());
    reply
}

/// Counts the commands of a pipeline's blind writes, which ran together.
pub(crate) fn count_blind(context: &Context, labels: &[&'static str], took: std::time::Duration) {
    for label in labels {
        context.metrics.count(label, took);
    }
}

/// The blind writes: SET without GET, SETNX, SETEX, PSETEX, MSET, MSETNX,
/// DEL, UNLINK. `Ok(None)` for any other command.
fn prepare_write(
    context: &Context,
    session: &Session,
    label: &'static str,
    name: &str,
    args: &[Bytes],
) -> Result<Option<BlindWrite>, Reply> {
    let write = |ops, answer| Ok(Some(BlindWrite { ops, answer, label }));
    match label {
        "set" => {
            let [key, value, options @ ..] = args else {
                return Err(wrong_arity(name));
            };
            let options = set_options(options)?;
            if options.get {
                return Ok(None);
            }
            let key = checked_key(context, session, key, Right::Write)?;
            let condition = options.condition.unwrap_or(Condition::Any);
            write(
                vec![put(key, value, condition, options.expiry)],
                Answer::OkOrNull,
            )
        }
        "setnx" => match args {
            [key, value] => {
                let key = checked_key(context, session, key, Right::Write)?;
                write(
                    vec![put(key, value, Condition::Absent, Expiry::Never)],
                    Answer::Flag,
                )
            }
            _ => Err(wrong_arity(name)),
        },
        "setex" | "psetex" => match args {
            [key, time, value] => {
                let key = checked_key(context, session, key, Right::Write)?;
                let unit = if label == "setex" { "EX" } else { "PX" };
                let expiry = expiry_of(unit, integer(time)?, name)?;
                let op = put(key, value, Condition::Any, expiry);
                write(vec![op], Answer::OkOrNull)
            }
            _ => Err(wrong_arity(name)),
        },
        "mset" | "msetnx" => {
            if args.is_empty() || !args.len().is_multiple_of(2) {
                return Err(wrong_arity(name));
            }
            let condition = if label == "msetnx" {
                Condition::Absent
            } else {
                Condition::Any
            };
            // A batch names a key once: the last value given for it wins,
            // as it would in Redis.
            let mut seen = HashSet::new();
            let mut ops = Vec::with_capacity(args.len() / 2);
            for pair in args.chunks_exact(2).rev() {
                let key = checked_key(context, session, &pair[0], Right::Write)?;
                if seen.insert(key.clone()) {
                    ops.push(put(key, &pair[1], condition, Expiry::Never));
                }
            }
            let answer = if label == "msetnx" {
                Answer::Flag
            } else {
                Answer::OkOrNull
            };
            write(ops, answer)
        }
        "del" | "unlink" => {
            if args.is_empty() {
                return Err(wrong_arity(name));
            }
            let mut seen = HashSet::new();
            let mut ops = Vec::with_capacity(args.len());
            for key in args {
                let key = checked_key(context, session, key, Right::Write)?;
                if seen.insert(key.clone()) {
                    ops.push(WriteOp::Delete {
                        key,
                        condition: Condition::Any,
                    });
                }
            }
            write(ops, Answer::Deleted)
        }
        _ => Ok(None),
    }
}

async fn run(
    context: &Context,
    session: &mut Session,
    label: &'static str,
    name: &str,
    args: &[Bytes],
) -> Outcome {
    if let Some(BlindWrite { ops, answer, .. }) =
        prepare_write(context, session, label, name, args)?
    {
        return Ok(answer.reply(context.store.write(ops).await));
    }
    match label {
        "ping" => match args {
            [] => Ok(Reply::Simple("PONG")),
            [message] => Ok(Reply::Bulk(message.clone())),
            _ => Err(wrong_arity(name)),
        },
        "echo" => match args {
            [message] => Ok(Reply::Bulk(message.clone())),
            _ => Err(wrong_arity(name)),
        },
        "quit" => {
            session.quit = true;
            Ok(Reply::Simple("OK"))
        }
        "reset" => {
            session.protocol = 2;
            session.name = None;
            session.rights = context.auth.is_none().then_some(Access::Open);
            session.transaction = super::transaction::Transaction::default();
            Ok(Reply::Simple("RESET"))
        }
        "select" => match args {
            [index] if index.as_ref() == b"0" => Ok(Reply::Simple("OK")),
            [index] if integer(index).is_ok() => Err(db_out_of_range()),
            [_] => Err(not_an_integer()),
            _ => Err(wrong_arity(name)),
        },
        "auth" => auth(context, session, name, args),
        "hello" => hello(context, session, args),
        "client" => client(session, args),
        "info" => Ok(info(context)),
        "config" => config(context, args),
        "command" => command(args),
        "time" => {
            let now = system_now_us();
            Ok(Reply::Array(vec![
                Reply::Bulk(Bytes::from((now / 1_000_000).to_string())),
                Reply::Bulk(Bytes::from((now % 1_000_000).to_string())),
            ]))
        }
        "dbsize" => dbsize(context, session, args).await,
        "get" => match args {
            [key] => {
                let key = checked_key(context, session, key, Right::Read)?;
                Ok(read(context, &key)
                    .await?
                    .map_or(Reply::Null, |entry| Reply::Bulk(entry.value.into())))
            }
            _ => Err(wrong_arity(name)),
        },
        "set" => set_get(context, session, name, args).await,
        "getset" => match args {
            [key, value] => {
                let key = checked_key(context, session, key, Right::Write)?;
                let value = value.to_vec();
                update(context, &key, |old| {
                    Ok(Step::Put {
                        value: value.clone(),
                        expiry: Expiry::Never,
                        reply: old_value(old),
                    })
                })
                .await
            }
            _ => Err(wrong_arity(name)),
        },
        "getdel" => match args {
            [key] => {
                let key = checked_key(context, session, key, Right::Write)?;
                update(context, &key, |old| match old {
                    None => Ok(Step::Answer(Reply::Null)),
                    Some(entry) => Ok(Step::Delete(Reply::Bulk(entry.value.clone().into()))),
                })
                .await
            }
            _ => Err(wrong_arity(name)),
        },
        "getex" => getex(context, session, name, args).await,
        "mget" => {
            let found = read_keys(context, session, name, args).await?;
            Ok(Reply::Array(
                found
                    .entries
                    .into_iter()
                    .map(|entry| entry.map_or(Reply::Null, |e| Reply::Bulk(e.value.into())))
                    .collect(),
            ))
        }
        "incr" | "decr" | "incrby" | "decrby" => {
            let (key, by) = match (label, args) {
                ("incr", [key]) => (key, 1),
                ("decr", [key]) => (key, -1),
                ("incrby", [key, by]) => (key, integer(by)?),
                ("decrby", [key, by]) => (key, integer(by)?.checked_neg().ok_or_else(overflow)?),
                _ => return Err(wrong_arity(name)),
            };
            let key = checked_key(context, session, key, Right::Write)?;
            update(context, &key, |old| {
                let current = match old {
                    None => 0,
                    Some(entry) => integer(&entry.value)?,
                };
                let next = current.checked_add(by).ok_or_else(overflow)?;
                Ok(Step::Put {
                    value: next.to_string().into_bytes(),
                    expiry: Expiry::Keep,
                    reply: Reply::Integer(next),
                })
            })
            .await
        }
        "incrbyfloat" => match args {
            [key, by] => {
                let key = checked_key(context, session, key, Right::Write)?;
                let by = float(by)?;
                update(context, &key, |old| {
                    let current = match old {
                        None => 0.0,
                        Some(entry) => float(&entry.value)?,
                    };
                    let next = current + by;
                    if !next.is_finite() {
                        return Err(Reply::Error(
                            "ERR increment would produce NaN or Infinity".into(),
                        ));
                    }
                    let text = next.to_string();
                    Ok(Step::Put {
                        value: text.clone().into_bytes(),
                        expiry: Expiry::Keep,
                        reply: Reply::Bulk(text.into()),
                    })
                })
                .await
            }
            _ => Err(wrong_arity(name)),
        },
        "append" => match args {
            [key, suffix] => {
                let key = checked_key(context, session, key, Right::Write)?;
                let max = context.limits.max_value_bytes;
                update(context, &key, |old| {
                    let mut value = old.map(|e| e.value.clone()).unwrap_or_default();
                    value.extend_from_slice(suffix);
                    if value.len() > max {
                        return Err(too_long(max));
                    }
                    let len = i64::try_from(value.len()).unwrap_or(i64::MAX);
                    Ok(Step::Put {
                        value,
                        expiry: Expiry::Keep,
                        reply: Reply::Integer(len),
                    })
                })
                .await
            }
            _ => Err(wrong_arity(name)),
        },
        "strlen" => match args {
            [key] => {
                let key = checked_key(context, session, key, Right::Read)?;
                let len = read(context, &key).await?.map_or(0, |e| e.value.len());
                Ok(Reply::Integer(i64::try_from(len).unwrap_or(i64::MAX)))
            }
            _ => Err(wrong_arity(name)),
        },
        "exists" => {
            let found = read_keys(context, session, name, args).await?;
            Ok(Reply::Integer(
                found.entries.iter().filter(|e| e.is_some()).count() as i64,
            ))
        }
        "type" => match args {
            [key] => {
                let key = checked_key(context, session, key, Right::Read)?;
                Ok(Reply::Simple(if read(context, &key).await?.is_some() {
                    "string"
                } else {
                    "none"
                }))
            }
            _ => Err(wrong_arity(name)),
        },
        "expire" | "pexpire" | "expireat" | "pexpireat" => {
            expire(context, session, label, name, args).await
        }
        "ttl" | "pttl" | "expiretime" | "pexpiretime" => match args {
            [key] => {
                let key = checked_key(context, session, key, Right::Read)?;
                let Some(entry) = read(context, &key).await? else {
                    return Ok(Reply::Integer(-2));
                };
                let Some(deadline) = entry.expires_at_us else {
                    return Ok(Reply::Integer(-1));
                };
                let left_ms = (deadline - system_now_us()).max(0) / 1000;
                Ok(Reply::Integer(match label {
                    // Rounded, as Redis rounds it.
                    "ttl" => (left_ms + 500) / 1000,
                    "pttl" => left_ms,
                    "expiretime" => deadline / 1_000_000,
                    _ => deadline / 1000,
                }))
            }
            _ => Err(wrong_arity(name)),
        },
        "persist" => match args {
            [key] => {
                let key = checked_key(context, session, key, Right::Write)?;
                update(context, &key, |old| match old {
                    Some(entry) if entry.expires_at_us.is_some() => Ok(Step::Put {
                        value: entry.value.clone(),
                        expiry: Expiry::Never,
                        reply: Reply::Integer(1),
                    }),
                    _ => Ok(Step::Answer(Reply::Integer(0))),
                })
                .await
            }
            _ => Err(wrong_arity(name)),
        },
        "scan" | "keys" | "randomkey" | "rename" | "renamenx" | "copy" | "getrange"
        | "setrange" | "flushdb" | "flushall" => {
            super::keyspace::run(context, session, label, name, args).await
        }
        "multi" | "exec" | "discard" | "watch" | "unwatch" => {
            super::transaction::run(context, session, label, name, args).await
        }
        "kv.get" | "kv.set" | "kv.del" | "kv.revision" => {
            super::versioned::run(context, session, label, name, args).await
        }
        _ => Err(Reply::Error(String::new())),
    }
}

/// What a read-modify-write command does with what it read.
pub(super) enum Step {
    /// No write: answer this.
    Answer(Reply),
    /// Write this value with this expiry, then answer.
    Put {
        value: Vec<u8>,
        expiry: Expiry,
        reply: Reply,
    },
    /// Delete the key, then answer.
    Delete(Reply),
}

/// Reads `key`, decides with `decide`, and writes conditionally on the
/// version read; when another write came between, reads and decides again.
pub(super) async fn update(
    context: &Context,
    key: &[u8],
    mut decide: impl FnMut(Option<&Entry>) -> Result<Step, Reply>,
) -> Outcome {
    for _ in 0..MAX_ATTEMPTS {
        let old = read(context, key).await?;
        let condition = old
            .as_ref()
            .map_or(Condition::Absent, |e| Condition::Version(e.version));
        let (op, reply) = match decide(old.as_ref())? {
            Step::Answer(reply) => return Ok(reply),
            Step::Put {
                value,
                expiry,
                reply,
            } => (
                WriteOp::Put {
                    key: key.to_vec(),
                    value,
                    condition,
                    expiry,
                },
                reply,
            ),
            Step::Delete(reply) => (
                WriteOp::Delete {
                    key: key.to_vec(),
                    condition,
                },
                reply,
            ),
        };
        if applied(context, vec![op]).await? {
            return Ok(reply);
        }
    }
    Err(kept_changing())
}

/// The answer of a command whose keys changed under it every time it tried.
pub(super) fn kept_changing() -> Reply {
    Reply::Error("ERR the key kept changing under this command; try again".into())
}

pub(super) async fn read(context: &Context, key: &[u8]) -> Result<Option<Entry>, Reply> {
    context.store.get(key).await.map_err(store_error)
}

/// The entries of the keys a command names (at least one), read from one
/// snapshot.
async fn read_keys(
    context: &Context,
    session: &Session,
    name: &str,
    args: &[Bytes],
) -> Result<crate::storage::Found, Reply> {
    if args.is_empty() {
        return Err(wrong_arity(name));
    }
    let keys = args
        .iter()
        .map(|key| checked_key(context, session, key, Right::Read))
        .collect::<Result<Vec<_>, _>>()?;
    context.store.get_many(keys).await.map_err(store_error)
}

/// Writes `ops` as one atomic write; whether every condition held.
pub(super) async fn applied(context: &Context, ops: Vec<WriteOp>) -> Result<bool, Reply> {
    match context.store.write(ops).await.map_err(store_error)? {
        WriteOutcome::Applied { .. } => Ok(true),
        WriteOutcome::Rejected { .. } => Ok(false),
    }
}

fn put(key: Vec<u8>, value: &Bytes, condition: Condition, expiry: Expiry) -> WriteOp {
    WriteOp::Put {
        key,
        value: value.to_vec(),
        condition,
        expiry,
    }
}

fn old_value(old: Option<&Entry>) -> Reply {
    old.map_or(Reply::Null, |e| Reply::Bulk(e.value.clone().into()))
}

/// The options of `SET key value [NX | XX] [GET] [EX s | PX ms | EXAT s |
/// PXAT ms | KEEPTTL]`.
struct SetOptions {
    condition: Option<Condition>,
    get: bool,
    expiry: Expiry,
}

fn set_options(options: &[Bytes]) -> Result<SetOptions, Reply> {
    let (mut condition, mut get, mut expiry) = (None, false, None);
    let mut rest = options.iter();
    while let Some(option) = rest.next() {
        let option = String::from_utf8_lossy(option).to_ascii_uppercase();
        match option.as_str() {
            "NX" | "XX" if condition.is_none() => {
                condition = Some(if option == "NX" {
                    Condition::Absent
                } else {
                    Condition::Exists
                });
            }
            "GET" if !get => get = true,
            "KEEPTTL" if expiry.is_none() => expiry = Some(Expiry::Keep),
            "EX" | "PX" | "EXAT" | "PXAT" if expiry.is_none() => {
                let time = rest.next().ok_or_else(syntax_error)?;
                expiry = Some(expiry_of(&option, integer(time)?, "set")?);
            }
            _ => return Err(syntax_error()),
        }
    }
    Ok(SetOptions {
        condition,
        get,
        expiry: expiry.unwrap_or(Expiry::Never),
    })
}

/// `SET ... GET`: the write and the old value, atomically. (SET without GET
/// is a blind write, see [`prepare_write`].)
async fn set_get(context: &Context, session: &Session, name: &str, args: &[Bytes]) -> Outcome {
    let [key, value, options @ ..] = args else {
        return Err(wrong_arity(name));
    };
    let SetOptions {
        condition, expiry, ..
    } = set_options(options)?;
    let key = checked_key(context, session, key, Right::Write)?;
    let value = value.to_vec();
    update(context, &key, |old| {
        let allowed = condition.is_none_or(|c| c.holds(old.map(|e| e.version)));
        if !allowed {
            return Ok(Step::Answer(old_value(old)));
        }
        Ok(Step::Put {
            value: value.clone(),
            expiry,
            reply: old_value(old),
        })
    })
    .await
}

/// `GETEX key [EX s | PX ms | EXAT s | PXAT ms | PERSIST]`.
async fn getex(context: &Context, session: &Session, name: &str, args: &[Bytes]) -> Outcome {
    let [key, options @ ..] = args else {
        return Err(wrong_arity(name));
    };
    let expiry = match options {
        [] => None,
        [persist] if persist.eq_ignore_ascii_case(b"PERSIST") => Some(Expiry::Never),
        [unit, time] => {
            let unit = String::from_utf8_lossy(unit).to_ascii_uppercase();
            if !matches!(unit.as_str(), "EX" | "PX" | "EXAT" | "PXAT") {
                return Err(syntax_error());
            }
            Some(expiry_of(&unit, integer(time)?, "getex")?)
        }
        _ => return Err(syntax_error()),
    };
    let right = if expiry.is_some() {
        Right::Write
    } else {
        Right::Read
    };
    let key = checked_key(context, session, key, right)?;
    let Some(expiry) = expiry else {
        return Ok(old_value(read(context, &key).await?.as_ref()));
    };
    update(context, &key, |old| match old {
        None => Ok(Step::Answer(Reply::Null)),
        Some(entry) => Ok(Step::Put {
            value: entry.value.clone(),
            expiry,
            reply: Reply::Bulk(entry.value.clone().into()),
        }),
    })
    .await
}

/// The expiry of `EX` / `PX` / `EXAT` / `PXAT` with `time`, with Redis's
/// checks (positive; no overflow in milliseconds). An absolute time already
/// past leaves the key expired at once, as Redis deletes it at once.
pub(super) fn expiry_of(unit: &str, time: i64, command: &str) -> Result<Expiry, Reply> {
    let invalid = || Reply::Error(format!("ERR invalid expire time in '{command}' command"));
    if time <= 0 {
        return Err(invalid());
    }
    let ms = match unit {
        "EX" | "EXAT" => time.checked_mul(1000).ok_or_else(invalid)?,
        _ => time,
    };
    match unit {
        "EX" | "PX" => {
            // The deadline this makes must fit too, as in Redis.
            ms.checked_add(system_now_us() / 1000).ok_or_else(invalid)?;
            Ok(Expiry::Ttl(ms.unsigned_abs()))
        }
        _ => Ok(Expiry::At(ms.saturating_mul(1000))),
    }
}

/// `EXPIRE key seconds [NX | XX | GT | LT]` and its three siblings, with
/// Redis's checks: a time that overflows in milliseconds is an error, and a
/// deadline already past deletes the key.
async fn expire(
    context: &Context,
    session: &Session,
    label: &str,
    name: &str,
    args: &[Bytes],
) -> Outcome {
    let [key, time, options @ ..] = args else {
        return Err(wrong_arity(name));
    };
    let key = checked_key(context, session, key, Right::Write)?;
    let time = integer(time)?;
    let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
    for option in options {
        let option = String::from_utf8_lossy(option).to_ascii_uppercase();
        match option.as_str() {
            "NX" => nx = true,
            "XX" => xx = true,
            "GT" => gt = true,
            "LT" => lt = true,
            _ => return Err(Reply::Error(format!("ERR Unsupported option {option}"))),
        }
    }
    if nx && (xx || gt || lt) {
        return Err(Reply::Error(
            "ERR NX and XX, GT or LT options at the same time are not compatible".into(),
        ));
    }
    if gt && lt {
        return Err(Reply::Error(
            "ERR GT and LT options at the same time are not compatible".into(),
        ));
    }
    let invalid = || Reply::Error(format!("ERR invalid expire time in '{name}' command"));
    let now_ms = system_now_us() / 1000;
    let ms = match label {
        "expire" | "expireat" => time.checked_mul(1000).ok_or_else(invalid)?,
        _ => time,
    };
    let deadline_ms = match label {
        "expire" | "pexpire" => ms.checked_add(now_ms).ok_or_else(invalid)?,
        _ => ms,
    };
    let deadline_us = deadline_ms.saturating_mul(1000);
    update(context, &key, |old| {
        let Some(entry) = old else {
            return Ok(Step::Answer(Reply::Integer(0)));
        };
        // No deadline counts as an infinite one, as in Redis.
        let current = entry.expires_at_us;
        let allowed = (!nx || current.is_none())
            && (!xx || current.is_some())
            && (!gt || current.is_some_and(|c| deadline_us > c))
            && (!lt || current.is_none_or(|c| deadline_us < c));
        if !allowed {
            return Ok(Step::Answer(Reply::Integer(0)));
        }
        if deadline_ms <= now_ms {
            return Ok(Step::Delete(Reply::Integer(1)));
        }
        Ok(Step::Put {
            value: entry.value.clone(),
            expiry: Expiry::At(deadline_us),
            reply: Reply::Integer(1),
        })
    })
    .await
}

/// `DBSIZE`: the keys in the store, counted a page at a time. With auth on,
/// only a token that may read every key may ask.
async fn dbsize(context: &Context, session: &Session, args: &[Bytes]) -> Outcome {
    if !args.is_empty() {
        return Err(wrong_arity("dbsize"));
    }
    if let Some(Access::Token(rights)) = &session.rights
        && !rights.can_read(b"")
    {
        return Err(Reply::Error(format!(
            "NOPERM token '{}' may not read every key, which DBSIZE counts",
            rights.name
        )));
    }
    let mut count = 0i64;
    let mut lower = std::ops::Bound::Unbounded;
    loop {
        let page = context
            .store
            .scan(ScanRequest {
                lower: lower.clone(),
                upper: std::ops::Bound::Unbounded,
                reverse: false,
                limit: 1000,
                keys_only: true,
                max_value_bytes: usize::MAX,
            })
            .await
            .map_err(store_error)?;
        count += page.entries.len() as i64;
        match page.entries.last() {
            Some(last) if page.more => lower = std::ops::Bound::Excluded(last.key.clone()),
            _ => return Ok(Reply::Integer(count)),
        }
    }
}

/// `AUTH token` or `AUTH name token`: the name, when given, must be the
/// token's name in the token file.
fn auth(context: &Context, session: &mut Session, name: &str, args: &[Bytes]) -> Outcome {
    let (user, token) = match args {
        [token] => (None, token),
        [user, token] => (Some(user), token),
        _ => return Err(wrong_arity(name)),
    };
    let Some(rules) = &context.auth else {
        return Err(Reply::Error(
            "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?".into(),
        ));
    };
    let rights = String::from_utf8(token.to_vec())
        .ok()
        .and_then(|token| rules.resolve(&token))
        .filter(|rights| user.is_none_or(|u| u.as_ref() == rights.name.as_bytes()))
        .ok_or_else(|| {
            Reply::Error("WRONGPASS invalid username-password pair or user is disabled.".into())
        })?;
    session.rights = Some(Access::Token(rights));
    Ok(Reply::Simple("OK"))
}

/// `HELLO [protover [AUTH name token] [SETNAME name]]`.
fn hello(context: &Context, session: &mut Session, args: &[Bytes]) -> Outcome {
    let mut protocol = session.protocol;
    let mut rest = args.iter();
    if let Some(version) = rest.next() {
        protocol = match integer(version) {
            Ok(2) => 2,
            Ok(3) => 3,
            Ok(_) => {
                return Err(Reply::Error("NOPROTO unsupported protocol version".into()));
            }
            Err(_) => {
                return Err(Reply::Error(
                    "ERR Protocol version is not an integer or out of range".into(),
                ));
            }
        };
    }
    let mut name = None;
    while let Some(option) = rest.next() {
        if option.eq_ignore_ascii_case(b"AUTH") {
            let (Some(user), Some(token)) = (rest.next(), rest.next()) else {
                return Err(syntax_error());
            };
            auth(context, session, "hello", &[user.clone(), token.clone()])?;
        } else if option.eq_ignore_ascii_case(b"SETNAME") {
            let value = rest.next().ok_or_else(syntax_error)?;
            name = Some(String::from_utf8_lossy(value).into_owned());
        } else {
            return Err(syntax_error());
        }
    }
    if session.rights.is_none() {
        return Err(Reply::Error(
            "NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time".into(),
        ));
    }
    session.protocol = protocol;
    if name.is_some() {
        session.name = name;
    }
    let text = |s: &str| Reply::Bulk(Bytes::from(s.to_owned()));
    Ok(Reply::Map(vec![
        (text("server"), text("redis")),
        (text("version"), text(REDIS_VERSION)),
        (text("proto"), Reply::Integer(i64::from(protocol))),
        (
            text("id"),
            Reply::Integer(i64::try_from(session.id).unwrap_or(i64::MAX)),
        ),
        (text("mode"), text("standalone")),
        (text("role"), text("master")),
        (text("modules"), Reply::Array(Vec::new())),
    ]))
}

/// `CLIENT SETNAME | GETNAME | ID | SETINFO | INFO | LIST`.
fn client(session: &mut Session, args: &[Bytes]) -> Outcome {
    let Some((sub, rest)) = args.split_first() else {
        return Err(wrong_arity("client"));
    };
    let sub = String::from_utf8_lossy(sub).to_ascii_uppercase();
    match (sub.as_str(), rest) {
        ("SETNAME", [name]) => {
            if name.iter().any(|b| *b <= b' ') {
                return Err(Reply::Error(
                    "ERR Client names cannot contain spaces, newlines or special characters."
                        .into(),
                ));
            }
            session.name = Some(String::from_utf8_lossy(name).into_owned());
            Ok(Reply::Simple("OK"))
        }
        ("GETNAME", []) => Ok(session
            .name
            .as_ref()
            .map_or(Reply::Null, |n| Reply::Bulk(Bytes::from(n.clone())))),
        ("ID", []) => Ok(Reply::Integer(
            i64::try_from(session.id).unwrap_or(i64::MAX),
        )),
        // Library name and version: accepted, as Redis does, and not kept.
        ("SETINFO", [_, _]) => Ok(Reply::Simple("OK")),
        ("INFO" | "LIST", []) => Ok(Reply::Verbatim(format!(
            "id={} addr={} name={} db=0 resp={}\n",
            session.id,
            session.addr.map(|a| a.to_string()).unwrap_or_default(),
            session.name.as_deref().unwrap_or_default(),
            session.protocol
        ))),
        _ => Err(Reply::Error(format!(
            "ERR unknown subcommand or wrong number of arguments for 'CLIENT|{sub}'"
        ))),
    }
}

/// `INFO`: the fields clients read (`redis_version`, `loading`, ...) and
/// kvstore's own.
fn info(context: &Context) -> Reply {
    let uptime = context.started.elapsed().as_secs();
    let fsync = if context.config.fsync_every_write {
        "always"
    } else {
        "everysec"
    };
    Reply::Verbatim(format!(
        "# Server\r\nredis_version:{REDIS_VERSION}\r\nkvstore_version:{}\r\nredis_mode:standalone\r\n\
         arch_bits:64\r\nprocess_id:{}\r\nuptime_in_seconds:{uptime}\r\n\r\n\
         # Clients\r\nconnected_clients:{}\r\n\r\n\
         # Persistence\r\nloading:0\r\naof_enabled:1\r\naof_fsync:{fsync}\r\nstorage:{}\r\n\r\n\
         # Cluster\r\ncluster_enabled:0\r\n\r\n# Keyspace\r\n",
        env!("CARGO_PKG_VERSION"),
        std::process::id(),
        context
            .connections
            .load(std::sync::atomic::Ordering::Relaxed),
        context.store.describe(),
    ))
}

/// `CONFIG GET pattern...`: kvstore's durability, in Redis's terms, for the
/// parameters clients and tools ask about; nothing else, and no `SET`.
fn config(context: &Context, args: &[Bytes]) -> Outcome {
    let Some((sub, patterns)) = args.split_first() else {
        return Err(wrong_arity("config"));
    };
    if !sub.eq_ignore_ascii_case(b"GET") || patterns.is_empty() {
        return Err(Reply::Error(
            "ERR kvstore takes CONFIG GET only; its settings are the server's flags".into(),
        ));
    }
    let fsync = if context.config.fsync_every_write {
        "always"
    } else {
        "everysec"
    };
    let known = [
        ("appendonly", "yes"),
        ("appendfsync", fsync),
        ("save", ""),
        ("databases", "1"),
    ];
    let mut pairs = Vec::new();
    for pattern in patterns {
        let pattern = String::from_utf8_lossy(pattern).to_ascii_lowercase();
        for (name, value) in known {
            if (pattern == "*" || pattern == name) && !pairs.iter().any(|(n, _)| *n == name) {
                pairs.push((name, value));
            }
        }
    }
    let text = |s: &str| Reply::Bulk(Bytes::from(s.to_owned()));
    Ok(Reply::Map(
        pairs
            .into_iter()
            .map(|(name, value)| (text(name), text(value)))
            .collect(),
    ))
}

/// `COMMAND [COUNT | DOCS | INFO]`: enough for redis-cli, which asks at
/// start; no command descriptions.
fn command(args: &[Bytes]) -> Outcome {
    match args
        .first()
        .map(|s| String::from_utf8_lossy(s).to_ascii_uppercase())
    {
        None => Ok(Reply::Array(Vec::new())),
        Some(sub) if sub == "COUNT" => Ok(Reply::Integer(COMMANDS.len() as i64)),
        Some(sub) if sub == "DOCS" => Ok(Reply::Map(Vec::new())),
        Some(sub) if sub == "INFO" => Ok(Reply::Array(
            args.iter().skip(1).map(|_| Reply::NullArray).collect(),
        )),
        Some(sub) => Err(Reply::Error(format!(
            "ERR unknown subcommand '{sub}'. Try COMMAND HELP."
        ))),
    }
}

/// Which right a command needs on a key.
#[derive(Clone, Copy)]
pub(super) enum Right {
    Read,
    Write,
}

/// A key as the API takes it (UTF-8, no NUL, not too long), that the
/// client may read or write.
pub(super) fn checked_key(
    context: &Context,
    session: &Session,
    raw: &Bytes,
    right: Right,
) -> Result<Vec<u8>, Reply> {
    let text = std::str::from_utf8(raw)
        .map_err(|_| Reply::Error("ERR invalid key: kvstore keys are UTF-8 text".into()))?;
    crate::api::request::check_key(text, &context.limits)
        .map_err(|err| Reply::Error(format!("ERR invalid key: {}", err.message)))?;
    if let Some(Access::Token(rights)) = &session.rights {
        let (allowed, verb) = match right {
            Right::Read => (rights.can_read(raw), "read"),
            Right::Write => (rights.can_write(raw), "write"),
        };
        if !allowed {
            return Err(Reply::Error(format!(
                "NOPERM token '{}' may not {verb} key '{text}'",
                rights.name
            )));
        }
    }
    Ok(raw.to_vec())
}

pub(super) fn store_error(err: StoreError) -> Reply {
    Reply::Error(format!("ERR {err}"))
}

pub(super) fn integer(raw: &[u8]) -> Result<i64, Reply> {
    std::str::from_utf8(raw)
        .ok()
        .filter(|text| !text.starts_with('+'))
        .and_then(|text| text.parse().ok())
        .ok_or_else(not_an_integer)
}

/// A float as Redis reads one: infinities are numbers (an increment of
/// `+inf` is refused for its result, not for its text), NaN is not.
fn float(raw: &[u8]) -> Result<f64, Reply> {
    std::str::from_utf8(raw)
        .ok()
        .and_then(|text| text.parse::<f64>().ok())
        .filter(|f| !f.is_nan())
        .ok_or_else(|| Reply::Error("ERR value is not a valid float".into()))
}

fn not_an_integer() -> Reply {
    Reply::Error("ERR value is not an integer or out of range".into())
}

fn overflow() -> Reply {
    Reply::Error("ERR increment or decrement would overflow".into())
}

/// A string would grow past `--max-value-bytes` (Redis's own limit is
/// proto-max-bulk-len, which its wording names).
pub(super) fn too_long(max: usize) -> Reply {
    Reply::Error(format!(
        "ERR string exceeds maximum allowed size ({max} bytes, --max-value-bytes)"
    ))
}

pub(super) fn db_out_of_range() -> Reply {
    Reply::Error("ERR DB index is out of range (kvstore has one keyspace, database 0)".into())
}

pub(super) fn syntax_error() -> Reply {
    Reply::Error("ERR syntax error".into())
}

pub(super) fn wrong_arity(name: &str) -> Reply {
    Reply::Error(format!(
        "ERR wrong number of arguments for '{name}' command"
    ))
}

fn unknown_command(name: &str, args: &[Bytes]) -> Reply {
    let shown: String = args
        .iter()
        .take(3)
        .map(|a| format!("'{}' ", String::from_utf8_lossy(a)))
        .collect();
    Reply::Error(format!(
        "ERR unknown command '{name}', with args beginning with: {shown}"
    ))
}
