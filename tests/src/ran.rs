//! What a `retrain` process left behind.

use std::process::{Command, Output};

/// Exit code and output of one finished `retrain` process.
#[derive(Debug)]
pub struct Ran {
    /// The exit code; -1 when a signal ended the process.
    pub code: i32,
    /// The signal that ended the process, if one did.
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Ran {
    fn from(out: Output) -> Self {
        use std::os::unix::process::ExitStatusExt;
        Self {
            code: out.status.code().unwrap_or(-1),
            signal: out.status.signal(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Ran {
    /// Runs `command` to completion on the current thread.
    ///
    /// # Panics
    /// When the process cannot be started.
    pub fn now(mut command: Command) -> Self {
        command
            .output()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"))
            .into()
    }

    /// Runs `command` to completion off the async runtime, so that servers
    /// living on the runtime (wiremock, the fake Hub) keep answering it.
    pub async fn finished(command: Command) -> Self {
        tokio::task::spawn_blocking(move || Self::now(command))
            .await
            .expect("the blocking task ran")
    }

    /// Stdout as JSON (`--output json`).
    ///
    /// # Panics
    /// When stdout is not JSON, showing stdout and stderr.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }

    /// Asserts the process exited with `code`, showing its output if not.
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code, code,
            "exit code\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }

    /// Asserts that `secret` shows neither on stdout nor on stderr.
    pub fn assert_hides(&self, secret: &str) -> &Self {
        assert!(
            !self.stdout.contains(secret),
            "secret on stdout: {}",
            self.stdout
        );
        assert!(
            !self.stderr.contains(secret),
            "secret on stderr: {}",
            self.stderr
        );
        self
    }
}

/// The `status` of `label` in a `--output json` run report ("" when the
/// report has no such label).
pub fn label_status(report: &serde_json::Value, label: &str) -> String {
    report["labels"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| l["label"] == label)
        .and_then(|l| l["status"].as_str())
        .unwrap_or_default()
        .to_owned()
}
