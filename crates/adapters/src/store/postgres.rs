//! The Postgres dialect of the run store: several orchestrators, possibly on
//! different machines, share one database. Lock expiry is computed and
//! compared with the database's `now()`, never with a client clock. Fenced
//! writes run in a transaction that first takes a `FOR SHARE` lock on the
//! label's lock row (see [`HOLDS`]); journal writes are group-committed by
//! the writer task of `group_commit.rs`, one such check for a whole batch
//! (see [`COMMIT_BATCH`]).

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
    // first, as a group commit's fence check (`COMMIT_BATCH`) share-locks them:
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

/// A group commit as one statement: the fence check of every write, then
/// the runs, journal lines, promotion events, cursors and lock releases of
/// the writes whose fence holds. One statement instead of one per table:
/// the writer task commits a batch in three round trips (`BEGIN`, this,
/// `COMMIT`) instead of five to eight, which is most of what a batch costs
/// when the database is across a network (`docs/BENCHMARKS.md`).
///
/// Parameters, one array per column:
/// - `$1..$4`, one row per write `w` (its ordinality, from 1): the fence's
///   label, owner and token, and whether the write releases the lock
///   (`RunStore::finish_and_unlock`);
/// - `$5..$14`, one row per write, in the same order: its run's columns;
/// - `$15..$22`, one row per journal line, oldest first: its write `w`, then
///   its columns;
/// - `$23..$34`, one row per promotion event: `w`, then its columns;
/// - `$35..$41`, one row per cursor: `w`, then its columns.
///
/// Answers the `w` of every write whose fence held, and how many journal
/// lines were applied and written.
///
/// Order, which the references between the parts force:
/// 1. `held` share-locks the fences' lock rows that hold, in label order, as
///    the heartbeat's `renew_many` locks them (so the two never wait on each
///    other in a cycle). The share lock makes a concurrent takeover (an
///    `UPDATE` of the row) wait until this transaction ends, so nobody takes
///    the lock between the check and the commit.
/// 2. `runs_written` upserts the applied writes' runs (their snapshot as of
///    their last line) as `json` (migration 0016: validated, not parsed
///    into `jsonb`).
/// 3. `head` advances `journal_head` by the number of applied lines, and
///    only after 1 and 2, so a batch never waits for a lock row or a run
///    row while it holds `journal_head`. Its row lock, held to commit,
///    orders positions by commit (migration 0007); the lines take the
///    positions in between, in the order given (migration 0017).
/// 4. `unlocked` releases the locks of the writes that carry their run's
///    end, as `LOCKS.release`: `held` share-locked those rows in this
///    transaction and nobody else writes under these fences, so the update
///    takes them without waiting.
const COMMIT_BATCH: &str = "WITH held AS MATERIALIZED (
         SELECT fence.w, fence.unlock
         FROM unnest($1::text[], $2::text[], $3::bigint[], $4::boolean[])
              WITH ORDINALITY AS fence(label, owner, token, unlock, w)
         JOIN locks ON locks.label = fence.label AND locks.owner = fence.owner
                   AND locks.token = fence.token
         WHERE locks.expires_at > now()
         ORDER BY locks.label
         FOR SHARE OF locks
     ),
     runs_written AS (
         INSERT INTO runs (run_id, cycle_id, label, stage, outcome, done, started_at, updated_at,
                           snapshot, verdict)
         SELECT run_id, cycle_id, label, stage, outcome, done, started_at, updated_at,
                snapshot::json, verdict
         FROM unnest($5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::boolean[],
                     $11::timestamptz[], $12::timestamptz[], $13::text[], $14::text[])
              WITH ORDINALITY AS run(run_id, cycle_id, label, stage, outcome, done, started_at,
                                     updated_at, snapshot, verdict, w)
         WHERE run.w IN (SELECT w FROM held)
         ON CONFLICT (run_id) DO UPDATE SET
            stage = excluded.stage, outcome = excluded.outcome, done = excluded.done,
            updated_at = excluded.updated_at, snapshot = excluded.snapshot,
            verdict = excluded.verdict
         RETURNING 1
     ),
     lines AS MATERIALIZED (
         SELECT line.run_id, line.seq, line.at, line.from_stage, line.to_stage, line.event,
                line.actions, row_number() OVER (ORDER BY line.n) AS k
         FROM unnest($15::bigint[], $16::text[], $17::bigint[], $18::timestamptz[], $19::text[],
                     $20::text[], $21::text[], $22::text[])
              WITH ORDINALITY AS line(w, run_id, seq, at, from_stage, to_stage, event, actions, n)
         WHERE line.w IN (SELECT w FROM held)
     ),
     head AS (
         UPDATE journal_head SET position = position + (SELECT count(*) FROM lines)
         WHERE (SELECT count(*) FROM lines) > 0 AND (SELECT count(*) FROM runs_written) > 0
         RETURNING position - (SELECT count(*) FROM lines) AS before
     ),
     lines_written AS (
         INSERT INTO transitions (run_id, seq, at, from_stage, to_stage, event, actions, position)
         SELECT lines.run_id, lines.seq, lines.at, lines.from_stage, lines.to_stage,
                lines.event::json, lines.actions::json, head.before + lines.k
         FROM head, lines
         ORDER BY lines.k
         RETURNING 1
     ),
     promotions_written AS (
         INSERT INTO promotions (run_id, label, kind, version, previous_version, candidate_run,
                                 candidate_id, verdict, by_whom, reason, at)
         SELECT run_id, label, kind, version, previous_version, candidate_run, candidate_id,
                verdict, by_whom, reason, at
         FROM unnest($23::bigint[], $24::text[], $25::text[], $26::text[], $27::text[],
                     $28::text[], $29::text[], $30::text[], $31::text[], $32::text[],
                     $33::text[], $34::timestamptz[])
              AS event(w, run_id, label, kind, version, previous_version, candidate_run,
                       candidate_id, verdict, by_whom, reason, at)
         WHERE event.w IN (SELECT w FROM held)
         ON CONFLICT (run_id) DO NOTHING
     ),
     cursors_written AS (
         INSERT INTO cursors (label, watermark, consumed_version, consumed_num_samples,
                              updated_at, rejected_version)
         SELECT label, watermark, consumed_version, consumed_num_samples, updated_at,
                rejected_version
         FROM unnest($35::bigint[], $36::text[], $37::timestamptz[], $38::text[], $39::bigint[],
                     $40::timestamptz[], $41::text[])
              AS cursor(w, label, watermark, consumed_version, consumed_num_samples, updated_at,
                        rejected_version)
         WHERE cursor.w IN (SELECT w FROM held)
         ON CONFLICT (label) DO UPDATE SET
            watermark = excluded.watermark, consumed_version = excluded.consumed_version,
            consumed_num_samples = excluded.consumed_num_samples,
            updated_at = excluded.updated_at, rejected_version = excluded.rejected_version
     ),
     unlocked AS (
         UPDATE locks SET owner = '', expires_at = 'epoch'
         FROM unnest($1::text[], $2::text[], $3::bigint[])
              WITH ORDINALITY AS fence(label, owner, token, w)
         WHERE fence.w IN (SELECT w FROM held WHERE unlock)
           AND locks.label = fence.label AND locks.owner = fence.owner
           AND locks.token = fence.token
     )
     SELECT held.w, (SELECT count(*) FROM lines) AS applied_lines,
            (SELECT count(*) FROM lines_written) AS written_lines
     FROM held";

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
        "w.awaits_approval",
        "run_id",
        "json_agg",
        "json_build_array",
        ")::text"
    );
    const SELECT_SNAPSHOTS: &'static str = "SELECT run_id, snapshot FROM runs
         WHERE run_id IN (SELECT value FROM jsonb_array_elements_text($1) AS value)";
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

/// Applies a batch of journal writes in one Postgres transaction, as the one
/// statement [`COMMIT_BATCH`] whatever their number.
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
        let rows = commit_batch_query(batch)
            .fetch_all(&mut *tx)
            .await
            .map_err(err)?;
        let mut applied = vec![false; batch.len()];
        for row in &rows {
            let w = row.int("w")?;
            let (applied_lines, written_lines) =
                (row.int("applied_lines")?, row.int("written_lines")?);
            if written_lines != applied_lines {
                // Only without the one `journal_head` row (migration 0007),
                // which nothing deletes: the lines would be dropped while
                // the runs moved on. Fail the batch (rolled back) instead.
                return Err(err(sqlx::Error::Decode(
                    format!(
                        "{written_lines} of {applied_lines} journal lines written: the journal_head row is missing"
                    )
                    .into(),
                )));
            }
            let at = usize::try_from(w - 1)
                .ok()
                .filter(|&at| at < batch.len())
                .ok_or_else(|| {
                    StoreError::Corrupt(format!("{what}: the database answered write {w}"))
                })?;
            applied[at] = true;
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

/// [`COMMIT_BATCH`] bound to `batch`: one array per column, each write's
/// lines, promotion events and cursor tagged with its ordinality `w`.
fn commit_batch_query(batch: &[JournalWrite]) -> Query<'_, Postgres> {
    fn column<'a, T: 'a, U>(
        items: impl IntoIterator<Item = &'a T>,
        f: impl Fn(&'a T) -> U,
    ) -> Vec<U> {
        items.into_iter().map(f).collect()
    }
    let runs: Vec<&RunValues> = batch.iter().map(|w| &w.run).collect();
    let numbered = || (1i64..).zip(batch);
    let lines: Vec<(i64, &LineValues)> = numbered()
        .flat_map(|(w, write)| write.lines.iter().map(move |line| (w, line)))
        .collect();
    let events: Vec<(i64, &PromotionEvent)> = numbered()
        .flat_map(|(w, write)| write.promotions.iter().map(move |event| (w, event)))
        .collect();
    let cursors: Vec<(i64, &CursorValues)> = numbered()
        .filter_map(|(w, write)| write.cursor.as_ref().map(|cursor| (w, cursor)))
        .collect();
    sqlx::query(COMMIT_BATCH)
        // The writes' fences.
        .bind(column(batch, |w| w.fence.0.as_str()))
        .bind(column(batch, |w| w.fence.1.as_str()))
        .bind(column(batch, |w| w.fence.2))
        .bind(column(batch, |w| w.unlock))
        // Their runs.
        .bind(column(&runs, |r| r.run_id.as_str()))
        .bind(column(&runs, |r| r.cycle_id.as_str()))
        .bind(column(&runs, |r| r.label.as_str()))
        .bind(column(&runs, |r| r.stage))
        .bind(column(&runs, |r| r.outcome))
        .bind(column(&runs, |r| r.done))
        .bind(column(&runs, |r| r.started_at))
        .bind(column(&runs, |r| r.updated_at))
        .bind(column(&runs, |r| r.snapshot.as_str()))
        .bind(column(&runs, |r| r.verdict.as_deref()))
        // Their journal lines.
        .bind(column(&lines, |(w, _)| *w))
        .bind(column(&lines, |(_, l)| l.run_id.as_str()))
        .bind(column(&lines, |(_, l)| l.seq))
        .bind(column(&lines, |(_, l)| l.at))
        .bind(column(&lines, |(_, l)| l.from))
        .bind(column(&lines, |(_, l)| l.to))
        .bind(column(&lines, |(_, l)| l.event.as_str()))
        .bind(column(&lines, |(_, l)| l.actions.as_str()))
        // Their promotion events.
        .bind(column(&events, |(w, _)| *w))
        .bind(column(&events, |(_, e)| e.run_id.as_str()))
        .bind(column(&events, |(_, e)| e.label.as_str()))
        .bind(column(&events, |(_, e)| e.kind.as_str()))
        .bind(column(&events, |(_, e)| e.version.as_str()))
        .bind(column(&events, |(_, e)| e.previous_version.as_deref()))
        .bind(column(&events, |(_, e)| {
            e.candidate_run.as_ref().map(|r| r.as_str())
        }))
        .bind(column(&events, |(_, e)| e.candidate_id.as_deref()))
        .bind(column(&events, |(_, e)| e.verdict.as_deref()))
        .bind(column(&events, |(_, e)| e.by.as_str()))
        .bind(column(&events, |(_, e)| e.reason.as_deref()))
        .bind(column(&events, |(_, e)| e.at))
        // Their cursors.
        .bind(column(&cursors, |(w, _)| *w))
        .bind(column(&cursors, |(_, c)| c.label.as_str()))
        .bind(column(&cursors, |(_, c)| c.watermark))
        .bind(column(&cursors, |(_, c)| c.consumed_version.as_deref()))
        .bind(column(&cursors, |(_, c)| c.consumed_num_samples))
        .bind(column(&cursors, |(_, c)| c.updated_at))
        .bind(column(&cursors, |(_, c)| c.rejected_version.as_deref()))
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
