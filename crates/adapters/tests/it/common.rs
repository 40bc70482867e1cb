//! Shared helpers for adapter integration tests.

pub use retrain_adapters::testing::services::service_url;
