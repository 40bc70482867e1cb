//! Test doubles for other crates' end-to-end tests (cargo feature `testing`).

pub mod fake_hub;
