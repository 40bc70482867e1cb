//! Integration tests of `retrain-server`: one `spawn_app()` harness
//! (`support.rs`) on SQLite and on the real Postgres.

mod api;
mod artifacts;
mod labels_reads;
mod openapi;
mod process;
mod processes;
mod replicas;
mod schedule;
mod support;
mod webhooks;
mod worker_processes;
mod workers;
