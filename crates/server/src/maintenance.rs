//! Housekeeping the server does on its own, between triggers.
//!
//! **Leases are reaped at start-up and every [`REAP_EVERY`].** `retrain
//! run` reaps before each cycle; a server may sit idle for hours between
//! triggers while an instance leased by a process that died (`kill -9`, a
//! lost node) keeps running and costs money. So the server stops every lease
//! that outlived its `max` or whose label no live orchestrator holds
//! (`Engine::reap_leases(false)`), whatever triggers it gets. Releasing a
//! lease is idempotent (stopping a stopped instance), so two replicas
//! reaping at once do no harm. Nothing is reaped in `dry_run`.

use std::time::Duration;

use retrain_core::CancellationToken;

use crate::state::AppState;

/// How often the server looks for leases to reap.
pub const REAP_EVERY: Duration = Duration::from_secs(60);

/// Reap now, then every `every`, until `shutdown` (a release under way is
/// dropped: it is idempotent and the next start-up repeats it).
pub async fn reap_leases(state: AppState, every: Duration, shutdown: CancellationToken) {
    if state.settings.dry_run {
        return;
    }
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            reaped = state.engine.reap_leases(false) => match reaped {
                Ok(leases) if !leases.is_empty() => tracing::info!(
                    count = leases.len(),
                    leases = ?leases.iter().map(|l| l.id.as_str()).collect::<Vec<_>>(),
                    "reaped leases left by orchestrators that are gone or that outlived their max"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "could not reap stale leases; retrying later"),
            },
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
