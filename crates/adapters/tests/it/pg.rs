//! Fresh Postgres databases for tests, made from the admin URL in
//! `RETRAIN_TEST_POSTGRES_URL` (see `retrain_adapters::testing::services`).

pub use retrain_adapters::testing::services::fresh_postgres_database as fresh_database;
