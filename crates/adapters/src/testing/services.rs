//! Real services for tests (PostgreSQL, `mlflow server`, `moto_server`), found
//! through env vars that `scripts/test.sh` / `.ci/run` export.

use secrecy::SecretString;
use sqlx::Connection;

use crate::aws::AwsSettings;

/// The admin URL of a throwaway PostgreSQL cluster.
pub const POSTGRES_VAR: &str = "RETRAIN_TEST_POSTGRES_URL";
/// The URL of `moto_server` (S3 and EC2).
pub const MOTO_VAR: &str = "RETRAIN_TEST_MOTO_URL";
/// The URL of `mlflow server`.
pub const MLFLOW_VAR: &str = "RETRAIN_TEST_MLFLOW_URL";
/// The virtualenv `scripts/start-services.sh` installed mlflow and moto
/// into (its `bin/python` has their client libraries).
pub const VENV_VAR: &str = "RETRAIN_VENV";

/// The access key moto accepts (any works; this one is on the record).
pub const MOTO_ACCESS_KEY: &str = "testing";
/// The secret key tests give moto; tests assert it never shows in logs,
/// errors or `Debug` output, so it is distinctive.
pub const MOTO_SECRET_KEY: &str = "moto-secret-key";
/// The one region the tests use.
pub const MOTO_REGION: &str = "us-east-1";

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

/// AWS settings that point every signed call at moto (or a wiremock
/// standing in for AWS) at `url`.
///
/// # Panics
/// When `url` is not a URL: a test helper.
pub fn moto_settings(url: &str) -> AwsSettings {
    AwsSettings::new(
        MOTO_ACCESS_KEY,
        SecretString::from(MOTO_SECRET_KEY),
        MOTO_REGION,
    )
    .with_endpoint(url::Url::parse(url).expect("the moto URL parses"))
}

/// The environment a `retrain` process needs to talk to moto at `url`, with
/// the same credentials as [`moto_settings`].
pub fn moto_env(url: &str) -> [(&'static str, String); 4] {
    [
        ("AWS_ACCESS_KEY_ID", MOTO_ACCESS_KEY.to_owned()),
        ("AWS_SECRET_ACCESS_KEY", MOTO_SECRET_KEY.to_owned()),
        ("AWS_REGION", MOTO_REGION.to_owned()),
        ("AWS_ENDPOINT_URL", url.to_owned()),
    ]
}

/// A name no other test (or earlier run against the same long-lived
/// service) uses: `prefix-` and 12 hex digits of a v7 UUID's random part.
pub fn unique_name(prefix: &str) -> String {
    let uuid = uuid::Uuid::now_v7().simple().to_string();
    format!("{prefix}-{}", &uuid[20..])
}

/// A signed S3 `PUT` to `{base}/{path}`: a bucket when `path` has no `/`,
/// else an object.
///
/// # Panics
/// When the PUT fails: a test helper.
pub async fn s3_put(settings: &AwsSettings, base: &str, path: &str, body: &[u8]) {
    let url = url::Url::parse(&format!("{}/{path}", base.trim_end_matches('/')))
        .expect("the S3 URL parses");
    let headers = settings
        .signer("s3")
        .sign("PUT", &url, &[], body)
        .expect("the PUT is signed");
    let mut request = reqwest::Client::new().put(url.clone()).body(body.to_vec());
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let response = request.send().await.expect("the PUT is answered");
    assert!(
        response.status().is_success(),
        "PUT {url}: {}",
        response.status()
    );
}

/// Dataset metadata as the seeds publish it (`dataset_metadata.json`).
pub fn dataset_metadata(name: &str, version: &str, samples: u64) -> serde_json::Value {
    serde_json::json!({
        "dataset_name": name,
        "version_tag": version,
        "num_samples": samples,
        "created_at": "2026-02-10T12:34:56Z",
        "splits": {"train": samples}
    })
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
