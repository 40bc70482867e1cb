//! Label locks and fencing, once for both dialects (each supplies only its
//! SQL, [`LockSql`](super::backend::LockSql)).
//!
//! **Row.** A lock is the row `locks (label, owner, expires_at, token)`.
//! It is never deleted: releasing sets `owner = ''` and an expiry in the
//! past, so the token of a label only ever grows, across releases too.
//!
//! **Token.** Every acquisition (a first insert: 1; a free, expired or
//! released lock taken; a re-acquisition by the same owner; a dead holder's
//! lock taken) sets `token = token + 1` in the statement that takes it and
//! returns it (`RETURNING token`): the [`Fence`] of that holder.
//!
//! **Takeovers.** The same statement sets `previous_owner` to the owner the
//! row had (SET expressions read the old row), so an acquisition whose
//! previous owner is neither `''` (released) nor the acquirer took over a
//! lock its holder never released ([`LockOutcome::Acquired`]'s
//! `taken_over_from`), without an extra statement.
//!
//! **Fenced writes.** Journal, cursor and lease writes, renewals and
//! releases apply only if the row still has exactly `(label, owner, token)`
//! and is unexpired, checked in the same statement (SQLite) or transaction
//! (Postgres, `FOR SHARE`) as the write. Otherwise nothing is written and the
//! caller gets [`StoreError::Fenced`] naming the current holder
//! ([`refused`]), `renew_lock` gets `false`, `release_lock` does nothing.
//!
//! **Dead holders.** An owner built with `LockOwner::for_process` names its
//! process. When an unexpired lock's holder is a process of this host that no
//! longer exists (pid with that start time), [`try_lock`] takes it at once,
//! with an update conditional on that very owner and token, so of several
//! contenders exactly one wins. A holder on another host, a live one, or an
//! owner naming no process is only ever taken after its expiry.

use std::time::Duration;

use chrono::{DateTime, Utc};
use retrain_core::domain::{Fence, Label, LockOutcome, LockOwner};
use retrain_core::ports::StoreError;

use super::backend::{fence_args, Arg, Backend, Columns, Statements, StoreRow, Taken};
use super::i64_to_u64;

/// A label's lock row as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LockRow {
    pub(super) owner: String,
    pub(super) token: u64,
    pub(super) expires_at: DateTime<Utc>,
    /// Unexpired (by the store's clock) and not released.
    pub(super) live: bool,
}

impl LockRow {
    /// Whether this lock is held by a process of this host that is gone.
    fn holder_is_dead(&self) -> bool {
        is_dead_here(&self.owner)
    }

    /// The owner of a live lock whose holder is not known to be dead.
    fn holder(&self) -> Option<&str> {
        live_holder(&self.owner, self.live)
    }
}

/// Whether `owner` names a process of this host that no longer exists (its
/// lock can be taken at once, so nobody holds it).
pub(super) fn is_dead_here(owner: &str) -> bool {
    LockOwner(owner.to_owned())
        .process()
        .is_some_and(|process| crate::process::is_dead_here(&process))
}

/// `owner` if its lock is `live` and it is not a dead process of this host
/// (such a lock can be taken at once, so nobody holds it).
pub(super) fn live_holder(owner: &str, live: bool) -> Option<&str> {
    (live && !is_dead_here(owner)).then_some(owner)
}

/// How often `try_lock` retries when the lock changes hands between its
/// statements (taken, expired or released meanwhile).
const ATTEMPTS: usize = 3;

/// The lock row of `label`, if the label was ever locked.
pub(super) async fn row<B: Backend>(b: &B, label: &Label) -> Result<Option<LockRow>, StoreError> {
    let mut args = vec![Arg::text(label)];
    args.extend(b.now_args());
    let row = b
        .pool()
        .fetch_optional(B::LOCKS.row, args)
        .await
        .map_err(|e| b.error(&format!("reading the lock of label {label}"), e))?;
    row.map(|row| {
        Ok(LockRow {
            owner: row.text("owner")?,
            token: i64_to_u64(row.int("token")?, &format!("token of the lock of {label}"))?,
            expires_at: row.time("expires_at", &format!("expiry of the lock of {label}"))?,
            live: row.flag("live")?,
        })
    })
    .transpose()
}

/// `RunStore::lock_holder`: the owner of a live lock, unless it is a dead
/// process of this host (its lock can be taken at once, so nobody holds it).
pub(super) async fn holder<B: Backend>(b: &B, label: &Label) -> Result<Option<String>, StoreError> {
    Ok(row(b, label)
        .await?
        .and_then(|row| row.holder().map(str::to_owned)))
}

/// `RunStore::try_lock`.
pub(super) async fn try_lock<B: Backend>(
    b: &B,
    label: &Label,
    owner: &LockOwner,
    ttl: Duration,
) -> Result<LockOutcome, StoreError> {
    let what = format!("locking label {label}");
    for _ in 0..ATTEMPTS {
        if let Some(taken) = b.acquire(label, owner, ttl).await? {
            return acquired(label, owner, taken);
        }
        // Refused: someone else's unexpired lock, unless it expired or was
        // released since (then try again).
        let Some(held) = row(b, label).await?.filter(|row| row.live) else {
            continue;
        };
        if !held.holder_is_dead() {
            return Ok(LockOutcome::Busy {
                owner: held.owner,
                expires_at: held.expires_at,
            });
        }
        let mut args = vec![
            Arg::text(label),
            Arg::text(owner),
            Arg::Text(held.owner.clone()),
            Arg::Int(super::u64_to_i64(held.token, "fencing token")?),
        ];
        args.extend(b.expiry_args(ttl));
        let taken = b
            .writer()
            .fetch_optional(B::LOCKS.take, args)
            .await
            .map_err(|e| b.error(&what, e))?;
        if let Some(taken) = taken {
            tracing::warn!(
                %label,
                dead = %held.owner,
                "took the lock of a holder process that no longer exists"
            );
            return acquired(label, owner, Taken::of(&taken)?);
        }
        // Another contender took it first: look again.
    }
    Err(StoreError::Conflict(format!(
        "the lock of label {label} kept changing hands; try again"
    )))
}

/// The rounds of a batch of lock acquisitions (the dialects' writer tasks
/// take every queued one): each round asks each label at most once, as a
/// second row for one label would meet the first one's row within the
/// statement; a label asked twice is asked again in the next round, as if
/// it came in the next batch. So each acquisition gets what it would have
/// got alone, in queue order.
///
/// `statement(asked, what)` runs one round's statement for the
/// acquisitions at indices `asked` (`what` names it for errors) and
/// answers a row `(label, token, previous_owner)` per lock it took. Each
/// acquisition's lock as taken (`None`: refused), in queue order.
pub(super) async fn acquire_in_rounds<'a, R, F>(
    labels: impl IntoIterator<Item = &'a str>,
    mut statement: impl FnMut(Vec<usize>, String) -> F,
) -> Result<Vec<Option<Taken>>, StoreError>
where
    R: Columns,
    F: std::future::Future<Output = Result<Vec<R>, StoreError>>,
{
    let labels: Vec<&str> = labels.into_iter().collect();
    let mut taken = vec![None; labels.len()];
    let mut pending: Vec<usize> = (0..labels.len()).collect();
    while !pending.is_empty() {
        // Each label's first acquisition in `pending` (by index).
        let mut by_label = std::collections::HashMap::new();
        let (asked, later): (Vec<usize>, Vec<usize>) = pending
            .iter()
            .partition(|&&i| *by_label.entry(labels[i]).or_insert(i) == i);
        let what = match &asked[..] {
            [one] => format!("locking label {}", labels[*one]),
            _ => format!("locking {} labels", asked.len()),
        };
        for row in statement(asked, what).await? {
            let label = row.text("label")?;
            let index = by_label.get(label.as_str()).copied().ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "the lock batch statement answered label {label}, which it was not asked"
                ))
            })?;
            taken[index] = Some(Taken::of(&row)?);
        }
        pending = later;
    }
    Ok(taken)
}

fn acquired(label: &Label, owner: &LockOwner, taken: Taken) -> Result<LockOutcome, StoreError> {
    let previous = taken.previous_owner;
    Ok(LockOutcome::Acquired {
        fence: Fence {
            owner: owner.clone(),
            token: i64_to_u64(taken.token, &format!("token of the lock of {label}"))?,
        },
        taken_over_from: (!previous.is_empty() && previous != owner.0).then_some(previous),
    })
}

/// `RunStore::renew_lock`: `false` unless exactly this lock was extended.
pub(super) async fn renew<B: Backend>(
    b: &B,
    label: &Label,
    fence: &Fence,
    ttl: Duration,
) -> Result<bool, StoreError> {
    let mut args = fence_args(label, fence)?;
    args.extend(b.expiry_args(ttl));
    let renewed = b
        .writer()
        .execute(B::LOCKS.renew, args)
        .await
        .map_err(|e| b.error(&format!("renewing the lock of label {label}"), e))?;
    Ok(renewed == 1)
}

/// `RunStore::renew_locks`: one statement for all of `held`; for each, in
/// order, whether exactly that lock was extended.
pub(super) async fn renew_many<B: Backend>(
    b: &B,
    held: &[(Label, Fence)],
    ttl: Duration,
) -> Result<Vec<bool>, StoreError> {
    if held.is_empty() {
        return Ok(Vec::new());
    }
    let mut locks = Vec::with_capacity(held.len());
    for (label, fence) in held {
        locks.push(serde_json::json!({
            "label": label.as_str(),
            "owner": fence.owner.0,
            "token": super::u64_to_i64(fence.token, "fencing token")?,
        }));
    }
    let mut args = vec![Arg::Json(serde_json::Value::Array(locks))];
    args.extend(b.expiry_args(ttl));
    let rows = b
        .writer()
        .fetch_all(B::LOCKS.renew_many, args)
        .await
        .map_err(|e| b.error(&format!("renewing {} label locks", held.len()), e))?;
    // Matched on the whole fence: the same label asked twice (a stale and
    // a current fence) is extended for the current one only.
    let mut extended = std::collections::HashSet::with_capacity(rows.len());
    for row in &rows {
        extended.insert((row.text("label")?, row.text("owner")?, row.int("token")?));
    }
    held.iter()
        .map(|(label, fence)| {
            let token = super::u64_to_i64(fence.token, "fencing token")?;
            Ok(extended.contains(&(label.as_str().to_owned(), fence.owner.0.clone(), token)))
        })
        .collect()
}

/// `RunStore::release_lock`: a no-op unless `fence` still holds the lock.
pub(super) async fn release<B: Backend>(
    b: &B,
    label: &Label,
    fence: &Fence,
) -> Result<(), StoreError> {
    let mut args = fence_args(label, fence)?;
    args.extend(b.now_args());
    b.writer()
        .execute(B::LOCKS.release, args)
        .await
        .map_err(|e| b.error(&format!("releasing the lock of label {label}"), e))?;
    Ok(())
}

/// The outcome of a fenced write: `Ok` if it was applied, otherwise
/// [`StoreError::Fenced`] naming who holds the lock now.
pub(super) async fn fenced<B: Backend>(
    b: &B,
    label: &Label,
    fence: &Fence,
    applied: bool,
) -> Result<(), StoreError> {
    if applied {
        return Ok(());
    }
    Err(refused(label, fence, row(b, label).await?.as_ref()))
}

/// The error of a write refused because `fence` no longer holds the lock,
/// given the lock row as it is now.
pub(super) fn refused(label: &Label, fence: &Fence, now: Option<&LockRow>) -> StoreError {
    let holder = now.and_then(|row| row.live.then_some(row.owner.as_str()));
    StoreError::Fenced(format!(
        "lock of label {label} is held by {} (token {}), not by {} (token {})",
        holder.unwrap_or("nobody"),
        now.map_or(0, |row| row.token),
        fence.owner,
        fence.token
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::DbUrl;
    use crate::store::{PostgresRunStore, SqliteRunStore, StoreOptions};
    use retrain_core::domain::ProcessIdentity;

    /// Run `B::LOCKS.take` for `owner` on the lock as the contender read it.
    async fn take<B: Backend>(b: &B, read_owner: &str, read_token: i64) -> Option<u64> {
        let mut args = vec![
            Arg::text("dept"),
            Arg::text("contender"),
            Arg::text(read_owner),
            Arg::Int(read_token),
        ];
        args.extend(b.expiry_args(Duration::from_secs(60)));
        let row = b.pool().fetch_optional(B::LOCKS.take, args).await.unwrap();
        row.map(|row| u64::try_from(row.int("token").unwrap()).unwrap())
    }

    /// The takeover of a dead holder only succeeds on the lock exactly as the
    /// contender read it (same owner and token): of two contenders that both
    /// saw the dead holder, the second finds it changed and takes nothing.
    async fn take_is_conditional_on_the_holder_as_read<B: Backend>(b: B) {
        let dept = Label::new("dept").unwrap();
        let held = match try_lock(
            &b,
            &dept,
            &LockOwner("dead".into()),
            Duration::from_secs(60),
        )
        .await
        .unwrap()
        {
            LockOutcome::Acquired { fence, .. } => fence,
            busy => panic!("{busy:?}"),
        };
        let token = i64::try_from(held.token).unwrap();
        assert_eq!(take(&b, "someone-else", token).await, None);
        assert_eq!(take(&b, "dead", token + 1).await, None);
        assert_eq!(take(&b, "dead", token).await, Some(held.token + 1));
        assert_eq!(take(&b, "dead", token).await, None, "taken twice");
        let now = row(&b, &dept).await.unwrap().unwrap();
        assert_eq!(
            (now.owner.as_str(), now.token),
            ("contender", held.token + 1)
        );
        assert!(now.live);
    }

    #[tokio::test]
    async fn sqlite_take_is_conditional_on_the_holder_as_read() {
        let url = DbUrl::parse("state", "sqlite::memory:").unwrap();
        let store = SqliteRunStore::open(url, StoreOptions::default())
            .await
            .unwrap();
        take_is_conditional_on_the_holder_as_read(store).await;
    }

    #[tokio::test]
    async fn postgres_take_is_conditional_on_the_holder_as_read() {
        let Some(url) = crate::testing::services::fresh_postgres_database().await else {
            return;
        };
        let url = DbUrl::parse("state", &url).unwrap();
        let store = PostgresRunStore::open(url, StoreOptions::default())
            .await
            .unwrap();
        take_is_conditional_on_the_holder_as_read(store).await;
    }

    fn lock_row(owner: String, live: bool) -> LockRow {
        LockRow {
            owner,
            token: 7,
            expires_at: Utc::now(),
            live,
        }
    }

    #[test]
    fn refusals_name_the_holder_and_both_tokens() {
        let label = Label::new("dept").unwrap();
        let fence = Fence {
            owner: LockOwner("a".into()),
            token: 3,
        };
        let err = refused(&label, &fence, Some(&lock_row("b".into(), true)));
        assert_eq!(
            err,
            StoreError::Fenced(
                "lock of label dept is held by b (token 7), not by a (token 3)".into()
            )
        );
        let err = refused(&label, &fence, Some(&lock_row("b".into(), false))).to_string();
        assert!(err.contains("held by nobody (token 7)"), "{err}");
        let err = refused(&label, &fence, None).to_string();
        assert!(err.contains("held by nobody (token 0)"), "{err}");
    }

    #[test]
    fn only_dead_processes_of_this_host_lose_their_lock_early() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = crate::process::identity(child.id()).unwrap();
        child.wait().unwrap();
        let owner = |p: &ProcessIdentity| LockOwner::for_process("retrain", p).0;
        assert!(lock_row(owner(&dead), true).holder_is_dead());
        assert_eq!(lock_row(owner(&dead), true).holder(), None);
        let me = crate::process::current_identity();
        assert!(!lock_row(owner(&me), true).holder_is_dead());
        let elsewhere = ProcessIdentity {
            host: format!("not-{}", me.host),
            ..dead
        };
        assert!(!lock_row(owner(&elsewhere), true).holder_is_dead());
        assert!(!lock_row("plain-owner".into(), true).holder_is_dead());
        assert_eq!(
            lock_row("plain-owner".into(), true).holder(),
            Some("plain-owner")
        );
        assert_eq!(lock_row("plain-owner".into(), false).holder(), None);
    }
}
