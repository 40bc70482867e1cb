//! The optional cron schedule: every tick starts a cycle of every label.
//!
//! - **Pure part** ([`Schedule`]): parse (`croner`, 5 or 6 fields) with an
//!   IANA time zone (`chrono-tz`; DST handled by evaluating in that zone),
//!   the next tick after a time, and which tick is *due* given the last one
//!   fired: after downtime the missed ticks collapse into the latest one, so
//!   a missed tick runs once, not N times.
//! - **Durable part** ([`run`]): the last fired tick is the newest claimed
//!   `schedule` line of the delivery log, and firing a tick *claims* it
//!   (delivery id = the tick's RFC 3339 time). Replicas sharing a store
//!   that reach the same tick race for the claim; one fires. Even if two
//!   fired, the engine's label locks would drive each label once.
//! - **Jitter**: up to `jitter` after the tick, derived from the tick's
//!   time (deterministic: replicas and tests agree, no RNG).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use croner::Cron;
use retrain_adapters::store::{DeliveryLog, NewDelivery, Recorded};
use retrain_core::engine::Clock;
use retrain_core::CancellationToken;
use sha2::{Digest, Sha256};

/// The delivery-log source of schedule ticks.
pub const SOURCE: &str = "schedule";

/// Ticks scanned when catching up after downtime; beyond that, the latest
/// tick is found by searching backwards from now.
const CATCH_UP_SCAN: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("cron expression {expr:?}: {reason}")]
    Cron { expr: String, reason: String },
    #[error("time zone {0:?} is not an IANA zone name (e.g. \"Europe/Paris\", \"UTC\")")]
    TimeZone(String),
}

/// A parsed schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: Cron,
    expr: String,
    tz: chrono_tz::Tz,
    jitter: Duration,
}

impl Schedule {
    /// `timezone = None` is UTC.
    pub fn parse(
        expr: &str,
        timezone: Option<&str>,
        jitter: Duration,
    ) -> Result<Self, ScheduleError> {
        let cron = Cron::from_str(expr.trim()).map_err(|e| ScheduleError::Cron {
            expr: expr.to_owned(),
            reason: e.to_string(),
        })?;
        let tz = match timezone.map(str::trim).filter(|t| !t.is_empty()) {
            None => chrono_tz::UTC,
            Some(name) => name
                .parse::<chrono_tz::Tz>()
                .map_err(|_| ScheduleError::TimeZone(name.to_owned()))?,
        };
        Ok(Self {
            cron,
            expr: expr.trim().to_owned(),
            tz,
            jitter,
        })
    }

    pub fn expression(&self) -> &str {
        &self.expr
    }

    /// The first tick strictly after `after`.
    pub fn next_tick(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&after.with_timezone(&self.tz), false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// The latest tick at or before `now`.
    fn latest_tick(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_previous_occurrence(&now.with_timezone(&self.tz), true)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// The tick to fire at `now`, if any: the latest tick in
    /// `(last_fired, now]`. Missed ticks collapse into that one. Without a
    /// fired tick on record (first start), nothing is due: the schedule
    /// begins with the next tick.
    pub fn due(
        &self,
        last_fired: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        let last = last_fired?;
        let mut due = None;
        let mut cursor = last;
        for _ in 0..CATCH_UP_SCAN {
            match self.next_tick(cursor) {
                Some(tick) if tick <= now => {
                    due = Some(tick);
                    cursor = tick;
                }
                _ => return due,
            }
        }
        // A very long downtime with a very frequent schedule.
        self.latest_tick(now).filter(|t| *t > last)
    }

    /// How long after `tick` to fire it: up to `jitter`, the same for every
    /// replica.
    pub fn jitter_for(&self, tick: DateTime<Utc>) -> Duration {
        let max = self.jitter.as_millis();
        if max == 0 {
            return Duration::ZERO;
        }
        let digest = Sha256::digest(tick.to_rfc3339().as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        let millis = u128::from(u64::from_le_bytes(first)) % (max + 1);
        Duration::from_millis(u64::try_from(millis).unwrap_or(u64::MAX))
    }
}

/// What firing a tick does (start a cycle of every label).
#[async_trait::async_trait]
pub trait TickHandler: Send + Sync {
    async fn fire(&self, tick: DateTime<Utc>) -> Result<(), String>;
}

/// What one pass of the loop did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TickResult {
    Fired(DateTime<Utc>),
    /// Another replica claimed the tick first.
    Taken(DateTime<Utc>),
    Failed(DateTime<Utc>, String),
    NothingDue,
}

impl TickResult {
    fn metric(&self) -> Option<&'static str> {
        match self {
            Self::Fired(_) => Some("fired"),
            Self::Taken(_) => Some("taken"),
            Self::Failed(..) => Some("failed"),
            Self::NothingDue => None,
        }
    }
}

/// The last fired tick on record.
pub async fn last_fired(log: &dyn DeliveryLog) -> Result<Option<DateTime<Utc>>, String> {
    let last = log.last_claimed(SOURCE).await.map_err(|e| e.to_string())?;
    Ok(last
        .and_then(|d| d.delivery_id)
        .and_then(|id| DateTime::parse_from_rfc3339(&id).ok())
        .map(|t| t.with_timezone(&Utc)))
}

/// Fire the due tick, if any, claiming it first.
pub async fn fire_due(
    schedule: &Schedule,
    log: &dyn DeliveryLog,
    handler: &dyn TickHandler,
    now: DateTime<Utc>,
) -> Result<TickResult, String> {
    let Some(tick) = schedule.due(last_fired(log).await?, now) else {
        return Ok(TickResult::NothingDue);
    };
    claim_and_fire(log, handler, tick, now).await
}

async fn claim_and_fire(
    log: &dyn DeliveryLog,
    handler: &dyn TickHandler,
    tick: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<TickResult, String> {
    let claim = NewDelivery {
        source: SOURCE.to_owned(),
        delivery_id: Some(tick.to_rfc3339()),
        claim: true,
        outcome: "fired".into(),
        status: 0,
        detail: Some(format!("tick {tick}")),
        received_at: now,
    };
    let seq = match log.record(&claim).await.map_err(|e| e.to_string())? {
        Recorded::Recorded { seq } => seq,
        Recorded::AlreadyClaimed => return Ok(TickResult::Taken(tick)),
    };
    match handler.fire(tick).await {
        Ok(()) => Ok(TickResult::Fired(tick)),
        Err(reason) => {
            // The tick stays claimed: a failed cycle start is not retried by
            // every replica; the next tick tries again.
            let _ = log.settle(seq, "failed", 0, Some(&reason), true).await;
            Ok(TickResult::Failed(tick, reason))
        }
    }
}

/// The schedule loop, until `shutdown`. On start it fires the tick missed
/// during downtime (once), then sleeps until each next tick (+ jitter),
/// claims it and fires it.
pub async fn run(
    schedule: Schedule,
    log: Arc<dyn DeliveryLog>,
    handler: Arc<dyn TickHandler>,
    clock: Arc<dyn Clock>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    shutdown: CancellationToken,
) {
    let record = |result: &TickResult| {
        match result {
            TickResult::Fired(t) => tracing::info!(tick = %t, "schedule: fired"),
            TickResult::Taken(t) => {
                tracing::info!(tick = %t, "schedule: another replica fired this tick")
            }
            TickResult::Failed(t, e) => {
                tracing::warn!(tick = %t, error = %e, "schedule: the tick's cycle did not start")
            }
            TickResult::NothingDue => {}
        }
        if let (Some(metrics), Some(name)) = (&metrics, result.metric()) {
            metrics.schedule_tick(name);
        }
    };
    match fire_due(&schedule, log.as_ref(), handler.as_ref(), clock.now()).await {
        Ok(result) => record(&result),
        Err(e) => tracing::warn!(error = %e, "schedule: cannot read the last fired tick"),
    }
    loop {
        let now = clock.now();
        let Some(tick) = schedule.next_tick(now) else {
            tracing::warn!(
                schedule = schedule.expression(),
                "schedule: no next tick; stopping"
            );
            return;
        };
        let wait = (tick - now).to_std().unwrap_or_default() + schedule.jitter_for(tick);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        match claim_and_fire(log.as_ref(), handler.as_ref(), tick, clock.now()).await {
            Ok(result) => record(&result),
            Err(e) => {
                tracing::warn!(tick = %tick, error = %e, "schedule: cannot claim the tick");
                if let Some(metrics) = &metrics {
                    metrics.schedule_tick("failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn bad_expressions_and_zones_are_named() {
        let e = Schedule::parse("61 * * * *", None, Duration::ZERO).unwrap_err();
        assert!(e.to_string().contains("61 * * * *"), "{e}");
        let e = Schedule::parse("0 3 * * *", Some("Mars/Olympus"), Duration::ZERO).unwrap_err();
        assert_eq!(e, ScheduleError::TimeZone("Mars/Olympus".into()));
    }

    #[test]
    fn next_ticks_follow_the_time_zone_across_dst() {
        let s = Schedule::parse("0 3 * * *", Some("Europe/Paris"), Duration::ZERO).unwrap();
        // Winter: 03:00 CET = 02:00 UTC.
        assert_eq!(
            s.next_tick(at("2026-01-10T12:00:00Z")),
            Some(at("2026-01-11T02:00:00Z"))
        );
        // Summer: 03:00 CEST = 01:00 UTC.
        assert_eq!(
            s.next_tick(at("2026-07-10T12:00:00Z")),
            Some(at("2026-07-11T01:00:00Z"))
        );
        let utc = Schedule::parse("*/15 * * * *", None, Duration::ZERO).unwrap();
        // Strictly after.
        assert_eq!(
            utc.next_tick(at("2026-01-01T00:15:00Z")),
            Some(at("2026-01-01T00:30:00Z"))
        );
    }

    #[test]
    fn missed_ticks_collapse_into_the_latest_one() {
        let s = Schedule::parse("0 * * * *", None, Duration::ZERO).unwrap();
        let last = at("2026-01-01T00:00:00Z");
        // Down for five hours and a half: one tick is due, the latest.
        assert_eq!(
            s.due(Some(last), at("2026-01-01T05:30:00Z")),
            Some(at("2026-01-01T05:00:00Z"))
        );
        assert_eq!(s.due(Some(last), at("2026-01-01T00:59:59Z")), None);
        assert_eq!(
            s.due(Some(last), at("2026-01-01T01:00:00Z")),
            Some(at("2026-01-01T01:00:00Z"))
        );
        // First start: nothing on record, nothing due.
        assert_eq!(s.due(None, at("2026-01-01T05:30:00Z")), None);
        // A downtime longer than the scan still yields the latest tick.
        let every_minute = Schedule::parse("* * * * *", None, Duration::ZERO).unwrap();
        assert_eq!(
            every_minute.due(Some(last), at("2026-03-01T10:30:30Z")),
            Some(at("2026-03-01T10:30:00Z"))
        );
    }

    #[test]
    fn jitter_is_bounded_and_the_same_for_every_replica() {
        let s = Schedule::parse("0 * * * *", None, Duration::from_secs(30)).unwrap();
        let tick = at("2026-01-01T01:00:00Z");
        assert_eq!(s.jitter_for(tick), s.jitter_for(tick));
        let spread: Vec<Duration> = (0..24)
            .map(|h| s.jitter_for(tick + chrono::Duration::hours(h)))
            .collect();
        assert!(spread.iter().all(|j| *j <= Duration::from_secs(30)));
        assert!(spread.iter().any(|j| *j != spread[0]), "{spread:?}");
        let none = Schedule::parse("0 * * * *", None, Duration::ZERO).unwrap();
        assert_eq!(none.jitter_for(tick), Duration::ZERO);
    }

    #[derive(Default)]
    struct Counting(Mutex<Vec<DateTime<Utc>>>);

    #[async_trait::async_trait]
    impl TickHandler for Counting {
        async fn fire(&self, tick: DateTime<Utc>) -> Result<(), String> {
            self.0.lock().unwrap().push(tick);
            Ok(())
        }
    }

    /// After downtime, two replicas sharing a store fire the missed tick
    /// once between them, and the next pass fires nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_missed_tick_fires_once_across_replicas() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/state.db", dir.path().display());
        let one = retrain_adapters::store::open_stores(&url, Default::default())
            .await
            .unwrap();
        let two = retrain_adapters::store::open_stores(&url, Default::default())
            .await
            .unwrap();
        let s = Schedule::parse("0 * * * *", None, Duration::ZERO).unwrap();
        let handler = Counting::default();
        // The last tick fired before the downtime.
        let before = at("2026-01-01T00:00:00Z");
        assert!(matches!(
            claim_and_fire(one.deliveries.as_ref(), &handler, before, before)
                .await
                .unwrap(),
            TickResult::Fired(_)
        ));
        let now = at("2026-01-01T05:30:00Z");
        let (a, b) = tokio::join!(
            fire_due(&s, one.deliveries.as_ref(), &handler, now),
            fire_due(&s, two.deliveries.as_ref(), &handler, now),
        );
        let results = [a.unwrap(), b.unwrap()];
        let fired = results
            .iter()
            .filter(|r| matches!(r, TickResult::Fired(_)))
            .count();
        assert_eq!(fired, 1, "{results:?}");
        assert_eq!(
            *handler.0.lock().unwrap(),
            vec![before, at("2026-01-01T05:00:00Z")]
        );
        assert_eq!(
            fire_due(&s, two.deliveries.as_ref(), &handler, now)
                .await
                .unwrap(),
            TickResult::NothingDue
        );
        assert_eq!(
            last_fired(one.deliveries.as_ref()).await.unwrap(),
            Some(at("2026-01-01T05:00:00Z"))
        );
    }
}
