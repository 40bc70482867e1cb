//! The seed orchestrator's environment names (§6), accepted as-is so a team
//! can keep its CI secrets: `HF_TOKEN`, `DATABASE_URL`, `THRESHOLD_<LABEL>`,
//! `RETRAIN_<LABEL>_REPO`, `HF_HUB_METADATA_<LABEL>`, `POLL_INTERVAL`...
//! A label that appears only here is a configured label.

use serde_json::Value;

use super::ConfigError;

/// One config value derived from a seed env var.
#[derive(Debug, Clone, PartialEq)]
pub struct SeedEntry {
    /// Dotted config key, e.g. `labels.urgency.threshold`.
    pub key: String,
    pub value: Value,
    /// The env var it came from, for error messages.
    pub var: String,
}

/// Maps the seed's names onto config keys.
#[derive(Debug)]
pub struct SeedEnv;

/// Plain renames: env var → config key (string values).
const DIRECT: &[(&str, &str)] = &[
    ("HF_TOKEN", "hub.token"),
    ("HF_ENDPOINT", "hub.endpoint"),
    ("DATABASE_URL", "counts.database"),
    ("PREPARE_DATASET_REPO", "prepare"),
    ("POLL_INTERVAL", "poll.interval"),
    ("POLL_TIMEOUT", "poll.timeout"),
    ("MLFLOW_TRACKING_URI", "mlflow.tracking_uri"),
    ("MLFLOW_TRACKING_TOKEN", "mlflow.token"),
    ("MLFLOW_TRACKING_USERNAME", "mlflow.username"),
    ("MLFLOW_TRACKING_PASSWORD", "mlflow.password"),
    ("GITHUB_TOKEN", "github.token"),
    ("GITHUB_API_URL", "github.api_url"),
    // Seed 003 (the trigger service): `retrain-server`'s `[server]`.
    ("PORT", "server.port"),
    ("LOG_FILE", "server.log_file"),
    ("LOG_MAX_BYTES", "server.log_max_bytes"),
    ("LOG_BACKUP_COUNT", "server.log_backup_count"),
    ("LOG_LEVEL", "server.log_level"),
    ("ORCHESTRATOR_TOKEN", "server.token"),
    ("RETRAIN_SERVER_TOKEN", "server.token"),
];

/// Seed names whose values are whole numbers (kept as strings when they
/// are not, so the error names the variable and the expectation).
const WHOLE_NUMBERS: &[&str] = &[
    "server.port",
    "server.log_max_bytes",
    "server.log_backup_count",
];

/// The seed abbreviates `DEPARTMENT` to `DEPT` in two names.
fn label_key(env_part: &str) -> String {
    let lower = env_part.to_ascii_lowercase();
    if lower == "dept" {
        "department".into()
    } else {
        lower
    }
}

fn parse_bool(raw: &str) -> Option<bool> {
    match raw.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" | "" => Some(false),
        _ => None,
    }
}

impl SeedEnv {
    /// Translate the seed's variables found in `env`.
    pub fn entries(env: &[(String, String)]) -> Result<Vec<SeedEntry>, ConfigError> {
        let mut out = Vec::new();
        for (var, raw) in env {
            let var = var.as_str();
            if let Some((_, key)) = DIRECT.iter().find(|(name, _)| *name == var) {
                if raw.trim().is_empty() {
                    continue;
                }
                // POLL_* are durations: numbers stay numbers (seconds).
                let value = if WHOLE_NUMBERS.contains(key) {
                    match raw.trim().parse::<u64>() {
                        Ok(n) => Value::from(n),
                        Err(_) => Value::String(raw.clone()),
                    }
                } else if key.starts_with("poll.") {
                    match raw.trim().parse::<f64>() {
                        Ok(f) if f.is_finite() => Value::from(f),
                        _ => Value::String(raw.clone()),
                    }
                } else {
                    Value::String(raw.clone())
                };
                out.push(SeedEntry {
                    key: (*key).into(),
                    value,
                    var: var.into(),
                });
                continue;
            }
            if var == "DRY_RUN" {
                let value = parse_bool(raw).ok_or_else(|| ConfigError {
                    key: Some("dry_run".into()),
                    message: format!(
                        "environment variable DRY_RUN: key `dry_run`: expected true or false, got {raw:?}"
                    ),
                })?;
                out.push(SeedEntry {
                    key: "dry_run".into(),
                    value: Value::Bool(value),
                    var: var.into(),
                });
                continue;
            }
            if let Some(label) = var.strip_prefix("THRESHOLD_") {
                if label.is_empty() {
                    continue;
                }
                let key = format!("labels.{}.threshold", label_key(label));
                let threshold: u64 = raw.trim().parse().map_err(|_| ConfigError {
                    key: Some(key.clone()),
                    message: format!(
                        "environment variable {var}: key `{key}`: expected a whole number >= 0, got {raw:?}"
                    ),
                })?;
                out.push(SeedEntry {
                    key,
                    value: Value::from(threshold),
                    var: var.into(),
                });
                continue;
            }
            if let Some(label) = var.strip_prefix("HF_HUB_METADATA_") {
                if label.is_empty() || raw.trim().is_empty() {
                    continue;
                }
                out.push(SeedEntry {
                    key: format!("labels.{}.metadata", label_key(label)),
                    value: Value::String(raw.clone()),
                    var: var.into(),
                });
                continue;
            }
            if let Some(rest) = var.strip_prefix("RETRAIN_") {
                // `RETRAIN_<LABEL>_REPO` is always the seed's name, never a
                // config key (config keys need `__`).
                if let Some(label) = rest.strip_suffix("_REPO") {
                    if label.is_empty() || label.contains("__") || raw.trim().is_empty() {
                        continue;
                    }
                    out.push(SeedEntry {
                        key: format!("labels.{}.trainer", label_key(label)),
                        value: Value::String(raw.clone()),
                        var: var.into(),
                    });
                }
            }
        }
        // Deterministic order (env iteration order is not).
        out.sort_by(|a, b| a.var.cmp(&b.var));
        Ok(out)
    }
}
