//! `retrain-adapters`: implementations of the `retrain-core` ports.
//!
//! One module per adapter. Every HTTP adapter goes through [`http`], which
//! owns timeouts, retries and secret-free error messages.

pub mod error;
pub mod http;

pub use error::AdapterError;
pub mod aws;
pub mod ec2;
pub mod github;
pub mod mlflow;
pub mod s3;
pub mod webhook;
