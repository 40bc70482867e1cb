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

use anyhow::{bail, Context};
use clap::Parser;
use retrain_adapters::settings::{load, ConfigSources};
use retrain_server::{Application, ServeOptions};

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

fn config(labels: usize) -> String {
    let mut text = String::from(
        "state = \"sqlite://state.db\"\n[server]\nbind = \"127.0.0.1:0\"\nrequest_timeout = \"30s\"\n",
    );
    for n in 0..labels {
        text.push_str(&format!(
            "[labels.label-{n:05}]\nthreshold = 10\ncounts = \"none\"\nmetadata = \"file://metadata.json\"\ntrainer = {{ command = [\"true\"] }}\ngate = \"none\"\n"
        ));
    }
    text
}

/// Resident set size of this process (Linux), in KiB.
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
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
    std::fs::write(dir.path().join("retrain.toml"), config(args.labels))?;
    std::fs::write(
        dir.path().join("metadata.json"),
        r#"{"dataset_name": "bench", "version_tag": "v1", "num_samples": 1, "created_at": "2026-01-02T00:00:00Z"}"#,
    )?;
    // Relative paths in the config (the SQLite file) resolve here.
    std::env::set_current_dir(dir.path())?;
    let loaded = load(&ConfigSources {
        file: Some(dir.path().join("retrain.toml")),
        env: Vec::new(),
        overrides: Vec::new(),
    })
    .context("loading the generated configuration")?;
    let app = Application::build(
        loaded,
        ServeOptions {
            insecure_no_auth: true,
        },
    )
    .await?;
    let addr = app.addr();
    // `--insecure-no-auth` binds loopback only; checked again here since
    // this tool must never send traffic elsewhere.
    if !addr.ip().is_loopback() {
        bail!("refusing to load {addr}: loopback only");
    }
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
    let idle_rss = rss_kib();

    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let began = Instant::now();
    let deadline = began + Duration::from_secs(args.seconds);
    let mut workers = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let (client, url, sent) = (client.clone(), url.clone(), sent.clone());
        let max = args.max_requests;
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            while Instant::now() < deadline
                && sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < max
            {
                let start = Instant::now();
                let ok = match client.get(&url).send().await {
                    Ok(response) => {
                        let ok = response.status().is_success();
                        response.bytes().await.is_ok() && ok
                    }
                    Err(_) => false,
                };
                if ok {
                    latencies.push(start.elapsed());
                } else {
                    errors += 1;
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for worker in workers {
        let (mine, failed) = worker.await?;
        latencies.extend(mine);
        errors += failed;
    }
    let elapsed = began.elapsed();
    latencies.sort();
    let _ = stop.send(());
    server.await??;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "GET {} | {} labels | {} connections | {:.1} s",
        args.path,
        args.labels,
        args.connections,
        elapsed.as_secs_f64()
    );
    println!(
        "requests ok {} | errors {} | {:.0} req/s",
        latencies.len(),
        errors,
        latencies.len() as f64 / elapsed.as_secs_f64()
    );
    println!(
        "latency p50 {:.2} ms | p99 {:.2} ms | max {:.2} ms",
        ms(percentile(&latencies, 50.0)),
        ms(percentile(&latencies, 99.0)),
        ms(latencies.last().copied().unwrap_or_default())
    );
    if let Some(rss) = idle_rss {
        println!(
            "idle RSS before the load (server + client runtime): {:.1} MiB",
            rss as f64 / 1024.0
        );
    }
    Ok(())
}
