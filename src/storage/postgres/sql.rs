//! The statements, with the schema's names filled in: the one place where
//! the PostgreSQL backend keeps its rules in SQL.

use super::super::Condition;
use super::PostgresConfig;

/// The database clock in microseconds since the Unix epoch: one clock for
/// every server.
pub(super) const NOW_US: &str = "(extract(epoch from clock_timestamp()) * 1000000)::int8";

/// A quoted SQL identifier.
pub(super) fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A quoted SQL string literal.
pub(super) fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Condition kinds as the statements take them.
pub(super) fn condition_params(condition: Condition) -> (i32, i64) {
    match condition {
        Condition::Any => (0, 0),
        Condition::Version(v) => (1, i64::try_from(v).unwrap_or(i64::MAX)),
        Condition::Absent => (2, 0),
        Condition::Exists => (3, 0),
    }
}

/// The statements, with the schema's names filled in.
pub(super) struct Sql {
    pub(super) get: String,
    pub(super) get_many: String,
    pub(super) put: String,
    pub(super) delete: String,
    pub(super) lock: String,
    pub(super) apply: String,
    pub(super) notify: Option<String>,
    pub(super) kv: String,
}

impl Sql {
    pub(super) fn new(config: &PostgresConfig) -> Self {
        let schema = ident(&config.schema);
        let kv = format!("{schema}.kv");
        let seq = literal(&format!("{schema}.kv_revision"));
        let channel = literal(&config.channel());
        // The put's notification: `revision:written_at_us:hex(key)`.
        let put_notify = if config.notify {
            format!(
                ", CASE WHEN applied THEN pg_notify({channel}, revision::text || ':' || \
                 updated_at_us::text || ':' || encode($1, 'hex')) END"
            )
        } else {
            String::new()
        };
        let delete_notify = if config.notify {
            format!(
                ", CASE WHEN ok THEN pg_notify({channel}, revision::text || ':' || \
                 {NOW_US}::text || ':' || encode($1, 'hex')) END"
            )
        } else {
            String::new()
        };
        // $1 key, $2 value, $3 condition kind, $4 expected version.
        let put = format!(
            "WITH cur AS MATERIALIZED (
                SELECT version FROM {kv} WHERE key = $1 FOR UPDATE
            ), now AS MATERIALIZED (SELECT {NOW_US} AS us),
            upd AS (
                UPDATE {kv} SET value = $2, version = {kv}.version + 1,
                    revision = nextval({seq}),
                    updated_at_us = greatest({kv}.updated_at_us, (SELECT us FROM now))
                WHERE key = $1 AND EXISTS (SELECT 1 FROM cur)
                  AND ($3 = 0 OR $3 = 3 OR ($3 = 1 AND (SELECT version FROM cur) = $4))
                RETURNING version, revision, created_at_us, updated_at_us
            ), ins AS (
                INSERT INTO {kv} (key, value, version, revision, created_at_us, updated_at_us)
                SELECT $1, $2, 1, nextval({seq}), us, us FROM now
                WHERE NOT EXISTS (SELECT 1 FROM cur) AND ($3 = 0 OR $3 = 2)
                ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value,
                    version = {kv}.version + 1, revision = nextval({seq}),
                    updated_at_us = greatest({kv}.updated_at_us, EXCLUDED.updated_at_us)
                WHERE $3 = 0
                RETURNING version, revision, created_at_us, updated_at_us
            ), done AS (
                SELECT true AS applied, version, revision, created_at_us, updated_at_us FROM upd
                UNION ALL
                SELECT true, version, revision, created_at_us, updated_at_us FROM ins
            )
            SELECT * {put_notify} FROM (
                SELECT applied, version, revision, created_at_us, updated_at_us FROM done
                UNION ALL
                SELECT false, (SELECT version FROM cur), NULL::int8, NULL::int8, NULL::int8
                WHERE NOT EXISTS (SELECT 1 FROM done)
            ) result"
        );
        // $1 key, $2 condition kind, $3 expected version. The revision is
        // taken only when the delete goes ahead, after the row is locked.
        let delete = format!(
            "WITH cur AS MATERIALIZED (
                SELECT version FROM {kv} WHERE key = $1 FOR UPDATE
            ), ok AS MATERIALIZED (
                SELECT CASE $2
                    WHEN 0 THEN true
                    WHEN 1 THEN coalesce((SELECT version FROM cur) = $3, false)
                    WHEN 2 THEN NOT EXISTS (SELECT 1 FROM cur)
                    ELSE EXISTS (SELECT 1 FROM cur) END AS ok
            ), del AS (
                DELETE FROM {kv} WHERE key = $1 AND (SELECT ok FROM ok) RETURNING version
            )
            SELECT ok, current, revision, deleted {delete_notify} FROM (
                SELECT ok, current, CASE WHEN ok THEN nextval({seq}) END AS revision,
                       (SELECT count(*) FROM del) > 0 AS deleted
                FROM (SELECT (SELECT ok FROM ok) AS ok,
                             (SELECT version FROM cur) AS current OFFSET 0) locked
            ) result"
        );
        // A batch: lock what exists in key order, then write everything.
        let lock =
            format!("SELECT key, version FROM {kv} WHERE key = ANY($1) ORDER BY key FOR UPDATE");
        // $1 keys to delete (all locked), $2 keys to put, $3 their values.
        let apply = format!(
            "WITH rev AS MATERIALIZED (SELECT nextval({seq}) AS r, {NOW_US} AS us),
            del AS (DELETE FROM {kv} WHERE key = ANY($1) RETURNING key),
            ins AS (
                INSERT INTO {kv} (key, value, version, revision, created_at_us, updated_at_us)
                SELECT t.k, t.v, 1, rev.r, rev.us, rev.us
                FROM unnest($2::bytea[], $3::bytea[]) AS t(k, v), rev ORDER BY t.k
                ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value,
                    version = {kv}.version + 1, revision = EXCLUDED.revision,
                    updated_at_us = greatest({kv}.updated_at_us, EXCLUDED.updated_at_us)
                RETURNING key, version, created_at_us, updated_at_us
            )
            SELECT (SELECT r FROM rev), (SELECT us FROM rev), (SELECT count(*) FROM del),
                   key, version, created_at_us, updated_at_us
            FROM (SELECT 1) one LEFT JOIN ins ON true"
        );
        Sql {
            get: format!(
                "SELECT value, version, revision, created_at_us, updated_at_us \
                 FROM {kv} WHERE key = $1"
            ),
            get_many: format!(
                "SELECT key, value, version, revision, created_at_us, updated_at_us \
                 FROM {kv} WHERE key = ANY($1)"
            ),
            put,
            delete,
            lock,
            apply,
            notify: config
                .notify
                .then(|| format!("SELECT pg_notify({channel}, $1)")),
            kv,
        }
    }
}
