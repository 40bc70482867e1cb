//! Where the `retrain` binary is.
//!
//! Cargo tells a package's own integration tests where its binaries are
//! (`CARGO_BIN_EXE_<name>`), not another package's, and artifact
//! dependencies are unstable. Building it from the test (escargot's way)
//! resolves features for `retrain-cli` alone, unlike `cargo test
//! --workspace`, and so compiles a second copy of most of the dependency
//! tree. So the harness takes the binary that `cargo test --workspace`
//! (scripts/test.sh) has just built next to the test executables, and
//! refuses a missing or stale one with what to run.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::SystemTime;

/// Set to a `retrain` executable to test that one instead (no staleness check).
pub const RETRAIN_BIN_VAR: &str = "RETRAIN_BIN";

/// The source trees the binary is built from: edited after the binary was
/// linked means it is stale.
const SOURCES: &[&str] = &[
    "Cargo.lock",
    "crates/core/src",
    "crates/adapters/src",
    "crates/adapters/migrations",
    "crates/cli/src",
];

/// The path of the `retrain` binary under test.
///
/// # Panics
/// When it is missing or older than its sources, naming the command that
/// builds it.
pub fn retrain_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os(RETRAIN_BIN_VAR) {
            return PathBuf::from(path);
        }
        let bin = beside_the_test_executable();
        let built = std::fs::metadata(&bin)
            .and_then(|m| m.modified())
            .unwrap_or_else(|e| {
                panic!(
                    "no retrain binary at {} ({e}): run `cargo build -p retrain-cli` with the \
                     same target dir, or the tests through scripts/test.sh, or set {RETRAIN_BIN_VAR}",
                    bin.display()
                )
            });
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the tests crate is inside the workspace");
        if let Some((source, edited)) = newest_source(root) {
            assert!(
                edited <= built,
                "{} is older than {}: run `cargo build -p retrain-cli` (or test with \
                 `-p retrain-cli` in the same cargo command) first",
                bin.display(),
                source.display()
            );
        }
        bin
    })
    .clone()
}

/// `<target>/<profile>/retrain`: test executables live in
/// `<target>/<profile>/deps/`.
fn beside_the_test_executable() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let mut dir = exe.parent().expect("a directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(format!("retrain{}", std::env::consts::EXE_SUFFIX))
}

/// The most recently modified file of [`SOURCES`] under `root`.
fn newest_source(root: &Path) -> Option<(PathBuf, SystemTime)> {
    let mut newest: Option<(PathBuf, SystemTime)> = None;
    let mut pending: Vec<PathBuf> = SOURCES.iter().map(|s| root.join(s)).collect();
    while let Some(path) = pending.pop() {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                pending.extend(entries.filter_map(|e| e.ok().map(|e| e.path())));
            }
        } else if let Ok(modified) = meta.modified() {
            if newest.as_ref().is_none_or(|(_, t)| modified > *t) {
                newest = Some((path, modified));
            }
        }
    }
    newest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_source_is_found_in_nested_directories_and_missing_ones_are_ignored() {
        let root = tempfile::tempdir().unwrap();
        let old = root.path().join("crates/core/src/lib.rs");
        let new = root.path().join("crates/cli/src/commands/run.rs");
        for file in [&old, &new] {
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(file, "").unwrap();
        }
        let past = SystemTime::now() - std::time::Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(past)
            .unwrap();
        let (path, _) = newest_source(root.path()).expect("a source");
        assert_eq!(path, new);
        assert!(newest_source(&root.path().join("nothing")).is_none());
    }
}
