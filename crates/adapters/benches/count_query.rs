//! Count query benchmark (§11): 1,000,000 feedback rows over 10 labels in
//! Postgres, with the index recommended in docs/adapters/postgres.md, timed
//! through the real `CountSource` (read-only transaction + statement timeout).
//! Then (issue 11) 1,000,000 rows over 1,000 labels, each label at its own
//! watermark (1,000 distinct ones): the per-label form (one statement) against
//! one full-table `GROUP BY`, and against the shared form (one statement per
//! distinct watermark, timed on a sample and scaled).
//!
//!   scripts/start-postgres.sh /tmp/pg.env && . /tmp/pg.env
//!   cargo bench -p retrain-adapters --bench count_query
//!
//! Skips with a message when RETRAIN_TEST_POSTGRES_URL is unset.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use retrain_adapters::counts::{open_count_source, CountOptions, WatermarkForm};
use retrain_core::domain::Label;
use sqlx::{Connection, Executor};

const ROWS: i64 = 1_000_000;
const RUNS: usize = 9;

/// The seed-style query: misclassified and correct reviews per label since
/// the watermark.
const QUERY: &str = "SELECT label,
        count(*) FILTER (WHERE NOT is_correct) AS misclassified,
        count(*) FILTER (WHERE is_correct) AS correct
    FROM feedback
    WHERE reviewed_at > $1
    GROUP BY label";

/// The per-label form of `QUERY`: each label counted after its own watermark.
const PER_LABEL_QUERY: &str = "SELECT f.label,
        count(*) FILTER (WHERE NOT f.is_correct) AS misclassified,
        count(*) FILTER (WHERE f.is_correct) AS correct
    FROM unnest($1::text[], $2::timestamptz[]) AS w(label, since)
    JOIN feedback_1k f ON f.label = w.label AND f.reviewed_at > w.since
    GROUP BY f.label";

/// One full-table `GROUP BY` over the same table: the yardstick.
const FULL_TABLE_QUERY: &str = "SELECT label,
        count(*) FILTER (WHERE NOT is_correct) AS misclassified,
        count(*) FILTER (WHERE is_correct) AS correct
    FROM feedback_1k
    WHERE reviewed_at > $1
    GROUP BY label";

const LABELS_1K: i64 = 1_000;
/// Shared-form statements actually timed (one per distinct watermark); the
/// total for all 1,000 is scaled from them.
const SHARED_SAMPLE: usize = 20;

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> BenchResult<()> {
    let Ok(admin) = std::env::var("RETRAIN_TEST_POSTGRES_URL") else {
        println!("count_query: skipped: RETRAIN_TEST_POSTGRES_URL is not set (scripts/start-postgres.sh)");
        return Ok(());
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(&admin))
}

async fn run(admin: &str) -> BenchResult<()> {
    let name = format!("retrain_bench_{}", uuid::Uuid::now_v7().simple());
    let mut conn = sqlx::PgConnection::connect(admin).await?;
    conn.execute(format!("CREATE DATABASE {name}").as_str())
        .await?;
    let mut url = url::Url::parse(admin)?;
    url.set_path(&format!("/{name}"));
    let result = bench(url.as_str()).await;
    conn.execute(format!("DROP DATABASE {name} WITH (FORCE)").as_str())
        .await?;
    result
}

async fn bench(url: &str) -> BenchResult<()> {
    let mut db = sqlx::PgConnection::connect(url).await?;
    let load = Instant::now();
    db.execute(
        "CREATE TABLE feedback (
            id          BIGSERIAL PRIMARY KEY,
            label       TEXT NOT NULL,
            is_correct  BOOLEAN NOT NULL,
            reviewed_at TIMESTAMPTZ NOT NULL
        )",
    )
    .await?;
    // 10 labels, ~1 in 7 misclassified, one review per second back from now
    // (about 11.6 days of feedback).
    sqlx::query(
        "INSERT INTO feedback (label, is_correct, reviewed_at)
         SELECT 'label_' || (i % 10), i % 7 <> 0, now() - make_interval(secs => i)
         FROM generate_series(1, $1::bigint) AS i",
    )
    .bind(ROWS)
    .execute(&mut db)
    .await?;
    // The recommended index: the watermark column first, the counted columns
    // included so that the query is an index-only scan.
    db.execute(
        "CREATE INDEX feedback_reviewed_at ON feedback (reviewed_at) INCLUDE (label, is_correct)",
    )
    .await?;
    db.execute("VACUUM ANALYZE feedback").await?;
    println!(
        "count_query: loaded {ROWS} rows over 10 labels and built the index in {:.1}s",
        load.elapsed().as_secs_f64()
    );

    let source = open_count_source(
        url,
        QUERY,
        CountOptions {
            statement_timeout: Duration::from_secs(30),
            ..CountOptions::default()
        },
    )
    .await?;
    let now = Utc::now();
    let cases: [(&str, DateTime<Utc>); 2] = [
        (
            "all 1,000,000 rows (watermark = epoch)",
            DateTime::<Utc>::UNIX_EPOCH,
        ),
        ("last day, ~86,400 rows", now - chrono::Duration::days(1)),
    ];
    for (what, since) in cases {
        // Warm the cache and the pool once.
        let counts = source.counts(since).await?;
        let total: u64 = counts.values().map(|c| c.misclassified + c.correct).sum();
        let mut times = Vec::with_capacity(RUNS);
        for _ in 0..RUNS {
            let started = Instant::now();
            source.counts(since).await?;
            times.push(started.elapsed());
        }
        times.sort();
        println!(
            "count_query: {what}: {} labels, {total} rows counted; median {:.1} ms (min {:.1}, max {:.1}) over {RUNS} runs",
            counts.len(),
            ms(times[RUNS / 2]),
            ms(times[0]),
            ms(times[RUNS - 1]),
        );
    }
    per_label_watermarks(&mut db, url).await
}

/// 1,000,000 rows over 1,000 labels; label `k` has the watermark
/// `now - (k + 1) × 1,000 s`, so the 1,000 watermarks are distinct and about
/// half of the rows are counted.
async fn per_label_watermarks(db: &mut sqlx::PgConnection, url: &str) -> BenchResult<()> {
    let load = Instant::now();
    db.execute(
        "CREATE TABLE feedback_1k (
            id          BIGSERIAL PRIMARY KEY,
            label       TEXT NOT NULL,
            is_correct  BOOLEAN NOT NULL,
            reviewed_at TIMESTAMPTZ NOT NULL
        )",
    )
    .await?;
    sqlx::query(
        "INSERT INTO feedback_1k (label, is_correct, reviewed_at)
         SELECT 'label_' || (i % $2), i % 7 <> 0, now() - make_interval(secs => i)
         FROM generate_series(1, $1::bigint) AS i",
    )
    .bind(ROWS)
    .bind(LABELS_1K)
    .execute(&mut *db)
    .await?;
    // The per-label form's index: the label first (equality), then the
    // watermark column (range), the counted column included.
    db.execute(
        "CREATE INDEX feedback_1k_label_reviewed_at ON feedback_1k (label, reviewed_at) INCLUDE (is_correct)",
    )
    .await?;
    db.execute(
        "CREATE INDEX feedback_1k_reviewed_at ON feedback_1k (reviewed_at) INCLUDE (label, is_correct)",
    )
    .await?;
    db.execute("VACUUM ANALYZE feedback_1k").await?;
    println!(
        "count_query: loaded {ROWS} rows over {LABELS_1K} labels and built the indexes in {:.1}s",
        load.elapsed().as_secs_f64()
    );
    let now = Utc::now();
    let watermarks: BTreeMap<Label, DateTime<Utc>> = (0..LABELS_1K)
        .map(|k| {
            (
                Label::new(format!("label_{k}")).expect("a valid label"),
                now - chrono::Duration::seconds((k + 1) * 1_000),
            )
        })
        .collect();
    let options = |form| CountOptions {
        statement_timeout: Duration::from_secs(120),
        form,
        labels: Vec::new(),
    };
    let per_label =
        open_count_source(url, PER_LABEL_QUERY, options(WatermarkForm::PerLabel)).await?;
    let full_table =
        open_count_source(url, FULL_TABLE_QUERY, options(WatermarkForm::Shared)).await?;

    let counted = per_label.counts_per_label(&watermarks).await?;
    let rows: u64 = counted.values().map(|c| c.misclassified + c.correct).sum();
    let one = median_ms(|| async {
        per_label.counts_per_label(&watermarks).await?;
        Ok(())
    })
    .await?;
    println!(
        "count_query: per-label form, {} labels at {} distinct watermarks, {rows} rows counted, one statement: median {:.1} ms (min {:.1}, max {:.1}) over {RUNS} runs",
        counted.len(),
        watermarks.len(),
        one[RUNS / 2],
        one[0],
        one[RUNS - 1]
    );
    let full = median_ms(|| async {
        full_table.counts(DateTime::<Utc>::UNIX_EPOCH).await?;
        Ok(())
    })
    .await?;
    println!(
        "count_query: one full-table GROUP BY ({ROWS} rows): median {:.1} ms (min {:.1}, max {:.1}); per-label form / full table = {:.2}x",
        full[RUNS / 2],
        full[0],
        full[RUNS - 1],
        one[RUNS / 2] / full[RUNS / 2]
    );
    // The shared form counts the labels at one watermark per statement.
    let sample: BTreeMap<Label, DateTime<Utc>> = watermarks
        .iter()
        .step_by(watermarks.len() / SHARED_SAMPLE)
        .map(|(l, s)| (l.clone(), *s))
        .collect();
    let started = Instant::now();
    let shared = full_table.counts_per_label(&sample).await?;
    let per_statement = ms(started.elapsed()) / sample.len() as f64;
    for (label, counts) in &shared {
        assert_eq!(
            counted.get(label),
            Some(counts),
            "both forms agree on {label}"
        );
    }
    println!(
        "count_query: shared form, one statement per distinct watermark: {:.1} ms per statement over {} sampled watermarks, so ≈ {:.1} s for all {}",
        per_statement,
        sample.len(),
        per_statement * watermarks.len() as f64 / 1000.0,
        watermarks.len()
    );
    Ok(())
}

/// `RUNS` timings (ms, sorted) of `f` after one warm-up call.
async fn median_ms<F, Fut>(f: F) -> BenchResult<Vec<f64>>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = BenchResult<()>>,
{
    f().await?;
    let mut times = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let started = Instant::now();
        f().await?;
        times.push(ms(started.elapsed()));
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
