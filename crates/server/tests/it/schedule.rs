//! The schedule loop end to end: a server with `[server.schedule]` and no
//! trigger at all drives every label, records each tick in the delivery
//! log, and a second replica on the same store fires no tick twice.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{spawn_in, Store, Workspace, READER};

/// Every second (croner's 6-field form), so the test waits about one tick.
fn scheduled(store: &Store) -> Workspace {
    let workspace = Workspace::new(store);
    let config = std::fs::read_to_string(workspace.config()).unwrap();
    std::fs::write(
        workspace.config(),
        format!("{config}\n[server.schedule]\ncron = \"* * * * * *\"\ntimezone = \"UTC\"\n"),
    )
    .unwrap();
    workspace
}

async fn ticks(app: &crate::support::TestApp) -> Vec<Value> {
    let response = app
        .get("/v1/webhooks/deliveries?source=schedule&limit=100", READER)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    body["deliveries"].as_array().cloned().unwrap_or_default()
}

async fn scheduled_cycle_drives_every_label(store: Store) {
    let workspace = scheduled(&store);
    let first = spawn_in(&workspace).await;
    let second = spawn_in(&workspace).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while ["intent", "urgency", "manual"]
        .iter()
        .any(|label| workspace.starts(label) == 0)
    {
        assert!(
            Instant::now() < deadline,
            "the schedule never trained every label"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = ticks(&first).await;
    assert!(!log.is_empty(), "no schedule tick recorded");
    // Each tick time is claimed by exactly one of the two replicas: the
    // other records it as `taken` (or never saw it due yet), never `fired`
    // twice.
    let mut fired: Vec<&str> = log
        .iter()
        .filter(|d| d["outcome"] == "fired")
        .map(|d| d["delivery_id"].as_str().unwrap())
        .collect();
    assert!(!fired.is_empty(), "{log:?}");
    let all = fired.len();
    fired.sort_unstable();
    fired.dedup();
    assert_eq!(fired.len(), all, "a tick fired twice: {log:?}");
    // Each label was trained once per tick that reached it at most: the
    // locks keep the two replicas from driving one label together, and a
    // label already consumed its version (v1), so later ticks train nothing.
    for label in ["intent", "urgency", "manual"] {
        assert_eq!(workspace.starts(label), 1, "{label}");
    }
    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_scheduled_cycles_drive_every_label_once() {
    scheduled_cycle_drives_every_label(Store::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_scheduled_cycles_drive_every_label_once() {
    let Some(store) = Store::postgres().await else {
        return;
    };
    scheduled_cycle_drives_every_label(store).await;
}
