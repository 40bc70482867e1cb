//! Labels waiting on one prepare job share their metadata reads until the
//! job publishes (issue 11).
//!
//! A prepare job shared by many labels publishes their datasets at about
//! the same time, so while none of them has appeared, one label's read per
//! poll round (the *scout*'s) says as much as every label's. Until some
//! label of the job sees its new dataset, each round's first poller reads
//! and the others skip their read, each still reading at least every
//! `max_gap` (a job that publishes one label at a time is noticed late by at
//! most that); the first new dataset seen wakes every label of the job, and
//! from then on each reads every round, as without scouting. A webhook's
//! wake-up and the poll at a label's deadline always read. A label that
//! skips its read also skips the job's stage read and takes the job's last
//! one.
//!
//! **Invariant:** scouting only decides whether a poll *reads*; a skipped
//! read is reported to the machine as "unchanged since the last read", which
//! it is as far as this process knows, so the machine's decisions (deadline,
//! acceptance) are the same ones it takes on an unchanged read.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::domain::Label;

/// Why a poll reads its metadata, or that it does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Read {
    /// The first poll of the round among the job's labels.
    Scout,
    /// A label of the job has seen its new dataset: every label reads.
    Published,
    /// This label has not read for `max_gap`.
    Overdue,
    /// A webhook woke this label, or its wait ends with this poll.
    Required,
    /// Scouting is off (`max_gap` zero).
    Always,
    /// Another label scouts this round.
    Skip,
}

impl Read {
    pub(super) fn reads(self) -> bool {
        self != Self::Skip
    }
}

/// The labels of one cycle waiting on one prepare job.
#[derive(Debug, Default)]
pub(super) struct JobWatch {
    state: Mutex<WatchState>,
    published: Notify,
}

#[derive(Debug, Default)]
struct WatchState {
    /// When the current round's scout read was decided.
    scouted_at: Option<Instant>,
    /// A label of the job has seen its new dataset in this cycle.
    published: bool,
    /// When each label last read its metadata (or began waiting).
    last_read: HashMap<Label, Instant>,
}

impl JobWatch {
    /// Whether `label` reads its metadata in the poll it makes `now`.
    /// `round` is how long one scout read serves the job's labels (the
    /// poll interval: every label polls once per interval plus jitter, so
    /// the first poll after a round is over scouts the next one); `max_gap`
    /// is the longest a label goes without a read of its own, zero for no
    /// scouting. A label woken by a webhook or at its deadline
    /// (`required`) reads.
    pub(super) fn decide(
        &self,
        label: &Label,
        now: Instant,
        round: Duration,
        max_gap: Duration,
        required: bool,
    ) -> Read {
        if max_gap.is_zero() {
            return Read::Always;
        }
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let state = &mut *guard;
        // A label's first poll here comes right after its own read of the
        // published version (phase one) or its restart of the job.
        let last_read = state.last_read.entry(label.clone()).or_insert(now);
        let read = if required {
            Read::Required
        } else if state.published {
            Read::Published
        } else if state
            .scouted_at
            .is_none_or(|at| now.duration_since(at) >= round)
        {
            state.scouted_at = Some(now);
            Read::Scout
        } else if now.duration_since(*last_read) >= max_gap {
            Read::Overdue
        } else {
            Read::Skip
        };
        if read.reads() {
            *last_read = now;
        }
        read
    }

    /// Whether a label of the job has seen its new dataset.
    pub(super) fn is_published(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .published
    }

    /// A label of the job saw its new dataset: every label reads from now
    /// on, and those waiting for their next poll are woken.
    pub(super) fn saw_publication(&self) {
        let first = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            !std::mem::replace(&mut state.published, true)
        };
        if first {
            self.published.notify_waiters();
        }
    }

    /// Resolves once a label of the job sees its new dataset, if none had
    /// when this label began its wait (`was_published`); never otherwise:
    /// a label that already reads every round has nothing to be woken for.
    pub(super) async fn publication(&self, was_published: bool) {
        if was_published {
            return std::future::pending().await;
        }
        let notified = self.published.notified();
        tokio::pin!(notified);
        // Registered before the flag is checked, so that a publication seen
        // in between is not missed (`Notify::notify_waiters`).
        notified.as_mut().enable();
        if self.is_published() {
            return;
        }
        notified.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUND: Duration = Duration::from_millis(500);
    const GAP: Duration = Duration::from_secs(10);

    fn label(name: &str) -> Label {
        Label::new(name).unwrap()
    }

    #[test]
    fn one_label_scouts_each_round_for_the_others() {
        let watch = JobWatch::default();
        let t0 = Instant::now();
        let (a, b, c) = (label("a"), label("b"), label("c"));
        assert_eq!(watch.decide(&a, t0, ROUND, GAP, false), Read::Scout);
        assert_eq!(watch.decide(&b, t0, ROUND, GAP, false), Read::Skip);
        let within = t0 + ROUND - Duration::from_millis(1);
        assert_eq!(watch.decide(&c, within, ROUND, GAP, false), Read::Skip);
        // The next round: whoever polls first scouts.
        let next = t0 + ROUND;
        assert_eq!(watch.decide(&b, next, ROUND, GAP, false), Read::Scout);
        assert_eq!(watch.decide(&a, next, ROUND, GAP, false), Read::Skip);
        assert_eq!(watch.decide(&c, next, ROUND, GAP, false), Read::Skip);
    }

    #[test]
    fn a_label_reads_at_least_every_max_gap() {
        let watch = JobWatch::default();
        let t0 = Instant::now();
        let (a, b) = (label("a"), label("b"));
        assert_eq!(watch.decide(&a, t0, ROUND, GAP, false), Read::Scout);
        // b begins waiting at t0: its gap counts from there.
        assert_eq!(watch.decide(&b, t0, ROUND, GAP, false), Read::Skip);
        let mut now = t0;
        // a scouts every round, b skips until its gap is over.
        while now < t0 + GAP - ROUND {
            now += ROUND;
            assert_eq!(watch.decide(&a, now, ROUND, GAP, false), Read::Scout);
            assert_eq!(watch.decide(&b, now, ROUND, GAP, false), Read::Skip);
        }
        now += ROUND;
        assert_eq!(watch.decide(&a, now, ROUND, GAP, false), Read::Scout);
        assert_eq!(watch.decide(&b, now, ROUND, GAP, false), Read::Overdue);
        // Its own read restarts its gap.
        now += ROUND;
        assert_eq!(watch.decide(&a, now, ROUND, GAP, false), Read::Scout);
        assert_eq!(watch.decide(&b, now, ROUND, GAP, false), Read::Skip);
    }

    #[test]
    fn a_scout_read_restarts_the_scouts_own_gap() {
        let watch = JobWatch::default();
        let t0 = Instant::now();
        let (a, b) = (label("a"), label("b"));
        assert_eq!(watch.decide(&b, t0, ROUND, GAP, false), Read::Scout);
        // a begins waiting and scouts the next rounds; b polls within them.
        let mut now = t0;
        for _ in 0..30 {
            now += ROUND;
            assert_eq!(watch.decide(&a, now, ROUND, GAP, false), Read::Scout);
            let read = watch.decide(&b, now, ROUND, GAP, false);
            if read == Read::Overdue {
                // b's last read was its scout read at t0.
                assert_eq!(now.duration_since(t0), GAP);
                return;
            }
            assert_eq!(read, Read::Skip);
        }
        panic!("b never read on its own");
    }

    #[test]
    fn once_published_every_label_reads_every_poll() {
        let watch = JobWatch::default();
        let t0 = Instant::now();
        let (a, b) = (label("a"), label("b"));
        assert_eq!(watch.decide(&a, t0, ROUND, GAP, false), Read::Scout);
        assert!(!watch.is_published());
        watch.saw_publication();
        assert!(watch.is_published());
        assert_eq!(watch.decide(&b, t0, ROUND, GAP, false), Read::Published);
        assert_eq!(watch.decide(&a, t0, ROUND, GAP, false), Read::Published);
        watch.saw_publication();
        assert!(watch.is_published());
    }

    #[test]
    fn a_label_that_must_read_reads_and_restarts_its_gap() {
        let watch = JobWatch::default();
        let t0 = Instant::now();
        let (a, b) = (label("a"), label("b"));
        assert_eq!(watch.decide(&a, t0, ROUND, GAP, false), Read::Scout);
        assert_eq!(watch.decide(&b, t0, ROUND, GAP, true), Read::Required);
        // Not the scout's round taken: the next label still skips.
        assert_eq!(watch.decide(&b, t0, ROUND, GAP, false), Read::Skip);
        let later = t0 + GAP - Duration::from_millis(1);
        assert_eq!(watch.decide(&a, later, ROUND, GAP, false), Read::Scout);
        assert_eq!(watch.decide(&b, later, ROUND, GAP, true), Read::Required);
        // b read at `later`: its gap counts from there, not from t0.
        let after = t0 + GAP;
        assert_eq!(watch.decide(&a, after, ROUND, GAP, false), Read::Skip);
        assert_eq!(watch.decide(&b, after, ROUND, GAP, false), Read::Skip);
        assert!(Read::Required.reads());
    }

    #[test]
    fn no_gap_means_no_scouting() {
        let watch = JobWatch::default();
        let t0 = Instant::now();
        for name in ["a", "b", "c"] {
            assert_eq!(
                watch.decide(&label(name), t0, ROUND, Duration::ZERO, false),
                Read::Always
            );
        }
        assert!(Read::Always.reads());
        assert!(Read::Scout.reads() && Read::Published.reads() && Read::Overdue.reads());
        assert!(!Read::Skip.reads());
    }

    #[tokio::test]
    async fn a_publication_wakes_the_waiting_labels_once() {
        let watch = std::sync::Arc::new(JobWatch::default());
        let waiting = {
            let watch = watch.clone();
            tokio::spawn(async move { watch.publication(false).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        watch.saw_publication();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .unwrap();
        // Seen before the wait began: resolves at once.
        tokio::time::timeout(Duration::from_secs(5), watch.publication(false))
            .await
            .expect("already published");
        // A label that already read after the publication is not woken.
        let woken = tokio::time::timeout(Duration::from_millis(50), watch.publication(true)).await;
        assert!(woken.is_err());
    }
}
