//! `retrain-core` must stay pure: no I/O crate in its normal dependency tree.

#[test]
fn core_has_no_io_dependencies() {
    // The cargo running the tests (`CARGO`), else the one on `PATH`: under
    // load, spawning the former has failed with "not found" now and then.
    let dir = env!("CARGO_MANIFEST_DIR");
    let mut tried = Vec::new();
    let output = std::env::var("CARGO")
        .into_iter()
        .chain(["cargo".to_string()])
        .find_map(|cargo| {
            let output = std::process::Command::new(&cargo)
                .args([
                    "tree",
                    "-p",
                    "retrain-core",
                    "-e",
                    "normal",
                    "--prefix",
                    "none",
                    "--offline",
                ])
                .current_dir(dir)
                .output();
            output
                .map_err(|e| tried.push(format!("{cargo} (in {dir}): {e}")))
                .ok()
        })
        .unwrap_or_else(|| panic!("running cargo tree: {tried:?}"));
    assert!(
        output.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tree = String::from_utf8_lossy(&output.stdout);
    let forbidden = [
        "sqlx",
        "reqwest",
        "hyper",
        "axum",
        "object_store",
        "aws-",
        "rusqlite",
        "tokio-postgres",
        "mio",
    ];
    for line in tree.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        for bad in forbidden {
            assert!(
                !name.starts_with(bad),
                "retrain-core depends on I/O crate {name}"
            );
        }
    }
    assert!(tree.contains("tokio"), "sanity: the tree was read");
}
