//! Which training intents are new: journaled by this process, under the
//! lock it still holds, and not started yet.
//!
//! A trainer's `start` is idempotent for its job key: before starting a job
//! it may look for one already started under the key (a Space's
//! `RETRAIN_JOB_KEY` variable, a workflow run named after it), to adopt it
//! instead of starting a second one. That lookup exists for one case: an
//! earlier process journaled the intent, maybe acted on it, and died before
//! journaling the result. For an intent this process has just journaled,
//! nobody can have acted on the key yet (every intent is durable before
//! its effect, and the fence keeps other holders' writes out), so the
//! lookup is a request whose answer cannot change the decision:
//! [`TrainingRequest::first_start`](crate::ports::TrainingRequest::first_start)
//! tells the trainer it may skip it.
//!
//! The mark is keyed by the fence as well as the job key: if this process
//! loses the lock before starting the job, another holder may start it,
//! and when this process takes the label again (a new fence) the journaled
//! intent is no longer new. A mark is taken by the first `start` for it,
//! whatever its outcome. Marks of intents never started (the drive stopped
//! in between) stay until the process ends: at most one per interrupted
//! training start.

use std::collections::HashSet;
use std::sync::Mutex;

use crate::domain::{Fence, JobKey};
use crate::journal::Transition;
use crate::machine::Action;

/// Job keys whose `StartTraining` intent this process journaled, with the
/// fence of the write.
#[derive(Debug, Default)]
pub(super) struct NewIntents(Mutex<HashSet<(JobKey, Fence)>>);

impl NewIntents {
    /// `transitions` were written under `fence`: mark the training intents
    /// among their pending actions.
    pub(super) fn journaled<'a>(
        &self,
        transitions: impl IntoIterator<Item = &'a Transition>,
        fence: &Fence,
    ) {
        let keys: Vec<JobKey> = transitions
            .into_iter()
            .flat_map(|t| &t.actions)
            .filter_map(|action| match action {
                Action::StartTraining {
                    job_key: Some(key), ..
                } => Some(key.clone()),
                _ => None,
            })
            .collect();
        if keys.is_empty() {
            return;
        }
        let mut marks = self.0.lock().unwrap_or_else(|e| e.into_inner());
        marks.extend(keys.into_iter().map(|key| (key, fence.clone())));
    }

    /// Whether starting `key` under `fence` is the first start of an intent
    /// this process journaled under that fence; takes the mark.
    pub(super) fn take(&self, key: &JobKey, fence: Option<&Fence>) -> bool {
        let Some(fence) = fence else {
            return false;
        };
        let mut marks = self.0.lock().unwrap_or_else(|e| e.into_inner());
        marks.remove(&(key.clone(), fence.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::LockOwner;

    fn fence(token: u64) -> Fence {
        Fence {
            owner: LockOwner("host-1".into()),
            token,
        }
    }

    fn key(n: u32) -> JobKey {
        JobKey(format!("run-1/train-{n}"))
    }

    #[test]
    fn a_mark_is_taken_once_and_only_under_its_fence() {
        let intents = NewIntents::default();
        intents.0.lock().unwrap().insert((key(1), fence(7)));
        assert!(!intents.take(&key(1), None), "no fence: never new");
        assert!(
            !intents.take(&key(1), Some(&fence(8))),
            "another tenure of the lock"
        );
        assert!(!intents.take(&key(2), Some(&fence(7))), "another key");
        assert!(intents.take(&key(1), Some(&fence(7))));
        assert!(
            !intents.take(&key(1), Some(&fence(7))),
            "a second start is not the first"
        );
    }
}
