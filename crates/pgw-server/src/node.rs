//! Assembles one member: storage, Raft, transport, services and background tasks.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{InitializeError, RaftError};
use openraft::{BasicNode, SnapshotPolicy};
use pgw_core::Config;
use pgw_proto::admin_client::AdminClient;
use pgw_proto::{admin_server::AdminServer, raft_server::RaftServer, HelloRequest};
use tonic::transport::Channel;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;

use crate::auth::{AuthLayer, Policy};
use crate::member::Shared;
use crate::raft::network::{ChannelMaker, PeerBook};
use crate::raft::network::{GrpcNetworkFactory, Reachability, TransportConfig};
use crate::raft::store::{self, StoreError};
use crate::raft::types::Raft;
use crate::service::{AdminService, RaftService};
use crate::telemetry;
use crate::tls::Tls;

/// Why a member could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("pgpool: {0}")]
    Pgpool(String),
    #[error(transparent)]
    Config(#[from] pgw_core::ConfigError),
    #[error("data directory: {0}")]
    Store(#[from] StoreError),
    #[error("Raft: {0}")]
    Raft(String),
    #[error("refused by the group: {0}")]
    Refused(String),
    #[error("--join: {0}")]
    Join(#[from] crate::membership::JoinError),
    #[error("cannot listen on {addr}: {message}")]
    Listen { addr: String, message: String },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Token(#[from] crate::auth::TokenError),
    #[error("storage failed, stopping so that the service manager restarts this member: {0}")]
    Storage(String),
}

/// The default channel maker: lazily connected TCP channels with mutual TLS, each verifying
/// that the peer's certificate names the member configured at that address.
/// One long-lived channel per peer address, shared by Raft replication, sidecar reports,
/// forwarded operator calls and bootstrap (tonic multiplexes them over one HTTP/2 connection).
/// `book` says which member is at which address; it follows the group's member list.
pub fn tls_channels(tls: Tls, book: PeerBook, connect_timeout: Duration) -> ChannelMaker {
    let cache: std::sync::Mutex<BTreeMap<(String, String), Channel>> = Default::default();
    Arc::new(move |addr: &str| {
        let member = book
            .name(addr)
            .ok_or_else(|| format!("{addr} is not the address of any member"))?;
        let key = (addr.to_string(), member.clone());
        if let Some(ch) = cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
            return Ok(ch);
        }
        let ch = tls.peer_channel(addr, &member, connect_timeout)?;
        if let Ok(mut c) = cache.lock() {
            c.insert(key, ch.clone());
        }
        Ok(ch)
    })
}

/// A running member (without its listeners: the caller serves `grpc_router()`).
pub struct Node {
    pub shared: Shared,
    pub health: HealthReporter,
    channels: ChannelMaker,
    pub policy: Arc<Policy>,
}

/// Largest gRPC message a member decodes: member RPCs (Raft entries, snapshot chunks of at
/// most 1 MiB, as JSON) and operator calls.
pub const MAX_RAFT_MESSAGE: usize = 8 << 20;
pub const MAX_ADMIN_MESSAGE: usize = 1 << 20;
/// Upper bound of any one gRPC call a member serves.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

fn raft_config(cfg: &Config) -> Result<openraft::Config, NodeError> {
    let r = &cfg.raft;
    let c = openraft::Config {
        cluster_name: cfg.cluster_id.clone(),
        heartbeat_interval: r.heartbeat_ms,
        election_timeout_min: r.election_timeout_min_ms,
        election_timeout_max: r.election_timeout_max_ms,
        install_snapshot_timeout: r.rpc_timeout_ms * 10,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(r.snapshot_logs),
        max_in_snapshot_log_to_keep: 100,
        snapshot_max_chunk_size: 1 << 20,
        ..Default::default()
    };
    c.validate()
        .map_err(|e| NodeError::Raft(format!("invalid Raft settings: {e}")))
}

impl Node {
    /// Opens the data directory and starts Raft. Nothing is bound here. `file` is the config
    /// as read; the member list it runs with is the group's (`roster.pgw`) once there is one.
    /// `book` is filled here and kept current (give the same to the channel maker).
    pub async fn start(
        file: Config,
        channels: ChannelMaker,
        tls: Tls,
        book: PeerBook,
    ) -> Result<Node, NodeError> {
        store::finish_forced(&file.data_dir)?;
        let roster = store::read_roster(&file.data_dir)?;
        let config = crate::member::LiveConfig::new(file, roster.clone());
        let cfg = config.get();
        cfg.validate()?;
        book.set(&cfg);
        let policy = Arc::new(Policy::from_config(&cfg)?);
        let me = cfg
            .me()
            .ok_or_else(|| {
                NodeError::Raft(format!(
                    "member `{}` is not in the group's member list{}",
                    cfg.member,
                    if roster.is_some() {
                        " (it was removed from the group)"
                    } else {
                        ""
                    }
                ))
            })?
            .clone();
        let (log, sm) = store::open_with(&cfg, config.file(), roster.as_ref())?;
        let reach = Reachability::new(store::names_by_id(&cfg));
        let shared_roster = config.roster();
        let shared_identity = pgw_proto::Identity {
            cluster_id: cfg.cluster_id.clone(),
            fingerprint: shared_roster.group.clone(),
            from: me.id,
            from_name: me.name.clone(),
            generation: shared_roster.generation,
        };
        let factory = GrpcNetworkFactory::new(
            TransportConfig {
                identity: shared_identity,
                rpc_timeout: Duration::from_millis(cfg.raft.rpc_timeout_ms),
                connect_timeout: Duration::from_millis(cfg.raft.rpc_timeout_ms),
            },
            reach.clone(),
            channels.clone(),
        );
        let raft = Raft::new(
            me.id,
            Arc::new(raft_config(&cfg)?),
            factory,
            log,
            sm.clone(),
        )
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?;
        let health = HealthReporter::new();
        health.set_service_status("", ServingStatus::Serving).await;
        for c in &cfg.clusters {
            health
                .set_service_status(&c.name, ServingStatus::NotServing)
                .await;
        }
        let live = Arc::new(crate::reload::Live::new(&cfg));
        let leader = crate::member::LeaderState::new(&cfg);
        let shared = Shared {
            config,
            policy: policy.clone(),
            book,
            raft,
            sm,
            reach,
            started: Instant::now(),
            channels: channels.clone(),
            leader,
            local: Default::default(),
            pgpool: Default::default(),
            live,
            tls,
            refusals: Default::default(),
            handing_over: Default::default(),
        };
        tokio::spawn(watch_metrics(shared.clone(), health.clone()));
        tokio::spawn(crate::placement::placement_loop(shared.clone()));
        tokio::spawn(ensure_clusters(shared.clone()));
        tokio::spawn(crate::membership::follow_loop(shared.clone()));
        tokio::spawn(crate::membership::superseded_loop(shared.clone()));
        tokio::spawn(crate::standby::standby_loop(shared.clone()));
        tokio::spawn(crate::leader::decision_loop(shared.clone()));
        for pg in &shared.cfg().postgres {
            match crate::sidecar::Sidecar::new(shared.clone(), pg.clone()) {
                Ok(sc) => sc.spawn(),
                Err(e) => return Err(NodeError::Raft(format!("postgres sidecar: {e}"))),
            }
        }
        crate::pgpool::spawn(&shared).map_err(|e| NodeError::Pgpool(e.to_string()))?;
        crate::hooks::spawn(&shared);
        Ok(Node {
            shared,
            health,
            channels,
            policy,
        })
    }

    /// The gRPC services of this member: Raft transport, admin API and `grpc.health.v1`.
    /// Every call passes the authorisation layer first; messages, concurrency and time per
    /// call are bounded.
    pub fn grpc_router(
        &self,
    ) -> tonic::transport::server::Router<
        tower::layer::util::Stack<AuthLayer, tower::layer::util::Identity>,
    > {
        tonic::transport::Server::builder()
            .timeout(REQUEST_TIMEOUT)
            .concurrency_limit_per_connection(64)
            .max_concurrent_streams(128)
            .http2_max_header_list_size(16 * 1024)
            // Dead peers and half-open connections are noticed and their slots freed.
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            .tcp_keepalive(Some(Duration::from_secs(30)))
            .layer(AuthLayer::new(self.policy.clone()))
            .add_service(
                HealthServer::new(HealthService::from_health_reporter(self.health.clone()))
                    .max_decoding_message_size(4096),
            )
            .add_service(
                RaftServer::new(RaftService::new(self.shared.clone()))
                    .max_decoding_message_size(MAX_RAFT_MESSAGE),
            )
            .add_service(
                AdminServer::new(AdminService(self.shared.clone()))
                    .max_decoding_message_size(MAX_ADMIN_MESSAGE),
            )
    }

    pub fn raft(&self) -> &Raft {
        &self.shared.raft
    }

    /// Bootstraps the group exactly once. A member whose storage was never part of a group asks
    /// its peers who they are: a peer with another cluster id or member list refuses us (we
    /// stop); if any peer already belongs to an initialised group we wait to be replicated to;
    /// otherwise every member initialises with the same member list, which openraft accepts
    /// (identical membership at log index 0 on each), and the first election forms the group.
    /// An initialised member is never re-initialised.
    pub async fn bootstrap(&self, wait: Duration) -> Result<(), NodeError> {
        let s = &self.shared;
        let me = s.cfg().me().map(|m| m.id).unwrap_or_default();
        let deadline = Instant::now() + wait;
        let mut answered: BTreeMap<u64, bool> = BTreeMap::new();
        let peers: Vec<_> = s
            .cfg()
            .members
            .iter()
            .filter(|m| m.id != me)
            .cloned()
            .collect();
        loop {
            for p in &peers {
                if answered.contains_key(&p.id) {
                    continue;
                }
                let Ok(ch) = (self.channels)(&p.grpc) else {
                    continue;
                };
                let mut req = tonic::Request::new(HelloRequest {
                    identity: Some(s.identity()),
                });
                req.set_timeout(Duration::from_millis(500));
                let mut client = AdminClient::new(ch);
                let fut = client.hello(req);
                let reply = match tokio::time::timeout(Duration::from_millis(700), fut).await {
                    Ok(Ok(reply)) => reply,
                    Ok(Err(st)) => {
                        if let Some(g) = crate::auth::generation_of(&st) {
                            if g > s.config.roster().generation {
                                s.reach.saw_generation(g, &p.name);
                            }
                        }
                        continue;
                    }
                    Err(_) => continue,
                };
                let r = reply.into_inner();
                if r.cluster_id != s.cfg().cluster_id {
                    return Err(NodeError::Refused(format!(
                        "peer `{}` at {} belongs to cluster id `{}`, but this member's config says `{}`",
                        p.name, p.grpc, r.cluster_id, s.cfg().cluster_id
                    )));
                }
                if r.fingerprint != s.config.roster().group || r.member != p.name {
                    return Err(NodeError::Refused(format!(
                        "peer `{}` at {} has member list [{}] (answers as `{}`), but this member's config has [{}]",
                        p.name,
                        p.grpc,
                        r.members,
                        r.member,
                        s.cfg().members_canonical()
                    )));
                }
                answered.insert(p.id, r.initialized);
            }
            if answered.len() == peers.len() || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let m = s.raft.metrics().borrow().clone();
        let pristine = m.last_log_index.is_none() && m.vote.leader_id().term == 0;
        if !pristine {
            tracing::info!(
                "Raft state recovered from disk (term {}, last log index {:?}); not initialising",
                m.vote.leader_id().term,
                m.last_log_index
            );
            return Ok(());
        }
        if answered.values().any(|init| *init) {
            tracing::info!("group already initialised by peers; waiting to be replicated to");
            return Ok(());
        }
        if s.config.roster().version > 0 || s.config.roster().generation > 0 {
            // Joined (or the list changed since the group was founded, or a forced generation,
            // which only its forcing member starts): the group exists; the leader adds this
            // member. Never found a second group beside it.
            tracing::info!("member of an existing group: waiting for the leader to add it");
            return Ok(());
        }
        if s.cfg().me().is_some_and(|m| !m.votes()) {
            // A sidecar member or a spare does not vote: the leader adds it as a learner.
            tracing::info!("non-voting member: waiting for the leader to add it as a non-voter");
            return Ok(());
        }
        let members: BTreeMap<u64, BasicNode> = s
            .cfg()
            .voters()
            .map(|m| {
                (
                    m.id,
                    BasicNode {
                        addr: m.grpc.clone(),
                    },
                )
            })
            .collect();
        match s.raft.initialize(members).await {
            Ok(()) => {
                tracing::info!(
                    "initialised the group with {} voters",
                    s.cfg().voters().count()
                );
                Ok(())
            }
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(NodeError::Raft(format!("initialise: {e}"))),
        }
    }

    pub async fn shutdown(&self) {
        self.health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        if let Err(e) = self.shared.raft.shutdown().await {
            tracing::warn!("Raft shutdown: {e}");
        }
    }
}

/// Feeds metrics, logs leader changes and keeps the per-cluster health status current.
async fn watch_metrics(s: Shared, health: HealthReporter) {
    let mut rx = s.raft.metrics();
    let mut last_leader = None;
    let mut serving: BTreeMap<String, bool> = BTreeMap::new();
    let me = s.cfg().me().map(|m| m.id);
    loop {
        let m = rx.borrow_and_update().clone();
        metrics::gauge!(telemetry::RAFT_TERM).set(m.current_term as f64);
        metrics::gauge!(telemetry::RAFT_IS_LEADER).set(if crate::member::leads(&m, me) {
            1.0
        } else {
            0.0
        });
        if let Some(l) = m.last_applied {
            metrics::gauge!(telemetry::RAFT_LAST_APPLIED).set(l.index as f64);
        }
        if m.current_leader != last_leader {
            metrics::counter!(telemetry::RAFT_LEADER_CHANGES).increment(1);
            match m.current_leader {
                Some(l) => tracing::info!(term = m.current_term, "leader is {}", s.member_name(l)),
                None => tracing::warn!(term = m.current_term, "no leader"),
            }
            last_leader = m.current_leader;
        }
        // A cluster is SERVING only while it has a primary recorded by a group that currently
        // has a leader (i.e. a majority is alive and in contact).
        let facts = s.sm.applied().facts;
        for c in &s.cfg().clusters {
            if let Some(f) = facts.cluster(&c.name) {
                metrics::gauge!(telemetry::CLUSTER_EPOCH, "cluster" => c.name.clone())
                    .set(f.epoch as f64);
                metrics::gauge!(telemetry::CLUSTER_HAS_PRIMARY, "cluster" => c.name.clone())
                    .set(if f.primary.is_some() { 1.0 } else { 0.0 });
            }
            let ok = m.current_leader.is_some()
                && facts.cluster(&c.name).is_some_and(|f| f.primary.is_some());
            if serving.get(&c.name) != Some(&ok) {
                let st = if ok {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                health.set_service_status(&c.name, st).await;
                serving.insert(c.name.clone(), ok);
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// While this member leads, registers every configured PostgreSQL cluster in the facts and
/// brings Raft's membership in line with the group's member list (`membership::reconcile`).
async fn ensure_clusters(s: Shared) {
    let me = s.cfg().me().map(|m| m.id);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let m = s.raft.metrics().borrow().clone();
        if m.state == openraft::ServerState::Shutdown {
            return;
        }
        if m.current_leader != me || me.is_none() {
            continue;
        }
        crate::membership::reconcile(&s, &m).await;
        let facts = s.sm.applied().facts;
        for c in &s.cfg().clusters {
            if facts.cluster(&c.name).is_none() {
                if let Err(e) = s.propose(crate::member::ensure_command(c)).await {
                    tracing::debug!(cluster = %c.name, "registering cluster: {}", e.message());
                }
            }
        }
    }
}
