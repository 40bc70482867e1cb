//! `GET /v1/labels` costs one store read per page, whatever the number of
//! labels: counted with a `RunStore` wrapper put in the app's state.
//! (Before: 5 reads per label, 6 with a finished run, one of which listed
//! every run of the label.)

use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::extract::{Query, State};
use retrain_adapters::settings::{load, ConfigSources};
use retrain_core::domain::{Fence, Label, LabelCursor, Lease, LockOutcome, LockOwner, RunId};
use retrain_core::journal::{
    JournalEntry, LabelStatusRow, PromotionEvent, RequestClaim, RunDetail, RunFilter, RunPage,
    RunSummary, Transition,
};
use retrain_core::machine::LabelRun;
use retrain_core::ports::{RunStore, StoreError};
use retrain_server::auth::Caller;
use retrain_server::routes::labels::{list, LabelsQuery};
use retrain_server::routes::Authorized;
use retrain_server::{Application, ServeOptions};

use crate::support::{Store, Workspace};

/// Delegates to `inner`, recording the name of every call.
struct Counting {
    inner: Arc<dyn RunStore>,
    calls: Mutex<Vec<&'static str>>,
}

impl Counting {
    fn count(&self, name: &'static str) {
        self.calls.lock().unwrap().push(name);
    }
}

#[async_trait]
impl RunStore for Counting {
    async fn try_lock(
        &self,
        label: &Label,
        owner: &LockOwner,
        ttl: Duration,
    ) -> Result<LockOutcome, StoreError> {
        self.count("try_lock");
        self.inner.try_lock(label, owner, ttl).await
    }
    async fn renew_lock(
        &self,
        label: &Label,
        fence: &Fence,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.count("renew_lock");
        self.inner.renew_lock(label, fence, ttl).await
    }
    async fn release_lock(&self, label: &Label, fence: &Fence) -> Result<(), StoreError> {
        self.count("release_lock");
        self.inner.release_lock(label, fence).await
    }
    async fn cursor(&self, label: &Label) -> Result<LabelCursor, StoreError> {
        self.count("cursor");
        self.inner.cursor(label).await
    }
    async fn unfinished_run(&self, label: &Label) -> Result<Option<LabelRun>, StoreError> {
        self.count("unfinished_run");
        self.inner.unfinished_run(label).await
    }
    async fn record(&self, transition: &Transition, fence: &Fence) -> Result<(), StoreError> {
        self.count("record");
        self.inner.record(transition, fence).await
    }
    async fn record_all(
        &self,
        transitions: &[Transition],
        fence: &Fence,
    ) -> Result<(), StoreError> {
        self.count("record_all");
        self.inner.record_all(transitions, fence).await
    }
    async fn finish(
        &self,
        transition: &Transition,
        cursor: Option<LabelCursor>,
        fence: &Fence,
    ) -> Result<(), StoreError> {
        self.count("finish");
        self.inner.finish(transition, cursor, fence).await
    }
    async fn finish_all(
        &self,
        transitions: &[Transition],
        cursor: Option<LabelCursor>,
        fence: &Fence,
    ) -> Result<(), StoreError> {
        self.count("finish_all");
        self.inner.finish_all(transitions, cursor, fence).await
    }
    async fn finish_and_unlock(
        &self,
        transitions: &[Transition],
        cursor: Option<LabelCursor>,
        fence: &Fence,
    ) -> Result<(), StoreError> {
        self.count("finish_and_unlock");
        self.inner
            .finish_and_unlock(transitions, cursor, fence)
            .await
    }
    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunSummary>, StoreError> {
        self.count("list_runs");
        self.inner.list_runs(filter).await
    }
    async fn list_runs_page(&self, page: &RunPage) -> Result<Vec<RunSummary>, StoreError> {
        self.count("list_runs_page");
        self.inner.list_runs_page(page).await
    }
    async fn label_statuses(&self, labels: &[Label]) -> Result<Vec<LabelStatusRow>, StoreError> {
        self.count("label_statuses");
        self.inner.label_statuses(labels).await
    }
    async fn promotions(&self, label: &Label) -> Result<Vec<PromotionEvent>, StoreError> {
        self.count("promotions");
        self.inner.promotions(label).await
    }
    async fn run(&self, run_id: &RunId) -> Result<Option<RunDetail>, StoreError> {
        self.count("run");
        self.inner.run(run_id).await
    }
    async fn put_lease(&self, lease: &Lease, fence: &Fence) -> Result<(), StoreError> {
        self.count("put_lease");
        self.inner.put_lease(lease, fence).await
    }
    async fn put_lease_unfenced(&self, lease: &Lease) -> Result<(), StoreError> {
        self.count("put_lease_unfenced");
        self.inner.put_lease_unfenced(lease).await
    }
    async fn active_leases(&self) -> Result<Vec<Lease>, StoreError> {
        self.count("active_leases");
        self.inner.active_leases().await
    }
    async fn lock_holder(&self, label: &Label) -> Result<Option<String>, StoreError> {
        self.count("lock_holder");
        self.inner.lock_holder(label).await
    }
    async fn journal_after(
        &self,
        after: u64,
        label: Option<Label>,
        limit: u32,
    ) -> Result<Vec<JournalEntry>, StoreError> {
        self.count("journal_after");
        self.inner.journal_after(after, label, limit).await
    }
    async fn journal_end(&self) -> Result<u64, StoreError> {
        self.count("journal_end");
        self.inner.journal_end().await
    }
    async fn claim_request(
        &self,
        key: &str,
        fingerprint: &str,
    ) -> Result<RequestClaim, StoreError> {
        self.count("claim_request");
        self.inner.claim_request(key, fingerprint).await
    }
    async fn complete_request(&self, key: &str, response: &str) -> Result<(), StoreError> {
        self.count("complete_request");
        self.inner.complete_request(key, response).await
    }
    async fn release_request(&self, key: &str) -> Result<(), StoreError> {
        self.count("release_request");
        self.inner.release_request(key).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_labels_page_is_one_store_read_whatever_the_number_of_labels() {
    let workspace = Workspace::new(&Store::Sqlite);
    let sources = ConfigSources {
        file: Some(workspace.config()),
        env: Workspace::env(),
        overrides: Vec::new(),
    };
    let app = Application::build(load(&sources).unwrap(), ServeOptions::default())
        .await
        .unwrap();
    let mut state = app.state().clone();
    let counting = Arc::new(Counting {
        inner: state.store.clone(),
        calls: Mutex::new(Vec::new()),
    });
    state.store = counting.clone();
    let labels = state.settings.labels.len();
    assert!(labels >= 3);
    let page = list(
        Authorized(
            Caller {
                name: "reader".into(),
            },
            PhantomData,
        ),
        State(state),
        Ok(Query(LabelsQuery {
            cursor: None,
            limit: None,
        })),
    )
    .await
    .unwrap();
    let body = axum::body::to_bytes(page.into_body(), usize::MAX)
        .await
        .unwrap();
    let page: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(page["labels"].as_array().unwrap().len(), labels);
    assert_eq!(
        *counting.calls.lock().unwrap(),
        ["label_statuses"],
        "{labels} labels"
    );
}
