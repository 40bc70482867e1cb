//! Test doubles and test services for this crate's and other crates' tests
//! (cargo feature `testing`).

pub mod fake_hub;
pub mod routes;
pub mod services;
