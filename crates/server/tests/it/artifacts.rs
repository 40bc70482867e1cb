//! `PUT/GET /v1/runs/{id}/artifacts/{name}`: the round trip with its hash in
//! the manifest, and every refusal leaving nothing behind (traversal forms
//! sent raw, so no client normalizes them first; oversized, declared or
//! streamed; unknown run; wrong scope).

use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{
    entry, spawn_app, TestApp, Workspace, ADMIN, ARTIFACT_MAX_BYTES, READER, TRIGGER,
};

/// A finished run of `intent`.
async fn finished_run(app: &TestApp) -> String {
    let started = app.trigger(&["intent"]).await;
    let run_id = entry(&started, "intent")["run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.wait_stage(&run_id, &["done"]).await;
    run_id
}

/// Every file under `dir` (recursively), relative to it.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(files_under(&path));
        } else {
            found.push(path);
        }
    }
    found.sort();
    found
}

/// One request written by hand (the path goes out exactly as given); the
/// response's status.
async fn raw_request(app: &TestApp, method: &str, path: &str, head: &str, body: &[u8]) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {ADMIN}\r\nConnection: close\r\n{head}\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    // The server may answer and close before reading everything.
    let _ = stream.write_all(body).await;
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    let response = String::from_utf8_lossy(&response);
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {response:?}"))
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_round_trips_with_its_hash_in_the_manifest() {
    let (workspace, app) = spawn_app(crate::support::Store::Sqlite).await;
    let run_id = finished_run(&app).await;
    let url = format!("/v1/runs/{run_id}/artifacts/model.bin");
    // Larger than the default body_limit (1 MiB), which must not apply.
    let bytes: Vec<u8> = (0..1_500_000u32).map(|i| (i % 251) as u8).collect();
    let response = app
        .client
        .put(app.url(&url))
        .bearer_auth(ADMIN)
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let created: Value = response.json().await.unwrap();
    assert_eq!(created["name"], "model.bin");
    assert_eq!(created["size_bytes"], bytes.len());
    assert_eq!(created["sha256"], sha256(&bytes));

    let response = app.get(&url, READER).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let etag = response.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(etag, format!("\"{}\"", sha256(&bytes)));
    assert_eq!(response.bytes().await.unwrap(), bytes);
    let unchanged = app
        .get(&url, READER)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(unchanged.status(), 304);

    // A second upload of the name replaces the bytes and the record.
    let replaced = b"second version".to_vec();
    let response = app
        .client
        .put(app.url(&url))
        .bearer_auth(ADMIN)
        .body(replaced.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(
        app.get(&url, READER)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
        replaced
    );
    let run: Value = app.read_json(&format!("/v1/runs/{run_id}")).await;
    let artifacts = run["manifest"]["artifacts"].as_array().unwrap();
    assert_eq!(artifacts.len(), 1, "{artifacts:?}");
    assert_eq!(artifacts[0]["name"], "model.bin");
    assert_eq!(artifacts[0]["size_bytes"], replaced.len());
    assert_eq!(artifacts[0]["sha256"], sha256(&replaced));
    assert_eq!(artifacts[0]["uploaded_by"], "admin");
    assert!(artifacts[0]["uploaded_at"].is_string());
    // On disk: exactly the artifact, no temporary file left.
    let dir = workspace.root().join("artifacts");
    assert_eq!(files_under(&dir), [dir.join(&run_id).join("model.bin")]);
    let missing = app
        .get(&format!("/v1/runs/{run_id}/artifacts/other.bin"), READER)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    app.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traversal_oversize_unknown_runs_and_wrong_scopes_are_refused_leaving_nothing() {
    let (workspace, app) = spawn_app(crate::support::Store::Sqlite).await;
    let run_id = finished_run(&app).await;
    let before = files_under(workspace.root());
    let base = format!("/v1/runs/{run_id}/artifacts");
    let put = |name: &str| format!("{base}/{name}");
    let body = b"evil!";
    let five = "Content-Length: 5\r\n";
    // One segment that decodes to something that is not a name: 400.
    for name in [
        "..",
        ".",
        "%2e%2e",
        "%2E%2E",
        "%2e%2e%2fescape",
        "..%2fescape",
        "%2fetc%2fescape",
        "%2F..%2F..%2Fescape",
        "a%00b",
        "a%5cescape",
        "..%5cescape",
        "a%20b",
        "%C3%A9",
        "%ff",
    ] {
        let status = raw_request(&app, "PUT", &put(name), five, body).await;
        assert_eq!(status, 400, "{name}");
    }
    // Forms that are not one segment never reach the handler.
    for path in [
        format!("{base}/../../../escape"),
        format!("{base}/a/b"),
        format!("{base}/a\\..\\escape"),
        format!("{base}//escape"),
    ] {
        let status = raw_request(&app, "PUT", &path, five, body).await;
        assert!((400..500).contains(&status), "{path}: {status}");
    }
    // Too large: declared, then streamed without a length.
    let limit = usize::try_from(ARTIFACT_MAX_BYTES).unwrap();
    let declared = format!("Content-Length: {}\r\n", limit + 1);
    let status = raw_request(
        &app,
        "PUT",
        &put("big.bin"),
        &declared,
        &vec![7u8; limit + 1],
    )
    .await;
    assert_eq!(status, 413);
    let mut chunked = Vec::new();
    for _ in 0..(limit / 65536 + 2) {
        chunked.extend_from_slice(format!("{:x}\r\n", 65536).as_bytes());
        chunked.extend_from_slice(&[7u8; 65536]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let status = raw_request(
        &app,
        "PUT",
        &put("big.bin"),
        "Transfer-Encoding: chunked\r\n",
        &chunked,
    )
    .await;
    assert_eq!(status, 413);
    // Unknown run: 404.
    let status = raw_request(
        &app,
        "PUT",
        "/v1/runs/no-such-run/artifacts/a.bin",
        five,
        body,
    )
    .await;
    assert_eq!(status, 404);
    // Wrong scope or no token: refused before the body is read.
    for (token, status) in [(Some(READER), 403), (Some(TRIGGER), 403), (None, 401)] {
        let mut request = app.client.put(app.url(&put("a.bin"))).body(body.to_vec());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        assert_eq!(request.send().await.unwrap().status(), status, "{token:?}");
    }
    // Nothing was written anywhere: not outside artifacts_dir, not in it
    // (the run's directory may exist, empty).
    let after: Vec<PathBuf> = files_under(workspace.root())
        .into_iter()
        .filter(|p| !is_store_file(&workspace, p))
        .collect();
    let before: Vec<PathBuf> = before
        .into_iter()
        .filter(|p| !is_store_file(&workspace, p))
        .collect();
    assert_eq!(after, before);
    app.shutdown().await.unwrap();
}

/// SQLite's own files change with every request; they are not artifacts.
fn is_store_file(workspace: &Workspace, path: &Path) -> bool {
    path.parent() == Some(workspace.root())
        && path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("state.db"))
}
