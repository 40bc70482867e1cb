//! retrain-core integration tests (one binary): machine properties, engine
//! invariants with fakes and mockall mocks, and the purity check.

mod approval;
mod audit;
mod concurrency;
mod dataset_check;
mod engine;
mod history;
mod machine_props;
mod purity;
mod rollback;
mod scale;
mod support;
