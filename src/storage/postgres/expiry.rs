//! Deadlines and leases on PostgreSQL: the expirer that deletes what is due,
//! the ends of leases, and the lease operations.
//!
//! Deadlines are kept and judged by the database clock, so servers whose
//! clocks differ agree on them. Reads leave out an expired key at once; the
//! delete follows within a second, as a write like any other: a revision,
//! change-log rows (reason `Expired`), the watermark, notifications.
//!
//! Every server runs the expirer. A due key is locked with `FOR UPDATE SKIP
//! LOCKED` and deleted under that lock only if it is still the version that
//! carried the deadline, so two expirers never delete one key twice and a key
//! rewritten before its deadline is left alone. A lease is ended by deleting
//! its row first, so that whoever deletes it deletes its keys, once.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::types::{ToSql, Type};

use super::errors::{is_retryable, map_pg};
use super::notify::notification_payloads;
use super::rows::{column, first_row, to_u64};
use super::sql::{EXPIRED, LEASE_ENDED, lease_id, lease_param, ttl_ms_param};
use super::{MAX_ATTEMPTS, Shared};
use crate::error::{StoreError, StoreResult};
use crate::storage::changes::count_expired;
use crate::storage::{DeleteReason, Lease, LeaseId, Revoked, new_lease_id};

/// How often the expirer looks for due keys and leases: well within the
/// second allowed between a deadline and its delete.
const EXPIRE_EVERY: Duration = Duration::from_millis(200);
/// Keys deleted per statement (one transaction): a million keys due at once
/// are deleted a thousand at a time, and other writes go on between.
const EXPIRE_BATCH: i64 = 1000;
/// Due leases looked up at a time; each is ended in a transaction of its own.
const LEASE_BATCH: i64 = 100;

/// Deletes due keys and ends due leases every [`EXPIRE_EVERY`] until the
/// task is aborted (the store closed or dropped).
pub(super) async fn run_expirer(shared: Arc<Shared>) {
    let mut failing = false;
    loop {
        tokio::time::sleep(EXPIRE_EVERY).await;
        match expire_round(&shared).await {
            Ok(()) => failing = false,
            // The poller says so already (and a closed store refuses writes).
            Err(StoreError::Unavailable(_)) => {}
            Err(err) => {
                if !failing {
                    tracing::warn!(error = %err, "deleting expired keys failed; retrying");
                }
                failing = true;
            }
        }
    }
}

/// Deletes everything due now.
async fn expire_round(shared: &Shared) -> StoreResult<()> {
    let full = usize::try_from(EXPIRE_BATCH).unwrap_or(usize::MAX);
    while shared
        .expire(&shared.sql.expire_due, Type::INT8, &EXPIRE_BATCH)
        .await?
        == full
    {}
    let full = usize::try_from(LEASE_BATCH).unwrap_or(usize::MAX);
    loop {
        let due = shared.due_leases().await?;
        for id in &due {
            shared.end_lease(*id, DeleteReason::Expired).await?;
        }
        if due.len() < full {
            return Ok(());
        }
    }
}

/// What a single write found in its way and left alone: its key past its
/// own deadline, or on a lease that has ended.
pub(super) enum Stale {
    Key,
    Lease(i64),
}

impl Stale {
    /// From the key's `state` and lease, as a single write's statement
    /// reports them.
    pub(super) fn of(state: i32, lease: Option<i64>) -> Option<Stale> {
        match (state, lease) {
            (EXPIRED, _) => Some(Stale::Key),
            (LEASE_ENDED, Some(lease)) => Some(Stale::Lease(lease)),
            _ => None,
        }
    }
}

impl Shared {
    /// Runs an expiry delete (`Sql::expire_due` or `Sql::expire_keys`) with
    /// its one parameter; gives how many keys it deleted.
    async fn expire(
        &self,
        sql: &str,
        param_type: Type,
        param: &(dyn ToSql + Sync),
    ) -> StoreResult<usize> {
        for _ in 0..MAX_ATTEMPTS {
            let client = self.writer().await?;
            match self
                .run
                .query(&client, sql, &[(param, param_type.clone())])
                .await
            {
                Ok(rows) => {
                    if !rows.is_empty() {
                        self.kick.notify_one();
                        count_expired(DeleteReason::Expired, rows.len());
                    }
                    return Ok(rows.len());
                }
                Err(err) if is_retryable(&err) => continue,
                Err(err) => return Err(map_pg(&err)),
            }
        }
        Err(StoreError::Unavailable(
            "too much contention deleting expired keys; try again".into(),
        ))
    }

    /// Deletes what a write found expired at its keys, so that the write,
    /// made again, finds them absent and its events follow their deletes:
    /// keys past their own deadline each under a revision of its own, and
    /// the keys of ended leases lease by lease.
    pub(super) async fn clear_expired(&self, keys: &[&[u8]], leases: &[i64]) -> StoreResult<()> {
        if !keys.is_empty() {
            self.expire(&self.sql.expire_keys, Type::BYTEA_ARRAY, &keys)
                .await?;
        }
        for lease in leases {
            self.end_lease(*lease, DeleteReason::Expired).await?;
        }
        Ok(())
    }

    /// Deletes what stood expired in a single write's way, so that the
    /// write can be made again.
    pub(super) async fn clear_stale(&self, key: &[u8], stale: Stale) -> StoreResult<()> {
        match stale {
            Stale::Key => self.clear_expired(&[key], &[]).await,
            Stale::Lease(lease) => self.clear_expired(&[], &[lease]).await,
        }
    }

    /// Up to [`LEASE_BATCH`] leases whose deadline passed.
    async fn due_leases(&self) -> StoreResult<Vec<i64>> {
        let client = self.writer().await?;
        let rows = self
            .run
            .query(&client, &self.sql.due_leases, &[(&LEASE_BATCH, Type::INT8)])
            .await
            .map_err(|e| map_pg(&e))?;
        rows.iter().map(|row| column(row, 0)).collect()
    }

    /// Ends lease `id` and deletes its keys under one revision, for
    /// `reason`: a revocation (`LeaseRevoked`) of a live lease, or the
    /// expiry (`Expired`) of one that is no longer live. `None` when a
    /// revocation found no live lease.
    pub(super) async fn end_lease(
        &self,
        id: i64,
        reason: DeleteReason,
    ) -> StoreResult<Option<Revoked>> {
        for _ in 0..MAX_ATTEMPTS {
            let mut client = self.writer().await?;
            match self.try_end_lease(&mut client, id, reason).await {
                Ok(ended) => {
                    self.kick.notify_one();
                    return Ok(ended);
                }
                Err(err) if is_retryable(&err) => continue,
                Err(err) => return Err(map_pg(&err)),
            }
        }
        Err(StoreError::Unavailable(
            "too much contention on the lease's keys; try again".into(),
        ))
    }

    /// One attempt at [`Shared::end_lease`]. Locks are taken in the order
    /// every write takes them, keys before the lease, so that a put on one
    /// of the lease's keys and the lease's end cannot wait on each other:
    /// first the keys attached now, then the lease's row, deleted (a put
    /// attaching a new key holds the row, FOR KEY SHARE, until it commits,
    /// so the delete waits for it), then the keys again, which now are all
    /// the keys the lease will ever have. Whoever deletes the lease second
    /// finds no keys left.
    async fn try_end_lease(
        &self,
        client: &mut deadpool_postgres::Object,
        id: i64,
        reason: DeleteReason,
    ) -> Result<Option<Revoked>, tokio_postgres::Error> {
        let revoke = reason == DeleteReason::LeaseRevoked;
        let (run, sql) = (&self.run, &self.sql);
        let tx = run.begin(client).await?;
        run.query_in(&tx, &sql.attached_keys, &[(&id, Type::INT8)])
            .await?;
        let ended = !run
            .query_in(
                &tx,
                &sql.end_lease,
                &[(&id, Type::INT8), (&revoke, Type::BOOL)],
            )
            .await?
            .is_empty();
        if revoke && !ended {
            tx.rollback().await?;
            return Ok(None);
        }
        let keys = run
            .query_in(&tx, &sql.lease_keys, &[(&id, Type::INT8)])
            .await?
            .iter()
            .map(|row| row.try_get::<_, Vec<u8>>(0))
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            let settled: i64 = tx
                .query_one(self.sql.watermark_row.as_str(), &[])
                .await?
                .try_get(0)?;
            tx.commit().await?;
            return Ok(Some(Revoked {
                revision: u64::try_from(settled).unwrap_or_default(),
                keys,
            }));
        }
        let code = i16::from(reason.code());
        let row = run
            .query_one_in(
                &tx,
                &sql.drop_keys,
                &[(&keys, Type::BYTEA_ARRAY), (&code, Type::INT2)],
            )
            .await?;
        let revision: i64 = row.try_get(0)?;
        let written_at_us: i64 = row.try_get(1)?;
        if let Some(notify) = &sql.notify {
            let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
            for payload in notification_payloads(revision, written_at_us, &refs) {
                tx.execute(notify.as_str(), &[&payload]).await?;
            }
        }
        tx.commit().await?;
        count_expired(reason, keys.len());
        Ok(Some(Revoked {
            revision: u64::try_from(revision).unwrap_or_default(),
            keys,
        }))
    }

    pub(super) async fn grant_lease(
        &self,
        ttl_ms: u64,
        owner: Option<String>,
    ) -> StoreResult<Lease> {
        let ttl = ttl_ms_param(ttl_ms);
        // A new random id collides with a live one about never; each try
        // draws another.
        for _ in 0..MAX_ATTEMPTS {
            let client = self.writer().await?;
            let id = lease_param(new_lease_id()?);
            let rows = self
                .run
                .query(
                    &client,
                    &self.sql.grant_lease,
                    &[(&ttl, Type::INT8), (&owner, Type::TEXT), (&id, Type::INT8)],
                )
                .await
                .map_err(|e| map_pg(&e))?;
            if let Some(row) = rows.first() {
                return Ok(Lease {
                    id: lease_id(column(row, 0)?),
                    ttl_ms: to_u64(ttl)?,
                    expires_at_us: column(row, 1)?,
                    owner,
                });
            }
        }
        Err(StoreError::Internal(
            "no free lease id after several random draws".into(),
        ))
    }

    /// Renews a live lease: a committed UPDATE, so the renewal survives a
    /// crash of PostgreSQL once answered.
    pub(super) async fn keep_lease_alive(&self, id: LeaseId) -> StoreResult<Lease> {
        let client = self.writer().await?;
        let rows = self
            .run
            .query(
                &client,
                &self.sql.keep_lease_alive,
                &[(&lease_param(id), Type::INT8)],
            )
            .await
            .map_err(|e| map_pg(&e))?;
        let row = rows.first().ok_or(StoreError::LeaseNotFound(id))?;
        Ok(Lease {
            id,
            ttl_ms: to_u64(column(row, 0)?)?,
            expires_at_us: column(row, 1)?,
            owner: column(row, 2)?,
        })
    }

    pub(super) async fn lease(&self, id: LeaseId) -> StoreResult<Option<Lease>> {
        let (run, sql, param) = (&self.run, &self.sql.lease, lease_param(id));
        let rows = self
            .read(|client| async move { run.query(&client, sql, &[(&param, Type::INT8)]).await })
            .await?;
        rows.first()
            .map(|row| {
                Ok(Lease {
                    id,
                    ttl_ms: to_u64(column(row, 0)?)?,
                    expires_at_us: column(row, 1)?,
                    owner: column(row, 2)?,
                })
            })
            .transpose()
    }

    pub(super) async fn lease_keys(&self, id: LeaseId) -> StoreResult<u64> {
        let (run, sql, param) = (&self.run, &self.sql.count_lease_keys, lease_param(id));
        let rows = self
            .read(|client| async move { run.query(&client, sql, &[(&param, Type::INT8)]).await })
            .await?;
        to_u64(column(&first_row(rows)?, 0)?)
    }
}
