//! A temporary project directory to run `retrain` in.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::binary::retrain_bin;

/// The quickstart's files, copied by [`Project::quickstart`].
const QUICKSTART_FILES: &[&str] = &["retrain.toml", "seed_feedback.py", "prepare.py", "train.py"];

/// A temporary directory holding a config and the programs, data and
/// effects of one scenario; deleted on drop.
#[derive(Debug)]
pub struct Project {
    dir: tempfile::TempDir,
}

impl Default for Project {
    fn default() -> Self {
        Self::new()
    }
}

impl Project {
    /// An empty project.
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("a temporary directory"),
        }
    }

    /// A private copy of `examples/quickstart` with its feedback database
    /// seeded.
    pub fn quickstart() -> Self {
        let source = Self::repository_root().join("examples/quickstart");
        let project = Self::new();
        for file in QUICKSTART_FILES {
            std::fs::copy(source.join(file), project.path().join(file))
                .unwrap_or_else(|e| panic!("cannot copy the quickstart's {file}: {e}"));
        }
        project.python(&["seed_feedback.py"]);
        project
    }

    /// The repository this harness belongs to.
    pub fn repository_root() -> &'static Path {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the tests crate is inside the repository")
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The absolute path of `relative` in the project.
    pub fn join(&self, relative: &str) -> PathBuf {
        self.path().join(relative)
    }

    /// Writes `contents` to `relative`, creating its directories.
    pub fn write(&self, relative: &str, contents: impl AsRef<[u8]>) -> &Self {
        let path = self.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create the parent directory");
        }
        std::fs::write(&path, contents)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        self
    }

    /// Writes the config, `retrain.toml`.
    pub fn config(&self, toml: &str) -> &Self {
        self.write("retrain.toml", toml)
    }

    /// `relative` as text; a missing file reads as empty (an effect that did
    /// not happen).
    pub fn read(&self, relative: &str) -> String {
        std::fs::read_to_string(self.join(relative)).unwrap_or_default()
    }

    /// The lines of `relative` (none when it is missing).
    pub fn lines(&self, relative: &str) -> Vec<String> {
        self.read(relative).lines().map(str::to_owned).collect()
    }

    /// `relative` as JSON.
    ///
    /// # Panics
    /// When it is missing or not JSON.
    pub fn json(&self, relative: &str) -> serde_json::Value {
        let path = self.join(relative);
        let bytes =
            std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
    }

    /// Runs `python3 args…` in the project and asserts it succeeded.
    pub fn python(&self, args: &[&str]) {
        let status = Command::new("python3")
            .args(args)
            .current_dir(self.path())
            .status()
            .expect("python3 is needed by the scenarios");
        assert!(status.success(), "python3 {args:?} failed: {status}");
    }

    /// `retrain` in the project directory with nothing of the caller's
    /// environment but `PATH`, and logs at `info`.
    pub fn retrain(&self) -> Command {
        Self::retrain_in(self.path())
    }

    /// `retrain` in `dir`, with the environment of [`Project::retrain`].
    pub fn retrain_in(dir: &Path) -> Command {
        let mut command = Command::new(retrain_bin());
        command
            .current_dir(dir)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RETRAIN_LOG", "info");
        command
    }
}
