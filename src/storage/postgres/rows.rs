//! Entries read from rows.

use tokio_postgres::Row;

use super::super::Entry;
use super::sql::lease_id;
use crate::error::{StoreError, StoreResult};

pub(super) fn to_u64(n: i64) -> StoreResult<u64> {
    u64::try_from(n).map_err(|_| StoreError::Internal(format!("negative counter {n}")))
}

/// The entry of a row whose columns from `first` on are value, version,
/// revision, created_at_us, updated_at_us, the effective deadline and the
/// lease.
pub(super) fn row_entry(key: Vec<u8>, row: &Row, first: usize) -> StoreResult<Entry> {
    let get = |i: usize| -> StoreResult<i64> {
        row.try_get::<_, i64>(first + i)
            .map_err(|e| StoreError::Internal(format!("reading an entry: {e}")))
    };
    let value: Option<Vec<u8>> = row
        .try_get(first)
        .map_err(|e| StoreError::Internal(format!("reading a value: {e}")))?;
    Ok(Entry {
        key,
        value: value.unwrap_or_default(),
        version: to_u64(get(1)?)?,
        revision: to_u64(get(2)?)?,
        created_at_us: get(3)?,
        updated_at_us: get(4)?,
        expires_at_us: column(row, first + 5)?,
        lease: column::<Option<i64>>(row, first + 6)?.map(lease_id),
    })
}

pub(super) fn column<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a Row,
    i: usize,
) -> StoreResult<T> {
    row.try_get(i)
        .map_err(|e| StoreError::Internal(format!("reading column {i}: {e}")))
}

/// The first row of a statement that always gives one.
pub(super) fn first_row(rows: Vec<Row>) -> StoreResult<Row> {
    rows.into_iter()
        .next()
        .ok_or_else(|| StoreError::Internal("a statement gave no row".into()))
}
