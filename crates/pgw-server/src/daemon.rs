//! `pg-watcher --config FILE`: binds the listeners, bootstraps and runs until SIGTERM/SIGINT.

use std::time::Duration;

use pgw_core::Config;
use tokio::net::TcpListener;

use crate::node::{tls_channels, Node, NodeError};
use crate::telemetry;
use crate::tls::Tls;

async fn bind(addr: &str) -> Result<TcpListener, NodeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| NodeError::Listen {
            addr: addr.to_string(),
            message: e.to_string(),
        })
}

/// One member of a pg-watcher group: a Raft member that decides, with the others, which
/// PostgreSQL server is the primary, and carries the decisions out on its own host.
#[derive(Debug, clap::Parser)]
#[command(name = "pg-watcher", version)]
pub struct Args {
    /// The member's TOML config (examples: /usr/share/doc/pg-watcher/examples).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: std::path::PathBuf,
    /// Validate the config and exit (0 when valid, 2 naming the bad field).
    #[arg(long)]
    pub check: bool,
    /// Join a running group (after `pgwctl member add` named this member there): ask the
    /// members at these gRPC addresses for the group's member list, store it, and start as a
    /// non-voter that the leader promotes once it has caught up. Ignored once joined.
    #[arg(long, value_name = "ADDR", value_delimiter = ',')]
    pub join: Vec<String>,
    /// Recovery after losing the majority, run on a surviving member with its pg-watcher
    /// stopped: a new group generation of the survivors out of this member's last state; the
    /// lost members' ids are retired and each cluster whose primary was lost promotes its most
    /// advanced surviving server. Refused unless the lost members stay silent for longer than
    /// the lease (or --i-know-the-others-are-down). Then exits; start the member as usual.
    #[arg(long, conflicts_with_all = ["check", "join"])]
    pub force_new_group: bool,
    /// With --force-new-group: the members that form the new group, this one among them
    /// (default: this member alone). Spares named here vote.
    #[arg(
        long,
        value_name = "NAME",
        value_delimiter = ',',
        requires = "force_new_group"
    )]
    pub survivors: Vec<String>,
    /// With --force-new-group: do not wait for the lost members' silence (you know they are
    /// down or cut off for good: a primary among them may otherwise still accept writes).
    #[arg(long = "i-know-the-others-are-down", requires = "force_new_group")]
    pub others_down: bool,
}

/// Runs one member until a termination signal. Returns an error for anything that stops it.
/// `path` is the config file it was read from (`pgwctl reload` reads it again).
pub async fn run(cfg: Config, path: std::path::PathBuf, join: &[String]) -> Result<(), NodeError> {
    let metrics = telemetry::install_metrics();
    cfg.validate()?;
    // Certificates first: a missing or wrong file is reported before anything is bound.
    let tls = Tls::load(&cfg.tls, &cfg.member, cfg.auth.has_tokens())?;
    if !join.is_empty() {
        crate::membership::join(&cfg, &tls, join).await?;
    }
    if let Some(s) = crate::raft::store::read_superseded(&cfg.data_dir)? {
        return Err(NodeError::Refused(s.message()));
    }
    // The addresses this member binds are the group's record of it, once there is one.
    crate::raft::store::finish_forced(&cfg.data_dir)?;
    let roster = crate::raft::store::read_roster(&cfg.data_dir)?;
    let running = match &roster {
        Some(r) => pgw_core::roster::effective(&cfg, r),
        None => cfg.clone(),
    };
    // A group recovered without this member (a newer generation) is asked before Raft starts.
    let listed = roster.unwrap_or_else(|| pgw_core::roster::Roster::founding(&cfg));
    if let Some(s) = crate::membership::superseded_at_start(&running, &listed, &tls).await? {
        return Err(NodeError::Refused(s.message()));
    }
    tracing::info!("{}", running.timing_summary());
    for n in running.notes() {
        tracing::warn!("{n}");
    }
    let grpc_addr = running.grpc_listen();
    let http_addr = running.http_listen();
    // Bind next: a port in use is reported before any state is touched.
    let grpc_listener = bind(&grpc_addr).await?;
    let http_listener = bind(&http_addr).await?;
    let https = cfg.tls.http.then(|| tls.clone());
    let reload_every = Duration::from_millis(cfg.tls.reload_check_ms);
    let book = crate::raft::network::PeerBook::default();
    book.set(&running);
    let channels = tls_channels(tls.clone(), book.clone(), Duration::from_millis(500));
    let node = Node::start(cfg, channels, tls.clone(), book).await?;
    node.shared.live.set_config_path(path);
    let policy = node.policy.clone();
    tls.spawn_reloader(reload_every, move || {
        if let Err(e) = policy.reload_tokens() {
            tracing::error!("role tokens not reloaded, keeping the previous ones: {e}");
        }
    });
    let router = node.grpc_router();
    let incoming = crate::tls::incoming(grpc_listener, tls);
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
        https,
    ));
    tracing::info!(grpc = %grpc_addr, http = %http_addr, "listening");
    let boot = node.bootstrap(Duration::from_secs(3));
    tokio::pin!(boot);
    let signal = shutdown_signal();
    tokio::pin!(signal);
    let storage = storage_failure(node.shared.raft.clone(), node.shared.reach.clone());
    tokio::pin!(storage);
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
        e = &mut storage => return Err(e),
    }
    tokio::select! {
        _ = &mut signal => {}
        // Fail-stop: openraft stopped on a storage error (disk full, a record found corrupt).
        // Exiting non-zero lets the service manager restart us; half-alive is never an option.
        e = &mut storage => return Err(e),
    }
    tracing::info!("shutting down");
    node.shutdown().await;
    let _ = stop_tx.send(());
    http.abort();
    let _ = tokio::time::timeout(Duration::from_secs(2), grpc).await;
    Ok(())
}

/// Resolves when openraft has stopped on a fatal error (a storage error names its file).
/// Raft stopped because a peer named a newer group generation is not a failure: the member
/// stays up idle (its lease guard fences a primary here) until the operator stops it.
async fn storage_failure(
    raft: crate::raft::types::Raft,
    reach: crate::raft::network::Reachability,
) -> NodeError {
    let mut rx = raft.metrics();
    loop {
        let state = rx.borrow_and_update().running_state.clone();
        if let Err(fatal) = state {
            if reach.newer_generation().is_some() {
                return std::future::pending().await;
            }
            metrics::gauge!(telemetry::STORAGE_FAILED).set(1.0);
            return NodeError::Storage(fatal.to_string());
        }
        if rx.changed().await.is_err() {
            if reach.newer_generation().is_some() {
                return std::future::pending().await;
            }
            return NodeError::Storage("Raft stopped".into());
        }
    }
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
