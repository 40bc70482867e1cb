//! A bounded load tool for `retrain-server` on loopback (docs/BENCHMARKS.md,
//! "Server"): starts the server in this process on `127.0.0.1:0` over a
//! fresh SQLite store with `--labels` configured labels (no auth, loopback
//! only), then `--connections` clients send `GET --path` for `--seconds`
//! (at most 60) or `--max-requests`, whichever ends first, and prints the
//! throughput, latency percentiles and the idle RSS before the load.
//!
//! ```sh
//! cargo run --release -p retrain-server --example load -- --path /healthz --connections 64
//! cargo run --release -p retrain-server --example load -- --path '/v1/labels?limit=1000' --labels 1000 --connections 8
//! ```
//!
//! Client and server share this process and the machine's cores: the
//! figures are a lower bound of what the server alone would serve.

use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;

#[path = "support/mod.rs"]
mod support;

#[derive(Debug, Parser)]
struct Args {
    /// Path and query to request.
    #[arg(long, default_value = "/healthz")]
    path: String,
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Duration of the load, 1..=60 seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Stop after this many requests in all.
    #[arg(long, default_value_t = 5_000_000)]
    max_requests: u64,
    /// Labels in the generated configuration, 1..=10000.
    #[arg(long, default_value_t = 3)]
    labels: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !(1..=60).contains(&args.seconds) {
        bail!("--seconds must be 1..=60, got {}", args.seconds);
    }
    if !(1..=10_000).contains(&args.labels) {
        bail!("--labels must be 1..=10000, got {}", args.labels);
    }
    if !(1..=1024).contains(&args.connections) {
        bail!("--connections must be 1..=1024, got {}", args.connections);
    }
    let dir = tempfile::tempdir()?;
    support::write_project(
        dir.path(),
        "sqlite://state.db",
        args.labels,
        support::Trainer::Command,
    )?;
    let app = support::build_server(dir.path()).await?;
    let addr = app.addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async move {
        let _ = stopped.await;
    }));
    let url = format!("http://{addr}{}", args.path);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .build()?;
    // Warm up (and check the path answers 200).
    let first = client.get(&url).send().await?;
    if !first.status().is_success() {
        bail!("GET {} answered {}", args.path, first.status());
    }
    first.bytes().await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let idle_rss = support::rss_mib("self");

    let began = Instant::now();
    let mut load = support::get_load(
        &client,
        &url,
        args.connections,
        began + Duration::from_secs(args.seconds),
        args.max_requests,
    )
    .await?;
    let elapsed = began.elapsed();
    let _ = stop.send(());
    server.await??;
    println!(
        "GET {} | {} labels | {} connections | {:.1} s",
        args.path,
        args.labels,
        args.connections,
        elapsed.as_secs_f64()
    );
    println!(
        "requests ok {} | errors {} | {:.0} req/s",
        load.latencies.len(),
        load.errors,
        load.latencies.len() as f64 / elapsed.as_secs_f64()
    );
    println!("latency {}", support::summary(&mut load.latencies));
    if let Some((rss, _)) = idle_rss {
        println!("idle RSS before the load (server + client runtime): {rss:.1} MiB");
    }
    Ok(())
}
