//! The audit trail (`engine/audit.rs`): one `retrain::audit` event per
//! journaled transition, with the status, level, duration and next actions
//! that the JSON logs and `--log-dir` carry.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use tracing::field::{Field, Visit};
use tracing::{Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

use retrain_core::report::LabelStatus;

use crate::support::*;

/// One audit event: its level and its fields as text.
#[derive(Debug, Clone)]
struct Step {
    level: Level,
    fields: BTreeMap<String, String>,
}

impl Step {
    fn field(&self, name: &str) -> &str {
        self.fields.get(name).map_or("", String::as_str)
    }
}

thread_local! {
    /// The audit steps of the test running on this thread, while it records.
    static RECORDED: std::cell::RefCell<Option<Vec<Step>>> = const { std::cell::RefCell::new(None) };
}

/// Records the `retrain::audit` events into [`RECORDED`]. Installed once as
/// the global default: scoped subscribers set and dropped by tests running
/// in parallel make tracing rebuild its callsite interest under them, which
/// lost events now and then.
struct AuditSteps;

impl<S: Subscriber> Layer<S> for AuditSteps {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        if event.metadata().target() != "retrain::audit" {
            return;
        }
        RECORDED.with(|recorded| {
            if let Some(steps) = recorded.borrow_mut().as_mut() {
                let mut fields = Fields::default();
                event.record(&mut fields);
                steps.push(Step {
                    level: *event.metadata().level(),
                    fields: fields.0,
                });
            }
        });
    }
}

fn record_audit_steps() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(AuditSteps))
            .expect("no other global subscriber in these tests");
    });
    RECORDED.with(|recorded| *recorded.borrow_mut() = Some(Vec::new()));
}

fn recorded_audit_steps() -> Vec<Step> {
    RECORDED.with(|recorded| recorded.borrow_mut().take().unwrap_or_default())
}

#[derive(Default)]
struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.to_owned());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.to_string());
    }
}

/// The audit steps of one cycle of `department` in `world`.
async fn audited_cycle(world: &World) -> (LabelStatus, Vec<Step>) {
    record_audit_steps();
    let store = MemStore::new();
    let engine = department_engine(&store, world);
    let report = engine
        .run_cycle(
            retrain_core::engine::CycleRequest::default(),
            retrain_core::CancellationToken::new(),
        )
        .await
        .unwrap();
    let recorded = recorded_audit_steps();
    (report.labels[0].status, recorded)
}

#[tokio::test(start_paused = true)]
async fn a_promoted_run_leaves_ok_steps_then_done_ones_all_at_info() {
    let world = World::new();
    let (status, steps) = audited_cycle(&world).await;
    assert_eq!(status, LabelStatus::Promoted);
    assert!(steps.len() >= 8, "{steps:#?}");
    // "ok" until the outcome is known (promoted), "done" from then on.
    let statuses: Vec<&str> = steps.iter().map(|s| s.field("status")).collect();
    let oks = statuses.iter().take_while(|s| **s == "ok").count();
    assert!(oks >= 5, "{statuses:?}");
    assert!(oks < statuses.len(), "{statuses:?}");
    assert!(statuses[oks..].iter().all(|s| *s == "done"), "{statuses:?}");
    assert!(steps.iter().all(|s| s.level == Level::INFO), "{steps:#?}");
    // The training takes 5 s of (paused) time: the step that ends it says
    // so, in seconds.
    let trained = steps
        .iter()
        .find(|s| {
            s.field("outputs")
                .contains("\"event\":\"training_finished\"")
        })
        .unwrap_or_else(|| panic!("no training_finished step in {steps:#?}"));
    assert_eq!(trained.field("duration_s"), "5", "{trained:?}");
    // Each step names the actions it leaves pending.
    let started = steps
        .iter()
        .find(|s| s.field("outputs").contains("\"next\":[\"start_training\"]"));
    assert!(
        started.is_some(),
        "no step announces start_training: {steps:#?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_run_ends_with_a_failed_warning() {
    let world = World::new();
    *world.trainer_fails.lock().unwrap() = true;
    let (status, steps) = audited_cycle(&world).await;
    assert_eq!(status, LabelStatus::Failed);
    let last = steps.last().unwrap();
    assert_eq!(last.field("status"), "failed", "{last:?}");
    assert_eq!(last.level, Level::WARN);
    assert!(last.field("outputs").contains("\"error\":"), "{last:?}");
}

#[tokio::test(start_paused = true)]
async fn a_deferred_step_is_a_warning_and_not_a_failure() {
    let world = World::new();
    world.registry_outages.store(1, Ordering::SeqCst);
    let (status, steps) = audited_cycle(&world).await;
    assert_eq!(status, LabelStatus::Deferred);
    let deferred: Vec<&Step> = steps
        .iter()
        .filter(|s| s.field("status") == "deferred")
        .collect();
    assert!(!deferred.is_empty(), "{steps:#?}");
    assert!(deferred.iter().all(|s| s.level == Level::WARN));
    assert!(steps.iter().all(|s| s.field("status") != "failed"));
}
