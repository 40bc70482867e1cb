//! Domain types. Every value that crosses a port is one of these, validated on
//! construction so that the state machine never has to re-check its inputs.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A model line, e.g. `department` or `urgency`.
///
/// Invariant: non-empty, at most 64 chars of `[a-z0-9_-]` (lower-cased on
/// construction), so it is safe in env var names, SQL parameters and URLs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Label(String);

impl Label {
    pub fn new(raw: impl AsRef<str>) -> Result<Self, InvalidLabel> {
        let lowered = raw.as_ref().trim().to_ascii_lowercase();
        let valid = !lowered.is_empty()
            && lowered.len() <= 64
            && lowered
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if valid {
            Ok(Self(lowered))
        } else {
            Err(InvalidLabel(raw.as_ref().to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Upper-case form used in the seed's env names (`THRESHOLD_URGENCY`).
    pub fn env_name(&self) -> String {
        self.0.to_ascii_uppercase().replace('-', "_")
    }
}

impl TryFrom<String> for Label {
    type Error = InvalidLabel;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<Label> for String {
    fn from(value: Label) -> Self {
        value.0
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid label {0:?}: expected 1-64 characters of a-z, 0-9, '_' or '-'")]
pub struct InvalidLabel(pub String);

/// The `version_tag` of a published dataset (e.g. `v20251030_115250`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VersionTag(pub String);

impl VersionTag {
    pub fn new(tag: impl Into<String>) -> Self {
        Self(tag.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VersionTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Identifier of one label's run. Time-ordered (UUIDv7) so listings sort by start.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RunId(pub String);

impl RunId {
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Identifier of one cycle (`retrain run`), shared by the label runs it drives.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CycleId(pub String);

impl CycleId {
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }
}

impl fmt::Display for CycleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Counts returned by a `CountSource` for one label since its watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FeedbackCounts {
    pub misclassified: u64,
    pub correct: u64,
}

impl FeedbackCounts {
    /// `dataset_len = misclassified + min(correct, ceil(misclassified × correct_ratio))` (§3).
    pub fn dataset_len(&self, ratio: CorrectRatio) -> u64 {
        let wanted = (self.misclassified as f64 * ratio.0).ceil();
        // `wanted` is finite and non-negative because the ratio is validated.
        let wanted = if wanted >= u64::MAX as f64 {
            u64::MAX
        } else {
            wanted as u64
        };
        self.misclassified.saturating_add(self.correct.min(wanted))
    }
}

/// Fraction of correctly classified samples mixed into the dataset per
/// misclassified one. Invariant: finite and `>= 0`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct CorrectRatio(f64);

impl CorrectRatio {
    pub fn new(value: f64) -> Result<Self, String> {
        if value.is_finite() && value >= 0.0 {
            Ok(Self(value))
        } else {
            Err(format!(
                "correct_ratio must be a finite number >= 0, got {value}"
            ))
        }
    }
    pub fn get(self) -> f64 {
        self.0
    }
}

impl Default for CorrectRatio {
    fn default() -> Self {
        Self(1.0)
    }
}

impl TryFrom<f64> for CorrectRatio {
    type Error = String;
    fn try_from(value: f64) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<CorrectRatio> for f64 {
    fn from(value: CorrectRatio) -> Self {
        value.0
    }
}

/// What a label remembers between cycles: where counting starts and which
/// dataset it consumed last.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LabelCursor {
    /// `created_at` of the last consumed dataset; `None` = the epoch.
    pub watermark: Option<DateTime<Utc>>,
    /// `version_tag` of the last consumed dataset.
    pub consumed_version: Option<VersionTag>,
    /// `num_samples` of the last consumed dataset (metadata-triggered labels).
    pub consumed_num_samples: Option<u64>,
    /// `version_tag` of the last dataset the label's `dataset_check`
    /// rejected: never checked or trained again (the watermark and the
    /// consumed version stay where they were, so the next cycle over its
    /// threshold prepares a new version).
    #[serde(default)]
    pub rejected_version: Option<VersionTag>,
}

impl LabelCursor {
    /// The watermark as bound to the count query (`$1`).
    pub fn watermark_or_epoch(&self) -> DateTime<Utc> {
        self.watermark.unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
    }

    /// Whether `version` was consumed or rejected: either way it is never
    /// accepted as a new dataset again.
    pub fn has_seen(&self, version: &VersionTag) -> bool {
        self.consumed_version.as_ref() == Some(version)
            || self.rejected_version.as_ref() == Some(version)
    }
}

/// What a label's `dataset_check` found for one dataset version.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct DatasetCheckResult {
    pub passed: bool,
    /// The check's own summary (`"summary"` of its result file): counts,
    /// resolutions, whatever it measured. Empty when it wrote none.
    #[serde(default)]
    pub summary: serde_json::Map<String, serde_json::Value>,
    /// The check's markdown report (`"report_md"`), put into the label's
    /// report and notifications.
    #[serde(default)]
    pub report_md: Option<String>,
    /// How the check ended as the adapter saw it when it failed (exit
    /// status and the scrubbed tail of its output).
    #[serde(default)]
    pub detail: Option<String>,
}

/// `dataset_metadata.json` (seed 000 §5). Invariant: validated by
/// [`DatasetMetadata::parse`]; unknown fields are kept in `extra`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetMetadata {
    pub dataset_name: String,
    pub version_tag: VersionTag,
    pub num_samples: u64,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub splits: Option<BTreeMap<String, u64>>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Why a `dataset_metadata.json` was rejected; always names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    #[error("dataset metadata is not valid JSON: {0}")]
    NotJson(String),
    #[error("dataset metadata must be a JSON object, got {0}")]
    NotAnObject(&'static str),
    #[error("dataset metadata is missing field `{0}`")]
    Missing(&'static str),
    #[error("dataset metadata field `{field}` {expected}")]
    Invalid {
        field: String,
        expected: &'static str,
    },
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

impl DatasetMetadata {
    /// Parse and validate the §6 shape. Field-by-field so the error names the
    /// offending field rather than a serde position.
    pub fn parse(bytes: &[u8]) -> Result<Self, MetadataError> {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| MetadataError::NotJson(e.to_string()))?;
        let serde_json::Value::Object(mut object) = value else {
            return Err(MetadataError::NotAnObject(json_kind(&value)));
        };
        let mut take_string = |field: &'static str| -> Result<String, MetadataError> {
            match object.remove(field) {
                None => Err(MetadataError::Missing(field)),
                Some(serde_json::Value::String(s)) if !s.trim().is_empty() => Ok(s),
                Some(serde_json::Value::String(_)) => Err(MetadataError::Invalid {
                    field: field.into(),
                    expected: "must be a non-empty string",
                }),
                Some(_) => Err(MetadataError::Invalid {
                    field: field.into(),
                    expected: "must be a string",
                }),
            }
        };
        let dataset_name = take_string("dataset_name")?;
        let version_tag = VersionTag(take_string("version_tag")?);
        let created_raw = take_string("created_at")?;
        let created_at = DateTime::parse_from_rfc3339(&created_raw)
            .map_err(|_| MetadataError::Invalid {
                field: "created_at".into(),
                expected: "must be an RFC 3339 timestamp such as 2025-10-30T11:53:01+00:00",
            })?
            .with_timezone(&Utc);
        let num_samples = match object.remove("num_samples") {
            None => return Err(MetadataError::Missing("num_samples")),
            Some(v) => v.as_u64().ok_or(MetadataError::Invalid {
                field: "num_samples".into(),
                expected: "must be an integer >= 0",
            })?,
        };
        let splits = match object.remove("splits") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Object(map)) => {
                let mut splits = BTreeMap::new();
                for (name, count) in map {
                    let count = count.as_u64().ok_or_else(|| MetadataError::Invalid {
                        field: format!("splits.{name}"),
                        expected: "must be an integer >= 0",
                    })?;
                    splits.insert(name, count);
                }
                Some(splits)
            }
            Some(_) => {
                return Err(MetadataError::Invalid {
                    field: "splits".into(),
                    expected: "must be an object mapping split names to integers",
                })
            }
        };
        Ok(Self {
            dataset_name,
            version_tag,
            num_samples,
            created_at,
            splits,
            extra: object,
        })
    }

    /// Stable hash of the metadata as published, recorded in the run manifest.
    pub fn content_hash(&self) -> String {
        use sha2::Digest;
        let canonical = serde_json::to_vec(self).unwrap_or_default();
        hex::encode(sha2::Sha256::digest(canonical))
    }
}

/// The dataset a run consumes: exactly one published version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetVersion {
    pub metadata: DatasetMetadata,
    /// Change marker reported by the store (`ETag`, `X-Repo-Commit`, mtime), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
}

/// Model metrics by name. `BTreeMap` keeps reports and hashes stable.
///
/// Values may be `NaN` or infinite (Python's `json` writes them): the gate
/// rejects them fail-closed, naming the metric. Wherever metrics are
/// serialised inside retrain's own records, use [`metrics_serde`] so they
/// survive a round trip (plain JSON has no NaN).
pub type Metrics = BTreeMap<String, f64>;

/// Serde for [`Metrics`] that keeps non-finite values: they are written as
/// the strings `"NaN"`, `"Infinity"`, `"-Infinity"` and read back from those
/// strings or from numbers.
pub mod metrics_serde {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Value {
        Number(f64),
        Text(String),
    }

    pub fn serialize<S: Serializer>(
        metrics: &BTreeMap<String, f64>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let encoded: BTreeMap<&str, Value> = metrics
            .iter()
            .map(|(k, v)| {
                let value = if v.is_nan() {
                    Value::Text("NaN".into())
                } else if *v == f64::INFINITY {
                    Value::Text("Infinity".into())
                } else if *v == f64::NEG_INFINITY {
                    Value::Text("-Infinity".into())
                } else {
                    Value::Number(*v)
                };
                (k.as_str(), value)
            })
            .collect();
        encoded.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, f64>, D::Error> {
        let raw = BTreeMap::<String, Value>::deserialize(d)?;
        raw.into_iter()
            .map(|(k, v)| {
                let value = match v {
                    Value::Number(n) => n,
                    Value::Text(t) => match t.as_str() {
                        "NaN" => f64::NAN,
                        "Infinity" => f64::INFINITY,
                        "-Infinity" => f64::NEG_INFINITY,
                        other => {
                            return Err(serde::de::Error::custom(format!(
                                "metric `{k}` is not a number: {other:?}"
                            )))
                        }
                    },
                };
                Ok((k, value))
            })
            .collect()
    }
}

/// What a trainer produced: an id the registry understands and its metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// Registry run id or model id (`RETRAIN_RESULT`'s `candidate`).
    pub id: String,
    #[serde(default, with = "metrics_serde")]
    pub metrics: Metrics,
}

/// The model currently in production, as the registry reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProductionModel {
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_id: Option<String>,
    #[serde(default, with = "metrics_serde")]
    pub metrics: Metrics,
}

/// The version a promotion produced in the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromotedVersion {
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
}

/// Stage of a Space / prepare job, as an open enum (§1.2 of the API notes:
/// clients disagree on the full list, so unknown stages are kept, not rejected).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SpaceStage {
    Running,
    Building,
    Starting,
    Stopped,
    Paused,
    Sleeping,
    /// `BUILD_ERROR`, `RUNTIME_ERROR`, `CONFIG_ERROR`, `NO_APP_FILE`: the job
    /// cannot produce a dataset; waiting labels fail fast.
    Error(String),
    Unknown(String),
}

impl SpaceStage {
    pub fn from_hub(raw: &str) -> Self {
        match raw {
            "RUNNING" => Self::Running,
            "BUILDING" | "RUNNING_BUILDING" => Self::Building,
            "APP_STARTING" | "RUNNING_APP_STARTING" => Self::Starting,
            "STOPPED" => Self::Stopped,
            "PAUSED" => Self::Paused,
            "SLEEPING" => Self::Sleeping,
            "BUILD_ERROR" | "RUNTIME_ERROR" | "CONFIG_ERROR" | "NO_APP_FILE" => {
                Self::Error(raw.to_owned())
            }
            other => Self::Unknown(other.to_owned()),
        }
    }

    pub fn is_error(&self) -> bool {
        matches!(self, Self::Error(_))
    }
}

impl fmt::Display for SpaceStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Running => f.write_str("RUNNING"),
            Self::Building => f.write_str("BUILDING"),
            Self::Starting => f.write_str("APP_STARTING"),
            Self::Stopped => f.write_str("STOPPED"),
            Self::Paused => f.write_str("PAUSED"),
            Self::Sleeping => f.write_str("SLEEPING"),
            Self::Error(s) | Self::Unknown(s) => f.write_str(s),
        }
    }
}

/// A job started by a trainer, journaled so a resumed run can find it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainingHandle {
    /// Adapter-specific, e.g. `command`, `hf-space`.
    pub kind: String,
    /// Adapter-specific data: pid + start time + result path, Space id + version...
    pub data: serde_json::Value,
}

/// Outcome of awaiting a training job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TrainingOutcome {
    Finished(Candidate),
    /// The job is gone without a result (e.g. the host rebooted).
    Lost {
        reason: String,
    },
}

/// An EC2 (or other) lease around a trainer. Written to the `RunStore` before
/// the instances are started so a crash can never leak a running machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: String,
    pub label: Label,
    pub run_id: RunId,
    pub provider: String,
    pub resources: Vec<String>,
    pub region: Option<String>,
    pub acquired_at: DateTime<Utc>,
    pub max_until: DateTime<Utc>,
    /// Filled once the instance is up (e.g. `public_ip`).
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    pub released_at: Option<DateTime<Utc>>,
}

/// Who holds a label lock. The owner string is unique per engine instance.
///
/// Owners built with [`LockOwner::for_process`] also say which process holds
/// the lock (`hint@host/pid/start-ticks/uuid`), so that a contender on the
/// same host can tell that the holder process is gone and take the lock at
/// once instead of waiting for its expiry (see [`ProcessIdentity`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LockOwner(pub String);

impl LockOwner {
    /// An owner that names no process (tests, embedders).
    pub fn generate(hint: &str) -> Self {
        Self(format!("{hint}-{}", uuid::Uuid::now_v7()))
    }

    /// An owner naming the process that holds the lock. `start` is the
    /// process start time in whatever unit the host reports (clock ticks
    /// since boot on Linux); with the pid it identifies the process even
    /// after pid reuse.
    pub fn for_process(hint: &str, process: &ProcessIdentity) -> Self {
        Self(format!(
            "{hint}@{}/{}/{}/{}",
            process.host,
            process.pid,
            process.start,
            uuid::Uuid::now_v7()
        ))
    }

    /// The process named by an owner built with [`LockOwner::for_process`].
    pub fn process(&self) -> Option<ProcessIdentity> {
        let (_, rest) = self.0.split_once('@')?;
        let mut parts = rest.rsplitn(4, '/');
        let _uuid = parts.next()?;
        let start = parts.next()?.parse().ok()?;
        let pid = parts.next()?.parse().ok()?;
        let host = parts.next()?.to_owned();
        if host.is_empty() {
            return None;
        }
        Some(ProcessIdentity { host, pid, start })
    }
}

impl fmt::Display for LockOwner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A process on a host: host name, pid and start time (so a reused pid is
/// not mistaken for the original process).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProcessIdentity {
    pub host: String,
    pub pid: u32,
    pub start: u64,
}

/// A held label lock: its owner and the fencing token of this acquisition.
///
/// The token grows with every acquisition of the label's lock (by anyone), so
/// a write carrying an older token is from a holder that has since lost the
/// lock. Every journal, cursor and lease write of a run carries its fence and
/// the store applies it only while that exact lock is still held and
/// unexpired (`StoreError::Fenced` otherwise).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fence {
    pub owner: LockOwner,
    pub token: u64,
}

impl fmt::Display for Fence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (token {})", self.owner, self.token)
    }
}

/// Result of trying to take a label lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockOutcome {
    Acquired {
        fence: Fence,
        /// The owner whose lock this acquisition took over: it had not
        /// released it, and it had expired or its process was gone (a
        /// crashed or partitioned orchestrator). `None` for a free or
        /// released lock and for a re-acquisition by the same owner.
        taken_over_from: Option<String>,
    },
    Busy {
        owner: String,
        expires_at: DateTime<Utc>,
    },
}

/// Deterministic key of one side effect announced in the journal (a training
/// job, a prepare restart, a lease): `run_id/kind/n`. Ports that start
/// something take the key and are idempotent for it, so a resumed run that
/// finds the intent journaled without its outcome adopts the job instead of
/// starting a second one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobKey(pub String);

impl JobKey {
    /// The key of the `start`-th training job of `run_id` (1-based; counts
    /// every job started, including cancelled ones).
    pub fn training(run_id: &RunId, start: u32) -> Self {
        Self(format!("{run_id}/train/{start}"))
    }
    /// The key of the restart of prepare job `job` in cycle `cycle_id` (a
    /// shared job is restarted once per cycle, whichever label asks first).
    pub fn prepare(cycle_id: &CycleId, job: &str) -> Self {
        Self(format!("{cycle_id}/prepare/{job}"))
    }
    /// The key of the dataset check of `run_id` (one check per run: a run
    /// accepts one dataset version).
    pub fn dataset_check(run_id: &RunId) -> Self {
        Self(format!("{run_id}/check"))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// A file-name-safe form (`/` → `_`), for pid files and markers.
    pub fn file_stem(&self) -> String {
        self.0
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }
}

impl fmt::Display for JobKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_metrics_survive_the_journal() {
        let candidate = Candidate {
            id: "c".into(),
            metrics: [
                ("acc".to_string(), f64::NAN),
                ("f1".to_string(), f64::INFINITY),
                ("loss".to_string(), f64::NEG_INFINITY),
                ("ok".to_string(), 0.5),
            ]
            .into_iter()
            .collect(),
        };
        let json = serde_json::to_value(&candidate).unwrap();
        assert_eq!(json["metrics"]["acc"], "NaN");
        assert_eq!(json["metrics"]["f1"], "Infinity");
        assert_eq!(json["metrics"]["loss"], "-Infinity");
        assert_eq!(json["metrics"]["ok"], 0.5);
        let back: Candidate = serde_json::from_value(json).unwrap();
        assert!(back.metrics["acc"].is_nan());
        assert_eq!(back.metrics["f1"], f64::INFINITY);
        assert_eq!(back.metrics["loss"], f64::NEG_INFINITY);
        assert_eq!(back.metrics["ok"], 0.5);
        let err = serde_json::from_value::<Candidate>(
            serde_json::json!({"id": "c", "metrics": {"acc": "high"}}),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("acc") && err.contains("high"), "{err}");
    }

    #[test]
    fn lock_owners_name_their_process() {
        let process = ProcessIdentity {
            host: "build-01".into(),
            pid: 4242,
            start: 987_654,
        };
        let owner = LockOwner::for_process("retrain", &process);
        assert!(
            owner.0.starts_with("retrain@build-01/4242/987654/"),
            "{owner}"
        );
        assert_eq!(owner.process(), Some(process));
        assert_eq!(LockOwner::generate("retrain").process(), None);
        for bad in [
            "x@/1/2/u",
            "x@h/pid/2/u",
            "x@h/1/start/u",
            "x@h/1",
            "nohost",
        ] {
            assert_eq!(LockOwner(bad.into()).process(), None, "{bad}");
        }
        // A host name with a slash-free but odd spelling still parses.
        let odd = LockOwner("r@my-host.local/7/8/uuid".into());
        assert_eq!(odd.process().unwrap().host, "my-host.local");
    }

    #[test]
    fn job_keys_are_deterministic_and_file_safe() {
        let run = RunId("0192-ab".into());
        assert_eq!(JobKey::training(&run, 3).as_str(), "0192-ab/train/3");
        assert_ne!(JobKey::training(&run, 3), JobKey::training(&run, 4));
        let cycle = CycleId("c1".into());
        assert_eq!(
            JobKey::prepare(&cycle, "hf-space://o/p").as_str(),
            "c1/prepare/hf-space://o/p"
        );
        assert_eq!(
            JobKey::prepare(&cycle, "hf-space://o/p").file_stem(),
            "c1_prepare_hf-space___o_p"
        );
        assert_eq!(JobKey("a.b-c".into()).file_stem(), "a.b-c");
    }

    #[test]
    fn dataset_len_follows_the_seed_formula() {
        let counts = FeedbackCounts {
            misclassified: 10,
            correct: 100,
        };
        assert_eq!(counts.dataset_len(CorrectRatio::new(1.0).unwrap()), 20);
        assert_eq!(counts.dataset_len(CorrectRatio::new(0.25).unwrap()), 13);
        assert_eq!(counts.dataset_len(CorrectRatio::new(0.0).unwrap()), 10);
        let few_correct = FeedbackCounts {
            misclassified: 10,
            correct: 3,
        };
        assert_eq!(few_correct.dataset_len(CorrectRatio::new(2.0).unwrap()), 13);
    }

    #[test]
    fn labels_are_normalised_and_validated() {
        assert_eq!(Label::new("Department").unwrap().as_str(), "department");
        assert_eq!(Label::new("dept-2").unwrap().env_name(), "DEPT_2");
        assert!(Label::new("").is_err());
        assert!(Label::new("a b").is_err());
        assert!(Label::new("../x").is_err());
    }

    #[test]
    fn seed_metadata_parses_and_keeps_unknown_fields() {
        let raw = br#"{"dataset_name":"owner/ds","version_tag":"v20251030_115250","num_samples":1600,
            "splits":{"train":1280,"eval":160,"test":160},"created_at":"2025-10-30T11:53:01.110260+00:00","source":"x"}"#;
        let meta = DatasetMetadata::parse(raw).unwrap();
        assert_eq!(meta.version_tag.as_str(), "v20251030_115250");
        assert_eq!(meta.num_samples, 1600);
        assert_eq!(meta.splits.as_ref().unwrap()["train"], 1280);
        assert_eq!(meta.extra["source"], "x");
    }

    #[test]
    fn metadata_errors_name_the_field() {
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "not valid JSON"),
            (b"[1]", "must be a JSON object"),
            (br#"{"version_tag":"v","num_samples":1,"created_at":"2025-10-30T11:53:01Z"}"#, "`dataset_name`"),
            (br#"{"dataset_name":"d","num_samples":1,"created_at":"2025-10-30T11:53:01Z"}"#, "`version_tag`"),
            (br#"{"dataset_name":"d","version_tag":"v","created_at":"2025-10-30T11:53:01Z"}"#, "`num_samples`"),
            (br#"{"dataset_name":"d","version_tag":"v","num_samples":-1,"created_at":"2025-10-30T11:53:01Z"}"#, "`num_samples`"),
            (br#"{"dataset_name":"d","version_tag":"v","num_samples":"12","created_at":"2025-10-30T11:53:01Z"}"#, "`num_samples`"),
            (br#"{"dataset_name":"d","version_tag":"v","num_samples":1,"created_at":"yesterday"}"#, "`created_at`"),
            (br#"{"dataset_name":"d","version_tag":"v","num_samples":1,"created_at":"2025-10-30T11:53:01Z","splits":{"a":1.5}}"#, "`splits.a`"),
            (br#"{"dataset_name":"d","version_tag":7,"num_samples":1,"created_at":"2025-10-30T11:53:01Z"}"#, "`version_tag`"),
        ];
        for (raw, needle) in cases {
            let err = DatasetMetadata::parse(raw).unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} should mention {needle}");
        }
    }

    #[test]
    fn space_stages_are_an_open_enum() {
        assert!(SpaceStage::from_hub("BUILD_ERROR").is_error());
        assert!(SpaceStage::from_hub("NO_APP_FILE").is_error());
        assert_eq!(
            SpaceStage::from_hub("SOMETHING_NEW"),
            SpaceStage::Unknown("SOMETHING_NEW".into())
        );
        assert!(!SpaceStage::from_hub("SOMETHING_NEW").is_error());
    }
}
