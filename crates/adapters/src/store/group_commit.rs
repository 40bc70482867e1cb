//! Group commit of journal writes and of lock acquisitions, shared by both
//! dialects. One writer task per store and kind of write takes
//! whatever writes are queued (up to [`GROUP_COMMIT_MAX`]) and hands them to
//! the dialect's [`CommitBatch`], which applies them in one transaction.
//! Each caller awaits its own acknowledgement, sent only after
//! that transaction committed, so "journaled before acting" holds; labels
//! running concurrently share one commit instead of each paying a
//! transaction (and, on Postgres, a turn on the `journal_head` row lock) of
//! its own.
//!
//! A write whose fence no longer holds is reported `false` by the dialect
//! and does not fail the others. A batch that fails as a whole (one write
//! breaking a constraint, a deadlock, a lost connection) is retried one
//! write per transaction, so a bad write fails alone.

use async_trait::async_trait;
use retrain_core::ports::StoreError;
use tokio::sync::{mpsc, oneshot};

/// Most writes committed in one transaction.
pub(super) const GROUP_COMMIT_MAX: usize = 256;

/// A dialect's "apply these writes in one transaction".
#[async_trait]
pub(super) trait CommitBatch: Send + Sync + 'static {
    /// One queued write, prepared by the caller (so that bad input is
    /// refused before it is queued).
    type Write: Send + Sync + 'static;
    /// What one write's caller learns: for a journal write, whether it was
    /// applied (`false`: its fence did not hold, nothing of it was
    /// written).
    type Outcome: Send + 'static;

    /// Apply `batch` in one transaction, all or nothing; for each write, in
    /// order, its outcome. (A kind of write that may be applied twice may
    /// take several: lock acquisitions, whose second application by the
    /// same owner is a re-acquisition. After a failed batch each write is
    /// applied again alone.)
    async fn commit(&self, batch: &[Self::Write]) -> Result<Vec<Self::Outcome>, StoreError>;
}

/// A queued write and where its outcome goes.
struct Queued<W, O> {
    write: W,
    done: oneshot::Sender<Result<O, StoreError>>,
}

/// The sending side of a store's writer task; the task ends when this is
/// dropped (with the store).
pub(super) struct GroupCommit<W, O = bool> {
    queue: mpsc::UnboundedSender<Queued<W, O>>,
}

impl<W: Send + Sync + 'static, O: Send + 'static> GroupCommit<W, O> {
    /// Start the writer task (on the current Tokio runtime) over `committer`.
    pub(super) fn spawn<C: CommitBatch<Write = W, Outcome = O>>(committer: C) -> Self {
        let (queue, received) = mpsc::unbounded_channel();
        tokio::spawn(writer(committer, received, GROUP_COMMIT_MAX));
        Self { queue }
    }

    /// Queue `write` and wait until it is committed: its outcome.
    pub(super) async fn submit(&self, write: W) -> Result<O, StoreError> {
        let (done, outcome) = oneshot::channel();
        let stopped = || StoreError::Unavailable("the run store's writer task stopped".into());
        self.queue
            .send(Queued { write, done })
            .map_err(|_| stopped())?;
        outcome.await.map_err(|_| stopped())?
    }
}

/// Commit queued writes in batches of at most `max` until every sender is
/// gone.
async fn writer<C: CommitBatch>(
    committer: C,
    mut queue: mpsc::UnboundedReceiver<Queued<C::Write, C::Outcome>>,
    max: usize,
) {
    while let Some(first) = queue.recv().await {
        let mut writes = vec![first.write];
        let mut done = vec![first.done];
        while writes.len() < max {
            match queue.try_recv() {
                Ok(next) => {
                    writes.push(next.write);
                    done.push(next.done);
                }
                Err(_) => break,
            }
        }
        match commit(&committer, &writes).await {
            Ok(outcomes) => {
                for (done, outcome) in done.into_iter().zip(outcomes) {
                    let _ = done.send(Ok(outcome));
                }
            }
            // One bad write must not fail the others: retry them one by one.
            Err(_) if writes.len() > 1 => {
                for (write, done) in writes.iter().zip(done) {
                    let outcome = commit(&committer, std::slice::from_ref(write)).await;
                    // `commit` checked: one outcome per write.
                    let _ = done.send(outcome.map(|mut one| one.swap_remove(0)));
                }
            }
            Err(error) => {
                for done in done {
                    let _ = done.send(Err(error.clone()));
                }
            }
        }
    }
}

/// [`CommitBatch::commit`], with one outcome per write guaranteed.
async fn commit<C: CommitBatch>(
    committer: &C,
    writes: &[C::Write],
) -> Result<Vec<C::Outcome>, StoreError> {
    let applied = committer.commit(writes).await?;
    if applied.len() != writes.len() {
        return Err(StoreError::Corrupt(format!(
            "the journal writer reported {} outcomes for {} writes",
            applied.len(),
            writes.len()
        )));
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A transaction the fake dialect saw: its writes, and whether it
    /// committed.
    type Attempt = (Vec<&'static str>, bool);

    /// A dialect that records its transactions. A write is a name:
    /// `"stale"` is fenced off, `"bad"` fails whatever batch it is in.
    #[derive(Default, Clone)]
    struct Recorder {
        /// Every transaction attempted, in order.
        transactions: Arc<Mutex<Vec<Attempt>>>,
        /// Outcomes reported per batch, if not the real count (a broken
        /// dialect).
        short: bool,
    }

    #[async_trait]
    impl CommitBatch for Recorder {
        type Write = &'static str;
        type Outcome = bool;

        async fn commit(&self, batch: &[&'static str]) -> Result<Vec<bool>, StoreError> {
            let failed = batch.contains(&"bad");
            self.transactions
                .lock()
                .unwrap()
                .push((batch.to_vec(), !failed));
            if failed {
                return Err(StoreError::Conflict("bad write".into()));
            }
            let applied: Vec<bool> = batch.iter().map(|w| *w != "stale").collect();
            Ok(if self.short {
                applied[1..].to_vec()
            } else {
                applied
            })
        }
    }

    /// Submit `writes` while the writer task cannot run (current-thread
    /// runtime), so they are all queued before it takes the first batch.
    async fn submit_all(
        recorder: Recorder,
        max: usize,
        writes: &[&'static str],
    ) -> Vec<Result<bool, StoreError>> {
        let (queue, received) = mpsc::unbounded_channel();
        let writes_done = GroupCommit::<&'static str> { queue };
        let task = tokio::spawn(writer(recorder, received, max));
        let results = futures::future::join_all(writes.iter().map(|w| writes_done.submit(w))).await;
        drop(writes_done);
        task.await.unwrap();
        results
    }

    #[tokio::test(flavor = "current_thread")]
    async fn queued_writes_share_one_transaction_and_get_their_own_outcome() {
        let recorder = Recorder::default();
        let results = submit_all(recorder.clone(), 256, &["a", "stale", "b"]).await;
        let outcomes: Vec<bool> = results.into_iter().map(Result::unwrap).collect();
        assert_eq!(outcomes, [true, false, true]);
        assert_eq!(
            *recorder.transactions.lock().unwrap(),
            [(vec!["a", "stale", "b"], true)]
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_batch_is_bounded() {
        let recorder = Recorder::default();
        let results = submit_all(recorder.clone(), 2, &["a", "b", "c", "d", "e"]).await;
        assert!(results.into_iter().all(|r| r.unwrap()));
        let batches: Vec<Vec<&str>> = recorder
            .transactions
            .lock()
            .unwrap()
            .iter()
            .map(|(batch, _)| batch.clone())
            .collect();
        assert_eq!(batches, [vec!["a", "b"], vec!["c", "d"], vec!["e"]]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_bad_write_fails_alone_and_the_others_are_retried_one_by_one() {
        let recorder = Recorder::default();
        let results = submit_all(recorder.clone(), 256, &["a", "bad", "stale", "b"]).await;
        assert!(matches!(results[0], Ok(true)), "{:?}", results[0]);
        assert!(
            matches!(&results[1], Err(StoreError::Conflict(m)) if m == "bad write"),
            "{:?}",
            results[1]
        );
        assert!(matches!(results[2], Ok(false)), "{:?}", results[2]);
        assert!(matches!(results[3], Ok(true)), "{:?}", results[3]);
        assert_eq!(
            *recorder.transactions.lock().unwrap(),
            [
                (vec!["a", "bad", "stale", "b"], false),
                (vec!["a"], true),
                (vec!["bad"], false),
                (vec!["stale"], true),
                (vec!["b"], true),
            ]
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_dialect_answering_for_fewer_writes_fails_them_instead_of_dropping_one() {
        let recorder = Recorder {
            short: true,
            ..Recorder::default()
        };
        let results = submit_all(recorder, 256, &["a", "b"]).await;
        for result in results {
            assert!(
                matches!(&result, Err(StoreError::Corrupt(m)) if m.contains("outcomes")),
                "{result:?}"
            );
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_stopped_writer_is_an_error_not_a_hang() {
        let (queue, received) = mpsc::unbounded_channel();
        drop(received);
        let writes = GroupCommit::<&'static str> { queue };
        let err = writes.submit("a").await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    }
}
