//! Seeds 001/002 end to end: dataset metadata in (moto) S3 → lease a (moto)
//! EC2 instance → a training command that logs a run to a real `mlflow
//! server` → gate Dice + IoU against production → promote → instance
//! stopped on every path → GitHub comment (wiremock) only when improved.
//!
//! Needs RETRAIN_TEST_MOTO_URL, RETRAIN_TEST_MLFLOW_URL and RETRAIN_VENV
//! (scripts/test.sh); unset → skipped locally, failure under CI=true.

use std::time::Duration;

use retrain_adapters::aws::AwsSettings;
use retrain_adapters::ec2::{Ec2Client, InstanceState};
use retrain_adapters::http::HttpPolicy;
use retrain_tests::routes::json_route;
use retrain_tests::services::{
    dataset_metadata, moto_env, moto_settings, s3_put, service_url, stopped_instance, unique_name,
    MLFLOW_VAR, MOTO_SECRET_KEY, MOTO_VAR, VENV_VAR,
};
use retrain_tests::{Project, Ran};
use serde_json::{json, Value};
use wiremock::MockServer;

const GITHUB_TOKEN: &str = "ghp_e2e_secret_token_do_not_print";

struct Services {
    moto: String,
    mlflow: String,
    python: String,
}

/// moto, mlflow and the venv they run from (whose `python` has the
/// libraries the training program needs), or `None` (skipped).
fn services() -> Option<Services> {
    Some(Services {
        moto: service_url(MOTO_VAR)?,
        mlflow: service_url(MLFLOW_VAR)?,
        python: format!("{}/bin/python", service_url(VENV_VAR)?),
    })
}

fn metadata(version: &str, samples: u64) -> Vec<u8> {
    serde_json::to_vec(&dataset_metadata("wms", version, samples)).unwrap()
}

async fn state(client: &Ec2Client, id: &str) -> InstanceState {
    client
        .describe_instances(&[id.to_owned()])
        .await
        .unwrap()
        .remove(0)
        .state
}

/// The training program: logs a run with dice/iou to MLflow over REST and
/// reports it through $RETRAIN_RESULT. `SLEEP` makes it slow; `FAIL` fails it.
const TRAIN_PY: &str = r#"
import json, os, sys, time, urllib.request
def call(path, body):
    req = urllib.request.Request(os.environ["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/" + path,
        data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req))
if os.environ.get("FAIL"):
    print("training diverged: loss is NaN", file=sys.stderr); sys.exit(3)
time.sleep(float(os.environ.get("SLEEP", "0")))
assert os.environ["RETRAIN_HOST"], "RETRAIN_HOST must be set under a lease"
try:
    exp_id = call("experiments/create", {"name": os.environ["EXPERIMENT"]})["experiment_id"]
except Exception:
    q = urllib.request.urlopen(os.environ["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=" + os.environ["EXPERIMENT"])
    exp_id = json.load(q)["experiment"]["experiment_id"]
run = call("runs/create", {"experiment_id": exp_id, "run_name": "retrain-" + os.environ["RETRAIN_DATASET_VERSION"]})["run"]
run_id = run["info"]["run_id"]
dice, iou = float(os.environ["DICE"]), float(os.environ["IOU"])
call("runs/log-batch", {"run_id": run_id, "metrics": [
    {"key": "dice", "value": dice, "timestamp": 0, "step": 0},
    {"key": "iou", "value": iou, "timestamp": 0, "step": 0}]})
call("runs/update", {"run_id": run_id, "status": "FINISHED"})
json.dump({"candidate": run_id, "metrics": {"dice": dice, "iou": iou}}, open(os.environ["RETRAIN_RESULT"], "w"))
"#;

struct Scenario {
    project: Project,
    services: Services,
    bucket: String,
    instance: String,
    model: String,
    github: MockServer,
    ec2: Ec2Client,
    aws: AwsSettings,
}

impl Scenario {
    async fn new() -> Option<Self> {
        let services = services()?;
        let aws = moto_settings(&services.moto);
        let ec2 = Ec2Client::new(&aws, HttpPolicy::fast_for_tests()).unwrap();
        let instance = stopped_instance(&ec2).await;
        let bucket = unique_name("wms");
        s3_put(&aws, &services.moto, &bucket, b"").await;
        s3_put(
            &aws,
            &services.moto,
            &format!("{bucket}/wms/dataset_metadata.json"),
            &metadata("v1", 200),
        )
        .await;
        let github = MockServer::start().await;
        json_route("GET", "/repos/acme/wms/issues/7/comments", 200, json!([]))
            .mount(&github)
            .await;
        json_route(
            "POST",
            "/repos/acme/wms/issues/7/comments",
            201,
            json!({"id": 555, "body": ""}),
        )
        .mount(&github)
        .await;
        let project = Project::new();
        project.write("train.py", TRAIN_PY);
        Some(Self {
            project,
            services,
            bucket,
            instance,
            model: unique_name("wms-unet"),
            github,
            ec2,
            aws,
        })
    }

    fn config(&self, dice: f64, iou: f64, extra_env: &str, timeout: &str) -> String {
        format!(
            r#"
state = "sqlite://state.db"
lock_ttl = "2s"
[labels.segmentation]
threshold = 50
counts = "none"
metadata = "s3://{bucket}/wms/dataset_metadata.json"
trainer = {{ command = ["{python}", "train.py"], timeout = "{timeout}", env = {{ MLFLOW_TRACKING_URI = "{mlflow}", EXPERIMENT = "{model}", DICE = "{dice}", IOU = "{iou}"{extra_env} }} }}
lease = {{ ec2 = ["{instance}"], region = "us-east-1", max = "1h" }}
registry = {{ mlflow = "{mlflow}", model = "{model}", alias = "production" }}
gate = {{ require = "all", metrics = [ {{ name = "dice", direction = "higher" }}, {{ name = "iou", direction = "higher" }} ] }}
notify = [ {{ github = "acme/wms", on = "improved", issue = 7 }} ]
"#,
            bucket = self.bucket,
            python = self.services.python,
            mlflow = self.services.mlflow,
            model = self.model,
            instance = self.instance,
        )
    }

    fn command(&self, config: &str) -> std::process::Command {
        self.project.config(config);
        let mut command = self.project.retrain();
        command
            .envs(moto_env(&self.services.moto))
            .env("GITHUB_TOKEN", GITHUB_TOKEN)
            .env("GITHUB_API_URL", self.github.uri());
        command
    }

    async fn run(&self, config: String, args: &[&str]) -> (i32, Value, String) {
        let mut command = self.command(&config);
        command.args(["--output", "json"]).args(args);
        let ran = Ran::finished(command).await;
        ran.assert_hides(GITHUB_TOKEN).assert_hides(MOTO_SECRET_KEY);
        let report = serde_json::from_str(&ran.stdout).unwrap_or(Value::Null);
        (ran.code, report, ran.stderr)
    }

    async fn publish(&self, version: &str, samples: u64) {
        s3_put(
            &self.aws,
            &self.services.moto,
            &format!("{}/wms/dataset_metadata.json", self.bucket),
            &metadata(version, samples),
        )
        .await;
    }

    async fn github_writes(&self) -> usize {
        self.github
            .received_requests()
            .await
            .unwrap()
            .iter()
            .filter(|r| r.method.as_str() != "GET")
            .count()
    }

    async fn production_version(&self) -> Option<String> {
        let url = format!(
            "{}/api/2.0/mlflow/registered-models/alias?name={}&alias=production",
            self.services.mlflow, self.model
        );
        let response = reqwest::get(url).await.unwrap();
        if !response.status().is_success() {
            return None;
        }
        let body: Value = response.json().await.unwrap();
        body["model_version"]["version"].as_str().map(str::to_owned)
    }
}

fn status(report: &Value) -> String {
    report["labels"][0]["status"]
        .as_str()
        .unwrap_or("?")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_001_promote_then_reject_instance_always_stopped() {
    let Some(s) = Scenario::new().await else {
        return;
    };

    // First model: no production model → first-model policy passes.
    let (code, report, stderr) = s.run(s.config(0.80, 0.70, "", "2m"), &["run"]).await;
    assert_eq!(code, 0, "{report}\n{stderr}");
    assert_eq!(status(&report), "promoted", "{report}\n{stderr}");
    assert_eq!(s.production_version().await.as_deref(), Some("1"));
    assert_eq!(state(&s.ec2, &s.instance).await, InstanceState::Stopped);
    assert_eq!(
        s.github_writes().await,
        1,
        "one comment for the improvement"
    );

    // Nothing new: skipped, the instance is not even started.
    let (code, report, _) = s.run(s.config(0.80, 0.70, "", "2m"), &["run"]).await;
    assert_eq!(code, 0);
    assert_eq!(status(&report), "skipped", "{report}");

    // New data, worse model: rejected, nothing promoted, stopped, PR untouched.
    s.publish("v2", 400).await;
    let (code, report, stderr) = s.run(s.config(0.79, 0.75, "", "2m"), &["run"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(status(&report), "rejected", "{report}");
    let verdict = &report["labels"][0]["verdict"];
    assert!(
        verdict["reason"].as_str().unwrap().contains("dice"),
        "{verdict}"
    );
    assert_eq!(s.production_version().await.as_deref(), Some("1"));
    assert_eq!(state(&s.ec2, &s.instance).await, InstanceState::Stopped);
    assert_eq!(
        s.github_writes().await,
        1,
        "no comment without an improvement"
    );

    // `--fail-on-reject` makes a reject visible to CI.
    s.publish("v3", 600).await;
    let (code, report, _) = s
        .run(s.config(0.10, 0.10, "", "2m"), &["run", "--fail-on-reject"])
        .await;
    assert_eq!(status(&report), "rejected");
    assert_eq!(code, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_instance_is_stopped_after_a_failing_trainer_and_a_timeout() {
    let Some(s) = Scenario::new().await else {
        return;
    };
    let (code, report, stderr) = s
        .run(s.config(0.9, 0.9, ", FAIL = \"1\"", "2m"), &["run"])
        .await;
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(status(&report), "failed");
    let error = report["labels"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("training diverged"),
        "stderr tail in the error: {error}"
    );
    assert_eq!(state(&s.ec2, &s.instance).await, InstanceState::Stopped);

    let (code, report, stderr) = s
        .run(s.config(0.9, 0.9, ", SLEEP = \"30\"", "2s"), &["run"])
        .await;
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(status(&report), "failed");
    assert!(
        report["labels"][0]["error"]
            .as_str()
            .unwrap()
            .contains("timed out"),
        "{report}"
    );
    assert_eq!(state(&s.ec2, &s.instance).await, InstanceState::Stopped);
    assert_eq!(s.github_writes().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_orchestrator_leaks_no_instance_after_reap() {
    let Some(s) = Scenario::new().await else {
        return;
    };
    let config = s.config(0.9, 0.9, ", SLEEP = \"60\"", "5m");
    let mut child = s.command(&config).arg("run").spawn().unwrap();
    // Wait until the lease started the instance.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while state(&s.ec2, &s.instance).await != InstanceState::Running {
        assert!(
            std::time::Instant::now() < deadline,
            "instance never started"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    child.kill().unwrap(); // SIGKILL: no cleanup at all
    child.wait().unwrap();
    assert_eq!(
        state(&s.ec2, &s.instance).await,
        InstanceState::Running,
        "still running after kill -9"
    );

    // The lock of the dead process expires (lock_ttl = 2s), then reap stops it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (code, reaped, stderr) = s.run(config.clone(), &["infra", "reap"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(reaped.as_array().map(Vec::len), Some(1), "{reaped}");
    assert_eq!(state(&s.ec2, &s.instance).await, InstanceState::Stopped);
}
