//! Member-to-member transport: openraft RPCs over gRPC (tonic).
//!
//! One long-lived HTTP/2 channel per peer, created once and shared by every openraft client for
//! that peer; tonic reconnects it lazily. Each RPC has a deadline. A peer that cannot be reached
//! is reported to openraft as `Unreachable`, which makes openraft back off using
//! [`PeerClient::backoff`] (exponential, capped) before trying again, and it is recorded in
//! [`Reachability`] for status and metrics.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, BasicNode};
use pgw_proto::raft_client::RaftClient;
use pgw_proto::{Identity, RaftReply, RaftRequest};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Channel;

use crate::raft::types::{NodeId, TypeConfig};
use crate::telemetry;

/// What this member last saw of each peer.
#[derive(Debug, Clone, Default)]
pub struct PeerState {
    pub reachable: bool,
    pub last_ok: Option<Instant>,
    pub last_error: Option<String>,
}

/// Which member answers at which gRPC address, from the group's member list (swapped when
/// the roster changes). Channels to a member verify that its certificate names it.
#[derive(Clone, Default)]
pub struct PeerBook(Arc<std::sync::RwLock<BTreeMap<String, String>>>);

impl PeerBook {
    pub fn set(&self, cfg: &pgw_core::Config) {
        let m: BTreeMap<String, String> = cfg
            .members
            .iter()
            .map(|m| (m.grpc.clone(), m.name.clone()))
            .collect();
        match self.0.write() {
            Ok(mut g) => *g = m,
            Err(p) => *p.into_inner() = m,
        }
    }

    /// The member at `addr`, if any.
    pub fn name(&self, addr: &str) -> Option<String> {
        match self.0.read() {
            Ok(g) => g.get(addr).cloned(),
            Err(p) => p.into_inner().get(addr).cloned(),
        }
    }
}

/// Shared view of peer reachability, fed by the transport.
#[derive(Debug, Clone)]
pub struct Reachability {
    peers: Arc<Mutex<BTreeMap<NodeId, PeerState>>>,
    names: Arc<std::sync::RwLock<BTreeMap<NodeId, String>>>,
    /// The newest group generation a peer's refusal named, and that peer.
    newer: Arc<Mutex<Option<(u64, String)>>>,
}

impl Reachability {
    pub fn new(names: BTreeMap<NodeId, String>) -> Self {
        Self {
            peers: Arc::default(),
            names: Arc::new(std::sync::RwLock::new(names)),
            newer: Arc::default(),
        }
    }

    /// A peer refused us naming group generation `g` (newer than ours: the group was
    /// recovered without this member).
    pub fn saw_generation(&self, g: u64, from: &str) {
        if let Ok(mut n) = self.newer.lock() {
            if n.as_ref().is_none_or(|(x, _)| g > *x) {
                *n = Some((g, from.to_string()));
            }
        }
    }

    /// The newer generation a peer named, if any.
    pub fn newer_generation(&self) -> Option<(u64, String)> {
        self.newer.lock().ok().and_then(|n| n.clone())
    }

    /// Takes new member names (after a roster change).
    pub fn set_names(&self, names: BTreeMap<NodeId, String>) {
        match self.names.write() {
            Ok(mut g) => *g = names,
            Err(p) => *p.into_inner() = names,
        }
    }

    pub fn name(&self, id: NodeId) -> String {
        let names = match self.names.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        names
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("node-{id}"))
    }

    fn update(&self, id: NodeId, result: Result<(), String>) {
        let Ok(mut peers) = self.peers.lock() else {
            return;
        };
        let st = peers.entry(id).or_default();
        let was = st.reachable;
        match result {
            Ok(()) => {
                st.reachable = true;
                st.last_ok = Some(Instant::now());
                st.last_error = None;
            }
            Err(e) => {
                st.reachable = false;
                st.last_error = Some(e);
            }
        }
        if was != st.reachable || st.last_ok.is_none() {
            let name = self.name(id);
            if st.reachable {
                tracing::info!(peer = %name, "peer reachable");
            } else {
                tracing::warn!(peer = %name, error = st.last_error.as_deref().unwrap_or(""), "peer unreachable");
            }
        }
        telemetry::peer_reachable(&self.name(id), st.reachable);
    }

    pub fn get(&self, id: NodeId) -> Option<PeerState> {
        self.peers.lock().ok().and_then(|p| p.get(&id).cloned())
    }
}

/// Settings shared by all peer clients.
#[derive(Clone)]
pub struct TransportConfig {
    pub identity: Identity,
    pub rpc_timeout: Duration,
    pub connect_timeout: Duration,
}

pub use crate::tls::{configure, endpoint};

/// Opens gRPC channels to peers. The daemon uses TCP; the simulator plugs in its own network.
pub type ChannelMaker = Arc<dyn Fn(&str) -> Result<Channel, String> + Send + Sync>;

/// Creates one client per peer, reusing one channel per peer address.
pub struct GrpcNetworkFactory {
    cfg: TransportConfig,
    channels: BTreeMap<NodeId, (String, Channel)>,
    reach: Reachability,
    maker: ChannelMaker,
}

impl GrpcNetworkFactory {
    pub fn new(cfg: TransportConfig, reach: Reachability, maker: ChannelMaker) -> Self {
        Self {
            cfg,
            channels: BTreeMap::new(),
            reach,
            maker,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for GrpcNetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        let channel = match self.channels.get(&target) {
            Some((addr, ch)) if *addr == node.addr => Some(ch.clone()),
            _ => match (self.maker)(&node.addr) {
                Ok(ch) => {
                    self.channels
                        .insert(target, (node.addr.clone(), ch.clone()));
                    Some(ch)
                }
                Err(e) => {
                    tracing::error!(peer = target, addr = %node.addr, error = %e, "invalid peer address");
                    None
                }
            },
        };
        PeerClient {
            target,
            client: channel.map(RaftClient::new),
            cfg: self.cfg.clone(),
            reach: self.reach.clone(),
        }
    }
}

/// openraft's view of one peer.
pub struct PeerClient {
    target: NodeId,
    client: Option<RaftClient<Channel>>,
    cfg: TransportConfig,
    reach: Reachability,
}

/// Error of one call before openraft's typing is applied.
enum CallError {
    Unreachable(String),
    Network(String),
    /// The peer answered with a Raft-level error (JSON).
    Remote(Vec<u8>),
}

#[derive(Clone, Copy)]
enum Rpc {
    Append,
    Vote,
    Snapshot,
}

impl PeerClient {
    async fn call<Req: Serialize>(
        &mut self,
        rpc: Rpc,
        req: &Req,
        ttl: Duration,
    ) -> Result<Vec<u8>, CallError> {
        let Some(client) = self.client.as_mut() else {
            return Err(CallError::Unreachable("peer address is invalid".into()));
        };
        let payload = serde_json::to_vec(req).map_err(|e| CallError::Network(e.to_string()))?;
        let mut request = tonic::Request::new(RaftRequest {
            identity: Some(self.cfg.identity.clone()),
            payload,
        });
        request.set_timeout(ttl);
        let fut = async {
            match rpc {
                Rpc::Append => client.append_entries(request).await,
                Rpc::Vote => client.vote(request).await,
                Rpc::Snapshot => client.install_snapshot(request).await,
            }
        };
        let result = match tokio::time::timeout(ttl, fut).await {
            Err(_) => Err(CallError::Unreachable(format!(
                "no answer within {} ms",
                ttl.as_millis()
            ))),
            Ok(Err(status)) => Err({
                if let Some(g) = crate::auth::generation_of(&status) {
                    if g > self.cfg.identity.generation {
                        self.reach.saw_generation(g, &self.reach.name(self.target));
                    }
                }
                match status.code() {
                    tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Cancelled => {
                        CallError::Unreachable(status.message().to_string())
                    }
                    tonic::Code::FailedPrecondition => {
                        tracing::error!(peer = %self.reach.name(self.target), "peer refused us: {}", status.message());
                        CallError::Network(format!("refused: {}", status.message()))
                    }
                    _ => CallError::Network(format!("{}: {}", status.code(), status.message())),
                }
            }),
            Ok(Ok(resp)) => {
                let RaftReply { payload, error } = resp.into_inner();
                if error {
                    Err(CallError::Remote(payload))
                } else {
                    Ok(payload)
                }
            }
        };
        match &result {
            Ok(_) | Err(CallError::Remote(_)) => self.reach.update(self.target, Ok(())),
            Err(CallError::Unreachable(e)) | Err(CallError::Network(e)) => {
                self.reach.update(self.target, Err(e.clone()))
            }
        }
        result
    }

    async fn typed<Req, Resp, E>(
        &mut self,
        rpc: Rpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let ttl = option.hard_ttl().min(match rpc {
            Rpc::Snapshot => self.cfg.rpc_timeout * 10,
            _ => self.cfg.rpc_timeout,
        });
        match self.call(rpc, req, ttl).await {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                RPCError::Network(NetworkError::new(&AnyError::error(format!(
                    "bad reply: {e}"
                ))))
            }),
            Err(CallError::Unreachable(m)) => {
                Err(RPCError::Unreachable(Unreachable::new(&AnyError::error(m))))
            }
            Err(CallError::Network(m)) => {
                Err(RPCError::Network(NetworkError::new(&AnyError::error(m))))
            }
            Err(CallError::Remote(bytes)) => match serde_json::from_slice::<E>(&bytes) {
                Ok(e) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
                Err(e) => Err(RPCError::Network(NetworkError::new(&AnyError::error(
                    format!("bad error reply: {e}"),
                )))),
            },
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.typed(Rpc::Append, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.typed(Rpc::Snapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.typed(Rpc::Vote, &rpc, &option).await
    }

    /// Retry an unreachable peer after 50 ms, doubling up to 800 ms: quick to notice a peer
    /// that restarted, cheap while one is down for long.
    fn backoff(&self) -> Backoff {
        Backoff::new((0u32..).map(|i| Duration::from_millis(50u64 << i.min(4))))
    }
}
