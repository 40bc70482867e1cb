//! The Postgres dialect of the run store: several orchestrators, possibly on
//! different machines, share one database. Lock expiry is computed and
//! compared with the database's `now()`, never with a client clock. Fenced
//! writes run in a transaction that first takes a `FOR SHARE` lock on the
//! label's lock row (see [`HOLDS`]); journal writes are group-committed by
//! the writer task of `group_commit.rs`, one such check for a whole batch
//! (see [`HOLD_ALL`]).

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use retrain_core::domain::{Fence, Label, LabelCursor, Lease, LockOwner, VersionTag};
use retrain_core::journal::{PromotionEvent, Transition};
use retrain_core::ports::StoreError;
use serde::de::DeserializeOwned;
use sqlx::postgres::{PgPool, PgRow};
use sqlx::types::Json;
use sqlx::{Postgres, Row};

use super::backend::{
    bind, fence_args, lease_args, Arg, Backend, Bind, Columns, LockSql, Query, StoreRow, Taken,
    UPSERT_LEASE,
};
use super::group_commit::{CommitBatch, GroupCommit};
use super::locks::acquire_in_rounds;
use super::{prepare_schema, u64_to_i64, RunRow, StoreOptions, POSTGRES_MIGRATIONS};
use crate::db::DbUrl;
use crate::AdapterError;

/// Connections per store: the engine writes one label at a time per task,
/// bounded by `max_parallel_labels`; more would only queue in Postgres.
const MAX_CONNECTIONS: u32 = 8;

/// The Postgres dialect.
pub(super) struct PostgresRunStore {
    pool: PgPool,
    url: DbUrl,
    /// Journal writes go through the group-commit writer task
    /// (`group_commit.rs`): every journal line takes the one `journal_head`
    /// row lock until its transaction commits, so concurrent writes would
    /// queue there one commit at a time; the writer task commits them
    /// together instead.
    journal: GroupCommit<JournalWrite>,
    /// Lock acquisitions go through a writer task of their own too, one
    /// statement per batch ([`ACQUIRE_ALL`]): a cycle takes a lock per
    /// label, and each was a statement and a commit of its own.
    acquisitions: GroupCommit<Acquisition, Option<Taken>>,
}

/// One queued lock acquisition: its values of [`ACQUIRE_ALL`].
struct Acquisition {
    label: String,
    owner: String,
    ttl_secs: f64,
}

/// Applies a batch of lock acquisitions in one statement per label asked
/// once ([`acquire_in_rounds`]).
struct PostgresLocks {
    pool: PgPool,
    url: DbUrl,
}

impl Bind for Postgres {
    fn bind(query: Query<'_, Self>, arg: Arg) -> Query<'_, Self> {
        match arg {
            Arg::Text(v) => query.bind(v),
            Arg::OptText(v) => query.bind(v),
            Arg::Int(v) => query.bind(v),
            Arg::OptInt(v) => query.bind(v),
            Arg::Float(v) => query.bind(v),
            Arg::Bool(v) => query.bind(v),
            Arg::Time(v) => query.bind(v),
            Arg::OptTime(v) => query.bind(v),
            Arg::Json(v) => query.bind(Json(v)),
        }
    }

    fn rows_affected(result: &sqlx::postgres::PgQueryResult) -> u64 {
        result.rows_affected()
    }
}

impl StoreRow for PgRow {
    fn time(&self, column: &str, what: &str) -> Result<DateTime<Utc>, StoreError> {
        self.try_get(column)
            .map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
    }

    fn opt_time(&self, column: &str, what: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        self.try_get(column)
            .map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
    }

    fn json<T: DeserializeOwned>(&self, column: &str) -> Result<T, String> {
        let Json(value) = self
            .try_get::<Json<serde_json::Value>, _>(column)
            .map_err(|e| e.to_string())?;
        serde_json::from_value(value).map_err(|e| e.to_string())
    }
}

/// Lock statements: `$1` label, then per statement (see [`LockSql`]); the
/// TTL in seconds comes last where an expiry is set. `now()` is the
/// database's clock. Concurrent upserts of one row serialise on it and
/// re-check the `WHERE` on its latest version, so exactly one caller takes a
/// free lock, and exactly one the lock of a dead holder.
const LOCKS: LockSql = LockSql {
    // [label, owner, dead owner, dead token, ttl]
    take: "UPDATE locks SET previous_owner = owner, owner = $2,
                            expires_at = now() + make_interval(secs => $5), token = token + 1
           WHERE label = $1 AND owner = $3 AND token = $4
           RETURNING token, previous_owner",
    // [label]
    row: "SELECT owner, token, expires_at, expires_at > now() AS live FROM locks WHERE label = $1",
    // [label, owner, token, ttl]
    renew: "UPDATE locks SET expires_at = now() + make_interval(secs => $4)
            WHERE label = $1 AND owner = $2 AND token = $3 AND expires_at > now()",
    // [[{label, owner, token}…], ttl]. The rows are locked in label order
    // first, as a group commit's fence check (`HOLD_ALL`) share-locks them:
    // two statements locking the same rows in different orders could
    // deadlock.
    renew_many: "WITH held AS MATERIALIZED (
                     SELECT locks.label FROM locks
                     JOIN jsonb_to_recordset($1) AS held(label TEXT, owner TEXT, token BIGINT)
                       ON locks.label = held.label AND locks.owner = held.owner
                      AND locks.token = held.token
                     WHERE locks.expires_at > now()
                     ORDER BY locks.label
                     FOR UPDATE OF locks)
                 UPDATE locks SET expires_at = now() + make_interval(secs => $2)
                 FROM held WHERE locks.label = held.label
                 RETURNING locks.label, locks.owner, locks.token",
    // [label, owner, token]
    release: "UPDATE locks SET owner = '', expires_at = 'epoch'
              WHERE label = $1 AND owner = $2 AND token = $3 AND expires_at > now()",
};

/// The check that opens every fenced write transaction. The share lock on
/// the row makes a concurrent takeover (an `UPDATE` of the row) wait until
/// this transaction ends, so nobody takes the lock between the check and the
/// commit.
const HOLDS: &str = "SELECT 1 FROM locks
     WHERE label = $1 AND owner = $2 AND token = $3 AND expires_at > now()
     FOR SHARE";

/// The fence check of a group commit, for all its writes in one statement:
/// `$1..$3` the fences' labels, owners and tokens; the rows of the fences
/// that hold. The rows are share-locked in label order, as the heartbeat's
/// `renew_many` locks them, so the two never wait on each other in a cycle;
/// and all before the first journal line takes the `journal_head` row lock,
/// so a batch never waits for a lock row while holding `journal_head`.
const HOLD_ALL: &str = "SELECT locks.label, locks.owner, locks.token
     FROM locks
     JOIN unnest($1::text[], $2::text[], $3::bigint[]) AS fence(label, owner, token)
       ON locks.label = fence.label AND locks.owner = fence.owner AND locks.token = fence.token
     WHERE locks.expires_at > now()
     ORDER BY locks.label
     FOR SHARE OF locks";

/// The locks released by a group commit's writes that carry their run's
/// end (`RunStore::finish_and_unlock`), in the write's transaction: the
/// release of `LOCKS.release`. [`HOLD_ALL`] share-locked these rows in
/// this transaction, and only this transaction locks them so (nobody else
/// writes under these fences), so the update takes them without waiting:
/// nobody took the lock since the check.
const UNLOCK_ALL: &str = "UPDATE locks SET owner = '', expires_at = 'epoch'
     FROM unnest($1::text[], $2::text[], $3::bigint[]) AS fence(label, owner, token)
     WHERE locks.label = fence.label AND locks.owner = fence.owner AND locks.token = fence.token";

/// The snapshots of a group commit's runs: one array per column.
/// The snapshots travel as JSON text (serialised once, straight from the
/// run) and are stored as `json` (migration 0016): validated, not parsed
/// into `jsonb`, which was half of the server's time in a cycle.
const UPSERT_RUNS: &str =
    "INSERT INTO runs (run_id, cycle_id, label, stage, outcome, done, started_at, updated_at,
                       snapshot, verdict)
     SELECT run_id, cycle_id, label, stage, outcome, done, started_at, updated_at,
            snapshot::json, verdict
     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::boolean[],
                 $7::timestamptz[], $8::timestamptz[], $9::text[], $10::text[])
          AS run(run_id, cycle_id, label, stage, outcome, done, started_at, updated_at,
                 snapshot, verdict)
     ON CONFLICT (run_id) DO UPDATE SET
        stage = excluded.stage, outcome = excluded.outcome, done = excluded.done,
        updated_at = excluded.updated_at, snapshot = excluded.snapshot,
        verdict = excluded.verdict";

/// The journal lines of a group commit, in the order given, numbered in
/// that order after the journal's head: the statement advances
/// `journal_head` by their number (its row lock, held to commit, orders
/// positions by commit: migration 0007) and gives them the positions in
/// between (migration 0017; before it a trigger did, one update per line).
const INSERT_LINES: &str = "WITH head AS (
         UPDATE journal_head SET position = position + cardinality($1::text[])
         RETURNING position - cardinality($1::text[]) AS before
     )
     INSERT INTO transitions (run_id, seq, at, from_stage, to_stage, event, actions, position)
     SELECT run_id, seq, at, from_stage, to_stage, event::json, actions::json, head.before + n
     FROM head, unnest($1::text[], $2::bigint[], $3::timestamptz[], $4::text[], $5::text[],
                       $6::text[], $7::text[])
          WITH ORDINALITY AS line(run_id, seq, at, from_stage, to_stage, event, actions, n)
     ORDER BY n";

/// The promotion events of a group commit, one array per column.
const INSERT_PROMOTIONS: &str =
    "INSERT INTO promotions (run_id, label, kind, version, previous_version, candidate_run,
                             candidate_id, verdict, by_whom, reason, at)
     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                          $7::text[], $8::text[], $9::text[], $10::text[], $11::timestamptz[])
     ON CONFLICT (run_id) DO NOTHING";

/// The cursors of a group commit: one array per column.
const UPSERT_CURSORS: &str =
    "INSERT INTO cursors (label, watermark, consumed_version, consumed_num_samples, updated_at, rejected_version)
     SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::bigint[],
                          $5::timestamptz[], $6::text[])
     ON CONFLICT (label) DO UPDATE SET
        watermark = excluded.watermark, consumed_version = excluded.consumed_version,
        consumed_num_samples = excluded.consumed_num_samples, updated_at = excluded.updated_at,
        rejected_version = excluded.rejected_version";

/// Lock acquisitions (`Backend::acquire`), one per row of `$1..$3`
/// (labels, owners, TTLs in seconds), each label at most once (see
/// [`acquire_in_rounds`]): a free, expired or own lock is taken with
/// `token + 1`, a first insert is token 1, and `previous_owner` keeps the
/// owner the row had. The rows are taken in label order, as the fence
/// check and the heartbeat's renewal lock them, so that two batches (of two
/// replicas), or a batch and a renewal, never wait on each other in a
/// cycle. Answers the lock of each label it took.
const ACQUIRE_ALL: &str = "INSERT INTO locks (label, owner, expires_at, token)
     SELECT label, owner, now() + make_interval(secs => ttl), 1
     FROM unnest($1::text[], $2::text[], $3::float8[]) AS asked(label, owner, ttl)
     ORDER BY label
     ON CONFLICT (label) DO UPDATE SET
        previous_owner = locks.owner, owner = excluded.owner,
        expires_at = excluded.expires_at, token = locks.token + 1
     WHERE locks.expires_at <= now() OR locks.owner = excluded.owner
     RETURNING label, token, previous_owner";

/// TTL in seconds for `make_interval(secs => …)`.
fn secs(ttl: Duration) -> f64 {
    super::ttl(ttl).num_milliseconds() as f64 / 1000.0
}

type Tx = sqlx::Transaction<'static, Postgres>;

impl PostgresRunStore {
    pub(super) async fn open(url: DbUrl, options: StoreOptions) -> Result<Self, AdapterError> {
        let pool = url
            .postgres_pool(super::KEY, MAX_CONNECTIONS, options.read_only)
            .await?;
        prepare_schema(POSTGRES_MIGRATIONS, &url, options, &pool).await?;
        let journal = GroupCommit::spawn(PostgresJournal {
            pool: pool.clone(),
            url: url.clone(),
        });
        let acquisitions = GroupCommit::spawn(PostgresLocks {
            pool: pool.clone(),
            url: url.clone(),
        });
        Ok(Self {
            pool,
            url,
            journal,
            acquisitions,
        })
    }

    /// Close every connection.
    pub(super) async fn close(&self) {
        self.pool.close().await;
    }

    /// Begin a fenced write: a transaction in which `fence` holds `label`'s
    /// lock (share-locked until it ends), or `None` (rolled back) if it does
    /// not.
    async fn begin_fenced(
        &self,
        label: &Label,
        fence: &Fence,
        what: &str,
    ) -> Result<Option<Tx>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.error(what, e))?;
        let held = bind(sqlx::query(HOLDS), fence_args(label, fence)?)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| self.error(what, e))?
            .is_some();
        if held {
            return Ok(Some(tx));
        }
        tx.rollback().await.map_err(|e| self.error(what, e))?;
        Ok(None)
    }

    async fn run_in(
        &self,
        tx: &mut Tx,
        sql: &'static str,
        args: Vec<Arg>,
        what: &str,
    ) -> Result<(), StoreError> {
        bind(sqlx::query(sql), args)
            .execute(&mut **tx)
            .await
            .map_err(|e| self.error(what, e))?;
        Ok(())
    }
}

#[async_trait]
impl Backend for PostgresRunStore {
    type Pool = PgPool;

    const LOCKS: LockSql = LOCKS;
    const SELECT_STATUS: &'static str = super::backend::select_status!(
        "SELECT DISTINCT value AS label FROM jsonb_array_elements_text($1) AS value",
        "k.owner <> '' AND k.expires_at > now()",
        "run_id",
        "json_agg",
        "json_build_array",
        ")::text"
    );
    const APPEND_LOG: &'static str =
        "UPDATE remote_jobs SET log_tail = right(log_tail || $3, 65536)
         WHERE job_key = $1 AND worker_id = $2 AND state IN ('assigned', 'cancelling')";

    fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn url(&self) -> &DbUrl {
        &self.url
    }

    fn now_args(&self) -> Vec<Arg> {
        Vec::new()
    }

    fn expiry_args(&self, ttl: Duration) -> Vec<Arg> {
        vec![Arg::Float(secs(ttl))]
    }

    /// Queued for the acquisitions' writer task (see [`ACQUIRE_ALL`]).
    async fn acquire(
        &self,
        label: &Label,
        owner: &LockOwner,
        ttl: Duration,
    ) -> Result<Option<Taken>, StoreError> {
        self.acquisitions
            .submit(Acquisition {
                label: label.as_str().to_owned(),
                owner: owner.0.clone(),
                ttl_secs: secs(ttl),
            })
            .await
    }

    /// Converted here (bad input fails this caller alone), then queued for
    /// the writer task; answered once its batch committed.
    async fn journal(
        &self,
        transitions: &[Transition],
        cursor: Option<&LabelCursor>,
        fence: &Fence,
        unlock: bool,
    ) -> Result<bool, StoreError> {
        match JournalWrite::of(transitions, cursor, fence, unlock)? {
            Some(write) => self.journal.submit(write).await,
            None => Ok(true),
        }
    }

    async fn lease(&self, lease: &Lease, fence: &Fence) -> Result<bool, StoreError> {
        let what = format!("recording lease {}", lease.id);
        let Some(mut tx) = self.begin_fenced(&lease.label, fence, &what).await? else {
            return Ok(false);
        };
        self.run_in(&mut tx, UPSERT_LEASE, lease_args(lease)?, &what)
            .await?;
        tx.commit().await.map_err(|e| self.error(&what, e))?;
        Ok(true)
    }
}

/// One journal write as the writer task applies it: the run's snapshot (as
/// of its last transition), a line per transition, their promotion events
/// and the cursor, as column values.
struct JournalWrite {
    /// `(label, owner, token)`: applied only while this fence holds.
    fence: (String, String, i64),
    run: RunValues,
    lines: Vec<LineValues>,
    promotions: Vec<PromotionEvent>,
    cursor: Option<CursorValues>,
    /// Release the lock of `fence` with the write.
    unlock: bool,
    /// "journaling run … seq …", for its errors.
    what: String,
}

struct RunValues {
    run_id: String,
    cycle_id: String,
    label: String,
    stage: &'static str,
    outcome: &'static str,
    done: bool,
    started_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    /// JSON text.
    snapshot: String,
    verdict: Option<String>,
}

struct LineValues {
    run_id: String,
    seq: i64,
    at: DateTime<Utc>,
    from: &'static str,
    to: &'static str,
    /// JSON text: the columns are `json` (migration 0016), which the
    /// server only validates.
    event: String,
    actions: String,
}

struct CursorValues {
    label: String,
    watermark: Option<DateTime<Utc>>,
    consumed_version: Option<String>,
    consumed_num_samples: Option<i64>,
    updated_at: DateTime<Utc>,
    rejected_version: Option<String>,
}

impl JournalWrite {
    /// `None` for no transitions (nothing to write).
    fn of(
        transitions: &[Transition],
        cursor: Option<&LabelCursor>,
        fence: &Fence,
        unlock: bool,
    ) -> Result<Option<Self>, StoreError> {
        let Some(last) = transitions.last() else {
            return Ok(None);
        };
        let row = RunRow::of(last)?;
        let what = format!("journaling run {} seq {}", row.run_id, row.seq);
        let run = RunValues {
            run_id: row.run_id.to_owned(),
            cycle_id: row.cycle_id.to_owned(),
            label: row.label.to_owned(),
            stage: row.stage,
            outcome: row.outcome,
            done: row.done,
            started_at: row.started_at,
            updated_at: last.at,
            snapshot: row.snapshot,
            verdict: row.verdict.map(str::to_owned),
        };
        let mut lines = Vec::with_capacity(transitions.len());
        for transition in transitions {
            lines.push(LineValues {
                run_id: transition.run_id.as_str().to_owned(),
                seq: super::seq_of(transition)?,
                at: transition.at,
                from: transition.from.as_str(),
                to: transition.to.as_str(),
                event: super::to_json_text(&transition.event, "the event")?,
                actions: super::to_json_text(&transition.actions, "the actions")?,
            });
        }
        let cursor = cursor
            .map(|cursor| {
                Ok::<_, StoreError>(CursorValues {
                    label: run.label.clone(),
                    watermark: cursor.watermark,
                    consumed_version: cursor.consumed_version.as_ref().map(version),
                    consumed_num_samples: cursor
                        .consumed_num_samples
                        .map(|n| u64_to_i64(n, "consumed_num_samples"))
                        .transpose()?,
                    updated_at: last.at,
                    rejected_version: cursor.rejected_version.as_ref().map(version),
                })
            })
            .transpose()?;
        Ok(Some(Self {
            fence: (
                last.label.as_str().to_owned(),
                fence.owner.0.clone(),
                u64_to_i64(fence.token, "fencing token")?,
            ),
            run,
            lines,
            promotions: transitions
                .iter()
                .filter_map(Transition::promotion_event)
                .collect(),
            cursor,
            unlock,
            what,
        }))
    }
}

fn version(v: &VersionTag) -> String {
    v.as_str().to_owned()
}

/// Applies a batch of journal writes in one Postgres transaction: the fence
/// check of every write in one statement, then one statement per table for
/// the writes whose fence held, whatever their number.
struct PostgresJournal {
    pool: PgPool,
    url: DbUrl,
}

#[async_trait]
impl CommitBatch for PostgresJournal {
    type Write = JournalWrite;
    type Outcome = bool;

    async fn commit(&self, batch: &[JournalWrite]) -> Result<Vec<bool>, StoreError> {
        let what = match batch {
            [one] => one.what.clone(),
            _ => format!("journaling {} writes in one transaction", batch.len()),
        };
        let err = |e| super::store_error(&self.url, &what, e);
        let mut tx = self.pool.begin().await.map_err(err)?;
        let held = sqlx::query(HOLD_ALL)
            .bind(batch.iter().map(|w| w.fence.0.as_str()).collect::<Vec<_>>())
            .bind(batch.iter().map(|w| w.fence.1.as_str()).collect::<Vec<_>>())
            .bind(batch.iter().map(|w| w.fence.2).collect::<Vec<_>>())
            .fetch_all(&mut *tx)
            .await
            .map_err(err)?
            .iter()
            .map(|row| Ok((row.text("label")?, row.text("owner")?, row.int("token")?)))
            .collect::<Result<std::collections::HashSet<_>, StoreError>>()?;
        let applied: Vec<bool> = batch.iter().map(|w| held.contains(&w.fence)).collect();
        let writes: Vec<&JournalWrite> = batch
            .iter()
            .zip(&applied)
            .filter_map(|(write, &applied)| applied.then_some(write))
            .collect();
        if !writes.is_empty() {
            write_all(&mut tx, &writes).await.map_err(err)?;
        }
        // Also when nothing was applied: ends the share locks.
        tx.commit().await.map_err(err)?;
        Ok(applied)
    }
}

#[async_trait]
impl CommitBatch for PostgresLocks {
    type Write = Acquisition;
    type Outcome = Option<Taken>;

    /// One statement per round ([`acquire_in_rounds`]), each its own
    /// transaction: if a later one fails, the writer task asks every
    /// acquisition of the batch again alone, and one that an earlier round
    /// took is taken again by the same owner (a new token, which is the one
    /// its caller gets).
    async fn commit(&self, batch: &[Acquisition]) -> Result<Vec<Option<Taken>>, StoreError> {
        let labels = batch.iter().map(|a| a.label.as_str());
        acquire_in_rounds(labels, |asked: Vec<usize>, what: String| async move {
            let each = || asked.iter().map(|&i| &batch[i]);
            sqlx::query(ACQUIRE_ALL)
                .bind(each().map(|a| a.label.as_str()).collect::<Vec<_>>())
                .bind(each().map(|a| a.owner.as_str()).collect::<Vec<_>>())
                .bind(each().map(|a| a.ttl_secs).collect::<Vec<_>>())
                .fetch_all(&self.pool)
                .await
                .map_err(|e| super::store_error(&self.url, &what, e))
        })
        .await
    }
}

/// The runs, then their lines (which reference them), promotion events and
/// cursors of `writes`: one statement each.
async fn write_all(tx: &mut Tx, writes: &[&JournalWrite]) -> Result<(), sqlx::Error> {
    let runs = writes.iter().map(|w| &w.run);
    sqlx::query(UPSERT_RUNS)
        .bind(runs.clone().map(|r| r.run_id.as_str()).collect::<Vec<_>>())
        .bind(
            runs.clone()
                .map(|r| r.cycle_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(runs.clone().map(|r| r.label.as_str()).collect::<Vec<_>>())
        .bind(runs.clone().map(|r| r.stage).collect::<Vec<_>>())
        .bind(runs.clone().map(|r| r.outcome).collect::<Vec<_>>())
        .bind(runs.clone().map(|r| r.done).collect::<Vec<_>>())
        .bind(runs.clone().map(|r| r.started_at).collect::<Vec<_>>())
        .bind(runs.clone().map(|r| r.updated_at).collect::<Vec<_>>())
        .bind(
            runs.clone()
                .map(|r| r.snapshot.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(runs.map(|r| r.verdict.as_deref()).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    let lines = writes.iter().flat_map(|w| &w.lines);
    let expected = lines.clone().count() as u64;
    let inserted = sqlx::query(INSERT_LINES)
        .bind(lines.clone().map(|l| l.run_id.as_str()).collect::<Vec<_>>())
        .bind(lines.clone().map(|l| l.seq).collect::<Vec<_>>())
        .bind(lines.clone().map(|l| l.at).collect::<Vec<_>>())
        .bind(lines.clone().map(|l| l.from).collect::<Vec<_>>())
        .bind(lines.clone().map(|l| l.to).collect::<Vec<_>>())
        .bind(lines.clone().map(|l| l.event.as_str()).collect::<Vec<_>>())
        .bind(lines.map(|l| l.actions.as_str()).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?
        .rows_affected();
    if inserted != expected {
        // Only without the one `journal_head` row (migration 0007), which
        // nothing deletes: the lines would be dropped while the runs moved
        // on. Fail the batch (rolled back) instead.
        return Err(sqlx::Error::Decode(
            format!(
                "{inserted} of {expected} journal lines written: the journal_head row is missing"
            )
            .into(),
        ));
    }
    let events: Vec<&PromotionEvent> = writes.iter().flat_map(|w| &w.promotions).collect();
    if !events.is_empty() {
        let events = events.iter();
        sqlx::query(INSERT_PROMOTIONS)
            .bind(
                events
                    .clone()
                    .map(|e| e.run_id.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(events.clone().map(|e| e.label.as_str()).collect::<Vec<_>>())
            .bind(events.clone().map(|e| e.kind.as_str()).collect::<Vec<_>>())
            .bind(
                events
                    .clone()
                    .map(|e| e.version.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                events
                    .clone()
                    .map(|e| e.previous_version.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(
                events
                    .clone()
                    .map(|e| e.candidate_run.as_ref().map(|r| r.as_str()))
                    .collect::<Vec<_>>(),
            )
            .bind(
                events
                    .clone()
                    .map(|e| e.candidate_id.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(
                events
                    .clone()
                    .map(|e| e.verdict.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(events.clone().map(|e| e.by.as_str()).collect::<Vec<_>>())
            .bind(
                events
                    .clone()
                    .map(|e| e.reason.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(events.map(|e| e.at).collect::<Vec<_>>())
            .execute(&mut **tx)
            .await?;
    }
    let cursors: Vec<&CursorValues> = writes.iter().filter_map(|w| w.cursor.as_ref()).collect();
    if !cursors.is_empty() {
        let cursors = cursors.iter();
        sqlx::query(UPSERT_CURSORS)
            .bind(
                cursors
                    .clone()
                    .map(|c| c.label.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(cursors.clone().map(|c| c.watermark).collect::<Vec<_>>())
            .bind(
                cursors
                    .clone()
                    .map(|c| c.consumed_version.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(
                cursors
                    .clone()
                    .map(|c| c.consumed_num_samples)
                    .collect::<Vec<_>>(),
            )
            .bind(cursors.clone().map(|c| c.updated_at).collect::<Vec<_>>())
            .bind(
                cursors
                    .map(|c| c.rejected_version.as_deref())
                    .collect::<Vec<_>>(),
            )
            .execute(&mut **tx)
            .await?;
    }
    let unlocks: Vec<&(String, String, i64)> = writes
        .iter()
        .filter(|w| w.unlock)
        .map(|w| &w.fence)
        .collect();
    if !unlocks.is_empty() {
        sqlx::query(UNLOCK_ALL)
            .bind(unlocks.iter().map(|f| f.0.as_str()).collect::<Vec<_>>())
            .bind(unlocks.iter().map(|f| f.1.as_str()).collect::<Vec<_>>())
            .bind(unlocks.iter().map(|f| f.2).collect::<Vec<_>>())
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use retrain_core::domain::{LockOutcome, LockOwner};

    use super::*;
    use crate::store::locks;

    /// The share lock taken by the fence check makes a takeover of the label
    /// wait until the write transaction ends: the lock cannot change hands
    /// between the check and the commit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_takeover_waits_for_the_fenced_write_in_flight() {
        let Some(url) = crate::testing::services::fresh_postgres_database().await else {
            return;
        };
        let url = DbUrl::parse("state", &url).unwrap();
        let store = std::sync::Arc::new(
            PostgresRunStore::open(url, StoreOptions::default())
                .await
                .unwrap(),
        );
        let dept = Label::new("dept").unwrap();
        let ttl = Duration::from_millis(500);
        let LockOutcome::Acquired { fence, .. } =
            locks::try_lock(store.as_ref(), &dept, &LockOwner("a".into()), ttl)
                .await
                .unwrap()
        else {
            panic!("a fresh label is free");
        };
        let tx = store
            .begin_fenced(&dept, &fence, "test")
            .await
            .unwrap()
            .expect("the fence holds");
        // The lock expires while the write is in flight; a takeover starts.
        tokio::time::sleep(Duration::from_millis(800)).await;
        let takeover = tokio::spawn({
            let store = store.clone();
            let dept = dept.clone();
            async move {
                locks::try_lock(store.as_ref(), &dept, &LockOwner("b".into()), ttl)
                    .await
                    .unwrap()
            }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!takeover.is_finished(), "the takeover did not wait");
        tx.commit().await.unwrap();
        let LockOutcome::Acquired {
            fence: taken,
            taken_over_from,
        } = takeover.await.unwrap()
        else {
            panic!("the expired lock is free once the write committed");
        };
        assert_eq!(taken.token, fence.token + 1);
        assert_eq!(taken_over_from.as_deref(), Some("a"));
    }
}
