//! Label locks held by this engine: fences, validity, and the heartbeat.
//!
//! **Invariants.**
//! 1. A label is registered here the moment its lock is taken (phase one)
//!    and stays until it is released, so the heartbeat renews queued labels
//!    as well as running ones.
//! 2. A lock is *valid* until `sent + lock_ttl`, where `sent` is when the
//!    last successful renewal (or the acquisition) was *sent*: a holder can
//!    only underestimate how long it still holds the lock, never overrun it.
//! 3. [`HeldLocks::check`] is called before every action; a label whose lock
//!    was lost (renewal refused) or ran out of validity (renewals failing
//!    for `lock_ttl`) executes nothing more. Its `lost` token wakes any wait
//!    in flight so the label stops promptly.
//! 4. The store enforces the same rule independently (fenced writes): even a
//!    holder paused between `check` and its write cannot write after losing
//!    the lock.
//! 5. One engine never drives a label twice at once: a label already held
//!    here, or whose lock another task of this engine is taking right now,
//!    is reported busy rather than re-acquired (a re-acquisition by the
//!    same owner would bump the token and fence out the first driver). The
//!    check and the reservation are one step under the table's mutex, so two
//!    concurrent triggers of one label in one process cannot both pass it.
//! 6. The commit of the run a cycle took the lock for ([`HeldLocks::bind_run`])
//!    releases the lock in the same write when that run is done
//!    (`RunStore::finish_and_unlock`): nothing of the label follows it under
//!    the lock. From the moment that write is sent the lock is *unlocking*:
//!    not renewed, and a refused renewal or a lapse of validity is not a
//!    loss (the write is fenced itself). If the write fails, the lock is
//!    held as before and released on its own. No other run's commit (a
//!    candidate closed by expiry or supersede under the same lock, a run
//!    parked for approval, which the cycle follows with that closing)
//!    releases it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use futures::stream::{self, StreamExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Engine;
use crate::domain::{Fence, Label, LockOutcome, RunId};
use crate::ports::StoreError;

/// Locks renewed by one `RunStore::renew_locks` call (one statement on
/// the SQL stores).
const RENEWAL_BATCH: usize = 512;
/// Renewal batches the heartbeat keeps in flight at once.
const BATCHES_IN_FLIGHT: usize = 8;

/// One held lock.
#[derive(Debug)]
struct Held {
    fence: Fence,
    valid_until: Instant,
    lost: CancellationToken,
    reason: Option<String>,
    /// The run whose finished commit releases this lock (invariant 6).
    run: Option<RunId>,
    /// That commit's write is in flight or done (invariant 6).
    unlocking: bool,
}

/// The locks this engine holds, by label.
#[derive(Debug, Default)]
pub(super) struct HeldLocks {
    inner: Mutex<HashMap<Label, Held>>,
    /// Labels whose lock a task of this engine is taking (store call in
    /// flight); always locked *after* `inner`.
    acquiring: Mutex<HashSet<Label>>,
    /// Locks this engine took over from another owner (see
    /// `LockOutcome::Acquired::taken_over_from`), for `retrain_lock_takeovers_total`.
    takeovers: AtomicU64,
}

/// A reservation of a label while its lock is being taken; dropped (also
/// when the acquiring future is dropped) it frees the label again.
struct Acquiring<'a> {
    locks: &'a HeldLocks,
    label: Label,
}

impl Drop for Acquiring<'_> {
    fn drop(&mut self) {
        self.locks
            .acquiring
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.label);
    }
}

/// What `Engine::acquire` found.
pub(super) enum Acquired {
    Held(Fence, CancellationToken),
    Busy(String),
}

impl HeldLocks {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Label, Held>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserve `label` for this task unless it is held or being taken
    /// (one step: see invariant 5).
    fn reserve(&self, label: &Label) -> Option<Acquiring<'_>> {
        let map = self.map();
        let mut acquiring = self.acquiring.lock().unwrap_or_else(|e| e.into_inner());
        if map.contains_key(label) || !acquiring.insert(label.clone()) {
            return None;
        }
        Some(Acquiring {
            locks: self,
            label: label.clone(),
        })
    }

    fn insert(&self, label: Label, fence: Fence, valid_until: Instant) -> CancellationToken {
        let lost = CancellationToken::new();
        self.map().insert(
            label,
            Held {
                fence,
                valid_until,
                lost: lost.clone(),
                reason: None,
                run: None,
                unlocking: false,
            },
        );
        lost
    }

    /// Unregister `label`: its fence, and whether its release was already
    /// written with its run's commit (invariant 6).
    fn remove(&self, label: &Label) -> Option<(Fence, bool)> {
        self.map()
            .remove(label)
            .map(|held| (held.fence, held.unlocking))
    }

    /// `run` is the one this lock was taken for: its commit, once the run is
    /// done, releases the lock (invariant 6).
    pub(super) fn bind_run(&self, label: &Label, run: &RunId) {
        if let Some(held) = self.map().get_mut(label) {
            held.run = Some(run.clone());
        }
    }

    /// Whether the commit of `run` under `fence` releases the lock; if so,
    /// the lock is unlocking from now on (invariant 6).
    pub(super) fn begin_unlock(&self, label: &Label, fence: &Fence, run: &RunId) -> bool {
        let mut map = self.map();
        let Some(held) = map.get_mut(label) else {
            return false;
        };
        let releases = held.fence == *fence && held.run.as_ref() == Some(run);
        held.unlocking |= releases;
        releases
    }

    /// The commit that was to release `label`'s lock failed: it is held as
    /// before.
    pub(super) fn abort_unlock(&self, label: &Label) {
        if let Some(held) = self.map().get_mut(label) {
            held.unlocking = false;
        }
    }

    /// `Ok` while the lock of `label` is held and valid, else why not.
    pub(super) fn check(&self, label: &Label) -> Result<(), String> {
        let map = self.map();
        let Some(held) = map.get(label) else {
            return Err(format!("the lock of label {label} is not held"));
        };
        if let Some(reason) = &held.reason {
            return Err(reason.clone());
        }
        if Instant::now() >= held.valid_until {
            return Err(format!(
                "the lock of label {label} could not be renewed within lock_ttl; stopping before the next step"
            ));
        }
        Ok(())
    }

    /// The locks to renew, the one that runs out first first.
    fn snapshot(&self) -> Vec<(Label, Fence)> {
        let mut held: Vec<_> = self
            .map()
            .iter()
            .filter(|(_, held)| held.reason.is_none() && !held.unlocking)
            .map(|(label, held)| (held.valid_until, label.clone(), held.fence.clone()))
            .collect();
        held.sort_by_key(|(valid_until, _, _)| *valid_until);
        held.into_iter()
            .map(|(_, label, fence)| (label, fence))
            .collect()
    }

    /// A renewal sent at `sent` succeeded.
    fn renewed(&self, label: &Label, fence: &Fence, valid_until: Instant) {
        if let Some(held) = self.map().get_mut(label) {
            if held.fence == *fence && held.reason.is_none() {
                held.valid_until = held.valid_until.max(valid_until);
            }
        }
    }

    /// The lock is gone: record why and wake the label's waits.
    pub(super) fn mark_lost(&self, label: &Label, fence: &Fence, reason: String) {
        if let Some(held) = self.map().get_mut(label) {
            if held.fence == *fence && held.reason.is_none() && !held.unlocking {
                warn!(%label, %reason, "label lock lost");
                held.reason = Some(reason);
                held.lost.cancel();
            }
        }
    }

    /// Wake the waits of labels whose validity ran out.
    fn expire(&self, now: Instant) {
        for (label, held) in self.map().iter_mut() {
            if held.reason.is_none() && !held.unlocking && now >= held.valid_until {
                warn!(%label, "label lock not renewed within lock_ttl; stopping the label");
                held.reason = Some(format!(
                    "the lock of label {label} could not be renewed within lock_ttl; stopped before the next step"
                ));
                held.lost.cancel();
            }
        }
    }
}

impl Engine {
    /// Take `label`'s lock and register it with the heartbeat.
    pub(super) async fn acquire(&self, label: &Label) -> Result<Acquired, StoreError> {
        // Held until the lock is registered (or refused): a concurrent
        // trigger of this label in this process is reported busy.
        let Some(_reservation) = self.locks.reserve(label) else {
            return Ok(Acquired::Busy(format!(
                "{} (this process, another trigger)",
                self.settings.owner
            )));
        };
        let sent = Instant::now();
        match self
            .store
            .try_lock(label, &self.settings.owner, self.settings.lock_ttl)
            .await?
        {
            LockOutcome::Acquired {
                fence,
                taken_over_from,
            } => {
                if let Some(previous) = taken_over_from {
                    self.locks.takeovers.fetch_add(1, Ordering::Relaxed);
                    warn!(
                        %label,
                        %previous,
                        "took over the label's lock: its previous holder never released it \
                         (it expired or its process is gone); its unfinished run is resumed"
                    );
                }
                let lost =
                    self.locks
                        .insert(label.clone(), fence.clone(), sent + self.settings.lock_ttl);
                Ok(Acquired::Held(fence, lost))
            }
            LockOutcome::Busy { owner, expires_at } => {
                info!(%owner, %expires_at, "label is busy: another orchestrator holds its lock");
                Ok(Acquired::Busy(owner))
            }
        }
    }

    /// How many locks this engine has taken over from another owner that
    /// never released them (a crashed, killed or partitioned orchestrator).
    pub fn lock_takeovers(&self) -> u64 {
        self.locks.takeovers.load(Ordering::Relaxed)
    }

    /// Unregister and release `label`'s lock (a no-op in the store if it was
    /// lost meanwhile: the release is fenced too), unless its run's commit
    /// released it already (invariant 6).
    pub(super) async fn unlock(&self, label: &Label) {
        let Some((fence, released)) = self.locks.remove(label) else {
            return;
        };
        if released {
            return;
        }
        if let Err(e) = self.store.release_lock(label, &fence).await {
            warn!(error = %e, "could not release the label lock; it will expire");
        }
    }

    /// Why `label` may not act now, if so (see invariant 3).
    pub(super) fn lock_problem(&self, label: &Label) -> Option<String> {
        self.locks.check(label).err()
    }

    /// Renew every held lock every `lock_ttl / 3`, forever (the caller
    /// drops this future when its cycle ends).
    ///
    /// A round renews the held locks in batches of [`RENEWAL_BATCH`] (one
    /// `RunStore::renew_locks` call, one statement on the SQL stores), up to
    /// [`BATCHES_IN_FLIGHT`] at once, the ones that run out first first, and
    /// the next round is due `lock_ttl / 3` after the previous one
    /// *started*: renewing one lock after the other made a round last `held
    /// labels × renewal latency` on top of the period (10,000 labels at a
    /// few ms per renewal on a loaded store outlasted `lock_ttl`, and labels
    /// nobody else wanted stopped as `lock_lost`).
    pub(super) async fn heartbeat(&self) {
        let ttl = self.settings.lock_ttl;
        let every = (ttl / 3).max(Duration::from_millis(10));
        let mut due = Instant::now() + every;
        loop {
            tokio::time::sleep_until(due).await;
            let round = Instant::now();
            let held = self.locks.snapshot();
            let count = held.len();
            stream::iter(held.chunks(RENEWAL_BATCH))
                .for_each_concurrent(BATCHES_IN_FLIGHT, |batch| self.renew(batch, ttl))
                .await;
            self.locks.expire(Instant::now());
            let took = round.elapsed();
            if took > every {
                warn!(
                    locks = count,
                    took_ms = took.as_millis() as u64,
                    "renewing the held label locks took longer than lock_ttl / 3; \
                     the store is too slow for this many labels at this lock_ttl"
                );
            }
            due = round + every;
        }
    }

    /// Run `work`, which holds a lock taken outside a cycle (a decision, a
    /// rollback, a recorded gate), while the heartbeat renews it: a
    /// registry call slower than `lock_ttl` must not lose the lock.
    pub(super) async fn renewing<T>(&self, work: impl std::future::Future<Output = T>) -> T {
        tokio::select! {
            result = work => result,
            () = self.heartbeat() => unreachable!("the heartbeat never ends"),
        }
    }

    /// One batch of the heartbeat: each lock is valid until the batch's
    /// send time + `ttl`; a lock the store did not extend is lost.
    async fn renew(&self, batch: &[(Label, Fence)], ttl: Duration) {
        let sent = Instant::now();
        let renewed = match self.store.renew_locks(batch, ttl).await {
            Ok(renewed) if renewed.len() == batch.len() => renewed,
            Ok(renewed) => {
                warn!(
                    asked = batch.len(),
                    answered = renewed.len(),
                    "the store answered a lock renewal for a different number of locks; will retry"
                );
                return;
            }
            Err(e) => {
                warn!(locks = batch.len(), error = %e, "lock renewal failed; will retry");
                return;
            }
        };
        for ((label, fence), renewed) in batch.iter().zip(renewed) {
            if renewed {
                self.locks.renewed(label, fence, sent + ttl);
                continue;
            }
            let holder = self
                .store
                .lock_holder(label)
                .await
                .ok()
                .flatten()
                .unwrap_or_else(|| "nobody (it expired)".into());
            self.locks.mark_lost(
                label,
                fence,
                format!("lock of label {label} lost to {holder}"),
            );
        }
    }

    /// A fenced store refusal: the lock is gone for good.
    pub(super) fn fenced(&self, label: &Label, fence: &Fence, error: &StoreError) -> String {
        let reason = match error {
            StoreError::Fenced(detail) => detail.clone(),
            other => other.to_string(),
        };
        self.locks.mark_lost(label, fence, reason.clone());
        reason
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::LockOwner;

    #[test]
    fn a_label_being_taken_or_held_cannot_be_reserved_again() {
        let locks = HeldLocks::default();
        let label = Label::new("intent").unwrap();
        let first = locks.reserve(&label).expect("free label");
        assert!(locks.reserve(&label).is_none(), "reserved twice");
        // Registered while still reserved, then the reservation ends: held.
        let fence = Fence {
            owner: LockOwner("me".into()),
            token: 1,
        };
        locks.insert(
            label.clone(),
            fence,
            Instant::now() + Duration::from_secs(60),
        );
        drop(first);
        assert!(locks.reserve(&label).is_none(), "reserved while held");
        locks.remove(&label);
        let again = locks.reserve(&label).expect("free again after release");
        drop(again);
        // A dropped reservation (refused lock, dropped future) frees the label.
        assert!(locks.reserve(&label).is_some());
    }

    #[test]
    fn only_the_bound_runs_commit_unlocks_and_an_unlocking_lock_is_neither_renewed_nor_lost() {
        let locks = HeldLocks::default();
        let label = Label::new("intent").unwrap();
        let fence = |token| Fence {
            owner: LockOwner("me".into()),
            token,
        };
        let (run, other) = (RunId("run-1".into()), RunId("run-0".into()));
        let lost = locks.insert(
            label.clone(),
            fence(2),
            Instant::now() + Duration::from_secs(60),
        );
        // No run bound yet (a candidate closed before the cycle's run).
        assert!(!locks.begin_unlock(&label, &fence(2), &run));
        locks.bind_run(&label, &run);
        assert!(
            !locks.begin_unlock(&label, &fence(2), &other),
            "another run"
        );
        assert!(
            !locks.begin_unlock(&label, &fence(1), &run),
            "a stale fence"
        );
        assert_eq!(locks.snapshot().len(), 1, "not unlocking: renewed");
        assert!(locks.begin_unlock(&label, &fence(2), &run));
        assert!(locks.snapshot().is_empty(), "unlocking: not renewed");
        // A renewal refused because the commit released the lock, or the
        // validity running out meanwhile, is not a loss.
        locks.mark_lost(&label, &fence(2), "released by the commit".into());
        locks.expire(Instant::now() + Duration::from_secs(120));
        assert!(!lost.is_cancelled());
        // The commit failed: held (and renewed, and losable) as before.
        locks.abort_unlock(&label);
        assert_eq!(locks.snapshot().len(), 1);
        assert_eq!(locks.remove(&label), Some((fence(2), false)));
        // The commit was written: unregistered as released.
        locks.insert(
            label.clone(),
            fence(3),
            Instant::now() + Duration::from_secs(60),
        );
        locks.bind_run(&label, &run);
        assert!(locks.begin_unlock(&label, &fence(3), &run));
        assert_eq!(locks.remove(&label), Some((fence(3), true)));
        assert!(!locks.begin_unlock(&label, &fence(3), &run), "not held");
        // A lock that is not unlocking is lost by a refused renewal.
        let lost = locks.insert(
            label.clone(),
            fence(4),
            Instant::now() + Duration::from_secs(60),
        );
        locks.mark_lost(&label, &fence(4), "taken over".into());
        assert!(lost.is_cancelled());
        assert!(locks.check(&label).is_err());
    }
}
