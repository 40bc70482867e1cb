//! Throughput of the pure state machine: one full happy-path run (count →
//! prepare → 3 polls → train → gate → promote → notify → commit) is 12
//! transitions. Target (§11): >= 1,000,000 transitions/s.
//!
//!     cargo bench -p retrain-core --bench machine

use std::time::Duration;

use chrono::{DateTime, Utc};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use retrain_core::domain::*;
use retrain_core::gate::GatePolicy;
use retrain_core::machine::{Event, LabelPlan, LabelRun, PromoteMode, Trigger};

fn dataset(tag: &str, n: u64) -> DatasetVersion {
    DatasetVersion {
        metadata: DatasetMetadata {
            dataset_name: "owner/ds".into(),
            version_tag: VersionTag::new(tag),
            num_samples: n,
            created_at: DateTime::<Utc>::from_timestamp(1_700_000_000, 0).unwrap(),
            splits: None,
            extra: Default::default(),
        },
        revision: None,
    }
}

fn events() -> Vec<Event> {
    let now = DateTime::<Utc>::from_timestamp(1_700_000_000, 0).unwrap();
    let metrics: Metrics = [("dice".to_string(), 0.9), ("iou".to_string(), 0.8)]
        .into_iter()
        .collect();
    vec![
        Event::Started { now },
        Event::CountsRead {
            counts: FeedbackCounts {
                misclassified: 50,
                correct: 100,
            },
        },
        Event::PublishedRead {
            current: Some(dataset("v1", 10)),
        },
        Event::PrepareRestarted { now },
        Event::Polled {
            now,
            dataset: Some(dataset("v1", 10)),
            prepare_stage: Some(SpaceStage::Running),
        },
        Event::Polled {
            now,
            dataset: None,
            prepare_stage: Some(SpaceStage::Running),
        },
        Event::Polled {
            now,
            dataset: Some(dataset("v2", 500)),
            prepare_stage: Some(SpaceStage::Running),
        },
        Event::TrainingStarted {
            handle: TrainingHandle {
                kind: "bench".into(),
                data: serde_json::Value::Null,
            },
        },
        Event::TrainingFinished {
            candidate: Candidate {
                id: "c".into(),
                metrics,
            },
        },
        Event::BaselineRead { production: None },
        Event::Promoted {
            version: PromotedVersion {
                version: "1".into(),
                previous: None,
            },
        },
        Event::Notified { error: None },
        Event::Committed,
    ]
}

fn bench(c: &mut Criterion) {
    let plan = LabelPlan {
        label: Label::new("department").unwrap(),
        trigger: Trigger::Counts {
            threshold: 40,
            correct_ratio: CorrectRatio::default(),
        },
        prepare: Some("prep".into()),
        gate: Some(GatePolicy::seed_default()),
        leased: false,
        promote: PromoteMode::Auto,
        max_attempts: 2,
        max_step_retries: 5,
        poll_interval: Duration::from_secs(60),
        poll_timeout: Duration::from_secs(1800),
        dry_run: false,
        approval_expires: retrain_core::machine::DEFAULT_APPROVAL_EXPIRES,
        dataset_check: false,
    };
    let events = events();
    let template = LabelRun::new(
        RunId("bench".into()),
        CycleId("bench".into()),
        plan,
        LabelCursor::default(),
    );
    let mut group = c.benchmark_group("machine");
    group.throughput(Throughput::Elements(events.len() as u64));
    group.bench_function("full_run_transitions", |b| {
        b.iter(|| {
            let mut run = template.clone();
            for event in &events {
                black_box(run.step(black_box(event)).unwrap());
            }
            assert!(run.is_done());
            run
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
