//! The HTTP API over a real `Application` (SQLite; the Postgres variants
//! are in `replicas.rs`).

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{entry, spawn_app, SseClient, Store, ADMIN, READER, TRIGGER};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_right_token_nothing_happens() {
    let (workspace, app) = spawn_app(Store::Sqlite).await;
    // Open probes.
    let health = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);

    let body = json!({"labels": ["intent"]});
    let attempts = [
        (None, 401, "unauthorized"),
        (Some("wrong-token-0123456789"), 401, "unauthorized"),
        (Some(READER), 403, "forbidden"),
    ];
    for (token, status, code) in attempts {
        let mut request = app.client.post(app.url("/v1/runs")).json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), status, "{token:?}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], code, "{error}");
        assert!(!error.to_string().contains("0123456789"), "{error}");
    }
    // Reads need a token too; approving needs the approve scope.
    for path in ["/v1/runs", "/v1/labels", "/v1/events"] {
        let response = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 401, "{path}");
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
    }
    let response = app
        .post("/v1/runs/some-run/approve", TRIGGER)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    let response = app
        .post("/v1/runs/some-run/reject", READER)
        .json(&json!({"reason": "no"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);

    tokio::time::sleep(Duration::from_millis(300)).await;
    let store = workspace.store().await;
    assert_eq!(store.journal_end().await.unwrap(), 0, "the journal changed");
    assert!(store
        .list_runs(&Default::default())
        .await
        .unwrap()
        .is_empty());
    assert_eq!(workspace.starts("intent"), 0);
    app.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_triggers_drive_a_label_once() {
    let (workspace, app) = spawn_app(Store::Sqlite).await;
    workspace.slow("intent", 2);
    let (a, b) = tokio::join!(app.trigger(&["intent"]), app.trigger(&["intent"]));
    let statuses = [entry(&a, "intent"), entry(&b, "intent")];
    let started: Vec<&&Value> = statuses
        .iter()
        .filter(|e| e["status"] == "started")
        .collect();
    let busy: Vec<&&Value> = statuses
        .iter()
        .filter(|e| e["status"] == "already_running")
        .collect();
    assert_eq!((started.len(), busy.len()), (1, 1), "{a} {b}");
    assert!(busy[0]["run_id"].is_null());
    assert_eq!(a["triggered_by"], "ci");
    let run_id = started[0]["run_id"].as_str().unwrap().to_owned();
    let done = app.wait_stage(&run_id, &["done"]).await;
    assert_eq!(done["run"]["outcome"], "trained", "{done}");
    assert_eq!(workspace.starts("intent"), 1);
    // The run is listed, shown with its journal and manifest, and in Markdown.
    assert!(done["journal"].as_array().unwrap().len() > 3);
    assert_eq!(done["manifest"]["run_id"], run_id.as_str());
    // The token's name is recorded as who triggered the run.
    assert_eq!(done["manifest"]["environment"]["triggered_by"], "ci");
    let md = app
        .get(&format!("/v1/runs/{run_id}/report.md"), READER)
        .send()
        .await
        .unwrap();
    assert_eq!(md.status(), 200);
    assert!(md.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/markdown"));
    let md = md.text().await.unwrap();
    assert!(md.contains(&format!("# retrain run `{run_id}`")) && md.contains("## Journal"));
    assert!(md.contains("- triggered by: `ci`"), "{md}");
    let listed: Value = app.read_json("/v1/runs?label=intent").await;
    assert_eq!(listed["runs"][0]["run_id"], run_id.as_str());
    let missing = app.get("/v1/runs/nope", READER).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    app.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_returns_the_first_response() {
    let (workspace, app) = spawn_app(Store::Sqlite).await;
    workspace.slow("urgency", 1);
    let send = |body: Value, key: &'static str| {
        app.post("/v1/runs", TRIGGER)
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
    };
    let first = send(json!({"labels": ["urgency"]}), "key-1").await.unwrap();
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.unwrap();
    let again = send(json!({"labels": ["urgency"]}), "key-1").await.unwrap();
    assert_eq!(again.status(), 202);
    let again: Value = again.json().await.unwrap();
    assert_eq!(first, again);
    assert_eq!(entry(&first, "urgency")["status"], "started");
    // The same key for another request is refused.
    let other = send(json!({"labels": ["intent"]}), "key-1").await.unwrap();
    assert_eq!(other.status(), 422);
    let other: Value = other.json().await.unwrap();
    assert_eq!(other["error"]["code"], "idempotency_key_reused");
    let run_id = entry(&first, "urgency")["run_id"].as_str().unwrap();
    app.wait_stage(run_id, &["done"]).await;
    assert_eq!(workspace.starts("urgency"), 1);
    assert_eq!(workspace.starts("intent"), 0);
    app.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_json_or_yaml_and_bad_ones_are_named() {
    let (_workspace, app) = spawn_app(Store::Sqlite).await;
    let yaml = app
        .post("/v1/runs", TRIGGER)
        .header("Content-Type", "text/yaml")
        .body("labels:\n  - intent\ndry_run: true\nreason: seed 003 submits YAML\n")
        .send()
        .await
        .unwrap();
    assert_eq!(yaml.status(), 202);
    let yaml: Value = yaml.json().await.unwrap();
    assert_eq!(yaml["dry_run"], true);
    assert_eq!(entry(&yaml, "intent")["status"], "planned");

    let cases = [
        (
            "application/json",
            r#"{"labels": ["nope"]}"#,
            400,
            "unknown_label",
        ),
        (
            "application/json",
            r#"{"labels": ["Bad Label"]}"#,
            400,
            "invalid_label",
        ),
        (
            "application/json",
            r#"{"lables": ["intent"]}"#,
            400,
            "invalid_body",
        ),
        ("application/json", "{", 400, "invalid_body"),
        (
            "text/plain",
            "labels: [intent]",
            415,
            "unsupported_media_type",
        ),
    ];
    // `curl -d` without a Content-Type sends a form: the answer says how to fix it.
    let form = app
        .post("/v1/runs", TRIGGER)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(r#"{"labels": ["intent"]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), 415);
    let form: serde_json::Value = form.json().await.unwrap();
    assert!(
        form["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Content-Type: application/json"),
        "{form}"
    );
    for (content_type, body, status, code) in cases {
        let response = app
            .post("/v1/runs", TRIGGER)
            .header("Content-Type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], code, "{body}: {error}");
        assert!(!error["error"]["message"].as_str().unwrap().is_empty());
    }
    // Its own connection: the server closes a connection whose body it
    // refused unread, which a pooled client may reuse at that moment.
    let too_big = reqwest::Client::new()
        .post(app.url("/v1/runs"))
        .bearer_auth(TRIGGER)
        .header("Content-Type", "application/json")
        .body(format!(
            r#"{{"reason": "{}"}}"#,
            "x".repeat(2 * 1024 * 1024)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(too_big.status(), 413);
    let labels: Value = app.read_json("/v1/labels").await;
    let names: Vec<&str> = labels["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["label"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["intent", "manual", "urgency"]);
    assert_eq!(labels["labels"][0]["threshold"], 10);
    let page: Value = app.read_json("/v1/labels?limit=2").await;
    assert_eq!(page["next_cursor"], "manual");
    let rest: Value = app.read_json("/v1/labels?cursor=manual").await;
    assert_eq!(rest["labels"][0]["label"], "urgency");
    assert!(rest["next_cursor"].is_null());
    app.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_candidate_is_approved_once_over_http() {
    let (_workspace, app) = spawn_app(Store::Sqlite).await;
    let body = app.trigger(&["manual"]).await;
    let run_id = entry(&body, "manual")["run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.wait_stage(&run_id, &["awaiting_approval"]).await;
    let labels: Value = app.read_json("/v1/labels").await;
    assert_eq!(labels["labels"][1]["awaiting_approval"][0], run_id.as_str());

    let path = |verb: &str| format!("/v1/runs/{run_id}/{verb}");
    let no_reason = app
        .post(&path("reject"), ADMIN)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(no_reason.status(), 400);
    let approved = app
        .post(&path("approve"), ADMIN)
        .json(&json!({"reason": "looks good"}))
        .send()
        .await
        .unwrap();
    assert_eq!(approved.status(), 200);
    let approved: Value = approved.json().await.unwrap();
    assert_eq!(approved["status"], "promoted", "{approved}");
    assert_eq!(approved["decided_by"], "admin");
    let again = app.post(&path("approve"), ADMIN).send().await.unwrap();
    assert_eq!(again.status(), 409);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["error"]["code"], "already_approved");
    assert!(again["error"]["message"]
        .as_str()
        .unwrap()
        .contains("by admin"));
    let late_reject = app
        .post(&path("reject"), ADMIN)
        .json(&json!({"reason": "too late"}))
        .send()
        .await
        .unwrap();
    assert_eq!(late_reject.status(), 409);
    let shown = app.wait_stage(&run_id, &["done"]).await;
    assert_eq!(shown["report"]["status"], "promoted");
    // The label's row now shows the finished run's verdict and production.
    let labels: Value = app.read_json("/v1/labels").await;
    let manual = &labels["labels"][1];
    assert_eq!(manual["label"], "manual");
    assert_eq!(
        manual["last_verdict"]["run_id"],
        run_id.as_str(),
        "{manual}"
    );
    assert!(
        manual["last_verdict"]["reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{manual}"
    );
    assert!(manual["running"].is_null(), "{manual}");
    assert!(manual["locked_by"].is_null(), "{manual}");
    assert!(manual["production_version"].is_string(), "{manual}");
    assert!(manual["production_since"].is_string(), "{manual}");
    assert!(manual["last_consumed_version"].is_string(), "{manual}");
    assert_eq!(manual["awaiting_approval"], json!([]));
    let missing = app
        .post("/v1/runs/no-such-run/approve", ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    app.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_is_the_journal_and_resumes_without_loss_or_duplicates() {
    let (workspace, app) = spawn_app(Store::Sqlite).await;
    let mut stream = SseClient::open(&app, "", None).await;
    let body = app.trigger(&["intent"]).await;
    let run_id = entry(&body, "intent")["run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let events = stream.until(&run_id, "run.finished").await;
    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    for expected in [
        "run.started",
        "dataset.published",
        "training.started",
        "training.finished",
        "run.finished",
    ] {
        assert!(kinds.contains(&expected), "{expected} missing: {kinds:?}");
    }
    let ids: Vec<u64> = events.iter().map(|e| e.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert!(events
        .iter()
        .all(|e| e.data["id"] == e.id && e.data["type"] == e.event));
    // Journal order: the events are the run's journal lines, in seq order.
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| e.data["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    drop(stream);

    // Reconnect after the second event: exactly the rest, nothing repeated.
    let mut resumed = SseClient::open(&app, "", Some(ids[1])).await;
    let rest = resumed.until(&run_id, "run.finished").await;
    assert_eq!(rest, events[2..].to_vec());
    // `?after=0` replays from the start; filters apply.
    let mut filtered = SseClient::open(
        &app,
        "?after=0&label=intent&types=training.started,run.finished",
        None,
    )
    .await;
    let only = filtered.until(&run_id, "run.finished").await;
    let kinds: Vec<&str> = only.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(kinds, ["training.started", "run.finished"]);
    let bad = app
        .get("/v1/events?types=training.begun", READER)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert_eq!(workspace.starts("intent"), 1);
    app.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_a_training_stops_in_time_and_the_run_resumes() {
    let (workspace, app) = spawn_app(Store::Sqlite).await;
    workspace.slow("intent", 60);
    let mut stream = SseClient::open(&app, "", None).await;
    let body = app.trigger(&["intent"]).await;
    let run_id = entry(&body, "intent")["run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    stream.until(&run_id, "training.started").await;
    let began = std::time::Instant::now();
    app.shutdown().await.unwrap();
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "{:?}",
        began.elapsed()
    );
    // The stream was closed by the shutdown.
    assert!(tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .is_none());
    // Journaled as cancelled (not an attempt), unfinished, resumable.
    let store = workspace.store().await;
    let detail = store
        .run(&retrain_core::domain::RunId(run_id.clone()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(detail.summary.stage.as_str(), "training");
    let last = detail.transitions.last().unwrap();
    assert_eq!(last.event["event"], "training_cancelled");
    drop(store);

    // The restarted server resumes the run on its own, without a trigger.
    workspace.slow("intent", 0);
    let app = crate::support::spawn_in(&workspace).await;
    app.wait_stage(&run_id, &["done"]).await;
    assert_eq!(workspace.starts("intent"), 2);
    let runs: Value = app.read_json("/v1/runs?label=intent").await;
    assert_eq!(
        runs["runs"].as_array().unwrap().len(),
        1,
        "no second run: {runs}"
    );
    app.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_routes_can_be_mounted_with_the_same_auth_and_errors() {
    use retrain_server::routes::{Authorized, ReadScope};
    async fn hello(Authorized(caller, _): Authorized<ReadScope>) -> String {
        format!("hello {}", caller.name)
    }
    let workspace = crate::support::Workspace::new(&Store::Sqlite);
    let extra = axum::Router::new().route("/v1/hello", axum::routing::get(hello));
    let app = crate::support::spawn_with(&workspace, Some(extra)).await;
    let hello = app.get("/v1/hello", READER).send().await.unwrap();
    assert_eq!(hello.status(), 200);
    assert_eq!(hello.text().await.unwrap(), "hello reader");
    let refused = app.client.get(app.url("/v1/hello")).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    let missing = app.get("/v1/nope", READER).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    let error: Value = missing.json().await.unwrap();
    assert_eq!(error["error"]["code"], "not_found");
    let wrong_method = app.client.delete(app.url("/v1/runs")).send().await.unwrap();
    assert_eq!(wrong_method.status(), 405);
    app.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_over_http_restores_production_once_and_records_the_token_name() {
    let (workspace, app) = spawn_app(Store::Sqlite).await;
    // Production before retrain: version 1, a model the candidate beats.
    std::fs::write(
        workspace.root().join("registry.json"),
        r#"{"models": {"manual-model": {"production": "1", "versions": [
            {"version": "1", "candidate": "hand-made", "status": "production",
             "metrics": {"accuracy": 0.5}}]}}}"#,
    )
    .unwrap();
    let production = || {
        let registry: Value =
            serde_json::from_slice(&std::fs::read(workspace.root().join("registry.json")).unwrap())
                .unwrap();
        registry["models"]["manual-model"]["production"].clone()
    };
    let body = app.trigger(&["manual"]).await;
    let run_id = entry(&body, "manual")["run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.wait_stage(&run_id, &["awaiting_approval"]).await;
    let approved = app
        .post(&format!("/v1/runs/{run_id}/approve"), ADMIN)
        .json(&json!({"reason": "looks good"}))
        .send()
        .await
        .unwrap();
    assert_eq!(approved.status(), 200);
    assert_eq!(production(), "2");

    let path = "/v1/labels/manual/rollback";
    // The read scope may not roll back; nothing changes.
    let denied = app
        .post(path, READER)
        .json(&json!({"reason": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 403);
    let no_reason = app.post(path, ADMIN).json(&json!({})).send().await.unwrap();
    assert_eq!(no_reason.status(), 400);
    let no_reason: Value = no_reason.json().await.unwrap();
    assert_eq!(no_reason["error"]["code"], "reason_required");
    let never = app
        .post(path, ADMIN)
        .json(&json!({"reason": "x", "to_version": "7"}))
        .send()
        .await
        .unwrap();
    assert_eq!(never.status(), 409);
    let never: Value = never.json().await.unwrap();
    assert_eq!(never["error"]["code"], "rollback_refused");
    let unknown = app
        .post("/v1/labels/nope/rollback", ADMIN)
        .json(&json!({"reason": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 400);
    assert_eq!(production(), "2", "a refused rollback changed production");

    let rolled = app
        .post(path, ADMIN)
        .json(&json!({"reason": "dice regressed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(rolled.status(), 200);
    let rolled: Value = rolled.json().await.unwrap();
    assert_eq!(rolled["status"], "rolled_back", "{rolled}");
    assert_eq!(rolled["rolled_back_by"], "admin");
    assert_eq!(rolled["resumed"], false);
    assert_eq!(production(), "1");
    // Version 1 is production again: a second identical request is refused.
    let again = app
        .post(path, ADMIN)
        .json(&json!({"reason": "dice regressed", "to_version": "1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
    let history = workspace
        .store()
        .await
        .promotions(&retrain_core::domain::Label::new("manual").unwrap())
        .await
        .unwrap();
    let last = history.last().unwrap();
    assert_eq!(last.kind, retrain_core::journal::PromotionKind::Rollback);
    assert_eq!(last.by, "admin");
    assert_eq!(last.reason.as_deref(), Some("dice regressed"));
    app.shutdown().await.unwrap();
}

/// A cycle of `intent` and `urgency`, finished; their run ids.
async fn finished_cycle(app: &crate::support::TestApp) -> Vec<String> {
    let started = app.trigger(&["intent", "urgency"]).await;
    let mut ids = Vec::new();
    for label in ["intent", "urgency"] {
        let id = entry(&started, label)["run_id"]
            .as_str()
            .unwrap()
            .to_owned();
        app.wait_stage(&id, &["done"]).await;
        ids.push(id);
    }
    ids
}

async fn runs_page(app: &crate::support::TestApp, query: &str) -> (u16, Value) {
    let response = app
        .get(&format!("/v1/runs{query}"), READER)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// The page's run ids, sorted.
fn sorted_ids(body: &Value) -> Vec<String> {
    let mut ids: Vec<String> = body["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["run_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// `GET /v1/runs` pages with an opaque keyset cursor: runs started while a
/// client pages appear before its first page and never shift the next ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_are_paged_by_an_opaque_cursor_unshifted_by_new_runs() {
    let (_workspace, app) = spawn_app(Store::Sqlite).await;
    let mut before = finished_cycle(&app).await;
    before.extend(finished_cycle(&app).await);
    before.sort();
    let (status, first) = runs_page(&app, "?limit=3").await;
    assert_eq!(status, 200);
    assert_eq!(sorted_ids(&first).len(), 3);
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();
    assert!(
        !before.contains(&cursor),
        "the cursor is opaque, not a run id"
    );
    let mut new_runs = finished_cycle(&app).await;
    new_runs.sort();
    let (_, rest) = runs_page(&app, &format!("?limit=3&cursor={cursor}")).await;
    assert!(rest["next_cursor"].is_null(), "{rest}");
    let mut seen = sorted_ids(&first);
    seen.extend(sorted_ids(&rest));
    seen.sort();
    assert_eq!(seen, before, "each run of the listing exactly once");
    let (_, newest) = runs_page(&app, "?limit=2").await;
    assert_eq!(sorted_ids(&newest), new_runs, "new runs come first");
    // Filters: label, and an outcome or a stage.
    let (_, intent) = runs_page(&app, "?label=intent&status=done&limit=500").await;
    assert_eq!(sorted_ids(&intent).len(), 3);
    assert!(intent["runs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["label"] == "intent"));
    let (_, training) = runs_page(&app, "?status=training").await;
    assert!(sorted_ids(&training).is_empty());
    // Bad cursors and limits name the problem.
    for (query, code) in [
        ("?cursor=!!!", "invalid_cursor"),
        ("?limit=0", "invalid_query"),
        ("?limit=501", "invalid_query"),
    ] {
        let (status, body) = runs_page(&app, query).await;
        assert_eq!(status, 400, "{query}");
        assert_eq!(body["error"]["code"], code, "{query}");
    }
    app.shutdown().await.unwrap();
}

/// Cycles started by `POST /v1/runs` are counted like the webhook and
/// schedule ones: the cycle by trigger, its finished runs by outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_cycles_and_their_runs_are_counted_in_metrics() {
    let (_workspace, app) = spawn_app(Store::Sqlite).await;
    finished_cycle(&app).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = app
            .client
            .get(app.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let runs: u64 = text
            .lines()
            .filter(|l| l.starts_with("retrain_runs_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        if runs == 2 {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the 2 runs were not counted:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        text.contains(r#"retrain_cycles_started_total{trigger="http"} 1"#),
        "{text}"
    );
    assert!(
        text.contains("retrain_stage_duration_seconds_count{"),
        "{text}"
    );
    app.shutdown().await.unwrap();
}

/// A label whose lock was left by an orchestrator that crashed (never
/// released, expired) is taken over by the next trigger, and the takeover
/// is counted; a released lock is not a takeover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_left_by_a_crashed_orchestrator_is_counted_as_a_takeover() {
    use retrain_core::domain::{Label, LockOutcome, LockOwner};
    let workspace = crate::support::Workspace::new(&Store::Sqlite);
    let store = workspace.store().await;
    let crashed = store
        .try_lock(
            &Label::new("intent").unwrap(),
            &LockOwner("crashed-orchestrator".into()),
            Duration::from_millis(1),
        )
        .await
        .unwrap();
    assert!(matches!(crashed, LockOutcome::Acquired { .. }));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let app = crate::support::spawn_in(&workspace).await;
    finished_cycle(&app).await;
    let text = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("retrain_lock_takeovers_total 1\n"),
        "one takeover (intent), none for urgency:\n{text}"
    );
    // A second cycle finds both locks released.
    finished_cycle(&app).await;
    let text = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("retrain_lock_takeovers_total 1\n"), "{text}");
    app.shutdown().await.unwrap();
}
