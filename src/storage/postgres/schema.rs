//! Creating and upgrading the schema, once per store, under an advisory lock
//! so that servers starting together do it once.

use deadpool_postgres::Pool;

use super::errors::{map_pg, map_pool};
use super::run::Runner;
use super::sql::{delete_function, ident, put_function};
use super::{PostgresConfig, SCHEMA_VERSION, Shared};
use crate::error::{StoreError, StoreResult};

impl Shared {
    /// Creates or upgrades the schema unless that was done already.
    pub(super) async fn ensure_schema(&self) -> StoreResult<()> {
        self.schema_ready
            .get_or_try_init(|| migrate(&self.pool, &self.config))
            .await?;
        Ok(())
    }
}

/// Creates the schema, or upgrades it to [`SCHEMA_VERSION`].
pub(super) async fn migrate(pool: &Pool, config: &PostgresConfig) -> StoreResult<()> {
    let mut client = pool.get().await.map_err(map_pool)?;
    let schema = ident(&config.schema);
    let tx = Runner::new(config)
        .begin(&mut client)
        .await
        .map_err(|e| map_pg(&e))?;
    // One lock per schema name: servers starting together take turns, and
    // the second finds everything in place.
    tx.execute(
        "SELECT pg_advisory_xact_lock(7070, hashtext($1))",
        &[&config.schema],
    )
    .await
    .map_err(|e| map_pg(&e))?;
    // Version 1: the entries and the revision sequence.
    let ddl = format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}.kvstore_schema (version int4 NOT NULL);
         CREATE TABLE IF NOT EXISTS {schema}.kv (
             key bytea PRIMARY KEY,
             value bytea NOT NULL,
             version int8 NOT NULL,
             revision int8 NOT NULL,
             created_at_us int8 NOT NULL,
             updated_at_us int8 NOT NULL
         );
         CREATE SEQUENCE IF NOT EXISTS {schema}.kv_revision AS int8;"
    );
    tx.batch_execute(&ddl).await.map_err(|e| map_pg(&e))?;
    let found: Option<i32> = tx
        .query_opt(
            &format!("SELECT max(version) FROM {schema}.kvstore_schema"),
            &[],
        )
        .await
        .map_err(|e| map_pg(&e))?
        .and_then(|row| row.get(0));
    match found {
        Some(v) if v > SCHEMA_VERSION => {
            return Err(StoreError::Internal(format!(
                "schema {} has version {v}, made by a newer kvstore (this one knows {SCHEMA_VERSION})",
                config.schema
            )));
        }
        Some(SCHEMA_VERSION) => {}
        // New (its version-1 tables were just made), or older: add what it
        // lacks, one version at a time.
        older => {
            if older.unwrap_or(1) < 2 {
                tx.batch_execute(&change_log_ddl(&schema))
                    .await
                    .map_err(|e| map_pg(&e))?;
            }
            if older.unwrap_or(1) < 3 {
                tx.batch_execute(&expiry_ddl(&schema))
                    .await
                    .map_err(|e| map_pg(&e))?;
            }
            // Versions 4 and 5: the put function, then the delete function
            // (`CREATE OR REPLACE`, so made again from any older version).
            for function in [put_function(&schema), delete_function(&schema)] {
                tx.batch_execute(&function).await.map_err(|e| map_pg(&e))?;
            }
            tx.batch_execute(&format!(
                "DELETE FROM {schema}.kvstore_schema;
                 INSERT INTO {schema}.kvstore_schema VALUES ({SCHEMA_VERSION});"
            ))
            .await
            .map_err(|e| map_pg(&e))?;
        }
    }
    tx.commit().await.map_err(|e| map_pg(&e))
}

/// Version 2: the change log and its watermark. The history starts at the
/// sequence's position when it is made: the writes before it (of a version-1
/// schema) were never logged, so they count as trimmed.
fn change_log_ddl(schema: &str) -> String {
    format!(
        "CREATE TABLE {schema}.kv_revisions (
             revision int8 PRIMARY KEY,   -- one row per settled revision
             written_at_us int8 NOT NULL,
             gap bool NOT NULL DEFAULT false  -- no write used it
         );
         CREATE TABLE {schema}.kv_changes (
             revision int8 NOT NULL,
             key bytea NOT NULL,
             value bytea,                 -- NULL for a delete
             version int8 NOT NULL,
             created_at_us int8,
             updated_at_us int8,
             reason int2,                 -- a delete's DeleteReason
             PRIMARY KEY (revision, key)
         );
         CREATE TABLE {schema}.kv_watermark (
             one bool PRIMARY KEY DEFAULT true CHECK (one),
             settled int8 NOT NULL,       -- every revision up to it has a kv_revisions row
             trimmed int8 NOT NULL        -- the history starts after it
         );
         INSERT INTO {schema}.kv_watermark (settled, trimmed)
         SELECT v, v FROM (
             SELECT CASE WHEN is_called THEN last_value ELSE 0 END AS v
             FROM {schema}.kv_revision
         ) seq;"
    )
}

/// Version 3: deadlines and leases. A key's own deadline and its lease are
/// columns of `kv` (both NULL for a key that never expires, and for every
/// key written before the upgrade); the change log keeps a put's effective
/// deadline and lease. Adding NULL columns rewrites nothing; the indexes are
/// built under the upgrade's lock.
fn expiry_ddl(schema: &str) -> String {
    format!(
        "ALTER TABLE {schema}.kv
             ADD COLUMN expires_at_us int8,   -- its own deadline, µs, database clock
             ADD COLUMN lease int8;           -- the lease it expires with
         CREATE INDEX kv_expires_at ON {schema}.kv (expires_at_us)
             WHERE expires_at_us IS NOT NULL;
         CREATE INDEX kv_lease ON {schema}.kv (lease) WHERE lease IS NOT NULL;
         CREATE TABLE {schema}.leases (
             id int8 PRIMARY KEY,             -- the LeaseId's 64 bits
             ttl_ms int8 NOT NULL,
             expires_at_us int8 NOT NULL,
             owner text
         );
         CREATE INDEX leases_expires_at ON {schema}.leases (expires_at_us);
         ALTER TABLE {schema}.kv_changes
             ADD COLUMN expires_at_us int8,   -- a put's effective deadline
             ADD COLUMN lease int8;"
    )
}
