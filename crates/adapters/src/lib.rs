//! `retrain-adapters`: implementations of the `retrain-core` ports, the
//! layered configuration, and the wiring that turns one into the other.
//!
//! One module per adapter. Every HTTP adapter goes through [`http`], which
//! owns timeouts, retries and secret-free error messages.

pub mod aws;
pub mod build_info;
pub mod command;
pub mod counts;
mod db;
pub mod ec2;
pub mod error;
pub mod file_metadata;
pub mod github;
pub mod github_workflow;
pub mod hf;
pub mod http;
pub mod json_registry;
pub mod log_notifier;
pub mod mlflow;
pub mod process;
pub mod s3;
pub mod scrub;
pub mod settings;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod webhook;
pub mod wiring;
pub mod worker_agent;
pub mod worker_trainer;

pub use error::AdapterError;
