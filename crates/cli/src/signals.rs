//! Ctrl-C / SIGTERM: cancel the engine (it finishes the current persistence
//! step, stops trainers and leases) and remember which signal for the exit code.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use retrain_core::CancellationToken;

#[derive(Debug, Clone)]
pub struct Interrupt {
    token: CancellationToken,
    code: Arc<AtomicU8>,
}

impl Interrupt {
    pub fn install() -> Self {
        let interrupt = Self {
            token: CancellationToken::new(),
            code: Arc::new(AtomicU8::new(0)),
        };
        let handler = interrupt.clone();
        tokio::spawn(async move {
            let code = wait_for_signal().await;
            tracing::warn!(code, "interrupted: saving state and stopping");
            handler.code.store(code, Ordering::SeqCst);
            handler.token.cancel();
        });
        interrupt
    }

    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    pub fn exit_code(&self) -> Option<u8> {
        match self.code.load(Ordering::SeqCst) {
            0 => None,
            c => Some(c),
        }
    }
}

#[cfg(unix)]
async fn wait_for_signal() -> u8 {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return crate::commands::exit::SIGINT;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => crate::commands::exit::SIGINT,
        _ = term.recv() => crate::commands::exit::SIGTERM,
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() -> u8 {
    let _ = tokio::signal::ctrl_c().await;
    crate::commands::exit::SIGINT
}
