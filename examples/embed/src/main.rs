//! "Another service" embedding retrain: it owns its tokio runtime, records
//! reviews of its predictions in memory, and runs one retraining cycle over
//! them with `retrain-core`'s engine, then prints the cycle report.
//!
//!     cargo run -p retrain-embed-example -- [DIR]
//!
//! `DIR` (default: a fresh temporary directory) receives the SQLite run
//! store, the exported datasets, the job logs and `registry.json`. Run it
//! twice with the same `DIR`: the second cycle is skipped, because the
//! reviews were consumed by the first dataset.

use anyhow::Context;
use retrain_core::engine::CycleRequest;
use retrain_core::CancellationToken;
use retrain_embed_example::{build_engine, simulate_reviews, EmbedConfig, FeedbackBuffer};

fn main() -> anyhow::Result<()> {
    let dir = match std::env::args_os().nth(1) {
        Some(dir) => std::path::PathBuf::from(dir),
        None => std::env::temp_dir().join(format!("retrain-embed-{}", std::process::id())),
    };
    // The service's own runtime: retrain runs on it like any other task.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let config = EmbedConfig::with_sh_trainer(&dir, "department")?;
        let buffer = FeedbackBuffer::new();
        // The service at work: 30 reviewed predictions, 12 of them wrong.
        simulate_reviews(&buffer, &config.label, 30, 12);
        let engine = build_engine(&config, &buffer).await?;

        // Ctrl-C stops the cycle at the next step boundary; the journal in
        // `state.db` lets the next cycle resume where it stopped.
        let cancel = CancellationToken::new();
        let on_ctrl_c = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                on_ctrl_c.cancel();
            }
        });
        let report = engine
            .run_cycle(CycleRequest::default(), cancel)
            .await
            .context("running the cycle")?;
        for label in &report.labels {
            println!("{}", label.to_markdown());
        }
        println!("{}", serde_json::to_string_pretty(&report)?);
        println!("state, datasets and registry in {}", dir.display());
        anyhow::Ok(())
    })
}
