//! `retrain-adapters`: implementations of the `retrain-core` ports.
//!
//! One module per adapter. Every HTTP adapter goes through [`http`], which
//! owns timeouts, retries and secret-free error messages.

pub mod command;
pub mod error;
pub mod file_metadata;
pub mod http;
pub mod json_registry;
pub mod log_notifier;

pub use error::AdapterError;
