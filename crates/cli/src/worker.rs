//! `retrain worker` (the agent: `retrain_adapters::worker_agent`) and
//! `retrain workers` (the server's worker list and job queue).

use std::time::Duration;

use anyhow::Context;
use retrain_adapters::http::HttpPolicy;
use retrain_adapters::settings::parse_duration;
use retrain_adapters::worker_agent::{
    resources, AgentConfig, AgentError, ResourceOverrides, ServerClient, WorkerAgent,
    DEFAULT_LEASE_WAIT_SECS, TOKEN_VAR,
};
use secrecy::SecretString;
use serde_json::{json, Value};

use crate::args::{Cli, OutputFormat, WorkerArgs, WorkersArgs};
use crate::commands::{config_failure, exit, Failure};
use crate::output;
use crate::signals::Interrupt;

/// The token a reader of the server uses for `retrain workers`.
const SERVER_TOKEN_VAR: &str = "RETRAIN_SERVER_TOKEN";

/// The first of `names` set to a non-empty value, as a secret.
fn token_from(names: &[&str]) -> Result<SecretString, Failure> {
    names
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()))
        .map(SecretString::from)
        .ok_or_else(|| {
            config_failure(format!(
                "set {} to a retrain-server token{}",
                names.join(" or "),
                if names.contains(&TOKEN_VAR) && names.len() == 1 {
                    " with scope `worker`"
                } else {
                    ""
                }
            ))
        })
}

pub async fn worker(args: &WorkerArgs, interrupt: Interrupt) -> Result<u8, Failure> {
    let token = token_from(&[TOKEN_VAR])?;
    let drain_timeout = parse_duration(&args.drain_timeout)
        .map_err(|e| config_failure(format!("--drain-timeout: {e}")))?;
    let overrides = match &args.resources {
        Some(raw) => ResourceOverrides::parse(raw).map_err(config_failure)?,
        None => ResourceOverrides::default(),
    };
    let resources = resources::detect(&overrides)
        .await
        .map_err(config_failure)?;
    let hostname = retrain_adapters::process::hostname();
    let config = AgentConfig {
        server: args.server.clone(),
        token,
        name: args.name.clone().unwrap_or_else(|| hostname.clone()),
        hostname,
        labels: args.labels.clone(),
        resources,
        work_dir: args.work_dir.clone(),
        drain_timeout,
        lease_wait_secs: DEFAULT_LEASE_WAIT_SECS,
        http: HttpPolicy::default(),
        hidden_env: vec![TOKEN_VAR.to_owned(), SERVER_TOKEN_VAR.to_owned()],
    };
    let agent = WorkerAgent::new(config.clone()).map_err(config_failure)?;
    // Logged once validated: the URL then carries no user info or query.
    tracing::info!(
        server = %args.server,
        name = %config.name,
        cpus = config.resources.cpus,
        memory = %human_bytes(config.resources.memory_bytes),
        gpus = config.resources.gpus,
        gpu_memory = %human_bytes(config.resources.gpu_memory_bytes),
        gpu_names = ?config.resources.gpu_names,
        tags = ?config.resources.tags,
        labels = ?config.labels,
        "starting the worker agent"
    );
    match agent
        .run_until(interrupt.token(), interrupt.force_token())
        .await
    {
        Ok(()) => {}
        Err(e @ AgentError::WorkDirInUse(_)) => return Err(config_failure(e)),
        Err(e) => {
            return Err(anyhow::Error::new(e)
                .context("the worker agent stopped")
                .into())
        }
    }
    // A second signal cut the drain short: the job (if any) was killed.
    if let Some(code) = interrupt.forced_exit_code() {
        return Ok(code);
    }
    // Drained on a signal (or never started): a clean stop either way.
    Ok(exit::OK)
}

pub async fn workers(cli: &Cli, args: &WorkersArgs) -> Result<u8, Failure> {
    let token = token_from(&[SERVER_TOKEN_VAR, TOKEN_VAR])?;
    let client =
        ServerClient::new(&args.server, token, HttpPolicy::default()).map_err(config_failure)?;
    let listed = client
        .get_json("worker list", "/v1/workers")
        .await
        .context("listing the workers")?;
    let queue = client
        .get_json("job queue", "/v1/workers/queue")
        .await
        .context("reading the job queue")?;
    let workers = listed.get("workers").cloned().unwrap_or(json!([]));
    let jobs = queue.get("jobs").cloned().unwrap_or(json!([]));
    match cli.output {
        OutputFormat::Json => output::print_json(&json!({ "workers": workers, "jobs": jobs }))?,
        OutputFormat::Text => print!("{}", render(&workers, &jobs)),
    }
    Ok(exit::OK)
}

/// `1.5G`-style binary sizes (`-` for zero).
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["", "K", "M", "G", "T"];
    if bytes == 0 {
        return "-".into();
    }
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() < 0.05 {
        format!("{value:.0}{}", UNITS[unit])
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) if items.is_empty() => "-".into(),
        Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// `4 cpu, 16G mem, 2x80G gpu, tags a100` from a resources object (or a
/// job's request, where every field is optional).
fn describe_resources(resources: &Value) -> String {
    let number = |key: &str| resources.get(key).and_then(Value::as_u64);
    let mut parts = Vec::new();
    if let Some(cpus) = number("cpus") {
        parts.push(format!("{cpus} cpu"));
    }
    if let Some(memory) = number("memory_bytes") {
        parts.push(format!("{} mem", human_bytes(memory)));
    }
    match (number("gpus"), number("gpu_memory_bytes")) {
        (Some(0), _) | (None, None) => {}
        (Some(gpus), Some(memory)) if memory > 0 => {
            parts.push(format!("{gpus}x{} gpu", human_bytes(memory)))
        }
        (Some(gpus), _) => parts.push(format!("{gpus} gpu")),
        (None, Some(memory)) => parts.push(format!("gpu {} each", human_bytes(memory))),
    }
    if let Some(tags) = resources.get("tags").filter(|t| !text(t).eq("-")) {
        parts.push(format!("tags {}", text(tags)));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

/// The two tables of `retrain workers`.
fn render(workers: &Value, jobs: &Value) -> String {
    let mut out = String::new();
    let empty = Vec::new();
    let workers = workers.as_array().unwrap_or(&empty);
    let jobs = jobs.as_array().unwrap_or(&empty);
    if workers.is_empty() {
        out.push_str("no workers registered\n");
    } else {
        out.push_str(&format!(
            "{:<34} {:<16} {:<9} {:<24} {:<26} {:<16} LAST HEARTBEAT\n",
            "WORKER", "NAME", "STATE", "JOB", "RESOURCES", "LABELS"
        ));
        for w in workers {
            out.push_str(&format!(
                "{:<34} {:<16} {:<9} {:<24} {:<26} {:<16} {}\n",
                text(&w["worker_id"]),
                text(&w["name"]),
                text(&w["state"]),
                text(&w["job_key"]),
                describe_resources(&w["resources"]),
                if text(&w["labels"]) == "-" {
                    "any".to_owned()
                } else {
                    text(&w["labels"])
                },
                text(&w["last_heartbeat_at"]),
            ));
        }
    }
    out.push('\n');
    if jobs.is_empty() {
        out.push_str("no jobs queued\n");
    } else {
        out.push_str(&format!(
            "{:<28} {:<16} {:<9} {:<34} {:>8}  REQUEST\n",
            "JOB", "LABEL", "STATE", "WORKER", "WAITING"
        ));
        for j in jobs {
            let waiting = j["waiting_secs"]
                .as_f64()
                .map(|s| {
                    retrain_adapters::settings::format_duration(Duration::from_secs(
                        s.max(0.0).round() as u64,
                    ))
                })
                .unwrap_or_else(|| "-".into());
            out.push_str(&format!(
                "{:<28} {:<16} {:<9} {:<34} {:>8}  {}\n",
                text(&j["job_key"]),
                text(&j["label"]),
                text(&j["state"]),
                text(&j["worker_id"]),
                waiting,
                describe_resources(&j["request"]),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_short_and_binary() {
        assert_eq!(human_bytes(0), "-");
        assert_eq!(human_bytes(512), "512");
        assert_eq!(human_bytes(80 << 30), "80G");
        assert_eq!(human_bytes(3 << 29), "1.5G");
    }

    #[test]
    fn tables_show_workers_and_the_queue() {
        let workers = json!([{
            "worker_id": "w-1", "name": "gpu-box", "hostname": "gpu-box.lab", "labels": [],
            "resources": {"cpus": 16, "memory_bytes": 256u64 << 30, "gpus": 2,
                          "gpu_memory_bytes": 80u64 << 30, "gpu_names": ["A100", "A100"], "tags": ["a100"]},
            "state": "running", "job_key": "run-1/train/1",
            "registered_at": "2026-01-01T00:00:00Z", "last_heartbeat_at": "2026-01-01T00:01:00Z"
        }]);
        let jobs = json!([{
            "job_key": "run-2/train/1", "run_id": "run-2", "label": "seg", "state": "queued",
            "request": {"gpus": 1, "gpu_memory_bytes": 24u64 << 30}, "worker_id": null,
            "enqueued_at": "2026-01-01T00:00:00Z", "waiting_secs": 95
        }]);
        let table = render(&workers, &jobs);
        assert!(
            table.contains("16 cpu, 256G mem, 2x80G gpu, tags a100"),
            "{table}"
        );
        assert!(
            table.contains("run-1/train/1") && table.contains(" any "),
            "{table}"
        );
        assert!(
            table.contains("1x24G gpu") && table.contains("queued"),
            "{table}"
        );
        let empty = render(&json!([]), &json!([]));
        assert_eq!(empty, "no workers registered\n\nno jobs queued\n");
    }
}
