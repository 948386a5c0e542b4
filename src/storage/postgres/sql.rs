//! The statements, with the schema's names filled in. The single `put` and
//! `delete` restate the write rules in SQL; which parts restate which rule
//! is listed in one place, the module docs of [`crate::storage::rules`].

use super::super::{Condition, DeleteReason, Expiry, LeaseId, MAX_TTL_MS, capped_ttl_us};
use super::PostgresConfig;

/// Revisions above the watermark that a read or the poller looks at, at most.
pub(super) const LOOK_AHEAD: i64 = 10_000;

/// The database clock in microseconds since the Unix epoch: one clock for
/// every server.
pub(super) const NOW_US: &str = "(extract(epoch from clock_timestamp()) * 1000000)::int8";

/// The database clock when the statement began: one instant for every row a
/// read looks at, so a page judges all its keys' deadlines at once.
const STATEMENT_NOW_US: &str = "(extract(epoch from statement_timestamp()) * 1000000)::int8";

/// What a write found at a key, as the statements report it (`state`).
const ABSENT: i32 = 0;
/// Its own deadline passed, and the row is not deleted yet.
pub(super) const EXPIRED: i32 = 1;
/// Its lease ended (expired, or gone), and the row is not deleted yet.
pub(super) const LEASE_ENDED: i32 = 2;
const LIVE: i32 = 3;

/// What a single put does to the key's deadline, as the `put` statement
/// takes it (with an argument).
const EXPIRY_NEVER: i32 = 0;
/// The argument is the ttl in µs, counted from the write.
const EXPIRY_TTL: i32 = 1;
/// The argument is the deadline in µs.
const EXPIRY_AT: i32 = 2;
/// The argument is the lease.
const EXPIRY_LEASE: i32 = 3;
/// A single put's `Keep`: the locked row's deadline and lease.
const EXPIRY_KEEP: i32 = 4;

/// A ttl in ms as the leases table keeps it, capped as deadlines are.
pub(super) fn ttl_ms_param(ttl_ms: u64) -> i64 {
    i64::try_from(ttl_ms.min(MAX_TTL_MS)).unwrap_or(i64::MAX)
}

/// A lease id as an int8: its 64 bits, so every id fits.
pub(super) fn lease_param(id: LeaseId) -> i64 {
    i64::from_ne_bytes(id.to_ne_bytes())
}

/// A lease id read from an int8.
pub(super) fn lease_id(stored: i64) -> LeaseId {
    u64::from_ne_bytes(stored.to_ne_bytes())
}

/// A single put's expiry as the `put` statement takes it (kind, argument);
/// the statement resolves `Keep` from the locked row.
pub(super) fn expiry_params(expiry: Expiry) -> (i32, i64) {
    match expiry {
        Expiry::Never => (EXPIRY_NEVER, 0),
        Expiry::Ttl(ms) => (EXPIRY_TTL, capped_ttl_us(ms)),
        Expiry::At(deadline) => (EXPIRY_AT, deadline),
        Expiry::Keep => (EXPIRY_KEEP, 0),
        Expiry::Lease(id) => (EXPIRY_LEASE, lease_param(id)),
    }
}

/// A quoted SQL identifier.
pub(super) fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A quoted SQL string literal.
pub(super) fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Condition kinds as the put and delete functions take them.
const IF_ANY: i32 = 0;
const IF_VERSION: i32 = 1;
const IF_ABSENT: i32 = 2;
const IF_EXISTS: i32 = 3;

/// Condition kinds as the statements take them.
pub(super) fn condition_params(condition: Condition) -> (i32, i64) {
    match condition {
        Condition::Any => (IF_ANY, 0),
        Condition::Version(v) => (IF_VERSION, i64::try_from(v).unwrap_or(i64::MAX)),
        Condition::Absent => (IF_ABSENT, 0),
        Condition::Exists => (IF_EXISTS, 0),
    }
}

/// Whether a single write's condition (`p_condition`, `p_expected`) holds
/// for a key whose row is live (`live`, a SQL boolean) at `version`: the
/// rule of `storage/rules.rs`, restated for the put and delete functions.
fn condition_holds(live: &str, version: &str) -> String {
    format!(
        "CASE WHEN {live}
              THEN p_condition IN ({IF_ANY}, {IF_EXISTS})
                   OR (p_condition = {IF_VERSION} AND {version} = p_expected)
              ELSE p_condition IN ({IF_ANY}, {IF_ABSENT}) END"
    )
}

/// The put and delete functions' first step: the key's row into `cur`
/// (version, deadline, lease and [`row_state`]), locked, with its lease.
fn lock_row(kv: &str, leases: &str) -> String {
    let state = row_state("us");
    format!(
        "SELECT e.version, e.expires_at_us, e.lease, {state} AS state INTO cur
         FROM {kv} e LEFT JOIN {leases} l ON l.id = e.lease
         WHERE e.key = p_key FOR UPDATE OF e;"
    )
}

/// The statements, with the schema's names filled in.
pub(super) struct Sql {
    pub(super) get: String,
    pub(super) get_many: String,
    pub(super) put: String,
    pub(super) delete: String,
    pub(super) lock: String,
    /// Locks the live leases among $1 against their end, for a batch that
    /// attaches keys to them.
    pub(super) hold_leases: String,
    pub(super) apply: String,
    pub(super) notify: Option<String>,
    pub(super) kv: String,
    pub(super) leases: String,
    /// Deletes up to $1 keys whose deadline passed, each under a revision of
    /// its own.
    pub(super) expire_due: String,
    /// The same for the keys $1 (those a write found expired).
    pub(super) expire_keys: String,
    /// Up to $1 leases whose deadline passed.
    pub(super) due_leases: String,
    /// Locks the keys attached to lease $1, live or not.
    pub(super) attached_keys: String,
    /// Deletes lease $1 if it is live ($2 true: a revocation) or if it has
    /// expired ($2 false).
    pub(super) end_lease: String,
    /// Locks the keys of lease $1 once it is no longer live.
    pub(super) lease_keys: String,
    /// Deletes the locked keys $1 under one revision, for reason $2.
    pub(super) drop_keys: String,
    pub(super) grant_lease: String,
    pub(super) keep_lease_alive: String,
    pub(super) lease: String,
    pub(super) count_lease_keys: String,
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
    /// Advances the watermark over the run of revisions above it that have
    /// their rows (looking at up to $1 of them), and gives where it ended
    /// and the revisions that exist above that.
    pub(super) settle: String,
    pub(super) fill: String,
}

/// The columns of an entry read from `{kv} e LEFT JOIN {leases} l`:
/// value, version, revision, created_at_us, updated_at_us, the effective
/// deadline, and the lease.
pub(super) const ENTRY_COLUMNS: &str = "e.value, e.version, e.revision, e.created_at_us, \
     e.updated_at_us, coalesce(e.expires_at_us, l.expires_at_us) AS expires_at_us, e.lease";

/// Whether the row `e` (joined with its lease `l`) is live at `now`: an
/// expired key is absent for every read, deleted yet or not.
fn live(now: &str) -> String {
    format!(
        "(e.expires_at_us IS NULL OR e.expires_at_us > {now}) \
         AND (e.lease IS NULL OR l.expires_at_us > {now})"
    )
}

/// What a write finds in the row `e` (joined with its lease `l`) at `now`:
/// `EXPIRED`, `LEASE_ENDED` or `LIVE`.
fn row_state(now: &str) -> String {
    format!(
        "CASE WHEN e.expires_at_us <= {now} THEN {EXPIRED}
              WHEN e.lease IS NOT NULL AND coalesce(l.expires_at_us <= {now}, true)
                  THEN {LEASE_ENDED}
              ELSE {LIVE} END"
    )
}

/// The schema's objects that the writes name, qualified by the schema
/// (itself an identifier, quoted); the sequence as a literal, for `nextval`.
struct Tables {
    kv: String,
    leases: String,
    revisions: String,
    changes: String,
    seq: String,
}

impl Tables {
    fn of(schema: &str) -> Self {
        Tables {
            kv: format!("{schema}.kv"),
            leases: format!("{schema}.leases"),
            revisions: format!("{schema}.kv_revisions"),
            changes: format!("{schema}.kv_changes"),
            seq: literal(&format!("{schema}.kv_revision")),
        }
    }
}

/// The name of the schema's put function, versioned so that servers of two
/// releases never run each other's.
pub(super) const PUT_FUNCTION: &str = "kv_put_1";

/// Creates the schema's put function (schema version 4), which the `put`
/// statement calls. A function of small statements, not one statement of
/// many CTEs: PostgreSQL starts an executor for the whole plan of a
/// statement on every call (about 40 nodes for the put as one statement),
/// and that start-up, not the writing, was most of its CPU; pgbench ran the
/// statement at 4,000 to 5,200 calls/s at 16 clients and a function like
/// this one at 7,100.
///
/// The put: the clock, then the row, locked, with its lease, and what it
/// finds there (a row past its deadline or on a lapsed lease changes
/// nothing and says so: the caller deletes it as expired first, under a
/// revision of its own, and puts again); a lease the put attaches to,
/// locked FOR KEY SHARE (which keepalives do not wait for) so that it
/// cannot end before the put commits; the condition; the revision, taken
/// once after the row lock (a `nextval` in an UPDATE's SET would be
/// evaluated again when the row turns out to have changed since the
/// snapshot, leaving a hole that watchers wait for until it is filled); the
/// new version, `created_at` kept and `updated_at = greatest(previous,
/// now)`, the deadline (`Keep` from the locked row); the revision's row
/// (and a gap row for a revision taken by an insert that met a concurrent
/// one, rather than a hole for the poller to fill); the change-log row; and
/// the answer, with the effective deadline (the lease's for a key on one).
pub(super) fn put_function(schema: &str) -> String {
    let Tables {
        kv,
        leases,
        revisions,
        changes,
        seq,
    } = Tables::of(schema);
    let lock_row = lock_row(&kv, &leases);
    let holds = condition_holds(&format!("o_state = {LIVE}"), "cur.version");
    format!(
        "CREATE OR REPLACE FUNCTION {schema}.{PUT_FUNCTION}(
             p_key bytea, p_value bytea, p_condition int4, p_expected int8,
             p_expiry int4, p_argument int8,
             OUT o_applied bool, OUT o_version int8, OUT o_revision int8,
             OUT o_created_at_us int8, OUT o_updated_at_us int8, OUT o_expires_at_us int8,
             OUT o_lease int8, OUT o_state int4, OUT o_lease_found bool)
         LANGUAGE plpgsql AS $put$
         DECLARE
             us int8 := {NOW_US};
             cur record;
             found_row bool;
             ok bool;
             taken int8;
             own int8;
             attached int8;
         BEGIN
             {lock_row}
             found_row := FOUND;
             o_state := CASE WHEN found_row THEN cur.state ELSE {ABSENT} END;
             o_lease_found := true;
             IF p_expiry = {EXPIRY_LEASE} THEN
                 PERFORM 1 FROM {leases} WHERE id = p_argument AND expires_at_us > us FOR KEY SHARE;
                 o_lease_found := FOUND;
             END IF;
             ok := CASE
                 WHEN o_state IN ({EXPIRED}, {LEASE_ENDED}) THEN false
                 WHEN NOT o_lease_found THEN false
                 ELSE {holds} END;
             IF NOT ok THEN
                 o_applied := false;
                 IF found_row THEN
                     o_version := cur.version;
                     o_lease := cur.lease;
                 END IF;
                 RETURN;
             END IF;
             taken := nextval({seq});
             own := CASE p_expiry WHEN {EXPIRY_TTL} THEN us + p_argument
                                  WHEN {EXPIRY_AT} THEN p_argument
                                  WHEN {EXPIRY_KEEP} THEN cur.expires_at_us END;
             attached := CASE p_expiry WHEN {EXPIRY_LEASE} THEN p_argument
                                       WHEN {EXPIRY_KEEP} THEN cur.lease END;
             IF found_row THEN
                 UPDATE {kv} e SET value = p_value, version = e.version + 1, revision = taken,
                     updated_at_us = greatest(e.updated_at_us, us),
                     expires_at_us = own, lease = attached
                 WHERE e.key = p_key
                 RETURNING e.version, e.revision, e.created_at_us, e.updated_at_us,
                           e.expires_at_us, e.lease
                 INTO o_version, o_revision, o_created_at_us, o_updated_at_us,
                      o_expires_at_us, o_lease;
             ELSE
                 INSERT INTO {kv} AS e
                     (key, value, version, revision, created_at_us, updated_at_us,
                      expires_at_us, lease)
                 VALUES (p_key, p_value, 1, taken, us, us, own, attached)
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value,
                     version = e.version + 1, revision = nextval({seq}),
                     updated_at_us = greatest(e.updated_at_us, EXCLUDED.updated_at_us),
                     expires_at_us = CASE WHEN p_expiry = {EXPIRY_KEEP} THEN e.expires_at_us
                                          ELSE EXCLUDED.expires_at_us END,
                     lease = CASE WHEN p_expiry = {EXPIRY_KEEP} THEN e.lease
                                  ELSE EXCLUDED.lease END
                 WHERE p_condition = {IF_ANY}
                 RETURNING e.version, e.revision, e.created_at_us, e.updated_at_us,
                           e.expires_at_us, e.lease
                 INTO o_version, o_revision, o_created_at_us, o_updated_at_us,
                      o_expires_at_us, o_lease;
             END IF;
             o_applied := FOUND;
             IF o_revision IS DISTINCT FROM taken THEN
                 INSERT INTO {revisions} (revision, written_at_us, gap) VALUES (taken, us, true);
             END IF;
             IF NOT o_applied THEN
                 RETURN;
             END IF;
             INSERT INTO {revisions} (revision, written_at_us, gap) VALUES (o_revision, us, false);
             IF o_expires_at_us IS NULL AND o_lease IS NOT NULL THEN
                 SELECT l.expires_at_us INTO o_expires_at_us FROM {leases} l WHERE l.id = o_lease;
             END IF;
             INSERT INTO {changes} (revision, key, value, version, created_at_us, updated_at_us,
                                    expires_at_us, lease)
             VALUES (o_revision, p_key, p_value, o_version, o_created_at_us, o_updated_at_us,
                     o_expires_at_us, o_lease);
         END
         $put$"
    )
}

/// The name of the schema's delete function, versioned as the put's is.
pub(super) const DELETE_FUNCTION: &str = "kv_delete_1";

/// Creates the schema's delete function (schema version 5), which the
/// `delete` statement calls, for the reason the put is a function: the row,
/// locked, with its lease, and what it finds there (a row past its deadline
/// or on a lapsed lease changes nothing and says so, as for the put); the
/// condition; and only when the delete goes ahead, the revision (so that a
/// failed condition takes none), its row, the delete, and the change-log
/// row of what was deleted. An unconditional delete of an absent key takes
/// a revision and logs no change, as on the embedded engine.
pub(super) fn delete_function(schema: &str) -> String {
    let Tables {
        kv,
        leases,
        revisions,
        changes,
        seq,
    } = Tables::of(schema);
    let lock_row = lock_row(&kv, &leases);
    let holds = condition_holds(&format!("o_state = {LIVE}"), "o_current");
    let deleted = DeleteReason::Deleted.code();
    format!(
        "CREATE OR REPLACE FUNCTION {schema}.{DELETE_FUNCTION}(
             p_key bytea, p_condition int4, p_expected int8,
             OUT o_ok bool, OUT o_current int8, OUT o_revision int8, OUT o_deleted bool,
             OUT o_state int4, OUT o_lease int8)
         LANGUAGE plpgsql AS $delete$
         DECLARE
             us int8 := {NOW_US};
             cur record;
             gone int8;
         BEGIN
             {lock_row}
             o_state := {ABSENT};
             IF FOUND THEN
                 o_state := cur.state;
                 o_current := cur.version;
                 o_lease := cur.lease;
             END IF;
             o_ok := CASE
                 WHEN o_state IN ({EXPIRED}, {LEASE_ENDED}) THEN false
                 ELSE {holds} END;
             o_deleted := false;
             IF NOT o_ok THEN
                 RETURN;
             END IF;
             o_revision := nextval({seq});
             INSERT INTO {revisions} (revision, written_at_us) VALUES (o_revision, us);
             DELETE FROM {kv} WHERE key = p_key RETURNING version INTO gone;
             o_deleted := FOUND;
             IF o_deleted THEN
                 INSERT INTO {changes} (revision, key, version, reason)
                 VALUES (o_revision, p_key, gone, {deleted});
             END IF;
         END
         $delete$"
    )
}

impl Sql {
    pub(super) fn new(config: &PostgresConfig) -> Self {
        let mut sql = Self::statements(config);
        sql.get = format!(
            "SELECT {ENTRY_COLUMNS} FROM {live} AND e.key = $1",
            live = sql.live_entries()
        );
        sql.get_many = sql.at_revision(
            &format!(
                "SELECT e.key, {ENTRY_COLUMNS} FROM {live} AND e.key = ANY($1)",
                live = sql.live_entries()
            ),
            "",
        );
        sql
    }

    /// The live entries, as `e` (with their leases as `l`), to select
    /// [`ENTRY_COLUMNS`] from; more conditions follow with `AND`.
    pub(super) fn live_entries(&self) -> String {
        format!(
            "{kv} e LEFT JOIN {leases} l ON l.id = e.lease WHERE {live}",
            kv = self.kv,
            leases = self.leases,
            live = live(STATEMENT_NOW_US),
        )
    }

    fn statements(config: &PostgresConfig) -> Self {
        let schema = ident(&config.schema);
        let Tables {
            kv,
            leases,
            revisions,
            changes,
            seq,
        } = Tables::of(&schema);
        let watermark = format!("{schema}.kv_watermark");
        let deleted = DeleteReason::Deleted.code();
        let expired = DeleteReason::Expired.code();
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
        let expire_notify = if config.notify {
            format!(
                ", pg_notify({channel}, r::text || ':' || us::text || ':' || encode(key, 'hex'))"
            )
        } else {
            String::new()
        };
        // $1 key, $2 value, $3 condition kind, $4 expected version, $5
        // expiry kind, $6 its argument: a call of the schema's put function
        // (see `put_function`).
        let put = format!(
            "SELECT * {put_notify} FROM (
                SELECT o_applied AS applied, o_version AS version, o_revision AS revision,
                       o_created_at_us AS created_at_us, o_updated_at_us AS updated_at_us,
                       o_expires_at_us AS expires_at_us, o_lease AS lease, o_state AS state,
                       o_lease_found AS lease_found
                FROM {schema}.{PUT_FUNCTION}($1, $2, $3, $4, $5, $6)
            ) result"
        );
        // $1 key, $2 condition kind, $3 expected version: a call of the
        // schema's delete function (see `delete_function`).
        let delete = format!(
            "SELECT * {delete_notify} FROM (
                SELECT o_ok AS ok, o_current AS current, o_revision AS revision,
                       o_deleted AS deleted, o_state AS state, o_lease AS lease
                FROM {schema}.{DELETE_FUNCTION}($1, $2, $3)
            ) result"
        );
        // A batch: lock what exists in key order, then write everything. The
        // clock is read once each row is locked, so that the latest reading
        // (which the rules stamp the batch with) is after every lock; a
        // batch whose keys are all absent gives one row with a null key.
        let lock = format!(
            "WITH locked AS MATERIALIZED (
                SELECT e.key, e.version, e.expires_at_us, e.lease, {state} AS state,
                       e.created_at_us, e.updated_at_us
                FROM {kv} e LEFT JOIN {leases} l ON l.id = e.lease
                WHERE e.key = ANY($1) ORDER BY e.key FOR UPDATE OF e
            )
            SELECT {NOW_US}, locked.* FROM (SELECT 1) one LEFT JOIN locked ON true",
            state = row_state(NOW_US),
        );
        // $1 keys to delete (all locked), $2 keys to put, $3 their values,
        // then what the rules decided for each put: $4 its version, $5 its
        // created_at_us, $6 its updated_at_us, $7 its own deadline, $8 its
        // lease. A row to update must still hold the version the rules
        // decided from; a key that a concurrent write created after the
        // locks were taken is left alone (no row comes back for it), and the
        // batch is made again.
        let apply = format!(
            "WITH rev AS MATERIALIZED (SELECT nextval({seq}) AS r, {NOW_US} AS us),
            del AS (DELETE FROM {kv} WHERE key = ANY($1) RETURNING key, version),
            ins AS (
                INSERT INTO {kv}
                    (key, value, version, revision, created_at_us, updated_at_us, expires_at_us, lease)
                SELECT t.k, t.v, t.version, rev.r, t.created, t.updated, t.expires, t.lease
                FROM unnest($2::bytea[], $3::bytea[], $4::int8[], $5::int8[], $6::int8[],
                            $7::int8[], $8::int8[])
                         AS t(k, v, version, created, updated, expires, lease),
                     rev
                ORDER BY t.k
                ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value,
                    version = EXCLUDED.version, revision = EXCLUDED.revision,
                    created_at_us = EXCLUDED.created_at_us,
                    updated_at_us = EXCLUDED.updated_at_us,
                    expires_at_us = EXCLUDED.expires_at_us, lease = EXCLUDED.lease
                WHERE {kv}.version = EXCLUDED.version - 1
                RETURNING key, value, version, created_at_us, updated_at_us, expires_at_us, lease
            ), written AS (
                SELECT key, value, version, created_at_us, updated_at_us, lease,
                       coalesce(ins.expires_at_us,
                                (SELECT l.expires_at_us FROM {leases} l WHERE l.id = ins.lease))
                           AS effective
                FROM ins
            ), marked AS (
                INSERT INTO {revisions} (revision, written_at_us) SELECT r, us FROM rev
            ), logged AS (
                INSERT INTO {changes} (revision, key, value, version, created_at_us, updated_at_us,
                                       reason, expires_at_us, lease)
                SELECT rev.r, del.key, NULL, del.version, NULL, NULL, {deleted}, NULL, NULL
                FROM del, rev
                UNION ALL
                SELECT rev.r, w.key, w.value, w.version, w.created_at_us, w.updated_at_us, NULL,
                       w.effective, w.lease FROM written w, rev
            )
            SELECT (SELECT r FROM rev), (SELECT us FROM rev), (SELECT count(*) FROM del),
                   key, version, created_at_us, updated_at_us, effective, lease
            FROM (SELECT 1) one LEFT JOIN written ON true"
        );
        // Expiry deletes: each key under a revision of its own (taken in
        // deadline order, once the row is locked), and only the version that
        // carried the deadline: a row rewritten before its deadline no longer
        // matches when the lock is taken, and a row another server is
        // deleting is skipped rather than waited for.
        let expire = |which: &str, limit: &str| {
            format!(
                "WITH now AS MATERIALIZED (SELECT {NOW_US} AS us),
                due AS MATERIALIZED (
                    SELECT key, version FROM {kv}
                    WHERE {which} AND expires_at_us <= (SELECT us FROM now)
                    ORDER BY expires_at_us LIMIT {limit} FOR UPDATE SKIP LOCKED
                ), rev AS MATERIALIZED (
                    SELECT key, version, nextval({seq}) AS r FROM due
                ), del AS (
                    DELETE FROM {kv} e USING rev WHERE e.key = rev.key AND e.version = rev.version
                ), marked AS (
                    INSERT INTO {revisions} (revision, written_at_us) SELECT r, us FROM rev, now
                ), logged AS (
                    INSERT INTO {changes} (revision, key, version, reason)
                    SELECT r, key, version, {expired} FROM rev
                )
                SELECT r {expire_notify} FROM rev, now"
            )
        };
        Sql {
            get: String::new(),
            get_many: String::new(),
            put,
            delete,
            lock,
            hold_leases: format!(
                "SELECT id FROM {leases} WHERE id = ANY($1) AND expires_at_us > {NOW_US}
                 ORDER BY id FOR KEY SHARE"
            ),
            apply,
            notify: config
                .notify
                .then(|| format!("SELECT pg_notify({channel}, $1)")),
            expire_due: expire("true", "$1"),
            expire_keys: expire("key = ANY($1)", "ALL"),
            due_leases: format!(
                "SELECT id FROM {leases} WHERE expires_at_us <= {NOW_US}
                 ORDER BY expires_at_us LIMIT $1"
            ),
            attached_keys: format!("SELECT key FROM {kv} WHERE lease = $1 ORDER BY key FOR UPDATE"),
            end_lease: format!(
                "DELETE FROM {leases} WHERE id = $1 AND (expires_at_us > {NOW_US}) = $2 RETURNING id"
            ),
            lease_keys: format!(
                "SELECT key FROM {kv} WHERE lease = $1 AND NOT EXISTS (
                     SELECT 1 FROM {leases} WHERE id = $1 AND expires_at_us > {NOW_US}
                 ) ORDER BY key FOR UPDATE"
            ),
            drop_keys: format!(
                "WITH rev AS MATERIALIZED (SELECT nextval({seq}) AS r, {NOW_US} AS us),
                del AS (DELETE FROM {kv} WHERE key = ANY($1) RETURNING key, version),
                marked AS (
                    INSERT INTO {revisions} (revision, written_at_us) SELECT r, us FROM rev
                ), logged AS (
                    INSERT INTO {changes} (revision, key, version, reason)
                    SELECT r, key, version, $2 FROM del, rev
                )
                SELECT r, us FROM rev"
            ),
            // The id is drawn by the server (`new_lease_id`), as on the
            // embedded engine; a collision gives no row, and another draw.
            grant_lease: format!(
                "INSERT INTO {leases} (id, ttl_ms, expires_at_us, owner)
                 VALUES ($3::int8, $1::int8, {NOW_US} + $1::int8 * 1000, $2::text)
                 ON CONFLICT (id) DO NOTHING RETURNING id, expires_at_us"
            ),
            keep_lease_alive: format!(
                "UPDATE {leases} SET expires_at_us = {NOW_US} + ttl_ms * 1000
                 WHERE id = $1 AND expires_at_us > {NOW_US}
                 RETURNING ttl_ms, expires_at_us, owner"
            ),
            lease: format!(
                "SELECT ttl_ms, expires_at_us, owner FROM {leases}
                 WHERE id = $1 AND expires_at_us > {NOW_US}"
            ),
            count_lease_keys: format!(
                "SELECT count(*) FROM {kv} e JOIN {leases} l ON l.id = e.lease
                 WHERE e.lease = $1 AND l.expires_at_us > {NOW_US}"
            ),
            kv,
            leases,
            // The bounds on `c.revision` restate the join's: without them
            // the generic plan, which cannot see how few revisions `revs`
            // holds, hashes the whole change log, on every page the poller
            // publishes (28 ms at 135,000 changes, against 0.5 ms).
            changes: format!(
                "WITH w AS MATERIALIZED (SELECT settled, trimmed FROM {watermark} LIMIT 1),
                revs AS MATERIALIZED (
                    SELECT revision FROM {revisions}
                    WHERE revision > $1 AND revision <= (SELECT settled FROM w)
                    ORDER BY revision LIMIT $2
                )
                SELECT w.settled, w.trimmed, revs.revision, c.key, c.value, c.version,
                       c.created_at_us, c.updated_at_us, c.reason, c.expires_at_us, c.lease
                FROM w LEFT JOIN (
                    revs LEFT JOIN {changes} c ON c.revision = revs.revision
                        AND c.revision > $1 AND c.revision <= (SELECT max(revision) FROM revs)
                ) ON true
                ORDER BY revs.revision, c.key"
            ),
            // One round trip per poll: the run of logged revisions right
            // above the watermark (where a revision equals the watermark
            // plus its rank) is read and the watermark moved to its end in
            // one statement. Other servers' pollers listen on the feed
            // channel: an advance wakes them at once instead of at their
            // next poll. One notification per advance, not per write, so
            // that NOTIFY's commit-time lock stays off the write path. The
            // advance commits without waiting for its WAL flush
            // (`synchronous_commit` off for its transaction): it records
            // only what committed writes already made durable, so one lost
            // in a crash is made again by the next poll, and it adds no
            // flush for the writes to queue behind (at one writer, a poll
            // follows nearly every write). Another server's advance is
            // waited for and never undone (`settled < ..` is checked again
            // on the row it committed).
            settle: format!(
                "WITH w AS MATERIALIZED (SELECT settled FROM {watermark} LIMIT 1),
                revs AS MATERIALIZED (
                    SELECT revision FROM {revisions}
                    WHERE revision > (SELECT settled FROM w) ORDER BY revision LIMIT $1
                ),
                run AS MATERIALIZED (
                    SELECT coalesce(max(revision), (SELECT settled FROM w)) AS head
                    FROM (SELECT revision, row_number() OVER (ORDER BY revision) AS n FROM revs) r
                    WHERE revision = (SELECT settled FROM w) + n
                ),
                moved AS (
                    UPDATE {watermark} SET settled = (SELECT head FROM run)
                    WHERE settled < (SELECT head FROM run)
                    RETURNING pg_notify({feed_channel}, ''),
                              set_config('synchronous_commit', 'off', true)
                )
                SELECT (SELECT head FROM run), revs.revision
                FROM (SELECT 1) one
                LEFT JOIN revs ON revs.revision > (SELECT head FROM run)
                ORDER BY revs.revision"
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
