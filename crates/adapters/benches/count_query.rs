//! Count query benchmark (§11): 1,000,000 feedback rows over 10 labels in
//! Postgres, with the index recommended in docs/adapters/postgres.md, timed
//! through the real `CountSource` (read-only transaction + statement timeout).
//!
//!   scripts/start-postgres.sh /tmp/pg.env && . /tmp/pg.env
//!   cargo bench -p retrain-adapters --bench count_query
//!
//! Skips with a message when RETRAIN_TEST_POSTGRES_URL is unset.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use retrain_adapters::counts::{open_count_source, CountOptions};
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
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
