//! `retrain-server`: the engine behind HTTP (seed 003's trigger service).
//!
//! - [`Application::build`] loads nothing itself: it takes the loaded
//!   settings, opens the run store (migrating it), builds the one engine of
//!   this process and binds (port 0 in tests), then
//!   [`Application::run_until`] serves until a shutdown signal.
//! - `routes/`: one module per resource (health, runs, labels, events);
//!   `auth.rs`: bearer tokens and scopes; `error.rs`: the JSON error shape
//!   with stable codes; `state.rs`: what handlers share; `maintenance.rs`:
//!   what the server does on its own (reaping stale leases); `artifacts.rs`:
//!   uploaded artifacts on disk and in the store.
//!
//! Every handler that drives the engine runs it in a task of its own
//! (tracked for shutdown), so a client that hangs up never drops a cycle or
//! a decision half-way.

pub mod app;
pub mod artifacts;
pub mod auth;
pub mod error;
pub mod logging;
pub mod maintenance;
pub mod metrics;
pub mod routes;
pub mod schedule;
pub mod state;
pub mod webhooks;

pub use app::{Application, ServeOptions, StartupError};
