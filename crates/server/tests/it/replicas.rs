//! Two `Application`s on one Postgres store: triggered at once, each label
//! is driven once (fenced locks); the event stream of one replica carries
//! the runs the other drives (LISTEN/NOTIFY).

use crate::support::{entry, spawn_in, SseClient, Store, Workspace};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_triggered_at_once_drive_each_label_once() {
    let Some(store) = Store::postgres().await else {
        return;
    };
    let workspace = Workspace::new(&store);
    workspace.slow("intent", 1);
    workspace.slow("urgency", 1);
    let (a, b) = tokio::join!(spawn_in(&workspace), spawn_in(&workspace));
    let mut events = SseClient::open(&a, "", None).await;
    let labels = ["intent", "urgency"];
    let (from_a, from_b) = tokio::join!(a.trigger(&labels), b.trigger(&labels));
    let mut runs = Vec::new();
    for label in labels {
        let answers = [entry(&from_a, label), entry(&from_b, label)];
        let started: Vec<_> = answers
            .iter()
            .filter(|e| e["status"] == "started")
            .collect();
        assert_eq!(started.len(), 1, "{label}: {from_a} {from_b}");
        assert!(
            answers.iter().any(|e| e["status"] == "already_running"),
            "{label}: {from_a} {from_b}"
        );
        runs.push(started[0]["run_id"].as_str().unwrap().to_owned());
    }
    // Whichever replica drives a run, A's stream sees it to the end.
    let mut seen = Vec::new();
    while !runs.iter().all(|run| {
        seen.iter().any(|e: &crate::support::Sse| {
            e.event == "run.finished" && e.data["run_id"] == run.as_str()
        })
    }) {
        let next = tokio::time::timeout(std::time::Duration::from_secs(60), events.next());
        seen.push(
            next.await
                .expect("no event within 60 s")
                .expect("the stream ended"),
        );
    }
    for run in &runs {
        assert!(seen
            .iter()
            .any(|e| e.event == "training.started" && e.data["run_id"] == run.as_str()));
        a.wait_stage(run, &["done"]).await;
    }
    for label in labels {
        assert_eq!(workspace.starts(label), 1, "{label} trained more than once");
    }
    let (stopped_a, stopped_b) = tokio::join!(a.shutdown(), b.shutdown());
    stopped_a.unwrap();
    stopped_b.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_event_stream_resumes_without_loss_or_duplicates() {
    let Some(store) = Store::postgres().await else {
        return;
    };
    let workspace = Workspace::new(&store);
    let app = spawn_in(&workspace).await;
    let mut stream = SseClient::open(&app, "", None).await;
    let body = app.trigger(&["intent"]).await;
    let run_id = entry(&body, "intent")["run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let events = stream.until(&run_id, "run.finished").await;
    let ids: Vec<u64> = events.iter().map(|e| e.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    drop(stream);
    let mut resumed = SseClient::open(&app, "", Some(ids[0])).await;
    assert_eq!(
        resumed.until(&run_id, "run.finished").await,
        events[1..].to_vec()
    );
    app.shutdown().await.unwrap();
}
