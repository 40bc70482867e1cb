//! The process-level fault campaign: abort the real `retrain` binary at
//! every failpoint (after every journal write, and between every side
//! effect and its journal write), rerun it without the failpoint, and check
//! that the final store and the outside world are exactly those of an
//! uninterrupted run.
//!
//! The cycle has three labels: `department` and `urgency` share one prepare
//! command (counts-triggered, gate "none"); `intent` is metadata-triggered,
//! leased on an EC2 instance (moto), gated against a JSON registry and
//! notified to a webhook. It runs on SQLite and, when
//! `RETRAIN_TEST_POSTGRES_URL` is set, on Postgres. EC2 needs
//! `RETRAIN_TEST_MOTO_URL`: unset → skipped locally, failure under CI=true.
//!
//! `docs/RELIABILITY.md` holds the resulting table (failpoints × stores).

use std::collections::BTreeMap;

use retrain_adapters::ec2::{Ec2Client, InstanceState};
use retrain_adapters::http::HttpPolicy;
use retrain_tests::services::{
    fresh_postgres_database, moto_env, moto_settings, service_url, stopped_instance, MOTO_VAR,
    POSTGRES_VAR,
};
use retrain_tests::{Project, Ran};
use serde_json::Value;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

/// Every failpoint this cycle reaches, in the order it reaches them.
const FAILPOINTS: &[&str] = &[
    "after-journal:started",
    "after-journal:counts_read",
    "after-journal:published_read",
    "after-effect:restart_prepare",
    "after-journal:prepare_restarted",
    "after-journal:polled",
    "after-effect:acquire_lease",
    "after-journal:lease_acquired",
    "after-effect:start_training",
    "after-journal:training_started",
    "after-journal:training_finished",
    "after-journal:baseline_read",
    "after-effect:promote",
    "after-journal:promoted",
    "after-effect:release_lease",
    "after-journal:lease_released",
    "after-effect:notify",
    "after-journal:notified",
    "after-journal:committed",
];

const PREPARE_PY: &str = r#"
import json, os, datetime, time
os.makedirs("effects", exist_ok=True)
with open("effects/restarts.log", "a") as f:
    f.write("restart\n")
n = sum(1 for _ in open("effects/restarts.log"))
time.sleep(0.2)
os.makedirs("datasets", exist_ok=True)
tmp = "datasets/.meta.tmp"
with open(tmp, "w") as f:
    json.dump({"dataset_name": "tickets", "version_tag": "v%d" % (n + 1), "num_samples": 1000,
               "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat()}, f)
os.replace(tmp, "datasets/dataset_metadata.json")
"#;

const TRAIN_PY: &str = r#"
import json, os, time
os.makedirs("effects", exist_ok=True)
with open("effects/trainings.log", "a") as f:
    f.write("%s %s\n" % (os.environ["RETRAIN_LABEL"], os.environ["RETRAIN_DATASET_VERSION"]))
time.sleep(0.3)
with open(os.environ["RETRAIN_RESULT"], "w") as f:
    json.dump({"candidate": "cand-" + os.environ["RETRAIN_LABEL"], "metrics": {"accuracy": 0.9}}, f)
"#;

const SEED_PY: &str = r#"
import sqlite3
db = sqlite3.connect("feedback.db")
db.execute("CREATE TABLE reviews (label TEXT, predicted TEXT, corrected TEXT, reviewed_at TEXT)")
for label in ("department", "urgency"):
    for i in range(60):
        db.execute("INSERT INTO reviews VALUES (?, 'a', 'b', '2026-01-01T00:00:00Z')", (label,))
db.commit()
"#;

/// One scenario directory: config, programs, feedback, effects.
struct Scenario {
    project: Project,
    instance: String,
}

impl Scenario {
    async fn new(ec2: &Ec2Client, state: &str, webhook: &str) -> Self {
        let project = Project::new();
        project
            .write("prepare.py", PREPARE_PY)
            .write("train.py", TRAIN_PY)
            .write("seed.py", SEED_PY)
            .write(
                "datasets/intent_metadata.json",
                r#"{"dataset_name": "intents", "version_tag": "i1", "num_samples": 300, "created_at": "2026-01-02T00:00:00Z"}"#,
            )
            .python(&["seed.py"]);
        let instance = stopped_instance(ec2).await;
        project.config(&format!(
            r#"
state = "{state}"
state_dir = ".retrain"
lock_ttl = "30s"

[counts]
database = "sqlite://feedback.db"
query = "SELECT label, SUM(CASE WHEN predicted <> corrected THEN 1 ELSE 0 END) AS misclassified, SUM(CASE WHEN predicted = corrected THEN 1 ELSE 0 END) AS correct FROM reviews WHERE julianday(reviewed_at) > julianday($1) GROUP BY label"

[poll]
interval = "100ms"
timeout = "1m"

[prepare]
command = ["python3", "prepare.py"]

[labels.department]
threshold = 40
metadata = "file://datasets/dataset_metadata.json"
trainer = {{ command = ["python3", "train.py"], timeout = "2m" }}
gate = "none"

[labels.urgency]
threshold = 40
metadata = "file://datasets/dataset_metadata.json"
trainer = {{ command = ["python3", "train.py"], timeout = "2m" }}
gate = "none"

[labels.intent]
threshold = 100
counts = "none"
prepare = "none"
metadata = "file://datasets/intent_metadata.json"
trainer = {{ command = ["python3", "train.py"], timeout = "2m" }}
lease = {{ ec2 = ["{instance}"], region = "us-east-1", max = "1h" }}
registry = {{ json = "registry.json", model = "intents" }}
gate = {{ metrics = [{{ name = "accuracy", direction = "higher" }}] }}
notify = [{{ webhook = "{webhook}", on = "always" }}]
"#
        ));
        Self { project, instance }
    }

    fn retrain(&self, moto: &str, failpoint: Option<&str>) -> Ran {
        let mut command = self.project.retrain();
        command
            .envs(moto_env(moto))
            .args(["--output", "json", "run"]);
        if let Some(failpoint) = failpoint {
            command.env("RETRAIN_FAILPOINT", failpoint);
        }
        Ran::now(command)
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut command = self.project.retrain();
        command.args(["--output", "json"]).args(args);
        Ran::now(command).assert_code(0).json()
    }
}

/// What an uninterrupted run leaves behind, compared across runs.
#[derive(Debug, PartialEq)]
struct Outcome {
    /// Per label: last consumed version, and the outcomes of its runs that
    /// did something (a rerun after a completed run skips: not counted).
    labels: BTreeMap<String, (Value, Vec<String>)>,
    restarts: usize,
    /// Trainings started per label.
    trainings: BTreeMap<String, usize>,
    /// Registry versions of the `intents` model and production's candidate.
    promotions: usize,
    production: Value,
    notifications: usize,
    instance: InstanceState,
}

async fn outcome(scenario: &Scenario, ec2: &Ec2Client, webhook: &MockServer) -> Outcome {
    let status = scenario.json(&["status"]);
    let runs = scenario.json(&["runs", "--limit", "100"]);
    let labels = status
        .as_array()
        .unwrap_or_else(|| panic!("status is not a list of labels: {status}"))
        .iter()
        .map(|l| {
            let name = l["label"].as_str().unwrap().to_owned();
            let mut outcomes: Vec<String> = runs
                .as_array()
                .unwrap_or_else(|| panic!("runs is not a list: {runs}"))
                .iter()
                .filter(|r| r["label"] == name.as_str() && r["outcome"] != "skipped")
                .map(|r| format!("{} ({})", r["outcome"], r["stage"]))
                .collect();
            outcomes.sort();
            (name, (l["last_version"].clone(), outcomes))
        })
        .collect();
    let mut trainings = BTreeMap::new();
    for line in scenario.project.lines("effects/trainings.log") {
        let label = line.split(' ').next().unwrap().to_owned();
        *trainings.entry(label).or_insert(0) += 1;
    }
    let registry: Value =
        serde_json::from_str(&scenario.project.read("registry.json")).unwrap_or(Value::Null);
    let model = &registry["models"]["intents"];
    // Notifications carry a stable delivery key: a repeat after a crash
    // between sending and journaling is the same delivery (at-least-once,
    // deduplicated by key).
    let mut deliveries: Vec<String> = webhook
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .filter(|r| r.url.path() == format!("/{}", scenario.instance))
        .map(|r| {
            r.headers
                .get("idempotency-key")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_else(|| String::from_utf8_lossy(&r.body).into_owned())
        })
        .collect();
    deliveries.sort();
    deliveries.dedup();
    Outcome {
        labels,
        restarts: scenario.project.lines("effects/restarts.log").len(),
        trainings,
        promotions: model["versions"].as_array().map_or(0, Vec::len),
        production: model["production"].clone(),
        notifications: deliveries.len(),
        instance: ec2
            .describe_instances(std::slice::from_ref(&scenario.instance))
            .await
            .unwrap()
            .remove(0)
            .state,
    }
}

/// SIGABRT: how a failpoint ends the process.
const ABORTED: Option<i32> = Some(6);

async fn campaign(store: &str) {
    let Some(moto) = service_url(MOTO_VAR) else {
        return;
    };
    let postgres = store == "postgres";
    if postgres && service_url(POSTGRES_VAR).is_none() {
        return;
    }
    let ec2 = Ec2Client::new(&moto_settings(&moto), HttpPolicy::fast_for_tests()).unwrap();
    let state = || async {
        if postgres {
            fresh_postgres_database().await.expect("checked above")
        } else {
            "sqlite://.retrain/state.db".to_owned()
        }
    };

    // The reference: one uninterrupted run.
    let webhook = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&webhook)
        .await;
    let reference = {
        let url = format!("{}/placeholder", webhook.uri());
        let scenario = Scenario::new(&ec2, &state().await, &url).await;
        rewrite_webhook(&scenario, &webhook);
        scenario.retrain(&moto, None).assert_code(0);
        outcome(&scenario, &ec2, &webhook).await
    };
    assert_eq!(reference.restarts, 1, "{reference:?}");
    assert_eq!(reference.promotions, 1, "{reference:?}");
    assert_eq!(reference.notifications, 1, "{reference:?}");
    assert_eq!(reference.instance, InstanceState::Stopped, "{reference:?}");
    assert_eq!(
        reference.trainings.values().sum::<usize>(),
        3,
        "{reference:?}"
    );

    let mut table = Vec::new();
    for failpoint in FAILPOINTS {
        let scenario = Scenario::new(&ec2, &state().await, "http://unused").await;
        rewrite_webhook(&scenario, &webhook);
        let crashed = scenario.retrain(&moto, Some(failpoint));
        assert_eq!(
            crashed.signal, ABORTED,
            "{store}: failpoint {failpoint} was never reached (exit {})\n{}",
            crashed.code, crashed.stderr
        );
        let resumed = scenario.retrain(&moto, None);
        assert_eq!(
            resumed.code, 0,
            "{store}: rerun after {failpoint} failed: {}\n{}",
            resumed.stdout, resumed.stderr
        );
        let after = outcome(&scenario, &ec2, &webhook).await;
        assert_eq!(after, reference, "{store}: after failpoint {failpoint}");
        table.push(*failpoint);
    }
    eprintln!(
        "fault campaign on {store}: {} failpoints, every final state identical to the uninterrupted run: {table:?}",
        table.len()
    );
}

/// Point the `intent` label's webhook at a path unique to this scenario
/// (its instance id), so deliveries of different scenarios are told apart.
fn rewrite_webhook(scenario: &Scenario, webhook: &MockServer) {
    let config = scenario.project.read("retrain.toml");
    let start = config.find("webhook = \"").unwrap() + "webhook = \"".len();
    let end = start + config[start..].find('"').unwrap();
    let updated = format!(
        "{}{}/{}{}",
        &config[..start],
        webhook.uri(),
        scenario.instance,
        &config[end..]
    );
    scenario.project.config(&updated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failpoint_resumes_to_the_uninterrupted_outcome_on_sqlite() {
    campaign("sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failpoint_resumes_to_the_uninterrupted_outcome_on_postgres() {
    campaign("postgres").await;
}
