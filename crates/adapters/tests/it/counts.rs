//! Count source against real SQLite files and a real Postgres.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use retrain_adapters::counts::{open_count_source, CountOptions, WatermarkForm};
use retrain_core::domain::{FeedbackCounts, Label};
use retrain_core::ports::PortError;

use crate::pg;

const SEED_QUERY_SQLITE: &str = "SELECT label,
        SUM(CASE WHEN predicted <> corrected THEN 1 ELSE 0 END) AS misclassified,
        SUM(CASE WHEN predicted = corrected THEN 1 ELSE 0 END) AS correct
     FROM reviews WHERE reviewed_at > $1 GROUP BY label";

const SEED_QUERY_PG: &str = "SELECT label,
        count(*) FILTER (WHERE predicted <> corrected) AS misclassified,
        count(*) FILTER (WHERE predicted = corrected) AS correct
     FROM reviews WHERE reviewed_at > $1 GROUP BY label";

/// The per-label form: every label at its own watermark, one statement.
const PER_LABEL_QUERY_SQLITE: &str = "SELECT r.label,
        SUM(CASE WHEN r.predicted <> r.corrected THEN 1 ELSE 0 END) AS misclassified,
        SUM(CASE WHEN r.predicted = r.corrected THEN 1 ELSE 0 END) AS correct
     FROM json_each($1) AS w
     JOIN reviews r ON r.label = w.value ->> 'label' AND r.reviewed_at > w.value ->> 'since'
     GROUP BY r.label";

const PER_LABEL_QUERY_PG: &str = "SELECT r.label,
        count(*) FILTER (WHERE r.predicted <> r.corrected) AS misclassified,
        count(*) FILTER (WHERE r.predicted = r.corrected) AS correct
     FROM unnest($1::text[], $2::timestamptz[]) AS w(label, since)
     JOIN reviews r ON r.label = w.label AND r.reviewed_at > w.since
     GROUP BY r.label";

fn at(day: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 10, day, 12, 0, 0).unwrap()
}

fn counts(misclassified: u64, correct: u64) -> FeedbackCounts {
    FeedbackCounts {
        misclassified,
        correct,
    }
}

fn label(name: &str) -> Label {
    Label::new(name).unwrap()
}

/// Rows: dept 2 wrong + 1 right on day 1, 1 wrong on day 3; urgency 1 right on day 3.
const ROWS: &[(&str, &str, &str, u32)] = &[
    ("dept", "a", "b", 1),
    ("dept", "a", "c", 1),
    ("dept", "a", "a", 1),
    ("dept", "a", "b", 3),
    ("urgency", "x", "x", 3),
];

async fn sqlite_db(dir: &tempfile::TempDir) -> String {
    let url = format!("sqlite://{}/feedback.db", dir.path().display());
    let opts = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(dir.path().join("feedback.db"))
        .create_if_missing(true);
    let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
    sqlx::query(
        "CREATE TABLE reviews (label TEXT, predicted TEXT, corrected TEXT, reviewed_at TEXT)",
    )
    .execute(&pool)
    .await
    .unwrap();
    for (label, predicted, corrected, day) in ROWS {
        sqlx::query("INSERT INTO reviews VALUES (?, ?, ?, ?)")
            .bind(label)
            .bind(predicted)
            .bind(corrected)
            // What Python's isoformat() writes, as the seed's tables hold.
            .bind(at(*day).to_rfc3339_opts(chrono::SecondsFormat::Micros, false))
            .execute(&pool)
            .await
            .unwrap();
    }
    pool.close().await;
    url
}

async fn err_of(url: &str, query: &str) -> PortError {
    open_count_source(url, query, CountOptions::default())
        .await
        .unwrap()
        .counts(DateTime::<Utc>::UNIX_EPOCH)
        .await
        .unwrap_err()
}

#[tokio::test]
async fn sqlite_counts_since_the_watermark() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_db(&dir).await;
    let source = open_count_source(&url, SEED_QUERY_SQLITE, CountOptions::default())
        .await
        .unwrap();
    let all = source.counts(DateTime::<Utc>::UNIX_EPOCH).await.unwrap();
    assert_eq!(all[&label("dept")], counts(3, 1));
    assert_eq!(all[&label("urgency")], counts(0, 1));
    let recent = source.counts(at(2)).await.unwrap();
    assert_eq!(recent[&label("dept")], counts(1, 0));
    assert_eq!(recent.len(), 2);
    assert!(source.counts(at(4)).await.unwrap().is_empty());

    // `?` works as well as `$1`.
    let source = open_count_source(
        &url,
        &SEED_QUERY_SQLITE.replace("$1", "?"),
        CountOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        source.counts(at(2)).await.unwrap()[&label("dept")],
        counts(1, 0)
    );
}

#[tokio::test]
async fn sqlite_bad_results_name_the_column() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_db(&dir).await;
    let cases = [
        ("SELECT label AS lbl, 1 AS misclassified, 1 AS correct FROM reviews WHERE reviewed_at > $1", "no column `label`"),
        ("SELECT label, 1 AS wrong, 1 AS correct FROM reviews WHERE reviewed_at > $1", "no column `misclassified`"),
        ("SELECT label, 1 AS misclassified, 'many' AS correct FROM reviews WHERE reviewed_at > $1", "`correct` must be an integer, got TEXT"),
        ("SELECT label, 1.5 AS misclassified, 1 AS correct FROM reviews WHERE reviewed_at > $1", "`misclassified` must be an integer, got REAL"),
        ("SELECT label, -2 AS misclassified, 1 AS correct FROM reviews WHERE reviewed_at > $1", "`misclassified` is negative (-2) for label `dept`"),
        ("SELECT 'Not a label!' AS label, 1 AS misclassified, 1 AS correct WHERE $1 IS NOT NULL", "\"Not a label!\""),
        ("SELECT label, NULL AS misclassified, 1 AS correct FROM reviews WHERE reviewed_at > $1", "`misclassified` is NULL"),
    ];
    for (query, needle) in cases {
        let err = err_of(&url, query).await;
        assert!(
            matches!(err, PortError::InvalidResponse(_)),
            "{query}: {err:?}"
        );
        assert!(err.message().contains(needle), "{query}: {err}");
    }
}

#[tokio::test]
async fn sqlite_count_query_is_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_db(&dir).await;
    let err = err_of(
        &url,
        "DELETE FROM reviews WHERE reviewed_at > $1 RETURNING label, 1 AS misclassified, 1 AS correct",
    )
    .await;
    assert!(matches!(err, PortError::Denied(_)), "{err:?}");
    // Nothing was deleted.
    let source = open_count_source(&url, SEED_QUERY_SQLITE, CountOptions::default())
        .await
        .unwrap();
    assert_eq!(
        source.counts(DateTime::<Utc>::UNIX_EPOCH).await.unwrap()[&label("dept")],
        counts(3, 1)
    );
}

#[tokio::test]
async fn missing_sqlite_file_and_empty_query_are_config_errors() {
    let err = open_count_source(
        "sqlite:///nonexistent/x.db",
        SEED_QUERY_SQLITE,
        CountOptions::default(),
    )
    .await
    .err()
    .expect("opening should fail")
    .to_string();
    assert!(err.starts_with("counts.database:"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_db(&dir).await;
    let err = open_count_source(&url, "  ", CountOptions::default())
        .await
        .err()
        .expect("opening should fail")
        .to_string();
    assert!(err.starts_with("counts.query:"), "{err}");
}

fn watermarks(pairs: &[(&str, DateTime<Utc>)]) -> BTreeMap<Label, DateTime<Utc>> {
    pairs.iter().map(|(l, since)| (label(l), *since)).collect()
}

/// The per-label form against the shared one on the same rows: every label
/// counted at its own watermark by one statement, the same answers as one
/// statement per distinct watermark, and `counts(since)` binding every
/// configured label at that watermark.
async fn per_label_form_counts_every_label_at_its_own_watermark(
    url: &str,
    shared_query: &str,
    per_label_query: &str,
) {
    let per_label = open_count_source(
        url,
        per_label_query,
        CountOptions {
            form: WatermarkForm::PerLabel,
            labels: vec![label("dept"), label("urgency")],
            ..CountOptions::default()
        },
    )
    .await
    .unwrap();
    let shared = open_count_source(url, shared_query, CountOptions::default())
        .await
        .unwrap();
    let epoch = DateTime::<Utc>::UNIX_EPOCH;
    let cases = [
        // dept after day 2 (its day-3 row), urgency since the epoch.
        (
            watermarks(&[("dept", at(2)), ("urgency", epoch)]),
            vec![("dept", counts(1, 0)), ("urgency", counts(0, 1))],
        ),
        // dept since the epoch, urgency after its only row.
        (
            watermarks(&[("dept", epoch), ("urgency", at(4))]),
            vec![("dept", counts(3, 1))],
        ),
        // A label that is not asked for is not counted.
        (
            watermarks(&[("urgency", epoch)]),
            vec![("urgency", counts(0, 1))],
        ),
        (watermarks(&[]), vec![]),
    ];
    for (given, expected) in cases {
        let expected: BTreeMap<Label, FeedbackCounts> =
            expected.into_iter().map(|(l, c)| (label(l), c)).collect();
        assert_eq!(
            per_label.counts_per_label(&given).await.unwrap(),
            expected,
            "per-label form, {given:?}"
        );
        assert_eq!(
            shared.counts_per_label(&given).await.unwrap(),
            expected,
            "shared form, {given:?}"
        );
    }
    for since in [epoch, at(2), at(4)] {
        assert_eq!(
            per_label.counts(since).await.unwrap(),
            shared.counts(since).await.unwrap(),
            "counts({since})"
        );
    }
}

/// A query written for the other form is refused when the source opens,
/// naming the key and what the form binds.
async fn a_query_of_the_other_form_is_a_config_error(
    url: &str,
    shared_query: &str,
    per_label_query: &str,
) {
    let per_label = CountOptions {
        form: WatermarkForm::PerLabel,
        ..CountOptions::default()
    };
    for (query, options, needle) in [
        (shared_query, per_label.clone(), "per_label"),
        (per_label_query, CountOptions::default(), "per_label"),
    ] {
        let err = open_count_source(url, query, options)
            .await
            .err()
            .expect("opening should fail")
            .to_string();
        assert!(err.starts_with("counts.query:"), "{err}");
        assert!(err.contains(needle), "{err}");
    }
}

#[tokio::test]
async fn sqlite_per_label_form_counts_every_label_at_its_own_watermark() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_db(&dir).await;
    per_label_form_counts_every_label_at_its_own_watermark(
        &url,
        SEED_QUERY_SQLITE,
        PER_LABEL_QUERY_SQLITE,
    )
    .await;
    a_query_of_the_other_form_is_a_config_error(&url, SEED_QUERY_SQLITE, PER_LABEL_QUERY_SQLITE)
        .await;
}

#[tokio::test]
async fn postgres_per_label_form_counts_every_label_at_its_own_watermark() {
    let Some(url) = pg_db().await else { return };
    per_label_form_counts_every_label_at_its_own_watermark(&url, SEED_QUERY_PG, PER_LABEL_QUERY_PG)
        .await;
    a_query_of_the_other_form_is_a_config_error(&url, SEED_QUERY_PG, PER_LABEL_QUERY_PG).await;
}

async fn pg_db() -> Option<String> {
    let url = pg::fresh_database().await?;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query(
        "CREATE TABLE reviews (label TEXT, predicted TEXT, corrected TEXT, reviewed_at TIMESTAMPTZ)",
    )
    .execute(&pool)
    .await
    .unwrap();
    for (label, predicted, corrected, day) in ROWS {
        sqlx::query("INSERT INTO reviews VALUES ($1, $2, $3, $4)")
            .bind(label)
            .bind(predicted)
            .bind(corrected)
            .bind(at(*day))
            .execute(&pool)
            .await
            .unwrap();
    }
    pool.close().await;
    Some(url)
}

#[tokio::test]
async fn postgres_counts_since_the_watermark() {
    let Some(url) = pg_db().await else { return };
    let source = open_count_source(&url, SEED_QUERY_PG, CountOptions::default())
        .await
        .unwrap();
    let all = source.counts(DateTime::<Utc>::UNIX_EPOCH).await.unwrap();
    assert_eq!(all[&label("dept")], counts(3, 1));
    assert_eq!(all[&label("urgency")], counts(0, 1));
    let recent = source.counts(at(2)).await.unwrap();
    assert_eq!(recent[&label("dept")], counts(1, 0));
    assert!(source.counts(at(4)).await.unwrap().is_empty());
    // int4 columns are accepted as well as count()'s int8.
    let source = open_count_source(
        &url,
        "SELECT label, count(*)::int4 AS misclassified, 0::int2 AS correct FROM reviews WHERE reviewed_at > $1 GROUP BY label",
        CountOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        source.counts(at(2)).await.unwrap()[&label("dept")],
        counts(1, 0)
    );
}

#[tokio::test]
async fn postgres_bad_results_name_the_column() {
    let Some(url) = pg_db().await else { return };
    let cases = [
        ("SELECT label AS lbl, 1 AS misclassified, 1 AS correct FROM reviews WHERE reviewed_at > $1", "no column `label`"),
        ("SELECT label, 1 AS misclassified FROM reviews WHERE reviewed_at > $1", "no column `correct`"),
        ("SELECT label, 'x' AS misclassified, 1 AS correct FROM reviews WHERE reviewed_at > $1", "`misclassified` must be an integer, got TEXT"),
        ("SELECT label, sum(1::bigint) AS misclassified, 1 AS correct FROM reviews WHERE reviewed_at > $1 GROUP BY label", "got NUMERIC"),
        ("SELECT label, 1 AS misclassified, -5 AS correct FROM reviews WHERE reviewed_at > $1", "`correct` is negative (-5) for label `dept`"),
        ("SELECT 7 AS label, 1 AS misclassified, 1 AS correct FROM reviews WHERE reviewed_at > $1", "`label` must be text, got INT4"),
        ("SELECT 'two words' AS label, 1 AS misclassified, 1 AS correct FROM reviews WHERE reviewed_at > $1", "\"two words\""),
    ];
    for (query, needle) in cases {
        let err = err_of(&url, query).await;
        assert!(
            matches!(err, PortError::InvalidResponse(_)),
            "{query}: {err:?}"
        );
        assert!(err.message().contains(needle), "{query}: {err}");
    }
    // SQL errors name the database without its password.
    let err = err_of(&url, "SELECT nope FROM reviews WHERE reviewed_at > $1").await;
    assert!(matches!(err, PortError::Config(_)), "{err:?}");
    assert!(err.message().contains("nope"), "{err}");
}

#[tokio::test]
async fn postgres_count_query_is_read_only() {
    let Some(url) = pg_db().await else { return };
    let err = err_of(
        &url,
        "WITH gone AS (DELETE FROM reviews WHERE reviewed_at > $1 RETURNING label)
         SELECT label, 1 AS misclassified, 1 AS correct FROM gone",
    )
    .await;
    assert!(matches!(err, PortError::Denied(_)), "{err:?}");
    assert!(err.message().contains("read-only"), "{err}");
    let source = open_count_source(&url, SEED_QUERY_PG, CountOptions::default())
        .await
        .unwrap();
    assert_eq!(
        source.counts(DateTime::<Utc>::UNIX_EPOCH).await.unwrap()[&label("dept")],
        counts(3, 1)
    );
}

#[tokio::test]
async fn postgres_statement_timeout_stops_slow_queries() {
    let Some(url) = pg_db().await else { return };
    let source = open_count_source(
        &url,
        "SELECT 'dept' AS label, 1 AS misclassified, 1 AS correct FROM pg_sleep(10) WHERE $1::timestamptz IS NOT NULL",
        CountOptions {
            statement_timeout: Duration::from_millis(300),
            ..CountOptions::default()
        },
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let err = source
        .counts(DateTime::<Utc>::UNIX_EPOCH)
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(err, PortError::Failed(_)), "{err:?}");
    assert!(err.message().contains("statement_timeout"), "{err}");
}
