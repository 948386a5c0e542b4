//! The writer's map of current key metadata, a small cousin of Bitcask's key
//! directory (see the module notes of [`super`]).

use super::codec::{self, RecordMeta};
use super::engine::Engine;
use crate::error::StoreResult;

/// The current metadata of keys the writer has read or written, `None` for a
/// key that does not exist. Bounded by weight; a key it has dropped is read
/// from the engine again.
pub(super) struct KeyDirectory(
    quick_cache::unsync::Cache<Vec<u8>, Option<RecordMeta>, DirectoryWeighter>,
);

#[derive(Clone)]
struct DirectoryWeighter;

/// Bytes of one directory entry besides its key: the metadata and the map's
/// own bookkeeping, roughly (the key's vector, the metadata, the entry and
/// its slot in the table).
const DIRECTORY_ENTRY_OVERHEAD: u64 = 96;

impl quick_cache::Weighter<Vec<u8>, Option<RecordMeta>> for DirectoryWeighter {
    fn weight(&self, key: &Vec<u8>, _: &Option<RecordMeta>) -> u64 {
        key.len() as u64 + DIRECTORY_ENTRY_OVERHEAD
    }
}

impl KeyDirectory {
    pub(super) fn new(bytes: u64) -> Self {
        let items = usize::try_from(bytes / (DIRECTORY_ENTRY_OVERHEAD + 32)).unwrap_or(usize::MAX);
        KeyDirectory(quick_cache::unsync::Cache::with_weighter(
            items.max(1),
            bytes.max(1),
            DirectoryWeighter,
        ))
    }

    /// The key's current metadata, from the directory or else from the engine.
    pub(super) fn current(
        &mut self,
        engine: &Engine,
        key: &[u8],
    ) -> StoreResult<Option<RecordMeta>> {
        if let Some(meta) = self.0.get(key) {
            return Ok(*meta);
        }
        let meta = match engine.kv.get(key)? {
            Some(record) => Some(codec::decode(&record)?.0),
            None => None,
        };
        self.0.insert(key.to_vec(), meta);
        Ok(meta)
    }

    pub(super) fn set(&mut self, key: Vec<u8>, meta: Option<RecordMeta>) {
        self.0.insert(key, meta);
    }

    pub(super) fn clear(&mut self) {
        self.0.clear();
    }
}
