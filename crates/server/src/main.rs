//! `retrain-server`: the engine behind HTTP (see `docs/server.md`).
//!
//! `retrain-server --config retrain.toml` serves `[server] bind` until
//! SIGINT/SIGTERM, then shuts down gracefully (exit 0). A bad configuration
//! exits 2 naming the key; no bearer token without `--insecure-no-auth`
//! exits 2 as well.
//!
//! `retrain-server --healthcheck` asks a running server's `/healthz` (at
//! `RETRAIN_SERVER_ADDR`, `0.0.0.0` meaning this host) and exits 0 if it
//! answers 200, 1 otherwise: the container `HEALTHCHECK`, with no curl in a
//! slim image.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use retrain_adapters::settings::{load, ConfigSources};
use retrain_server::{Application, ServeOptions, StartupError};

/// Exit code of a configuration error (as the CLI's).
const EXIT_CONFIG: u8 = 2;

#[derive(Debug, Parser)]
#[command(name = "retrain-server", version, about = "retrain behind HTTP")]
struct Args {
    /// The configuration file (default: ./retrain.toml if present).
    #[arg(long, env = "RETRAIN_CONFIG")]
    config: Option<PathBuf>,
    /// Serve without bearer tokens (loopback only).
    #[arg(long)]
    insecure_no_auth: bool,
    /// Ask a running server's /healthz (RETRAIN_SERVER_ADDR) and exit 0 if healthy.
    #[arg(long)]
    healthcheck: bool,
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

/// `GET /healthz` on `addr` over plain HTTP/1.1; `Ok` on a 200.
async fn healthcheck(addr: SocketAddr) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let target = if addr.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    };
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(target).await?;
        stream
            .write_all(
                format!("GET /healthz HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        std::io::Result::Ok(response)
    };
    let response = tokio::time::timeout(std::time::Duration::from_secs(5), exchange)
        .await
        .with_context(|| format!("{target}: no answer within 5 s"))?
        .with_context(|| format!("{target}: cannot reach the server"))?;
    let status = String::from_utf8_lossy(&response);
    let status = status.lines().next().unwrap_or_default();
    anyhow::ensure!(
        status.starts_with("HTTP/1.1 200") || status.starts_with("HTTP/1.0 200"),
        "{target}/healthz answered {status:?}"
    );
    Ok(())
}

fn server_addr() -> anyhow::Result<SocketAddr> {
    std::env::var("RETRAIN_SERVER_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:8080".into())
        .parse()
        .context("RETRAIN_SERVER_ADDR must be host:port, e.g. 127.0.0.1:8080")
}

fn fail(code: u8, error: impl std::fmt::Display) -> ExitCode {
    eprintln!("retrain-server: {error}");
    ExitCode::from(code)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if args.healthcheck {
        return match server_addr() {
            Ok(addr) => match healthcheck(addr).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(1, format!("{e:#}")),
            },
            Err(e) => fail(EXIT_CONFIG, format!("{e:#}")),
        };
    }
    let loaded = match load(&ConfigSources::from_process(args.config.clone())) {
        Ok(loaded) => loaded,
        Err(e) => return fail(EXIT_CONFIG, e),
    };
    if let Err(e) = retrain_server::logging::init(&loaded.settings.server.log) {
        return fail(
            EXIT_CONFIG,
            format!("server.log_file: cannot open the log file: {e}"),
        );
    }
    let options = ServeOptions {
        insecure_no_auth: args.insecure_no_auth,
    };
    let app = match Application::build(loaded, options).await {
        Ok(app) => app,
        Err(e @ StartupError::Config(_)) => return fail(EXIT_CONFIG, e),
        Err(e) => return fail(1, e),
    };
    tracing::info!(addr = %app.addr(), "retrain-server listening");
    match app.run_until(shutdown_signal()).await {
        Ok(()) => {
            tracing::info!("retrain-server stopped");
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_healthcheck_passes_against_a_live_server_and_fails_without_one() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok" }));
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        healthcheck(addr).await.unwrap();
        // `0.0.0.0:port` (the container's bind address) is checked on localhost.
        healthcheck(SocketAddr::new([0, 0, 0, 0].into(), addr.port()))
            .await
            .unwrap();
        server.abort();
        let _ = server.await;
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);
        let err = healthcheck(closed_addr).await.unwrap_err();
        assert!(format!("{err:#}").contains("cannot reach"), "{err:#}");
    }
}
