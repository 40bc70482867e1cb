//! Waiting for a new dataset: one metadata read (and prepare-stage read) per
//! poll, after a jittered delay that never overruns the poll deadline and
//! that a webhook can cut short (`Engine::wake`). Labels waiting on one
//! prepare job share their reads until it publishes (`scout.rs`).

use std::time::Duration;

use tracing::{debug, info, warn};

use super::cycle::Stops;
use super::scout::Read;
use super::{CycleShared, Engine, Executed, LabelBinding};
use crate::domain::RunId;
use crate::machine::{Event, LabelRun};
use crate::ports::{MetadataRead, PortError};

impl Engine {
    pub(super) async fn poll(
        &self,
        binding: &LabelBinding,
        run: &LabelRun,
        delay_ms: u64,
        check_prepare: bool,
        shared: &CycleShared,
        stops: &Stops<'_>,
    ) -> Executed {
        // Scouting applies to the labels that restarted a job and wait on it.
        let watch = match (&run.plan.prepare, check_prepare) {
            (Some(job), true) => Some(shared.job_watch(job)),
            _ => None,
        };
        let mut woken = false;
        if delay_ms > 0 {
            let mut delay = Duration::from_millis(delay_ms);
            delay += jitter(&run.run_id, run.polls, delay, self.settings.poll_jitter);
            // Never sleep past the deadline: the timeout must be honoured.
            if let Some(deadline) = run.poll_deadline() {
                let left = (deadline - self.clock.now()).to_std().unwrap_or_default();
                delay = delay.min(left);
            }
            let waker = self.waker(run.label());
            let published = async {
                match &watch {
                    Some(watch) => watch.publication(watch.is_published()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = waker.notified() => {
                    info!("woken early by a webhook");
                    woken = true;
                }
                () = published => info!("woken early: the prepare job published"),
                () = stops.interrupt.cancelled() => return Executed::Interrupted,
                () = stops.lost.cancelled() => return Executed::LockLost(
                    self.lock_problem(run.label()).unwrap_or_else(|| "lock lost".into())
                ),
            }
        }
        // The poll that ends the wait reads, whoever scouts: the deadline
        // is decided on the label's own dataset.
        let decided_at = self.clock.now();
        let last = run
            .poll_deadline()
            .is_some_and(|deadline| decided_at >= deadline);
        let read = match &watch {
            Some(watch) => watch.decide(
                run.label(),
                tokio::time::Instant::now(),
                run.plan.poll_interval,
                self.settings.poll_scout_max_gap,
                woken || last,
            ),
            None => Read::Always,
        };
        let known = run.last_seen.as_ref().and_then(|d| d.revision.clone());
        let outcome = if read.reads() {
            binding.metadata.read(known).await
        } else {
            debug!("metadata read skipped: another label of the prepare job scouts this round");
            self.skipped_reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(MetadataRead::Unchanged)
        };
        let dataset = match outcome {
            Ok(MetadataRead::Published(dataset)) => {
                if let Some(watch) = &watch {
                    if run.is_new_version(&dataset.metadata.version_tag) {
                        watch.saw_publication();
                    }
                }
                Some(dataset)
            }
            Ok(MetadataRead::Unchanged) => run.last_seen.clone(),
            Ok(MetadataRead::Absent) => None,
            Err(PortError::Transient(e)) => {
                warn!(error = %e, "metadata poll failed; will poll again");
                run.last_seen.clone()
            }
            Err(e) => {
                return Self::failed_event(format!(
                    "reading dataset metadata {} failed: {e}",
                    binding.metadata.describe()
                ))
            }
        };
        let prepare_stage = match (&binding.prepare, &run.plan.prepare, check_prepare) {
            // A label that skipped its metadata read takes the stage the
            // job's last read found, if any, and asks for none.
            (Some(_), Some(job), true) if !read.reads() => shared.last_stage(job),
            (Some(controller), Some(job), true) => {
                // One read per job per round (half a poll interval): every
                // label waiting on this job decides on the same answer.
                let cell = shared.stage_cell(job, run.plan.poll_interval / 2);
                cell.get_or_init(|| async {
                    match controller.stage().await {
                        Ok(stage) => Some(stage),
                        Err(e) => {
                            warn!(error = %e, "could not read the prepare job's stage");
                            None
                        }
                    }
                })
                .await
                .clone()
            }
            _ => None,
        };
        let (current_len, version) = dataset
            .as_ref()
            .map(|d| (d.metadata.num_samples, d.metadata.version_tag.to_string()))
            .unwrap_or((0, "none".into()));
        info!(
            "current_len={current_len} required_len={} version={version} prepare_stage={}",
            run.required_len,
            prepare_stage
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_else(|| "-".into())
        );
        Executed::Event(Event::Polled {
            // A skipped read took no time: the machine judges the deadline
            // at the instant that found it not yet reached.
            now: if read.reads() {
                self.clock.now()
            } else {
                decided_at
            },
            dataset,
            prepare_stage,
        })
    }

    fn failed_event(reason: String) -> Executed {
        Executed::Event(Event::ActionFailed { reason })
    }
}

/// Deterministic jitter in `[0, fraction × delay)`, derived from the run id
/// and poll count so core needs no RNG and tests stay reproducible.
fn jitter(run_id: &RunId, polls: u32, delay: Duration, fraction: f64) -> Duration {
    use std::hash::{Hash, Hasher};
    if fraction.is_nan() || fraction <= 0.0 {
        return Duration::ZERO;
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    run_id.hash(&mut hasher);
    polls.hash(&mut hasher);
    let unit = (hasher.finish() % 10_000) as f64 / 10_000.0;
    delay.mul_f64((unit * fraction).min(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_is_bounded_and_varies() {
        let id = RunId::generate();
        let delay = Duration::from_secs(60);
        let values: Vec<Duration> = (0..20).map(|p| jitter(&id, p, delay, 0.1)).collect();
        assert!(values.iter().all(|j| *j < Duration::from_secs(6)));
        assert!(values.iter().any(|j| *j != values[0]));
        assert_eq!(jitter(&id, 1, delay, 0.0), Duration::ZERO);
        assert_eq!(jitter(&id, 1, delay, f64::NAN), Duration::ZERO);
        assert!(jitter(&id, 3, delay, 1.0) <= delay);
    }
}
