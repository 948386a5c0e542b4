//! kvstore's own commands, for what Redis's do not say: a key's version and
//! revision, and writes conditional on a version (the HTTP API's `If-Match`).
//! Their names begin with `KV.`, as module commands do, so that they cannot
//! clash with Redis's.
//!
//! - `KV.GET key`: a map of `value`, `version`, `revision`, `created_at`,
//!   `updated_at` (microseconds since the epoch), `expires_at` and `lease`
//!   (null when the key has none); null when the key is absent.
//! - `KV.SET key value [IFVERSION n | IFABSENT | IFEXISTS] [EX s | PX ms |
//!   EXAT s | PXAT ms | KEEPTTL]`: a map of `version`, `revision` and `created`.
//! - `KV.DEL key [IFVERSION n]`: 1 when deleted, 0 when absent.
//! - `KV.REVISION`: the store's revision.
//!
//! A failed condition is the error `VERSION_MISMATCH`, naming the key's
//! current version, as the HTTP API's 412 does.

use bytes::Bytes;

use super::commands::{
    Outcome, Right, checked_key, expiry_of, integer, read, store_error, syntax_error, wrong_arity,
};
use super::frame::Reply;
use super::{Context, Session};
use crate::storage::{Condition, Expiry, OpResult, WriteOp, WriteOutcome};

fn text(s: &str) -> Reply {
    Reply::Bulk(Bytes::from(s.to_owned()))
}

/// The condition of `IFVERSION n`: a version of 1 or more.
fn if_version(raw: &[u8]) -> Result<Condition, Reply> {
    u64::try_from(integer(raw)?)
        .ok()
        .filter(|v| *v > 0)
        .map(Condition::Version)
        .ok_or_else(|| Reply::Error("ERR IFVERSION takes a version of 1 or more".into()))
}

fn mismatch(current: Option<u64>) -> Reply {
    Reply::Error(match current {
        Some(version) => format!("VERSION_MISMATCH the key is at version {version}"),
        None => "VERSION_MISMATCH the key does not exist".into(),
    })
}

pub(super) async fn run(
    context: &Context,
    session: &Session,
    label: &str,
    name: &str,
    args: &[Bytes],
) -> Outcome {
    match label {
        "kv.get" => {
            let [key] = args else {
                return Err(wrong_arity(name));
            };
            let key = checked_key(context, session, key, Right::Read)?;
            let Some(entry) = read(context, &key).await? else {
                return Ok(Reply::Null);
            };
            let micros = |us: i64| Reply::Integer(us);
            Ok(Reply::Map(vec![
                (text("value"), Reply::Bulk(entry.value.into())),
                (
                    text("version"),
                    Reply::Integer(i64::try_from(entry.version).unwrap_or(i64::MAX)),
                ),
                (
                    text("revision"),
                    Reply::Integer(i64::try_from(entry.revision).unwrap_or(i64::MAX)),
                ),
                (text("created_at"), micros(entry.created_at_us)),
                (text("updated_at"), micros(entry.updated_at_us)),
                (
                    text("expires_at"),
                    entry.expires_at_us.map_or(Reply::Null, micros),
                ),
                (
                    text("lease"),
                    entry
                        .lease
                        .map_or(Reply::Null, |id| text(&crate::api::types::lease_text(id))),
                ),
            ]))
        }
        "kv.set" => {
            let [key, value, options @ ..] = args else {
                return Err(wrong_arity(name));
            };
            let key = checked_key(context, session, key, Right::Write)?;
            let (mut condition, mut expiry) = (None, None);
            let mut rest = options.iter();
            while let Some(option) = rest.next() {
                let option = String::from_utf8_lossy(option).to_ascii_uppercase();
                match option.as_str() {
                    "IFVERSION" if condition.is_none() => {
                        condition = Some(if_version(rest.next().ok_or_else(syntax_error)?)?);
                    }
                    "IFABSENT" if condition.is_none() => condition = Some(Condition::Absent),
                    "IFEXISTS" if condition.is_none() => condition = Some(Condition::Exists),
                    "KEEPTTL" if expiry.is_none() => expiry = Some(Expiry::Keep),
                    "EX" | "PX" | "EXAT" | "PXAT" if expiry.is_none() => {
                        let time = integer(rest.next().ok_or_else(syntax_error)?)?;
                        expiry = Some(expiry_of(&option, time, name)?);
                    }
                    _ => return Err(syntax_error()),
                }
            }
            let op = WriteOp::Put {
                key,
                value: value.to_vec(),
                condition: condition.unwrap_or(Condition::Any),
                expiry: expiry.unwrap_or(Expiry::Never),
            };
            match context.store.write(vec![op]).await.map_err(store_error)? {
                WriteOutcome::Applied { revision, results } => {
                    let Some(OpResult::Put {
                        version, created, ..
                    }) = results.first()
                    else {
                        return Err(Reply::Error("ERR a put had no put result".into()));
                    };
                    Ok(Reply::Map(vec![
                        (
                            text("version"),
                            Reply::Integer(i64::try_from(*version).unwrap_or(i64::MAX)),
                        ),
                        (
                            text("revision"),
                            Reply::Integer(i64::try_from(revision).unwrap_or(i64::MAX)),
                        ),
                        (text("created"), Reply::Boolean(*created)),
                    ]))
                }
                WriteOutcome::Rejected { failed } => {
                    Err(mismatch(failed.first().and_then(|f| f.current_version)))
                }
            }
        }
        "kv.del" => {
            let (key, condition) = match args {
                [key] => (key, None),
                [key, option, version] if option.eq_ignore_ascii_case(b"IFVERSION") => {
                    (key, Some(if_version(version)?))
                }
                [_, _, _] => return Err(syntax_error()),
                _ => return Err(wrong_arity(name)),
            };
            let key = checked_key(context, session, key, Right::Write)?;
            let op = WriteOp::Delete {
                key,
                condition: condition.unwrap_or(Condition::Any),
            };
            match context.store.write(vec![op]).await.map_err(store_error)? {
                WriteOutcome::Applied { results, .. } => Ok(Reply::Integer(i64::from(matches!(
                    results.first(),
                    Some(OpResult::Deleted { existed: true })
                )))),
                WriteOutcome::Rejected { failed } => {
                    Err(mismatch(failed.first().and_then(|f| f.current_version)))
                }
            }
        }
        _ => {
            if !args.is_empty() {
                return Err(wrong_arity(name));
            }
            let found = context
                .store
                .get_many(Vec::new())
                .await
                .map_err(store_error)?;
            Ok(Reply::Integer(
                i64::try_from(found.revision).unwrap_or(i64::MAX),
            ))
        }
    }
}
