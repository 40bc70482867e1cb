//! Building and running the server (zero2prod's `Application`): tests build
//! it on port 0 and drive it with a real HTTP client.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use retrain_adapters::settings::LoadedSettings;
use retrain_adapters::store::{JournalWatch, StoreOptions};
use retrain_adapters::wiring;
use retrain_core::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::artifacts::Artifacts;
use crate::auth::Tokens;
use crate::metrics::Metrics;
use crate::routes;
use crate::schedule::{Schedule, ScheduleError};
use crate::state::AppState;
use crate::webhooks::{self, effects::EngineEffects};

/// How the server was asked to run (command-line flags).
#[derive(Debug, Clone, Copy, Default)]
pub struct ServeOptions {
    /// Serve without bearer tokens, on loopback only.
    pub insecure_no_auth: bool,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// A configuration problem (exit code 2), naming the key.
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Store(String),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Why serving stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("serving HTTP: {0}")]
    Io(#[from] std::io::Error),
    #[error("the work under way did not stop within shutdown_timeout ({0:?})")]
    ShutdownTimedOut(Duration),
}

/// A bound server, not serving yet.
#[derive(Debug)]
pub struct Application {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    state: AppState,
    shutdown_timeout: Duration,
    schedule: Option<Schedule>,
    /// Routes mounted beside the API's.
    extra: Vec<axum::Router<AppState>>,
}

impl Application {
    /// Open the store (migrating it), build this process's engine and bind
    /// `[server] bind`. Refuses to start without a token unless
    /// `--insecure-no-auth`, which also restricts the bind to loopback.
    pub async fn build(
        loaded: LoadedSettings,
        options: ServeOptions,
    ) -> Result<Self, StartupError> {
        let server = &loaded.settings.server;
        let mut bind = server.bind;
        let tokens = if server.tokens.is_empty() {
            if !options.insecure_no_auth {
                return Err(StartupError::Config(
                    "[server]: no bearer token configured: set RETRAIN_SERVER_TOKEN (or [[server.tokens]]), or pass --insecure-no-auth to serve without authentication on loopback only".into(),
                ));
            }
            if !bind.ip().is_loopback() {
                tracing::warn!(configured = %bind, "--insecure-no-auth: serving on loopback only");
                bind.set_ip(Ipv4Addr::LOCALHOST.into());
            }
            Tokens::insecure_no_auth()
        } else {
            if options.insecure_no_auth {
                tracing::warn!("--insecure-no-auth ignored: bearer tokens are configured");
            }
            Tokens::new(&server.tokens)
        };
        let schedule = server
            .schedule
            .as_ref()
            .map(|s| {
                Schedule::parse(&s.cron, Some(&s.timezone), s.jitter).map_err(|e| {
                    let key = match e {
                        ScheduleError::Cron { .. } => "server.schedule.cron",
                        ScheduleError::TimeZone(_) => "server.schedule.timezone",
                    };
                    StartupError::Config(format!("key `{key}`: {e}"))
                })
            })
            .transpose()?;
        let stores = retrain_adapters::store::open_stores(
            secrecy::ExposeSecret::expose_secret(&loaded.settings.state),
            StoreOptions {
                migrate: true,
                read_only: false,
            },
        )
        .await
        .map_err(|e| StartupError::Store(format!("opening the run store: {e}")))?;
        let store = stores.runs;
        let jobs = retrain_adapters::worker_trainer::RemoteJobs::new(stores.jobs);
        let journal =
            JournalWatch::open(secrecy::ExposeSecret::expose_secret(&loaded.settings.state))
                .await
                .map_err(|e| StartupError::Store(format!("watching the journal: {e}")))?;
        let engine = wiring::build_engine_with_jobs(&loaded, store.clone(), jobs.clone())
            .await
            .map_err(|e| StartupError::Config(e.to_string()))?;
        let listener = tokio::net::TcpListener::bind(bind)
            .await
            .map_err(|source| StartupError::Bind { addr: bind, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| StartupError::Bind { addr: bind, source })?;
        let shutdown_timeout = server.shutdown_timeout;
        let artifacts = Artifacts::new(
            server.artifacts_dir.clone(),
            server.artifact_max_bytes,
            server.request_timeout,
            stores.artifacts,
        );
        let state = AppState {
            engine: Arc::new(engine),
            store,
            webhook_targets: Arc::new(webhooks::targets(&loaded.settings)),
            settings: Arc::new(loaded.settings),
            tokens: Arc::new(tokens),
            journal: Arc::new(journal),
            shutdown: CancellationToken::new(),
            work: TaskTracker::new(),
            deliveries: stores.deliveries,
            pending_gates: stores.pending_gates,
            metrics: Arc::new(Metrics::new()),
            jobs,
            artifacts: Arc::new(artifacts),
        };
        Ok(Self {
            listener,
            addr,
            state,
            shutdown_timeout,
            schedule,
            extra: Vec::new(),
        })
    }

    /// The address actually bound (the port chosen when 0 was asked).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The shared state.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Mount more routes (they get the same state, body limit, timeout and
    /// shutdown); their paths must not overlap the API's.
    pub fn merge_routes(mut self, routes: axum::Router<AppState>) -> Self {
        self.extra.push(routes);
        self
    }

    /// Serve until `signal` completes, then shut down gracefully: stop
    /// accepting, cancel the cycles' waits (trainings cancelled and
    /// journaled, leases stopped, runs resumable), end the event streams,
    /// and wait for the work under way, all within `shutdown_timeout`.
    pub async fn run_until(
        self,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let Self {
            listener,
            state,
            shutdown_timeout,
            schedule,
            extra,
            ..
        } = self;
        let shutdown = state.shutdown.clone();
        let work = state.work.clone();
        if let Some(schedule) = schedule {
            tracing::info!(schedule = schedule.expression(), "schedule on");
            let effects = Arc::new(EngineEffects::new(state.clone(), state.metrics.clone()));
            work.spawn(crate::schedule::run(
                schedule,
                state.deliveries.clone(),
                effects,
                Arc::new(retrain_core::engine::TokioClock::new()),
                Some(state.metrics.clone()),
                shutdown.clone(),
            ));
        }
        work.spawn(crate::maintenance::reap_leases(
            state.clone(),
            crate::maintenance::REAP_EVERY,
            shutdown.clone(),
        ));
        // Gates accepted and runs begun by a process that stopped before it
        // could finish them.
        let effects = EngineEffects::new(state.clone(), state.metrics.clone());
        effects.resume_pending_gates().await;
        effects.resume_interrupted_runs().await;
        // Workers past `worker_ttl` become stale and their jobs lost.
        work.spawn(crate::routes::workers::sweep_stale(
            state.clone(),
            shutdown.clone(),
        ));
        let app = routes::router_with(state, extra);
        let stopping = shutdown.clone();
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
            signal.await;
            tracing::info!("shutting down: no new connections; interrupting the work under way");
            stopping.cancel();
        });
        // The HTTP side finishes its requests; the engine side its steps.
        let mut serving = tokio::spawn(async move { serve.await });
        tokio::select! {
            () = shutdown.cancelled() => {}
            ended = &mut serving => {
                // Serving failed on its own: still stop the work cleanly.
                shutdown.cancel();
                let _ = tokio::time::timeout(shutdown_timeout, async {
                    work.close();
                    work.wait().await;
                })
                .await;
                return match ended {
                    Ok(result) => result.map_err(ServeError::Io),
                    Err(join) => Err(ServeError::Io(std::io::Error::other(join.to_string()))),
                };
            }
        }
        let drained = tokio::time::timeout(shutdown_timeout, async {
            work.close();
            work.wait().await;
            serving.await
        })
        .await;
        match drained {
            Ok(Ok(result)) => result.map_err(ServeError::Io),
            Ok(Err(join)) => Err(ServeError::Io(std::io::Error::other(join.to_string()))),
            Err(_) => Err(ServeError::ShutdownTimedOut(shutdown_timeout)),
        }
    }
}
