//! The embedded engine runs a whole cycle over the service's own
//! `CountSource`: count → export (prepare) → train (`sh`, §6 protocol) →
//! gate → promote into the JSON registry; the next cycle is skipped until
//! new reviews arrive, and counts only those.

use retrain_core::engine::CycleRequest;
use retrain_core::report::LabelStatus;
use retrain_core::CancellationToken;
use retrain_embed_example::{
    build_engine, registry_path, simulate_reviews, EmbedConfig, FeedbackBuffer,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_cycle_over_the_services_own_count_source_promotes() {
    let dir = tempfile::tempdir().unwrap();
    let config = EmbedConfig::with_sh_trainer(dir.path(), "department").unwrap();
    let buffer = FeedbackBuffer::new();
    simulate_reviews(&buffer, &config.label, 30, 12);
    let engine = build_engine(&config, &buffer).await.unwrap();

    let report = engine
        .run_cycle(CycleRequest::default(), CancellationToken::new())
        .await
        .unwrap();
    let label = &report.labels[0];
    assert_eq!(label.status, LabelStatus::Promoted, "{label:#?}");
    let counts = label.counts.expect("counted by the buffer");
    assert_eq!((counts.misclassified, counts.correct), (12, 18));
    // dataset_len = 12 + min(18, ceil(12 × 1.0)) = 24.
    assert_eq!(label.measured, Some(24));
    assert_eq!(label.dataset_samples, Some(30));
    let candidate = label.candidate.as_ref().expect("the trainer's result");
    let version = label.dataset_version.as_ref().unwrap().to_string();
    assert_eq!(candidate.id, format!("router-{version}"));
    assert_eq!(candidate.metrics["accuracy"], 0.91);
    let registry: serde_json::Value =
        serde_json::from_slice(&std::fs::read(registry_path(dir.path())).unwrap()).unwrap();
    assert_eq!(
        registry["models"]["ticket-router"]["production"], "1",
        "{registry}"
    );

    // The consumed reviews do not count again.
    let report = engine
        .run_cycle(CycleRequest::default(), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(report.labels[0].status, LabelStatus::Skipped);
    assert_eq!(report.labels[0].measured, Some(0));

    // New reviews arrive: counted from the consumed dataset's created_at on.
    simulate_reviews(&buffer, &config.label, 6, 6);
    let report = engine
        .run_cycle(
            CycleRequest {
                labels: None,
                dry_run: true,
            },
            CancellationToken::new(),
        )
        .await
        .unwrap();
    let label = &report.labels[0];
    assert_eq!(label.status, LabelStatus::Skipped, "{label:#?}");
    assert_eq!(label.measured, Some(6));
}
