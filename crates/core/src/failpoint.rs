//! Process-level failpoints for the fault campaign.
//!
//! `RETRAIN_FAILPOINT=<name>` makes the process abort (`std::process::abort`,
//! as abrupt as `kill -9` for everything retrain writes: no destructor, no
//! flush, no journal write) the first time execution reaches the failpoint
//! `<name>`. Names are `after-journal:<event>` (right after the journal
//! write of that event committed) and `after-effect:<action>` (right after a
//! side effect returned, before its outcome is journaled). Unset, a
//! failpoint costs one load of a cached `Option`.
//!
//! This reads an environment variable and nothing else: it keeps core free
//! of I/O crates while letting `tests/fault_campaign` crash the real binary
//! at every point where a crash could repeat or lose work.

use std::sync::OnceLock;

/// The environment variable naming the failpoint to abort at.
pub const ENV: &str = "RETRAIN_FAILPOINT";

fn configured() -> Option<&'static str> {
    static TARGET: OnceLock<Option<String>> = OnceLock::new();
    TARGET
        .get_or_init(|| std::env::var(ENV).ok().filter(|v| !v.is_empty()))
        .as_deref()
}

/// Abort the process if `name` is the configured failpoint.
pub fn hit(name: &str) {
    if configured() == Some(name) {
        eprintln!("retrain: failpoint {name} reached; aborting");
        std::process::abort();
    }
}

/// Abort if the failpoint `<prefix>:<suffix()>` is configured; `suffix` is
/// only computed when some failpoint with that prefix is.
pub fn hit_lazy(prefix: &str, suffix: impl FnOnce() -> &'static str) {
    if let Some(target) = configured() {
        if target
            .strip_prefix(prefix)
            .and_then(|t| t.strip_prefix(':'))
            == Some(suffix())
        {
            hit(target);
        }
    }
}
