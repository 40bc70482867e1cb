//! `retrain-adapters`: implementations of the `retrain-core` ports.
//!
//! One module per adapter. Every HTTP adapter goes through [`http`], which
//! owns timeouts, retries and secret-free error messages.

pub mod counts;
mod db;
pub mod error;
pub mod http;
pub mod store;

pub use error::AdapterError;
