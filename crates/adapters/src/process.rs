//! Processes of this host, as `/proc` describes them: which process we are
//! ([`current_identity`]), and whether a process named by pid and start time
//! still exists ([`is_alive`]).
//!
//! Used by command jobs (a journaled handle names its process, so a new
//! orchestrator can await it or notice it is gone) and by the run store (a
//! label lock names the process holding it, so a contender on the same host
//! can take the lock of a dead holder at once instead of waiting for expiry).
//!
//! A process is identified by pid **and** start time (field 22 of
//! `/proc/<pid>/stat`, clock ticks since boot), so a reused pid is never taken
//! for the original process. Where `/proc` is unavailable nothing can be
//! known, and every process is reported alive (never "dead by ignorance").

use std::sync::OnceLock;

use retrain_core::domain::ProcessIdentity;

/// `/proc/<pid>/stat` facts used to recognise a process across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcStat {
    pub(crate) state: char,
    pub(crate) pgrp: i64,
    /// Field 22: clock ticks after boot.
    pub(crate) start_time: u64,
}

impl ProcStat {
    pub(crate) fn read(pid: u32) -> Option<Self> {
        let raw = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        Self::parse(&raw)
    }

    /// Field 2 (`comm`) may contain spaces and parentheses, so parse from the
    /// last `)`: the rest starts at field 3 (state); pgrp is field 5 and
    /// starttime field 22.
    pub(crate) fn parse(raw: &str) -> Option<Self> {
        let rest = &raw[raw.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        Some(Self {
            state: fields.first()?.chars().next()?,
            pgrp: fields.get(2)?.parse().ok()?,
            start_time: fields.get(19)?.parse().ok()?,
        })
    }

    /// Zombies have exited; only their parent has not collected them yet.
    pub(crate) fn is_running(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Whether `pid` is still the process we started (same start time) and
/// running. `false` where `/proc` cannot be read (callers that must not
/// conclude "dead" from that use [`is_alive`]).
pub(crate) fn process_alive(pid: u32, start_time: Option<u64>) -> bool {
    if pid == 0 {
        return false;
    }
    match ProcStat::read(pid) {
        Some(stat) => stat.is_running() && start_time.is_none_or(|t| t == stat.start_time),
        None => false,
    }
}

/// This host's name: `/proc/sys/kernel/hostname`, else `$HOSTNAME`, else
/// `localhost`.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::env::var("HOSTNAME")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "localhost".to_owned())
}

/// The identity of process `pid` of this host (its start time read from
/// `/proc`), or `None` when it does not exist or `/proc` is unavailable.
/// A child that has exited but was not reaped yet still has one.
pub fn identity(pid: u32) -> Option<ProcessIdentity> {
    Some(ProcessIdentity {
        host: hostname(),
        pid,
        start: ProcStat::read(pid)?.start_time,
    })
}

/// This process: host, pid and start time (0 where `/proc` is unavailable;
/// [`is_alive`] then never reports it dead either). Read once.
pub fn current_identity() -> ProcessIdentity {
    static CURRENT: OnceLock<ProcessIdentity> = OnceLock::new();
    CURRENT
        .get_or_init(|| {
            let pid = std::process::id();
            identity(pid).unwrap_or_else(|| ProcessIdentity {
                host: hostname(),
                pid,
                start: 0,
            })
        })
        .clone()
}

/// Whether the process `process` names (pid with that start time) may still
/// exist on this host. `false` only when `/proc` is readable and shows no
/// running process with that pid and start time (gone, a zombie, or the pid
/// reused by a process started later). The host is not compared: deciding
/// whether `process` is of this host is the caller's business.
pub fn is_alive(process: &ProcessIdentity) -> bool {
    if ProcStat::read(std::process::id()).is_none() {
        // No /proc: we cannot tell, so never call anything dead.
        return true;
    }
    process_alive(process.pid, Some(process.start))
}

/// Whether `process` is of this host and known to be gone: the one case in
/// which a lock it holds may be taken before it expires.
pub fn is_dead_here(process: &ProcessIdentity) -> bool {
    process.host == current_identity().host && !is_alive(process)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_parses_comm_with_spaces_and_parens() {
        let raw = "1234 (my (odd) prog) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        let stat = ProcStat::parse(raw).unwrap();
        assert_eq!(stat.state, 'S');
        assert_eq!(stat.pgrp, 1234);
        assert_eq!(stat.start_time, 987654);
        assert!(ProcStat::parse("garbage").is_none());
    }

    #[test]
    fn own_process_is_alive() {
        let stat = ProcStat::read(std::process::id()).unwrap();
        assert!(process_alive(std::process::id(), Some(stat.start_time)));
        assert!(!process_alive(
            std::process::id(),
            Some(stat.start_time + 1)
        ));
        assert!(!process_alive(0, None));
    }

    #[test]
    fn current_identity_names_this_process() {
        let me = current_identity();
        assert_eq!(me.pid, std::process::id());
        assert_eq!(me.host, hostname());
        assert!(!me.host.is_empty());
        assert_eq!(me.start, ProcStat::read(me.pid).unwrap().start_time);
        assert!(is_alive(&me));
        assert!(!is_dead_here(&me));
    }

    #[test]
    fn a_reaped_child_is_dead_and_a_reused_pid_is_not_it() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        // Not reaped yet: its /proc entry (a zombie once it exits) still exists.
        let gone = identity(child.id()).unwrap();
        child.wait().unwrap();
        assert!(!is_alive(&gone));
        assert!(is_dead_here(&gone));
        // Same pid as us but another start time: another process.
        let mut other = current_identity();
        other.start += 1;
        assert!(!is_alive(&other));
        // On another host: never known dead.
        let elsewhere = ProcessIdentity {
            host: format!("not-{}", hostname()),
            ..gone
        };
        assert!(!is_dead_here(&elsewhere));
    }
}
