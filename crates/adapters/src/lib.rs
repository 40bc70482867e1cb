//! `retrain-adapters`: implementations of the `retrain-core` ports, the
//! layered configuration, and the wiring that turns one into the other.
//!
//! One module per adapter. Every HTTP adapter goes through [`http`], which
//! owns timeouts, retries and secret-free error messages.

pub mod counts;
mod db;
pub mod error;
pub mod http;
pub mod settings;
pub mod store;

pub use error::AdapterError;
pub mod hf;
#[cfg(feature = "testing")]
pub mod testing;
pub mod aws;
pub mod ec2;
pub mod github;
pub mod mlflow;
pub mod s3;
pub mod webhook;
