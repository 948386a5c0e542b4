//! The statements, with the schema's names filled in: the one place where
//! the PostgreSQL backend keeps its rules in SQL.

use super::super::{Condition, DeleteReason};
use super::PostgresConfig;

/// Revisions above the watermark that a read or the poller looks at, at most.
pub(super) const LOOK_AHEAD: i64 = 10_000;

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
    /// The change log's tables (see `watch.rs`).
    pub(super) revisions: String,
    pub(super) watermark: String,
    /// The changes after $1, at most $2 revisions, up to the watermark.
    pub(super) changes: String,
    pub(super) watermark_row: String,
    /// Revisions after $1 up to $2 (at most $4), and whether each was
    /// written more than $3 µs ago.
    pub(super) trim_candidates: String,
    /// Deletes the history after $1 up to $2.
    pub(super) trim: String,
    /// The watermark, and the revisions that exist above it.
    pub(super) above_watermark: String,
    pub(super) advance: String,
    pub(super) fill: String,
}

impl Sql {
    pub(super) fn new(config: &PostgresConfig) -> Self {
        let mut sql = Self::statements(config);
        sql.get_many = sql.at_revision(
            &format!(
                "SELECT key, value, version, revision, created_at_us, updated_at_us \
                 FROM {kv} WHERE key = ANY($1)",
                kv = sql.kv
            ),
            "",
        );
        sql
    }

    fn statements(config: &PostgresConfig) -> Self {
        let schema = ident(&config.schema);
        let kv = format!("{schema}.kv");
        let revisions = format!("{schema}.kv_revisions");
        let changes = format!("{schema}.kv_changes");
        let watermark = format!("{schema}.kv_watermark");
        // The only reason this backend deletes for, so far.
        let deleted = DeleteReason::Deleted.code();
        let seq = literal(&format!("{schema}.kv_revision"));
        let channel = literal(&config.channel());
        let feed_channel = literal(&config.feed_channel());
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
        // $1 key, $2 value, $3 condition kind, $4 expected version. The
        // revision is taken once, after the row lock, in a materialized CTE:
        // a `nextval` in the UPDATE's SET would be evaluated again when the
        // row turns out to have changed since the snapshot, leaving the first
        // value unused (a hole that watchers wait for until it is filled).
        let put = format!(
            "WITH cur AS MATERIALIZED (
                SELECT version FROM {kv} WHERE key = $1 FOR UPDATE
            ), now AS MATERIALIZED (SELECT {NOW_US} AS us),
            rev AS MATERIALIZED (
                SELECT nextval({seq}) AS r FROM now
                WHERE CASE WHEN EXISTS (SELECT 1 FROM cur)
                    THEN $3 = 0 OR $3 = 3 OR ($3 = 1 AND (SELECT version FROM cur) = $4)
                    ELSE $3 = 0 OR $3 = 2 END
            ), upd AS (
                UPDATE {kv} SET value = $2, version = {kv}.version + 1,
                    revision = (SELECT r FROM rev),
                    updated_at_us = greatest({kv}.updated_at_us, (SELECT us FROM now))
                WHERE key = $1 AND EXISTS (SELECT 1 FROM cur) AND EXISTS (SELECT 1 FROM rev)
                RETURNING version, revision, created_at_us, updated_at_us
            ), ins AS (
                INSERT INTO {kv} (key, value, version, revision, created_at_us, updated_at_us)
                SELECT $1, $2, 1, r, us, us FROM now, rev WHERE NOT EXISTS (SELECT 1 FROM cur)
                ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value,
                    version = {kv}.version + 1, revision = nextval({seq}),
                    updated_at_us = greatest({kv}.updated_at_us, EXCLUDED.updated_at_us)
                WHERE $3 = 0
                RETURNING version, revision, created_at_us, updated_at_us
            ), done AS (
                SELECT true AS applied, version, revision, created_at_us, updated_at_us FROM upd
                UNION ALL
                SELECT true, version, revision, created_at_us, updated_at_us FROM ins
            ), marked AS (
                INSERT INTO {revisions} (revision, written_at_us, gap)
                SELECT revision, us, false FROM done, now
                UNION ALL
                -- The revision taken for an insert that met a concurrent
                -- one is not used: it is settled as a gap at once, rather
                -- than left as a hole for the poller to fill.
                SELECT r, us, true FROM rev, now
                WHERE NOT EXISTS (SELECT 1 FROM done WHERE done.revision = rev.r)
            ), logged AS (
                INSERT INTO {changes} (revision, key, value, version, created_at_us, updated_at_us)
                SELECT revision, $1, $2, version, created_at_us, updated_at_us FROM done
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
            ), rev AS MATERIALIZED (
                SELECT nextval({seq}) AS r, {NOW_US} AS us FROM ok WHERE ok
            ), del AS (
                DELETE FROM {kv} WHERE key = $1 AND EXISTS (SELECT 1 FROM rev) RETURNING version
            ), marked AS (
                INSERT INTO {revisions} (revision, written_at_us) SELECT r, us FROM rev
            ), logged AS (
                INSERT INTO {changes} (revision, key, version, reason)
                SELECT rev.r, $1, del.version, {deleted} FROM rev, del
            )
            SELECT ok, current, revision, deleted {delete_notify} FROM (
                SELECT (SELECT ok FROM ok) AS ok, (SELECT version FROM cur) AS current,
                       (SELECT r FROM rev) AS revision, (SELECT count(*) FROM del) > 0 AS deleted
            ) result"
        );
        // A batch: lock what exists in key order, then write everything.
        let lock =
            format!("SELECT key, version FROM {kv} WHERE key = ANY($1) ORDER BY key FOR UPDATE");
        // $1 keys to delete (all locked), $2 keys to put, $3 their values.
        let apply = format!(
            "WITH rev AS MATERIALIZED (SELECT nextval({seq}) AS r, {NOW_US} AS us),
            del AS (DELETE FROM {kv} WHERE key = ANY($1) RETURNING key, version),
            ins AS (
                INSERT INTO {kv} (key, value, version, revision, created_at_us, updated_at_us)
                SELECT t.k, t.v, 1, rev.r, rev.us, rev.us
                FROM unnest($2::bytea[], $3::bytea[]) AS t(k, v), rev ORDER BY t.k
                ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value,
                    version = {kv}.version + 1, revision = EXCLUDED.revision,
                    updated_at_us = greatest({kv}.updated_at_us, EXCLUDED.updated_at_us)
                RETURNING key, value, version, created_at_us, updated_at_us
            ), marked AS (
                INSERT INTO {revisions} (revision, written_at_us) SELECT r, us FROM rev
            ), logged AS (
                INSERT INTO {changes}
                    (revision, key, value, version, created_at_us, updated_at_us, reason)
                SELECT rev.r, del.key, NULL, del.version, NULL, NULL, {deleted} FROM del, rev
                UNION ALL
                SELECT rev.r, ins.key, ins.value, ins.version, ins.created_at_us,
                       ins.updated_at_us, NULL FROM ins, rev
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

            get_many: String::new(),
            put,
            delete,
            lock,
            apply,
            notify: config
                .notify
                .then(|| format!("SELECT pg_notify({channel}, $1)")),
            kv,
            changes: format!(
                "WITH w AS MATERIALIZED (SELECT settled, trimmed FROM {watermark} LIMIT 1),
                revs AS MATERIALIZED (
                    SELECT revision FROM {revisions}
                    WHERE revision > $1 AND revision <= (SELECT settled FROM w)
                    ORDER BY revision LIMIT $2
                )
                SELECT w.settled, w.trimmed, revs.revision, c.key, c.value, c.version,
                       c.created_at_us, c.updated_at_us, c.reason
                FROM w LEFT JOIN (revs LEFT JOIN {changes} c ON c.revision = revs.revision) ON true
                ORDER BY revs.revision, c.key"
            ),
            above_watermark: format!(
                "SELECT w.settled, w.trimmed, r.revision FROM (SELECT * FROM {watermark} LIMIT 1) w
                 LEFT JOIN LATERAL (
                     SELECT revision FROM {revisions} WHERE revision > w.settled
                     ORDER BY revision LIMIT $1
                 ) r ON true ORDER BY r.revision"
            ),
            // Other servers' pollers listen on the feed channel: an advance
            // wakes them at once instead of at their next poll. One
            // notification per advance, not per write, so that NOTIFY's
            // commit-time lock stays off the write path.
            advance: format!(
                "WITH moved AS (UPDATE {watermark} SET settled = $1 WHERE settled < $1 RETURNING 1)
                 SELECT pg_notify({feed_channel}, '') FROM moved"
            ),
            // A revision taken by a write that has not logged it yet is
            // settled as a gap: the write then fails on the primary key and
            // is tried again under a new revision.
            fill: format!(
                "INSERT INTO {revisions} (revision, written_at_us, gap)
                 SELECT r, {NOW_US}, true FROM unnest($1::int8[]) r
                 ON CONFLICT (revision) DO NOTHING"
            ),
            watermark_row: format!("SELECT settled, trimmed FROM {watermark}"),
            trim_candidates: format!(
                "SELECT revision, written_at_us < {NOW_US} - $3 FROM {revisions}
                 WHERE revision > $1 AND revision <= $2 ORDER BY revision LIMIT $4"
            ),
            trim: format!(
                "WITH logged AS (
                    DELETE FROM {changes} WHERE revision > $1 AND revision <= $2
                ), marked AS (
                    DELETE FROM {revisions} WHERE revision > $1 AND revision <= $2
                )
                UPDATE {watermark} SET trimmed = $2 WHERE trimmed = $1"
            ),
            revisions,
            watermark,
        }
    }

    /// `rows` (a query whose column 0 is the key, and that has a `revision`
    /// column) with two numbers from the same snapshot, as its last two
    /// columns: the highest revision of the rows (or the watermark), and the
    /// revision up to which every revision has settled in the snapshot (the
    /// watermark, then the run of logged revisions above it, looked at up to
    /// `LOOK_AHEAD` of them), so that every write up to it is visible to the
    /// read. An empty read gives one row with a null key.
    pub(super) fn at_revision(&self, rows: &str, order: &str) -> String {
        // Scalar subqueries, so that the planner counts one row of numbers
        // (the watermark table has no statistics until analyzed).
        format!(
            "WITH page AS MATERIALIZED ({rows}),
            w AS MATERIALIZED (
                SELECT settled,
                       least(coalesce((SELECT max(revision) FROM {revisions}), 0),
                             settled + {LOOK_AHEAD}) AS head
                FROM (SELECT (SELECT settled FROM {watermark}) AS settled) w
            ),
            top AS MATERIALIZED (
                SELECT greatest(settled, coalesce((SELECT max(revision) FROM page), 0)) AS page,
                       greatest(settled, coalesce((
                           SELECT min(g) - 1 FROM generate_series(settled + 1, head) g
                           WHERE NOT EXISTS (SELECT 1 FROM {revisions} WHERE revision = g)
                       ), head)) AS run
                FROM w
            )
            SELECT page.*, top.page, top.run FROM top LEFT JOIN page ON true {order}",
            watermark = self.watermark,
            revisions = self.revisions,
        )
    }
}
