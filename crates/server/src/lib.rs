//! `retrain-server` as a library: the pieces the binary mounts and tests
//! drive directly.

pub mod metrics;
pub mod schedule;
pub mod webhooks;
