//! Processes, process groups and job records of the command adapters.
//!
//! Everything here reads `/proc` or signals through `nix` (no `unsafe`, no
//! `/bin/kill`, which slim images lack).
//!
//! **Whose group is it?** A job runs as the leader of its own process group
//! (pgid = the leader's pid). Once the leader is gone, its pid can be reused,
//! and a reused pid that leads a group of its own (every shell pipeline, every
//! daemon) would make `killpg(pgid)` hit a stranger. So a group is signalled
//! only when it is provably the job's: its leader is alive with the recorded
//! kernel start time, or one of its members carries the job's marker in its
//! environment (`RETRAIN_RESULT=<path>` for a trainer, `RETRAIN_JOB_KEY=<key>`
//! for a prepare job). While any member is alive the kernel cannot hand the
//! pgid out again, so "a member carries the marker" proves the group is ours.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::{getpgrp, Pid};
use retrain_core::ports::PortError;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::JobHandle;

/// Time between SIGTERM and SIGKILL when stopping a job's process group.
pub(super) const KILL_GRACE: Duration = Duration::from_secs(3);

pub(super) use crate::process::{process_alive, ProcStat};

/// Every running (non-zombie) process: `(pid, stat)`.
fn processes() -> Vec<(u32, ProcStat)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, ProcStat::read(pid)?)))
        .filter(|(_, stat)| stat.is_running())
        .collect()
}

/// The running members of process group `pgid`.
fn group_members(pgid: u32) -> Vec<u32> {
    processes()
        .into_iter()
        .filter(|(_, stat)| stat.pgrp == i64::from(pgid))
        .map(|(pid, _)| pid)
        .collect()
}

/// Whether `/proc/<pid>/environ` (the environment the process was started
/// with) contains exactly the entry `marker` (`NAME=value`).
fn env_has(pid: u32, marker: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|raw| {
            raw.split(|b| *b == 0)
                .any(|entry| entry == marker.as_bytes())
        })
        .unwrap_or(false)
}

/// A group that may be signalled: not ours (the orchestrator's), not 0/1.
fn signallable(pgid: u32) -> bool {
    let Ok(raw) = i32::try_from(pgid) else {
        return false;
    };
    raw > 1 && raw != getpgrp().as_raw()
}

/// Whether group `pgid` still has a running member carrying `marker`.
pub(super) fn group_is_ours(pgid: u32, marker: &str) -> bool {
    signallable(pgid)
        && group_members(pgid)
            .into_iter()
            .any(|pid| env_has(pid, marker))
}

/// What a scan for a job's processes found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FoundJob {
    /// The group leader (pid = pgid), if it still runs, with its start time.
    pub leader: Option<(u32, u64)>,
    /// The job's process group, if any member still runs.
    pub pgid: Option<u32>,
}

/// Find the running processes carrying `marker` (a job whose spawn was not
/// recorded because the orchestrator died in between).
pub(super) fn find_job(marker: &str) -> FoundJob {
    let mut found = FoundJob {
        leader: None,
        pgid: None,
    };
    for (pid, stat) in processes() {
        if !env_has(pid, marker) {
            continue;
        }
        let Ok(pgid) = u32::try_from(stat.pgrp) else {
            continue;
        };
        if !signallable(pgid) {
            continue;
        }
        found.pgid.get_or_insert(pgid);
        if i64::from(pid) == stat.pgrp {
            found.leader = Some((pid, stat.start_time));
            found.pgid = Some(pgid);
        }
    }
    found
}

/// Send `signal` to every process of group `pgid`. "No such process" is fine:
/// stopping a stopped group is a success.
fn signal_group(pgid: u32, signal: Signal) {
    if !signallable(pgid) {
        warn!(pgid, "refusing to signal process group 0, 1 or our own");
        return;
    }
    // `signallable` checked the conversion.
    let Ok(raw) = i32::try_from(pgid) else {
        return;
    };
    match killpg(Pid::from_raw(raw), signal) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => warn!(pgid, signal = %signal, error = %e, "cannot signal the process group"),
    }
}

/// SIGKILL the group at once, without waiting (for `Drop`, which cannot
/// await). The caller has established that the group is the job's.
pub(super) fn kill_group_now(pgid: u32) {
    signal_group(pgid, Signal::SIGKILL);
}

/// SIGTERM the group, give it [`KILL_GRACE`] to exit, then SIGKILL. The
/// caller has established that the group is the job's.
pub(super) async fn stop_group(pgid: u32) {
    if group_members(pgid).is_empty() {
        return;
    }
    signal_group(pgid, Signal::SIGTERM);
    let deadline = tokio::time::Instant::now() + KILL_GRACE;
    while tokio::time::Instant::now() < deadline {
        if group_members(pgid).is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    signal_group(pgid, Signal::SIGKILL);
    // SIGKILL cannot be ignored; give the kernel a moment to tear down.
    for _ in 0..40 {
        if group_members(pgid).is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Stop the job of `job` (its leader and everything in its group), if it is
/// provably still the job's (see the module doc). Returns whether it did.
pub(super) async fn stop_job(job: &JobHandle, marker: &str) -> bool {
    let leader_alive = job.pid == job.pgid && process_alive(job.pid, job.start_time);
    if leader_alive || group_is_ours(job.pgid, marker) {
        stop_group(job.pgid).await;
        true
    } else {
        debug!(pgid = job.pgid, "nothing of the job is left to stop");
        false
    }
}

/// After the leader exited: terminate whatever it left in its group
/// (background children), so no orphan keeps running.
///
/// `leader_seen` says the leader was observed alive (our own child, held
/// unreaped until it exited, or polled while running): its pgid was pinned
/// by it and, after it, by its remaining members, so any member of the group
/// now is the job's — even one that cleared its environment. Otherwise (the
/// leader was already gone when we looked, perhaps days ago) the group must
/// prove itself through `marker`.
pub(super) async fn stop_orphans(job: &JobHandle, marker: &str, leader_seen: bool) {
    let ours = if leader_seen {
        signallable(job.pgid) && !group_members(job.pgid).is_empty()
    } else {
        group_is_ours(job.pgid, marker)
    };
    if ours {
        info!(
            pgid = job.pgid,
            "the job's main process exited; stopping what it left running"
        );
        stop_group(job.pgid).await;
    }
}

/// The file that makes a start idempotent for its key. Written *before* the
/// spawn as a claim (`job: None`) and again right after it with the pid
/// (`job: Some`), each time atomically (temp file, fsync, rename).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct JobRecord {
    /// The job key this record belongs to.
    pub key: String,
    /// When the claim was written.
    pub claimed_at: DateTime<Utc>,
    /// The spawned job; `None` while the spawn is not confirmed.
    #[serde(default)]
    pub job: Option<JobHandle>,
}

/// Read a job record (a [`JobRecord`], or another record of a job such as a
/// completed dataset check): `Ok(None)` when there is none.
pub(super) fn read_record<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<Option<T>, PortError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            PortError::Failed(format!(
                "job record {} is malformed ({e}); remove it only if no job of that key runs",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(PortError::Failed(format!(
            "cannot read job record {}: {e}",
            path.display()
        ))),
    }
}

/// Write a job record (or any record of a job, e.g. a completed dataset
/// check) atomically: a reader sees the old or the new record, never half
/// of one, even after a crash or a power loss.
pub(super) fn write_record<T: Serialize>(path: &Path, record: &T) -> Result<(), PortError> {
    let failed = |e: std::io::Error| {
        PortError::Failed(format!("cannot write job record {}: {e}", path.display()))
    };
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir).map_err(failed)?;
    let bytes = serde_json::to_vec_pretty(record)
        .map_err(|e| PortError::Failed(format!("cannot encode job record: {e}")))?;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_group_and_init_are_never_signallable() {
        let own = u32::try_from(getpgrp().as_raw()).unwrap();
        assert!(!signallable(own));
        assert!(!signallable(0));
        assert!(!signallable(1));
        assert!(!group_is_ours(own, "PATH=/nonexistent"));
    }

    #[test]
    fn records_round_trip_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs/k.job.json");
        assert_eq!(read_record::<JobRecord>(&path).unwrap(), None);
        let record = JobRecord {
            key: "run/train/1".into(),
            claimed_at: Utc::now(),
            job: None,
        };
        write_record(&path, &record).unwrap();
        assert_eq!(read_record::<JobRecord>(&path).unwrap(), Some(record));
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
        std::fs::write(&path, "{").unwrap();
        let err = read_record::<JobRecord>(&path).unwrap_err().to_string();
        assert!(
            err.contains("k.job.json") && err.contains("malformed"),
            "{err}"
        );
    }
}
