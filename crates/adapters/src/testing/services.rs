//! Real services for tests (PostgreSQL, `mlflow server`, `moto_server`), found
//! through env vars that `scripts/test.sh` / `.ci/run` export.

use sqlx::Connection;

/// The admin URL of a throwaway PostgreSQL cluster.
pub const POSTGRES_VAR: &str = "RETRAIN_TEST_POSTGRES_URL";

/// The URL of a real service for a test, from `var`.
///
/// Unset: returns `None` after printing a skip notice, or panics when
/// `CI=true` (a CI run must exercise the real thing).
pub fn service_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => Some(v),
        _ => {
            if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
                panic!(
                    "{var} is not set but CI=true: .ci/run must start the service and export {var}"
                );
            }
            eprintln!("skipped: {var} is not set (run scripts/test.sh to start the service)");
            None
        }
    }
}

/// A URL of a new, empty Postgres database made from the admin URL in
/// [`POSTGRES_VAR`] (one database per test, so tests never see each other's
/// rows; the throwaway cluster is deleted as a whole afterwards), or `None`
/// (skipped) when the var is unset.
pub async fn fresh_postgres_database() -> Option<String> {
    let admin = service_url(POSTGRES_VAR)?;
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {POSTGRES_VAR}: {e}"));
    let name = format!("retrain_test_{}", uuid::Uuid::now_v7().simple());
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("cannot create database {name}: {e}"));
    let mut url = url::Url::parse(&admin).expect("admin URL parses");
    url.set_path(&format!("/{name}"));
    Some(url.to_string())
}

/// A new EC2 instance in moto, stopped, created through a signed
/// `RunInstances` call; its id.
///
/// # Panics
/// When moto refuses: a test helper.
pub async fn stopped_instance(client: &crate::ec2::Ec2Client) -> String {
    let xml = client
        .call(
            "RunInstances",
            &[
                ("ImageId".into(), "ami-12c6146b".into()),
                ("MinCount".into(), "1".into()),
                ("MaxCount".into(), "1".into()),
                ("InstanceType".into(), "t3.micro".into()),
            ],
        )
        .await
        .expect("RunInstances")
        .expect("RunInstances answered");
    let start = xml.find("<instanceId>").expect("an instance id") + "<instanceId>".len();
    let end = start + xml[start..].find("</instanceId>").expect("an instance id");
    let id = xml[start..end].to_owned();
    client
        .stop_instances(std::slice::from_ref(&id))
        .await
        .expect("StopInstances");
    id
}
