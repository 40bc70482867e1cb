//! What the server's load examples share (`load.rs`, `scenarios.rs`): the
//! generated project (configuration of N labels, dataset metadata), the
//! server started on loopback, latency percentiles and the memory and CPU
//! figures of a process from `/proc`.
//!
//! Each example includes it with `#[path = "support/mod.rs"] mod support;`
//! (a directory without `main.rs` is not an example of its own), so not
//! every example uses every item.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use retrain_adapters::settings::{load, ConfigSources};
use retrain_server::{Application, ServeOptions};

/// How the generated labels train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Trainer {
    /// A local command that writes its result at once (a full cycle per
    /// label without waiting on anything).
    Command,
    /// `trainer = { worker = {…} }`: a job in the queue for a worker.
    Worker,
}

/// The configuration of `labels` labels `label-00000…` on the store at
/// `state`, all reading `metadata.json` (no prepare job, no count query,
/// no gate).
pub fn config(state: &str, labels: usize, trainer: Trainer) -> String {
    let mut text = format!(
        "state = \"{state}\"\nstate_dir = \".retrain\"\n[server]\nbind = \"127.0.0.1:0\"\nrequest_timeout = \"90s\"\n"
    );
    let trainer = match trainer {
        Trainer::Command => {
            r#"{ command = ["sh", "-c", "printf '{\"candidate\": \"c\", \"metrics\": {\"accuracy\": 0.9}}' > \"$RETRAIN_RESULT\""], timeout = "5m" }"#
        }
        Trainer::Worker => r#"{ worker = { command = ["true"], timeout = "1h" } }"#,
    };
    for n in 0..labels {
        text.push_str(&format!(
            "[labels.{}]\nthreshold = 10\ncounts = \"none\"\nmetadata = \"file://metadata.json\"\ntrainer = {trainer}\ngate = \"none\"\n",
            label_name(n)
        ));
    }
    text
}

pub fn label_name(n: usize) -> String {
    format!("label-{n:05}")
}

/// Publish dataset version `tag` in the project at `dir`.
pub fn publish(dir: &Path, tag: &str) -> anyhow::Result<()> {
    let metadata = serde_json::json!({
        "dataset_name": "bench",
        "version_tag": tag,
        "num_samples": 100,
        "created_at": chrono::Utc::now(),
    });
    std::fs::write(dir.join("metadata.json"), metadata.to_string()).context("writing metadata.json")
}

/// Write the project (`retrain.toml`, `metadata.json` at `v1`) into `dir`.
pub fn write_project(
    dir: &Path,
    state: &str,
    labels: usize,
    trainer: Trainer,
) -> anyhow::Result<()> {
    std::fs::write(dir.join("retrain.toml"), config(state, labels, trainer))
        .context("writing retrain.toml")?;
    publish(dir, "v1")
}

/// Build the server of the project in `dir` (no auth: loopback only) and
/// check that it listens on loopback, since a load tool must never send
/// traffic elsewhere. Relative paths of the config resolve in `dir`.
pub async fn build_server(dir: &Path) -> anyhow::Result<Application> {
    std::env::set_current_dir(dir)?;
    let loaded = load(&ConfigSources {
        file: Some(dir.join("retrain.toml")),
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
    let addr: SocketAddr = app.addr();
    if !addr.ip().is_loopback() {
        bail!("refusing to load {addr}: loopback only");
    }
    Ok(app)
}

/// The `p`th percentile (nearest rank) of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// `p50 … | p99 … | max …` of `latencies` (sorted here), in milliseconds.
pub fn summary(latencies: &mut [Duration]) -> String {
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "p50 {:.2} ms | p99 {:.2} ms | max {:.2} ms ({} samples)",
        ms(percentile(latencies, 50.0)),
        ms(percentile(latencies, 99.0)),
        ms(latencies.last().copied().unwrap_or_default()),
        latencies.len()
    )
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in KiB.
pub fn status_kib(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resident set size of `pid` (`"self"` for this process) and its peak, in MiB.
pub fn rss_mib(pid: &str) -> Option<(f64, f64)> {
    let now = status_kib(pid, "VmRSS")?;
    let peak = status_kib(pid, "VmHWM")?;
    Some((now as f64 / 1024.0, peak as f64 / 1024.0))
}

/// CPU time (user + system, every thread) `pid` has used so far.
pub fn cpu_time(pid: &str) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold
    // spaces: state is field 3, utime 14, stime 15.
    let rest = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest)
        .context("unexpected /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i - 3)
            .context("short /proc/PID/stat")?
            .parse()
            .context("a /proc/PID/stat field")
    };
    let total = ticks(14)? + ticks(15)?;
    Ok(Duration::from_secs_f64(
        total as f64 / clock_ticks_per_second()? as f64,
    ))
}

/// `getconf CLK_TCK` (the unit of `/proc/PID/stat` times).
fn clock_ticks_per_second() -> anyhow::Result<u64> {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .context("running getconf CLK_TCK")?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("getconf CLK_TCK printed no number")
}

/// What [`get_load`] measured.
pub struct Load {
    /// One per successful request.
    pub latencies: Vec<Duration>,
    /// Requests that failed or answered other than 2xx.
    pub errors: u64,
}

/// `connections` clients send `GET url` back to back until `deadline` or
/// `max_requests` in all, whichever comes first.
pub async fn get_load(
    client: &reqwest::Client,
    url: &str,
    connections: usize,
    deadline: std::time::Instant,
    max_requests: u64,
) -> anyhow::Result<Load> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let sent = std::sync::Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(connections);
    for _ in 0..connections {
        let (client, url, sent) = (client.clone(), url.to_owned(), sent.clone());
        tasks.push(tokio::spawn(async move {
            let mut load = Load {
                latencies: Vec::new(),
                errors: 0,
            };
            while std::time::Instant::now() < deadline
                && sent.fetch_add(1, Ordering::Relaxed) < max_requests
            {
                let start = std::time::Instant::now();
                let ok = match client.get(&url).send().await {
                    Ok(response) => {
                        let ok = response.status().is_success();
                        response.bytes().await.is_ok() && ok
                    }
                    Err(_) => false,
                };
                if ok {
                    load.latencies.push(start.elapsed());
                } else {
                    load.errors += 1;
                }
            }
            load
        }));
    }
    let mut all = Load {
        latencies: Vec::new(),
        errors: 0,
    };
    for task in tasks {
        let load = task.await?;
        all.latencies.extend(load.latencies);
        all.errors += load.errors;
    }
    Ok(all)
}
