//! Fresh Postgres databases for tests, made from the admin URL in
//! `RETRAIN_TEST_POSTGRES_URL` (one database per test, so tests never see
//! each other's rows; the throwaway cluster of scripts/start-postgres.sh is
//! deleted as a whole afterwards).

#![allow(dead_code)]

use sqlx::Connection;

use crate::common;

pub const VAR: &str = "RETRAIN_TEST_POSTGRES_URL";

/// A URL of a new, empty database, or `None` (skipped) when the var is unset.
pub async fn fresh_database() -> Option<String> {
    let admin = common::service_url(VAR)?;
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {VAR}: {e}"));
    let name = format!("retrain_test_{}", uuid::Uuid::now_v7().simple());
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("cannot create database {name}: {e}"));
    let mut url = url::Url::parse(&admin).expect("admin URL parses");
    url.set_path(&format!("/{name}"));
    Some(url.to_string())
}
