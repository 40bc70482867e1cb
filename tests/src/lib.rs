//! The one harness of retrain's process-level tests: the `retrain` binary
//! ([`retrain_bin`]), a temporary project directory to run it in
//! ([`Project`], [`Project::quickstart`]), what a run left behind ([`Ran`],
//! [`label_status`]), and — re-exported from `retrain_adapters::testing` —
//! the real services (PostgreSQL, mlflow, moto: [`services`]) and fake ones
//! (the stateful Hugging Face Hub: [`FakeHub`]).
//!
//! The scenarios in this crate's `tests/` and the `retrain-cli` tests use it
//! instead of each repeating the setup.

mod binary;
mod project;
mod ran;

pub use binary::{retrain_bin, RETRAIN_BIN_VAR};
pub use project::Project;
pub use ran::{label_status, Ran};
pub use retrain_adapters::testing::fake_hub::FakeHub;
pub use retrain_adapters::testing::{routes, services};
