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
//!    here is reported busy rather than re-acquired (a re-acquisition by
//!    the same owner would bump the token and fence out the first driver).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Engine;
use crate::domain::{Fence, Label, LockOutcome};
use crate::ports::StoreError;

/// One held lock.
#[derive(Debug)]
struct Held {
    fence: Fence,
    valid_until: Instant,
    lost: CancellationToken,
    reason: Option<String>,
}

/// The locks this engine holds, by label.
#[derive(Debug, Default)]
pub(super) struct HeldLocks {
    inner: Mutex<HashMap<Label, Held>>,
    /// Labels whose store lock is being taken right now: reserved before
    /// the store call, so two triggers of one process racing for a label
    /// cannot both reach `try_lock` (the store lets an owner re-acquire its
    /// own lock, which would fence the first one out).
    acquiring: Mutex<std::collections::HashSet<Label>>,
}

/// Removes a reservation of [`HeldLocks::reserve`] when dropped.
struct Reservation<'a>(&'a HeldLocks, Label);

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut acquiring = self.0.acquiring.lock().unwrap_or_else(|e| e.into_inner());
        acquiring.remove(&self.1);
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

    pub(super) fn holds(&self, label: &Label) -> bool {
        self.map().contains_key(label)
    }

    /// Reserve `label` for one acquisition; `None` if this engine holds it
    /// or another trigger is acquiring it.
    fn reserve(&self, label: &Label) -> Option<Reservation<'_>> {
        let mut acquiring = self.acquiring.lock().unwrap_or_else(|e| e.into_inner());
        if self.holds(label) || !acquiring.insert(label.clone()) {
            return None;
        }
        Some(Reservation(self, label.clone()))
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
            },
        );
        lost
    }

    fn remove(&self, label: &Label) -> Option<Fence> {
        self.map().remove(label).map(|held| held.fence)
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

    fn snapshot(&self) -> Vec<(Label, Fence)> {
        self.map()
            .iter()
            .filter(|(_, held)| held.reason.is_none())
            .map(|(label, held)| (label.clone(), held.fence.clone()))
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
            if held.fence == *fence && held.reason.is_none() {
                warn!(%label, %reason, "label lock lost");
                held.reason = Some(reason);
                held.lost.cancel();
            }
        }
    }

    /// Wake the waits of labels whose validity ran out.
    fn expire(&self, now: Instant) {
        for (label, held) in self.map().iter_mut() {
            if held.reason.is_none() && now >= held.valid_until {
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
        let Some(_reserved) = self.locks.reserve(label) else {
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
            LockOutcome::Acquired(fence) => {
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

    /// Unregister and release `label`'s lock (a no-op in the store if it was
    /// lost meanwhile: the release is fenced too).
    pub(super) async fn unlock(&self, label: &Label) {
        let Some(fence) = self.locks.remove(label) else {
            return;
        };
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
    pub(super) async fn heartbeat(&self) {
        let ttl = self.settings.lock_ttl;
        let every = (ttl / 3).max(Duration::from_millis(10));
        loop {
            tokio::time::sleep(every).await;
            for (label, fence) in self.locks.snapshot() {
                let sent = Instant::now();
                match self.store.renew_lock(&label, &fence, ttl).await {
                    Ok(true) => self.locks.renewed(&label, &fence, sent + ttl),
                    Ok(false) => {
                        let holder = self
                            .store
                            .lock_holder(&label)
                            .await
                            .ok()
                            .flatten()
                            .unwrap_or_else(|| "nobody (it expired)".into());
                        self.locks.mark_lost(
                            &label,
                            &fence,
                            format!("lock of label {label} lost to {holder}"),
                        );
                    }
                    Err(e) => warn!(%label, error = %e, "lock renewal failed; will retry"),
                }
            }
            self.locks.expire(Instant::now());
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
