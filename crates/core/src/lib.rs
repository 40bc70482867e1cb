//! `retrain-core`: the pure domain of retrain.
//!
//! - [`domain`]: validated value types (labels, counts, dataset metadata, leases).
//! - [`ports`]: the interfaces adapters implement (`CountSource`, `SpaceController`,
//!   `MetadataStore`, `Trainer`, `ModelRegistry`, `RunStore`, `Notifier`, `LeaseProvider`).
//! - [`machine`]: the sans-IO state machine of one label's run.
//! - [`engine`]: the async driver that journals every transition and executes actions.
//! - [`gate`]: the quality gate.
//!
//! No I/O crate is a dependency of this crate (checked by a test).

pub mod domain;
pub mod engine;
pub mod failpoint;
pub mod gate;
pub mod history;
pub mod journal;
pub mod lifecycle;
pub mod machine;
pub mod manifest;
pub mod ports;
pub mod report;

pub use tokio_util::sync::CancellationToken;

/// Mocks of every port, for tests of other crates (`features = ["mocks"]`).
#[cfg(any(test, feature = "mocks"))]
pub mod mocks {
    pub use crate::ports::{
        MockCountSource, MockLeaseProvider, MockMetadataStore, MockModelRegistry, MockNotifier,
        MockRunStore, MockSpaceController, MockTrainer,
    };
}
