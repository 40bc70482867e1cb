//! retrain-core integration tests (one binary): machine properties, engine
//! invariants with fakes and mockall mocks, and the purity check.

mod approval;
mod concurrency;
mod engine;
mod machine_props;
mod purity;
mod scale;
mod support;
