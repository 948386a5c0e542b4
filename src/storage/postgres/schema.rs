//! Creating and upgrading the schema, once per store, under an advisory lock
//! so that servers starting together do it once.

use super::errors::{map_pg, map_pool};
use super::sql::ident;
use super::{PostgresStore, SCHEMA_VERSION};
use crate::error::{StoreError, StoreResult};

impl PostgresStore {
    /// Creates or upgrades the schema unless that was done already.
    pub(super) async fn ensure_schema(&self) -> StoreResult<()> {
        self.schema_ready.get_or_try_init(|| self.migrate()).await?;
        Ok(())
    }

    async fn migrate(&self) -> StoreResult<()> {
        let mut client = self.pool.get().await.map_err(map_pool)?;
        let schema = ident(&self.config.schema);
        let tx = client.transaction().await.map_err(|e| map_pg(&e))?;
        // One lock per schema name: servers starting together take turns, and
        // the second finds everything in place.
        tx.execute(
            "SELECT pg_advisory_xact_lock(7070, hashtext($1))",
            &[&self.config.schema],
        )
        .await
        .map_err(|e| map_pg(&e))?;
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
            None => {
                tx.execute(
                    &format!("INSERT INTO {schema}.kvstore_schema VALUES ($1)"),
                    &[&SCHEMA_VERSION],
                )
                .await
                .map_err(|e| map_pg(&e))?;
            }
            Some(v) if v > SCHEMA_VERSION => {
                return Err(StoreError::Internal(format!(
                    "schema {} has version {v}, made by a newer kvstore (this one knows {SCHEMA_VERSION})",
                    self.config.schema
                )));
            }
            // Upgrades from older versions go here.
            Some(_) => {}
        }
        tx.commit().await.map_err(|e| map_pg(&e))
    }
}
