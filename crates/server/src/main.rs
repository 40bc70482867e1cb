//! `retrain-server`: the engine behind HTTP (§8).
//!
//! This release serves liveness only (`GET /healthz`); triggers, webhooks and
//! results endpoints are tracked as later work. It binds 127.0.0.1 by default
//! and shuts down gracefully on SIGINT/SIGTERM.
//!
//! `retrain-server --healthcheck` asks a running server's `/healthz` (at
//! `RETRAIN_SERVER_ADDR`, `0.0.0.0` meaning this host) and exits 0 if it
//! answers 200, 1 otherwise: the container `HEALTHCHECK`, with no curl in a
//! slim image.

use std::net::SocketAddr;

use anyhow::Context;
use axum::routing::get;
use axum::Router;

/// The HTTP routes. A function so tests can drive it without a socket.
pub fn router() -> Router {
    Router::new().route("/healthz", get(healthz))
}

async fn healthz() -> &'static str {
    "ok"
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args().skip(1).any(|a| a == "--healthcheck") {
        return healthcheck(server_addr()?).await;
    }
    let color = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(color)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RETRAIN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let addr = server_addr()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "retrain-server listening");
    axum::serve(listener, router())
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving HTTP")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    #[tokio::test]
    async fn healthz_answers_ok() {
        let response = router()
            .oneshot(Request::get("/healthz").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        assert_eq!(&body[..], b"ok");
    }

    #[tokio::test]
    async fn the_healthcheck_passes_against_a_live_server_and_fails_without_one() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, router()).await });
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

    #[tokio::test]
    async fn unknown_routes_are_404() {
        let response = router()
            .oneshot(Request::get("/nope").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
    }
}
