//! Deterministic network simulation (turmoil) of a three-member group: the real node (openraft,
//! our durable store, our gRPC services) runs unchanged, with turmoil's simulated network and
//! clock underneath. A partitioned leader's side cannot commit; after healing, all converge.
//! Every link is mutual TLS over the simulated TCP, as in production.

mod common;

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use pgw_core::config::{ListenConfig, LogConfig, MemberConfig, RaftConfig};
use pgw_core::{Config, Role};
use pgw_proto::admin_client::AdminClient;
use pgw_proto::{HistoryRequest, SetPausedRequest, StatusReply, StatusRequest};
use pgw_server::{ChannelMaker, Node};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::{Channel, Endpoint, Uri};

const PORT: u16 = 7400;
const NAMES: [&str; 3] = ["room-a", "room-b", "room-c"];

/// A turmoil TCP stream (TLS runs over it).
struct SimStream(turmoil::net::TcpStream);
impl AsyncRead for SimStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}
impl AsyncWrite for SimStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// TLS channels over turmoil's network; the server must be the member named by the host.
fn sim_channel(addr: &str, client: Arc<rustls::ClientConfig>) -> Result<Channel, String> {
    let ep = Endpoint::from_shared(format!("http://{addr}")).map_err(|e| e.to_string())?;
    let ep = pgw_server::raft::network::configure(ep, Duration::from_millis(500));
    Ok(
        ep.connect_with_connector_lazy(tower::service_fn(move |uri: Uri| {
            let client = client.clone();
            async move {
                let host = uri.host().unwrap_or_default().to_string();
                let port = uri.port_u16().unwrap_or(PORT);
                let s = turmoil::net::TcpStream::connect((host.as_str(), port)).await?;
                let s = pgw_server::tls::connect(SimStream(s), &host, client).await?;
                Ok::<_, io::Error>(TokioIo::new(s))
            }
        })),
    )
}

/// A member's channels, presenting its own certificate.
fn sim_channels(tls: pgw_server::tls::Tls) -> ChannelMaker {
    Arc::new(move |addr: &str| sim_channel(addr, tls.current().client.clone()))
}

/// The test's own (operator) client configuration: the `admin` role.
fn ctl_config() -> Arc<rustls::ClientConfig> {
    common::pki().client("admin").config
}

fn configs(root: &std::path::Path) -> Vec<Config> {
    let members: Vec<MemberConfig> = NAMES
        .iter()
        .enumerate()
        .map(|(i, n)| MemberConfig {
            name: n.to_string(),
            id: i as u64 + 1,
            role: Role::Data,
            grpc: format!("{n}:{PORT}"),
            http: format!("{n}:{}", PORT + 1),
            priority: 100,
            postgres: None,
            pgpool: None,
            pcp: None,
            room: None,
            spare: false,
        })
        .collect();
    members
        .iter()
        .map(|m| Config {
            cluster_id: "sim".into(),
            member: m.name.clone(),
            data_dir: root.join(&m.name),
            members: members.clone(),
            listen: ListenConfig::default(),
            // turmoil delays each message up to 100 ms: round trips of the wide-area kind.
            timing: pgw_core::config::TimingProfile::WideArea,
            raft: RaftConfig::for_profile(pgw_core::config::TimingProfile::WideArea),
            clusters: pgw_core::config::defaults::clusters(),
            active_cluster: None,
            log: LogConfig::default(),
            postgres: Vec::new(),
            failover: pgw_core::config::FailoverConfig::for_profile(
                pgw_core::config::TimingProfile::WideArea,
            ),
            pgpool: None,
            tls: common::pki().tls(&m.name),
            auth: common::pki().auth(),
            hooks: Vec::new(),
            generation: 0,
            pools: Default::default(),
        })
        .collect()
}

async fn run_member(cfg: Config) -> Result<(), Box<dyn std::error::Error>> {
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", PORT)).await?;
    let tls = pgw_server::tls::Tls::load(&cfg.tls, &cfg.member, false)?;
    let node = Node::start(
        cfg,
        sim_channels(tls.clone()),
        tls.clone(),
        Default::default(),
    )
    .await?;
    // Handshakes run on their own tasks (one stalled by a partition must not block accepts).
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            let (tls, tx) = (tls.clone(), tx.clone());
            tokio::spawn(async move {
                let hs = tls.accept(SimStream(s), None);
                if let Ok(Ok(a)) = tokio::time::timeout(Duration::from_secs(5), hs).await {
                    let _ = tx.send(Ok::<_, io::Error>(a)).await;
                }
            });
        }
    });
    let incoming = tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx);
    let router = node.grpc_router();
    tokio::spawn(async move { router.serve_with_incoming(incoming).await });
    node.bootstrap(Duration::from_secs(3)).await?;
    // Serve until the simulation ends.
    std::future::pending::<()>().await;
    Ok(())
}

async fn admin(name: &str) -> AdminClient<Channel> {
    AdminClient::new(sim_channel(&format!("{name}:{PORT}"), ctl_config()).expect("channel"))
}

async fn status(name: &str) -> Option<StatusReply> {
    let mut c = admin(name).await;
    let r = tokio::time::timeout(Duration::from_millis(500), c.status(StatusRequest {})).await;
    match r {
        Ok(Ok(r)) => Some(r.into_inner()),
        _ => None,
    }
}

/// The member that is leader with the highest term among `names`, by their own account.
async fn leader_among(names: &[&str]) -> Option<(String, u64)> {
    let mut best: Option<(String, u64)> = None;
    for n in names {
        if let Some(s) = status(n).await {
            if s.raft_state == "leader" && best.as_ref().is_none_or(|(_, t)| s.term > *t) {
                best = Some((s.member.clone(), s.term));
            }
        }
    }
    best
}

async fn wait_leader(names: &[&str], limit: Duration) -> (String, u64) {
    let t0 = tokio::time::Instant::now();
    loop {
        if let Some(l) = leader_among(names).await {
            return l;
        }
        assert!(
            t0.elapsed() < limit,
            "no leader among {names:?} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asks `via` to commit a pause/resume, retrying transient refusals (no leader yet, leadership
/// moving) like a real client; `None` if nothing committed within `limit`.
async fn decide(via: &str, paused: bool, reason: &str, limit: Duration) -> Option<u64> {
    let t0 = tokio::time::Instant::now();
    while t0.elapsed() < limit {
        let mut c = admin(via).await;
        let req = SetPausedRequest {
            cluster: "global".into(),
            paused,
            reason: reason.into(),
        };
        let left = limit.saturating_sub(t0.elapsed());
        match tokio::time::timeout(left, c.set_paused(req)).await {
            Ok(Ok(r)) => return Some(r.into_inner().log_index),
            Ok(Err(s)) if s.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(Err(s)) => panic!("decision refused for a non-transient reason: {s}"),
            Err(_) => return None,
        }
    }
    None
}

async fn history(name: &str) -> Vec<String> {
    let mut c = admin(name).await;
    let r = c
        .history(HistoryRequest {
            cluster: "global".into(),
            limit: 1000,
        })
        .await
        .expect("history");
    r.into_inner()
        .entries
        .into_iter()
        .map(|e| format!("{}:{}", e.log_index, e.event))
        .collect()
}

fn run_scenario(seed: u64) {
    if std::env::var("PGW_SIM_LOG").is_ok() {
        let _ = pgw_server::telemetry::init_logging(
            "sim",
            "all",
            "debug,openraft=info,h2=info,hyper=info,tower=info",
        );
    }
    let root = tempfile::tempdir().expect("tempdir");
    let cfgs = configs(root.path());
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(120))
        .rng_seed(seed)
        .build();
    for cfg in cfgs {
        let name = cfg.member.clone();
        sim.host(name.as_str(), move || run_member(cfg.clone()));
    }
    sim.client("ctl", async move {
        let (leader, term) = wait_leader(&NAMES, Duration::from_secs(20)).await;
        // Any member accepts a decision (followers forward it to the leader).
        for n in NAMES {
            decide(n, true, "before partition", Duration::from_secs(5))
                .await
                .unwrap_or_else(|| panic!("seed {seed}: healthy group commits via {n}"));
        }
        // Leadership may have moved during start-up; take the current leader.
        let (leader, term) = leader_among(&NAMES).await.unwrap_or((leader, term));

        // Cut the leader off from both followers (ctl still reaches everyone).
        let others: Vec<&str> = NAMES.iter().copied().filter(|n| *n != leader).collect();
        for o in &others {
            turmoil::partition(leader.as_str(), *o);
        }
        // The minority side cannot commit.
        let minority = decide(&leader, false, "from minority", Duration::from_secs(3)).await;
        assert_eq!(
            minority, None,
            "seed {seed}: isolated leader committed a decision"
        );

        // The majority side elects a new leader and commits.
        let (new_leader, new_term) = wait_leader(&others, Duration::from_secs(20)).await;
        assert!(new_term > term, "seed {seed}: new term");
        decide(&new_leader, false, "from majority", Duration::from_secs(5))
            .await
            .expect("majority commits");
        let old_view = status(&leader).await.expect("old leader answers ctl");
        let g = old_view
            .clusters
            .iter()
            .find(|c| c.name == "global")
            .expect("global");
        assert!(
            g.paused,
            "seed {seed}: isolated member must not apply anything new"
        );

        // Heal: everyone converges on the majority's history.
        for o in &others {
            turmoil::repair(leader.as_str(), *o);
        }
        let t0 = tokio::time::Instant::now();
        loop {
            let mut views = Vec::new();
            for n in NAMES {
                views.push(status(n).await);
            }
            let converged = views.iter().all(|v| v.is_some())
                && views
                    .iter()
                    .flatten()
                    .filter(|v| v.raft_state == "leader")
                    .count()
                    == 1
                && views.iter().flatten().all(|v| {
                    v.last_applied == views[0].as_ref().map(|x| x.last_applied).unwrap_or(0)
                });
            if converged {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "seed {seed}: no convergence: {views:#?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let h0 = history(NAMES[0]).await;
        for n in &NAMES[1..] {
            assert_eq!(history(n).await, h0, "seed {seed}: histories differ");
        }
        assert!(h0.iter().any(|e| e.contains("from majority")), "{h0:?}");
        assert!(
            !h0.iter().any(|e| e.contains("from minority")),
            "seed {seed}: {h0:?}"
        );
        Ok(())
    });
    sim.run().expect("simulation");
}

#[test]
fn partitioned_leader_cannot_commit_and_healing_converges() {
    let seeds: Vec<u64> = match std::env::var("PGW_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("PGW_SIM_SEED is a number")],
        Err(_) => (1..=12).collect(),
    };
    for seed in seeds {
        run_scenario(seed);
    }
}
