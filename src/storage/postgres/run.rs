//! Running statements the way the connection allows (see [`Pooler`]):
//! prepared once per connection and kept, on a connection that is one
//! server session; unnamed, each in a transaction that sets kvstore's
//! settings, behind a pooler in transaction mode.

use deadpool_postgres::{ClientWrapper, Transaction};
use futures_util::future::{join_all, join3};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Error, Row};

#[cfg(doc)]
use super::config::Pooler;
use super::config::PostgresConfig;

/// A statement's parameter, with its type.
pub(super) type Param<'a> = (&'a (dyn ToSql + Sync), Type);

/// How statements are sent.
pub(super) struct Runner {
    /// `SET LOCAL` of the settings, behind a pooler in transaction mode.
    local_settings: Option<String>,
    /// `BEGIN` and the same, for a statement that runs on its own.
    begin_with_settings: Option<String>,
}

impl Runner {
    pub(super) fn new(config: &PostgresConfig) -> Self {
        let local_settings = config.local_settings();
        Runner {
            begin_with_settings: local_settings
                .as_ref()
                .map(|settings| format!("BEGIN; {settings}")),
            local_settings,
        }
    }

    /// Runs `sql` on its own (outside any transaction of the caller's).
    pub(super) async fn query(
        &self,
        client: &ClientWrapper,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Vec<Row>, Error> {
        let Some(begin) = &self.begin_with_settings else {
            let (types, values) = split(params);
            let statement = client.prepare_typed_cached(sql, &types).await?;
            return client.query(&statement, &values).await;
        };
        // One round trip: each is sent when first polled, and `join3` polls
        // them in order before any answer is awaited. A failed statement
        // aborts the transaction, and its COMMIT then rolls back.
        let (begun, rows, committed) = join3(
            client.batch_execute(begin),
            client.query_typed(sql, params),
            client.batch_execute("COMMIT"),
        )
        .await;
        begun?;
        let rows = rows?;
        committed?;
        Ok(rows)
    }

    /// Runs `sql` in `tx`, begun by [`Runner::begin`].
    pub(super) async fn query_in(
        &self,
        tx: &Transaction<'_>,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Vec<Row>, Error> {
        if self.local_settings.is_some() {
            return tx.query_typed(sql, params).await;
        }
        let (types, values) = split(params);
        let statement = tx.prepare_typed_cached(sql, &types).await?;
        tx.query(&statement, &values).await
    }

    /// Runs `statements` in `tx`, in order, sent together: one round trip
    /// for all of them once each is prepared. Gives each one's rows.
    pub(super) async fn query_all_in(
        &self,
        tx: &Transaction<'_>,
        statements: &[(&str, &[Param<'_>])],
    ) -> Result<Vec<Result<Vec<Row>, Error>>, Error> {
        if self.local_settings.is_some() {
            return Ok(join_all(
                statements
                    .iter()
                    .map(|(sql, params)| tx.query_typed(sql, params)),
            )
            .await);
        }
        // Prepared first, so that every query below is sent when first
        // polled, and `join_all` polls them in order.
        let mut prepared = Vec::with_capacity(statements.len());
        for (sql, params) in statements {
            let (types, values) = split(params);
            prepared.push((tx.prepare_typed_cached(sql, &types).await?, values));
        }
        Ok(join_all(
            prepared
                .iter()
                .map(|(statement, values)| tx.query(statement, values)),
        )
        .await)
    }

    /// Runs `sql`, which gives exactly one row, in `tx`.
    pub(super) async fn query_one_in(
        &self,
        tx: &Transaction<'_>,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Row, Error> {
        if self.local_settings.is_some() {
            return tx.query_typed_one(sql, params).await;
        }
        let (types, values) = split(params);
        let statement = tx.prepare_typed_cached(sql, &types).await?;
        tx.query_one(&statement, &values).await
    }

    /// Begins a transaction with kvstore's settings.
    pub(super) async fn begin<'a>(
        &self,
        client: &'a mut ClientWrapper,
    ) -> Result<Transaction<'a>, Error> {
        let tx = client.transaction().await?;
        if let Some(settings) = &self.local_settings {
            tx.batch_execute(settings).await?;
        }
        Ok(tx)
    }
}

/// The types of `params`, and their values.
fn split<'a>(params: &[Param<'a>]) -> (Vec<Type>, Vec<&'a (dyn ToSql + Sync)>) {
    params
        .iter()
        .map(|(value, ty)| (ty.clone(), *value))
        .unzip()
}
