//! `pg-watcher --config FILE`: binds the listeners, bootstraps and runs until SIGTERM/SIGINT.

use std::time::Duration;

use pgw_core::Config;
use tokio::net::TcpListener;

use crate::node::{tcp_channels, Node, NodeError};
use crate::telemetry;

async fn bind(addr: &str) -> Result<TcpListener, NodeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| NodeError::Listen {
            addr: addr.to_string(),
            message: e.to_string(),
        })
}

/// Runs one member until a termination signal. Returns an error for anything that stops it.
pub async fn run(cfg: Config) -> Result<(), NodeError> {
    let metrics = telemetry::install_metrics();
    let grpc_addr = cfg.grpc_listen();
    let http_addr = cfg.http_listen();
    // Bind first: a port in use is reported before any state is touched.
    let grpc_listener = bind(&grpc_addr).await?;
    let http_listener = bind(&http_addr).await?;
    let node = Node::start(cfg, tcp_channels(Duration::from_millis(500))).await?;
    let router = node.grpc_router();
    let incoming =
        tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let grpc = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            })
            .await
    });
    let http = tokio::spawn(crate::http::serve(
        http_listener,
        node.shared.clone(),
        metrics,
    ));
    tracing::info!(grpc = %grpc_addr, http = %http_addr, "listening");
    let boot = node.bootstrap(Duration::from_secs(3));
    tokio::pin!(boot);
    let signal = shutdown_signal();
    tokio::pin!(signal);
    tokio::select! {
        r = &mut boot => {
            if let Err(e) = r {
                node.shutdown().await;
                return Err(e);
            }
        }
        _ = &mut signal => {
            node.shutdown().await;
            return Ok(());
        }
    }
    signal.await;
    tracing::info!("shutting down");
    node.shutdown().await;
    let _ = stop_tx.send(());
    http.abort();
    let _ = tokio::time::timeout(Duration::from_secs(2), grpc).await;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
