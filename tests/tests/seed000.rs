//! Seed 000 end to end: a real PostgreSQL reviews table over two labels, the
//! seed's environment names, a stateful fake Hugging Face Hub, and the
//! `retrain` binary. Needs `RETRAIN_TEST_POSTGRES_URL` (scripts/test.sh
//! starts a throwaway cluster); unset → skipped locally, failure under CI.

use std::time::Duration;

use retrain_tests::services::fresh_postgres_database;
use retrain_tests::{label_status, FakeHub, Project, Ran};
use serde_json::json;
use sqlx::Connection;

const TOKEN: &str = "hf_e2e_super_secret_token_42";
const PREPARE: &str = "owner/project_prepare_dataset";
const DEPT_SPACE: &str = "owner/project_retrain_dept";
const URGENCY_SPACE: &str = "owner/project_retrain_urgency";
const DEPT_DATA: &str = "owner/project_department";
const URGENCY_DATA: &str = "owner/project_urgency";
const FILE: &str = "dataset_metadata.json";

const COUNT_QUERY: &str = "SELECT label, \
    COUNT(*) FILTER (WHERE predicted <> corrected) AS misclassified, \
    COUNT(*) FILTER (WHERE predicted = corrected) AS correct \
    FROM reviews WHERE reviewed_at > $1 GROUP BY label";

/// A fresh database with the seed's reviews: `department` above its
/// threshold (30 misclassified + 30 correct = 60 >= 40), `urgency` below
/// (5 + 5 = 10 < 30); `None` (skipped) without Postgres.
async fn reviews_database() -> Option<String> {
    let url = fresh_postgres_database().await?;
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query(
        "CREATE TABLE reviews (id serial PRIMARY KEY, label text NOT NULL, predicted text NOT NULL, \
         corrected text NOT NULL, reviewed_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    for (label, wrong, right) in [("department", 30, 30), ("urgency", 5, 5)] {
        sqlx::query(
            "INSERT INTO reviews (label, predicted, corrected) \
             SELECT $1, 'a', CASE WHEN g <= $2 THEN 'b' ELSE 'a' END FROM generate_series(1, $3) g",
        )
        .bind(label)
        .bind(wrong)
        .bind(wrong + right)
        .execute(&mut conn)
        .await
        .unwrap();
    }
    Some(url)
}

fn metadata(tag: &str, n: u64) -> serde_json::Value {
    json!({"dataset_name": DEPT_DATA, "version_tag": tag, "num_samples": n,
           "splits": {"train": n}, "created_at": "2030-01-01T00:00:00+00:00"})
}

async fn fake_hub() -> FakeHub {
    let hub = FakeHub::start_with_token(TOKEN).await;
    for space in [PREPARE, DEPT_SPACE, URGENCY_SPACE] {
        hub.add_space(space, "RUNNING");
    }
    hub.add_dataset(DEPT_DATA, FILE, Some(metadata("v20251030_115250", 20)));
    hub.add_dataset(URGENCY_DATA, FILE, Some(metadata("v20251030_115250", 20)));
    hub
}

/// The seed's world: the reviews database, the fake Hub and the seed's
/// environment; `None` (skipped) without Postgres.
async fn seed_world() -> Option<(FakeHub, Vec<(String, String)>)> {
    let database = reviews_database().await?;
    let hub = fake_hub().await;
    let env = seed_env(&hub, &database, &database);
    Some((hub, env))
}

/// The prepare Space publishes `tag` (`samples` samples) to the department
/// dataset `delay` after its restart.
fn publish_on_restart(hub: &FakeHub, tag: &str, samples: u64, delay: Duration) {
    hub.on_restart_publish(PREPARE, DEPT_DATA, FILE, metadata(tag, samples), delay);
}

/// The seed's environment, nothing else.
fn seed_env(hub: &FakeHub, database: &str, state: &str) -> Vec<(String, String)> {
    let psycopg = database.replacen("postgres://", "postgresql+psycopg2://", 1);
    [
        ("HF_TOKEN", TOKEN.to_string()),
        ("HF_ENDPOINT", hub.uri()),
        ("DATABASE_URL", psycopg),
        ("PREPARE_DATASET_REPO", PREPARE.into()),
        ("RETRAIN_DEPT_REPO", DEPT_SPACE.into()),
        ("RETRAIN_URGENCY_REPO", URGENCY_SPACE.into()),
        ("HF_HUB_METADATA_DEPT", hub.metadata_url(DEPT_DATA, FILE)),
        (
            "HF_HUB_METADATA_URGENCY",
            hub.metadata_url(URGENCY_DATA, FILE),
        ),
        ("THRESHOLD_DEPARTMENT", "40".into()),
        ("THRESHOLD_URGENCY", "30".into()),
        ("POLL_INTERVAL", "0.2".into()),
        ("POLL_TIMEOUT", "20".into()),
        ("RETRAIN_COUNTS__QUERY", COUNT_QUERY.into()),
        ("RETRAIN_STATE", state.into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Run the binary in a fresh directory with only the seed's environment
/// (and logs at `debug`).
async fn retrain(env: Vec<(String, String)>, args: &[&str]) -> Ran {
    let project = Project::new();
    let mut command = project.retrain();
    command.env("RETRAIN_LOG", "debug").envs(env).args(args);
    let ran = Ran::finished(command).await;
    ran.assert_hides(TOKEN);
    ran
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_000_scenario() {
    let Some((hub, env)) = seed_world().await else {
        return;
    };
    publish_on_restart(&hub, "v20251101_000000", 60, Duration::from_millis(600));

    // DRY_RUN=true: reads only, zero POSTs.
    let mut dry = env.clone();
    dry.push(("DRY_RUN".into(), "true".into()));
    let ran = retrain(dry, &["--output", "json", "run"]).await;
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let r = ran.json();
    assert_eq!(label_status(&r, "department"), "planned");
    assert_eq!(label_status(&r, "urgency"), "skipped");
    assert_eq!(hub.posts(), 0, "a dry run sent POSTs");

    // The real run.
    let ran = retrain(env.clone(), &["--output", "json", "run"]).await;
    assert_eq!(ran.code, 0, "{}\n{}", ran.stdout, ran.stderr);
    let r = ran.json();
    assert_eq!(label_status(&r, "department"), "trained", "{r}");
    assert_eq!(label_status(&r, "urgency"), "skipped", "{r}");
    assert_eq!(
        hub.restarts(PREPARE),
        1,
        "prepare Space restarted exactly once"
    );
    assert_eq!(
        hub.variables(DEPT_SPACE)
            .get("DATASET_VERSION")
            .map(String::as_str),
        Some("v20251101_000000")
    );
    assert_eq!(hub.restarts(DEPT_SPACE), 1);
    assert_eq!(
        hub.restarts(URGENCY_SPACE),
        0,
        "urgency is below its threshold"
    );
    assert!(
        ran.stderr.contains("current_len="),
        "progress lines: {}",
        ran.stderr
    );

    // A second run: nothing new since the consumed dataset.
    let ran = retrain(env.clone(), &["--output", "json", "run"]).await;
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let r = ran.json();
    assert_eq!(label_status(&r, "department"), "skipped", "{r}");
    assert_eq!(hub.restarts(PREPARE), 1);
    assert_eq!(hub.restarts(DEPT_SPACE), 1);

    // Status and history come from the Postgres RunStore.
    let ran = retrain(env, &["--output", "json", "status"]).await;
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    assert!(ran.stdout.contains("v20251101_000000"), "{}", ran.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_stage_on_the_prepare_space_fails_fast() {
    let Some((hub, mut env)) = seed_world().await else {
        return;
    };
    hub.set_restart_stages(PREPARE, &["BUILDING", "BUILD_ERROR"]);
    hub.set_error_message(PREPARE, "pip install failed");
    env.push(("POLL_TIMEOUT".into(), "600".into()));
    let started = std::time::Instant::now();
    let ran = retrain(env, &["--output", "json", "run", "--label", "department"]).await;
    assert_eq!(ran.code, 1, "a failed label exits 1: {}", ran.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "waited for POLL_TIMEOUT"
    );
    let r = ran.json();
    assert_eq!(label_status(&r, "department"), "failed");
    assert!(ran.stdout.contains("BUILD_ERROR"), "{}", ran.stdout);
    assert_eq!(hub.restarts(DEPT_SPACE), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_version_tag_is_never_accepted() {
    let Some((hub, mut env)) = seed_world().await else {
        return;
    };
    // The prepare job "publishes" the same version_tag with plenty of samples.
    publish_on_restart(
        &hub,
        "v20251030_115250",
        100_000,
        Duration::from_millis(100),
    );
    env.push(("POLL_TIMEOUT".into(), "2".into()));
    let ran = retrain(env, &["--output", "json", "run", "--label", "department"]).await;
    assert_eq!(ran.code, 1, "{}", ran.stderr);
    let r = ran.json();
    assert_eq!(label_status(&r, "department"), "failed");
    assert!(ran.stdout.contains("timed out"), "{}", ran.stdout);
    assert_eq!(
        hub.restarts(DEPT_SPACE),
        0,
        "trained on an unchanged version"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_postgres_drive_each_label_once() {
    let Some((hub, env)) = seed_world().await else {
        return;
    };
    publish_on_restart(&hub, "v20251101_000000", 60, Duration::from_millis(1500));
    let (a, b) = tokio::join!(
        retrain(env.clone(), &["--output", "json", "run"]),
        retrain(env.clone(), &["--output", "json", "run"])
    );
    assert_eq!(a.code, 0, "{}", a.stderr);
    assert_eq!(b.code, 0, "{}", b.stderr);
    let statuses = [
        label_status(&a.json(), "department"),
        label_status(&b.json(), "department"),
    ];
    assert!(statuses.contains(&"trained".to_string()), "{statuses:?}");
    assert!(
        statuses.contains(&"busy".to_string()) || statuses.contains(&"skipped".to_string()),
        "{statuses:?}"
    );
    assert_eq!(hub.restarts(PREPARE), 1);
    assert_eq!(hub.restarts(DEPT_SPACE), 1);
}
