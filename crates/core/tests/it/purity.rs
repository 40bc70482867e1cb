//! `retrain-core` must stay pure: no I/O crate in its normal dependency tree.

#[test]
fn core_has_no_io_dependencies() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = std::process::Command::new(cargo)
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
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo tree");
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
