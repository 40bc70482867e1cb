//! Waking readers of the journal (`GET /v1/events`) when it may have grown.
//!
//! Postgres: `LISTEN retrain_journal`; the position trigger of migration
//! 0007 notifies at every commit of a journal line, from any replica. A
//! notification lost while the listener reconnects is covered by a slow
//! poll. SQLite (one machine): a short poll of the journal.
//!
//! A wake-up only means "read again": the journal itself, read after the
//! last position seen, is what the stream sends, so a spurious or missed
//! wake-up can delay an event but never lose or repeat one.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::db::DbUrl;
use crate::AdapterError;

/// The channel `LISTEN`ed to (see `migrations/postgres/0007_journal_positions.sql`).
const CHANNEL: &str = "retrain_journal";
/// How often SQLite readers look at the journal.
const SQLITE_POLL: Duration = Duration::from_millis(200);
/// How often Postgres readers look even without a notification.
const POSTGRES_POLL: Duration = Duration::from_secs(5);

/// Wakes journal readers; cheap to share (`Arc`), one per process.
#[derive(Debug)]
pub struct JournalWatch {
    changed: watch::Receiver<u64>,
    poll: Duration,
    listener: Option<JoinHandle<()>>,
}

impl Drop for JournalWatch {
    fn drop(&mut self) {
        if let Some(task) = &self.listener {
            task.abort();
        }
    }
}

impl JournalWatch {
    /// Watch the journal of the run store at `url` (the `state` setting).
    pub async fn open(url: &str) -> Result<Self, AdapterError> {
        let url = DbUrl::parse(super::KEY, url)?;
        let (sender, changed) = watch::channel(0);
        match &url {
            DbUrl::SqliteFile(_) | DbUrl::SqliteMemory => {
                // Nothing to listen to; keep the sender alive so `wait` polls.
                Ok(Self {
                    changed,
                    poll: SQLITE_POLL,
                    listener: Some(tokio::spawn(async move {
                        sender.closed().await;
                    })),
                })
            }
            DbUrl::Postgres(_) => {
                let pool = url.postgres_pool(super::KEY, 1, true).await?;
                let mut listener = sqlx::postgres::PgListener::connect_with(&pool)
                    .await
                    .map_err(|e| {
                        AdapterError::Unavailable(format!(
                            "{}: cannot listen for journal notifications: {}",
                            super::KEY,
                            url.scrub(e)
                        ))
                    })?;
                listener.listen(CHANNEL).await.map_err(|e| {
                    AdapterError::Unavailable(format!(
                        "{}: cannot listen for journal notifications: {}",
                        super::KEY,
                        url.scrub(e)
                    ))
                })?;
                let task = tokio::spawn(async move {
                    loop {
                        match listener.recv().await {
                            Ok(_) => {
                                sender.send_modify(|n| *n += 1);
                            }
                            Err(e) => {
                                // `recv` reconnects by itself on the next call;
                                // wake readers: they may have missed something.
                                tracing::warn!(error = %url.scrub(e), "journal listener interrupted; reconnecting");
                                sender.send_modify(|n| *n += 1);
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                        }
                    }
                });
                Ok(Self {
                    changed,
                    poll: POSTGRES_POLL,
                    listener: Some(task),
                })
            }
        }
    }

    /// A subscription for one reader.
    pub fn subscribe(&self) -> JournalWaker {
        JournalWaker {
            changed: self.changed.clone(),
            poll: self.poll,
        }
    }
}

/// One reader's view of [`JournalWatch`].
#[derive(Debug, Clone)]
pub struct JournalWaker {
    changed: watch::Receiver<u64>,
    poll: Duration,
}

impl JournalWaker {
    /// Return when the journal may have grown: a notification since the
    /// last call, or the poll interval elapsed.
    pub async fn wait(&mut self) {
        tokio::select! {
            _ = self.changed.changed() => {}
            () = tokio::time::sleep(self.poll) => {}
        }
    }
}
