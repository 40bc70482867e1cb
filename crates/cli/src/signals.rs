//! Ctrl-C / SIGTERM: cancel the engine (it finishes the current persistence
//! step, stops trainers and leases) and remember which signal for the exit code.
//! A second signal fires [`Interrupt::force_token`]: for whoever waits out
//! something long after the first (the worker agent draining its job), a
//! request to stop now.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use retrain_core::CancellationToken;

#[derive(Debug, Clone)]
pub struct Interrupt {
    token: CancellationToken,
    code: Arc<AtomicU8>,
    force: CancellationToken,
    force_code: Arc<AtomicU8>,
}

impl Interrupt {
    pub fn install() -> Self {
        let interrupt = Self {
            token: CancellationToken::new(),
            code: Arc::new(AtomicU8::new(0)),
            force: CancellationToken::new(),
            force_code: Arc::new(AtomicU8::new(0)),
        };
        let handler = interrupt.clone();
        tokio::spawn(async move {
            let mut signals = Signals::new();
            let code = signals.next().await;
            tracing::warn!(code, "interrupted: saving state and stopping");
            handler.code.store(code, Ordering::SeqCst);
            handler.token.cancel();
            let code = signals.next().await;
            tracing::warn!(code, "interrupted a second time");
            handler.force_code.store(code, Ordering::SeqCst);
            handler.force.cancel();
        });
        interrupt
    }

    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Fires on the second signal.
    pub fn force_token(&self) -> CancellationToken {
        self.force.clone()
    }

    pub fn exit_code(&self) -> Option<u8> {
        match self.code.load(Ordering::SeqCst) {
            0 => None,
            c => Some(c),
        }
    }

    /// The exit code of the second signal, once it came.
    pub fn forced_exit_code(&self) -> Option<u8> {
        match self.force_code.load(Ordering::SeqCst) {
            0 => None,
            c => Some(c),
        }
    }
}

/// SIGINT and SIGTERM, listened to from the first call on (so a signal
/// right after the first is not missed between two waits).
struct Signals {
    #[cfg(unix)]
    streams: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let streams = signal(SignalKind::interrupt())
                .and_then(|int| Ok((int, signal(SignalKind::terminate())?)))
                .ok();
            Self { streams }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// The exit code of the next SIGINT or SIGTERM.
    async fn next(&mut self) -> u8 {
        #[cfg(unix)]
        if let Some((int, term)) = self.streams.as_mut() {
            return tokio::select! {
                _ = int.recv() => crate::commands::exit::SIGINT,
                _ = term.recv() => crate::commands::exit::SIGTERM,
            };
        }
        let _ = tokio::signal::ctrl_c().await;
        crate::commands::exit::SIGINT
    }
}
