//! What readers see, and batch reads and ranges from it. A key past its
//! deadline (or on a lease that is gone) is left out at once, whether or not
//! the expirer has deleted it yet.

use std::ops::Bound;
use std::sync::Arc;

use fjall::Readable;

use super::codec;
use super::engine::Engine;
use super::{Entry, Found, ScanPage, ScanRequest, Shared};
use crate::error::StoreResult;

/// The engine as of the last sync: every read goes through one. fjall makes
/// a group visible as soon as it is in the journal, before the sync that the
/// sync thread runs while the next group is written (see [`super::syncer`]);
/// a snapshot taken right after the group, and handed to readers only once
/// that sync is done, keeps every reader from seeing a write that a crash
/// could still take away.
pub(super) struct View {
    pub(super) engine: Arc<Engine>,
    pub(super) snapshot: fjall::Snapshot,
    /// The store revision the snapshot holds.
    pub(super) revision: u64,
}

impl View {
    /// The engine as it is now, which holds `revision`; only the writer may
    /// take one, after its commit and before the next.
    pub(super) fn now(engine: Arc<Engine>, revision: u64) -> Self {
        View {
            snapshot: engine.db.snapshot(),
            engine,
            revision,
        }
    }
}

pub(super) fn get_snapshot(shared: &Shared, keys: Vec<Vec<u8>>) -> StoreResult<Found> {
    shared.with_view(|view| {
        let now = shared.now_us();
        let entries = keys
            .into_iter()
            .map(|key| match view.snapshot.get(&view.engine.kv, &key)? {
                Some(record) => to_entry(shared, now, key, &record, false),
                None => Ok(None),
            })
            .collect::<StoreResult<_>>()?;
        Ok(Found {
            entries,
            revision: view.revision,
        })
    })
}

/// The entry a stored record holds; `None` when it has expired at `now_us`.
pub(super) fn to_entry(
    shared: &Shared,
    now_us: i64,
    key: Vec<u8>,
    record: &[u8],
    keys_only: bool,
) -> StoreResult<Option<Entry>> {
    let (meta, value) = codec::decode(record)?;
    let expires_at_us = shared.deadline_of(&meta);
    if expires_at_us.is_some_and(|deadline| deadline <= now_us) {
        return Ok(None);
    }
    Ok(Some(Entry {
        key,
        value: if keys_only {
            Vec::new()
        } else {
            value.to_vec()
        },
        version: meta.version,
        revision: meta.revision,
        created_at_us: meta.created_at_us,
        updated_at_us: meta.updated_at_us,
        expires_at_us,
        lease: meta.lease,
    }))
}

/// Whether no key can lie between the bounds (fjall, like `BTreeMap`, must not
/// be asked for an inverted range).
pub(super) fn range_is_empty(lower: &Bound<Vec<u8>>, upper: &Bound<Vec<u8>>) -> bool {
    match (lower, upper) {
        (Bound::Included(l), Bound::Included(u)) => l > u,
        (Bound::Included(l), Bound::Excluded(u))
        | (Bound::Excluded(l), Bound::Included(u))
        | (Bound::Excluded(l), Bound::Excluded(u)) => l >= u,
        _ => false,
    }
}

pub(super) fn scan_snapshot(shared: &Shared, request: &ScanRequest) -> StoreResult<ScanPage> {
    shared.with_view(|view| scan_view(shared, view, request))
}

fn scan_view(shared: &Shared, view: &View, request: &ScanRequest) -> StoreResult<ScanPage> {
    let now = shared.now_us();
    let revision = view.revision;
    let range = view.snapshot.range(
        &view.engine.kv,
        (request.lower.clone(), request.upper.clone()),
    );
    let items: Box<dyn Iterator<Item = fjall::Guard>> = if request.reverse {
        Box::new(range.rev())
    } else {
        Box::new(range)
    };
    let mut entries = Vec::with_capacity(request.limit.min(1024));
    let mut value_bytes = 0usize;
    for item in items {
        let (key, record) = item.into_inner()?;
        if entries.len() == request.limit {
            return Ok(ScanPage {
                entries,
                more: true,
                revision,
            });
        }
        let Some(entry) = to_entry(shared, now, key.to_vec(), &record, request.keys_only)? else {
            continue;
        };
        value_bytes = value_bytes.saturating_add(entry.value.len());
        if !entries.is_empty() && !request.keys_only && value_bytes > request.max_value_bytes {
            return Ok(ScanPage {
                entries,
                more: true,
                revision,
            });
        }
        entries.push(entry);
    }
    Ok(ScanPage {
        entries,
        more: false,
        revision,
    })
}
