//! One contract suite for every `RunStore`, run against SQLite (a temp file)
//! and Postgres (a fresh database per test).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use retrain_adapters::store::{open_run_store, StoreOptions};
use retrain_core::domain::{
    Candidate, CycleId, DatasetMetadata, DatasetVersion, Label, LabelCursor, Lease, LockOutcome,
    LockOwner, RunId, TrainingHandle, TrainingOutcome, VersionTag,
};
use retrain_core::journal::{RunFilter, Transition};
use retrain_core::machine::{Action, Event, LabelPlan, LabelRun, PromoteMode, Stage, Trigger};
use retrain_core::ports::{RunStore, StoreError};

use crate::pg;

pub fn label(name: &str) -> Label {
    Label::new(name).unwrap()
}

pub fn plan(name: &str) -> LabelPlan {
    LabelPlan {
        label: label(name),
        trigger: Trigger::Metadata { threshold: 1 },
        prepare: None,
        gate: None,
        leased: false,
        promote: PromoteMode::Auto,
        max_attempts: 2,
        max_step_retries: 5,
        poll_interval: Duration::from_secs(1),
        poll_timeout: Duration::from_secs(60),
        dry_run: false,
    }
}

pub fn dataset(version: &str, samples: u64) -> DatasetVersion {
    let raw = format!(
        r#"{{"dataset_name":"owner/ds","version_tag":"{version}","num_samples":{samples},"created_at":"2025-10-30T11:53:01.110260+00:00"}}"#
    );
    DatasetVersion {
        metadata: DatasetMetadata::parse(raw.as_bytes()).unwrap(),
        revision: None,
    }
}
