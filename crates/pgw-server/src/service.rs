//! gRPC services: the Raft transport's server side and the operator (admin) API.

use std::time::Duration;

use openraft::ServerState;
use pgw_core::{Command, Config, Outcome};
use pgw_proto::admin_client::AdminClient;
use pgw_proto::{
    admin_server, raft_server, ClusterStatus, DecisionReply, FailoverRequest, HelloReply,
    HelloRequest, HistoryEntry, HistoryReply, HistoryRequest, MemberInfo, NodeStatus,
    OperationReply, OperationRequest, PcpReply, PcpRequest, RaftReply, RaftRequest, RecoverRequest,
    ReloadReply, ReloadRequest, ReportReply, ReportRequest, RestartRequest, SetPausedRequest,
    StatusReply, StatusRequest, SwitchoverRequest,
};
use serde::Serialize;
use tonic::{Request, Response, Status};

use crate::member::{Shared, WithLeader};
use crate::raft::types::TypeConfig;
use crate::telemetry;

use crate::auth::{caller, Caller, FORWARDED, FORWARDED_CALLER, FORWARDED_ROLE};

/// Largest snapshot a member accepts (the facts are kilobytes; this is far above any real one).
pub const MAX_SNAPSHOT_BYTES: u64 = 64 << 20;

/// A request handed on to the leader: marked as forwarded (so it is never forwarded twice),
/// naming the operator it is for (the leader trusts a member to say who asked), and with a
/// deadline.
fn forward_request<T>(
    req: T,
    caller: Option<&Caller>,
    bearer: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
) -> Result<Request<T>, Status> {
    let mut fwd = Request::new(req);
    let md = fwd.metadata_mut();
    md.insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    // A token caller's token goes along: the leader checks it against its own policy.
    if let Some(b) = bearer {
        md.insert("authorization", b);
    }
    if let Some(Caller::Operator { name, role }) = caller {
        let v = name.parse().map_err(|_| {
            Status::invalid_argument(format!(
                "caller name `{name}` cannot be forwarded to the leader (not ASCII)"
            ))
        })?;
        md.insert(FORWARDED_CALLER, v);
        md.insert(
            FORWARDED_ROLE,
            tonic::metadata::MetadataValue::from_static(role.name()),
        );
    }
    fwd.set_timeout(Duration::from_secs(10));
    Ok(fwd)
}

fn leader_hint(s: &Status) -> Option<u64> {
    s.metadata()
        .get("x-pgw-leader")?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn raft_reply<T: Serialize, E: Serialize>(
    res: Result<T, E>,
) -> Result<Response<RaftReply>, Status> {
    let (payload, error) = match res {
        Ok(v) => (serde_json::to_vec(&v), false),
        Err(e) => (serde_json::to_vec(&e), true),
    };
    let payload = payload.map_err(|e| Status::internal(format!("encode reply: {e}")))?;
    Ok(Response::new(RaftReply { payload, error }))
}

fn parse<T: for<'de> serde::Deserialize<'de>>(req: &RaftRequest) -> Result<T, Status> {
    serde_json::from_slice(&req.payload)
        .map_err(|e| Status::invalid_argument(format!("malformed Raft payload: {e}")))
}

/// Server side of the member-to-member Raft transport. Every call must come from a member's
/// certificate, the vote it carries must be that member's own, and terms and indices must be
/// plausible (a term near `u64::MAX` would overflow openraft's next election).
pub struct RaftService {
    shared: Shared,
    /// Snapshots being received, per sender: (snapshot id, next offset, the bytes so far).
    receiving: std::sync::Mutex<std::collections::BTreeMap<u64, Receiving>>,
}

/// A snapshot being received: its id, the next offset expected and the bytes so far.
type Receiving = (String, u64, Vec<u8>);

/// How far ahead of our term a peer's term may be (an election per 100 ms for ~1 day).
pub const MAX_TERM_JUMP: u64 = 1 << 20;
/// Largest log index accepted (decades of decisions at any realistic rate).
pub const MAX_LOG_INDEX: u64 = 1 << 48;

impl RaftService {
    pub fn new(shared: Shared) -> Self {
        Self {
            shared,
            receiving: Default::default(),
        }
    }

    /// Parses a Raft request after checking its sender.
    fn accept<T: for<'de> serde::Deserialize<'de>>(
        &self,
        request: Request<RaftRequest>,
    ) -> Result<(T, u64), Status> {
        let who = caller(&request)?;
        let req = request.into_inner();
        self.shared.check_member(req.identity.as_ref(), &who)?;
        let from = req.identity.as_ref().map(|i| i.from).unwrap_or_default();
        Ok((parse(&req)?, from))
    }

    fn max_term(&self) -> u64 {
        let cur = self.shared.raft.metrics().borrow().current_term;
        cur.saturating_add(MAX_TERM_JUMP).min(u64::MAX / 2)
    }

    /// A vote (leader or candidate id) that is not the sender's own, or whose term is far
    /// beyond ours, is refused.
    fn own_vote(&self, vote: &openraft::Vote<u64>, from: u64) -> Result<(), Status> {
        let term = vote.leader_id().term;
        if term > self.max_term() {
            return Err(Status::invalid_argument(format!(
                "term {term} is implausibly far ahead of ours"
            )));
        }
        match vote.leader_id().voted_for() {
            Some(v) if v == from => Ok(()),
            v => Err(Status::permission_denied(format!(
                "member `{}` sent a vote for node {v:?}; a member may only speak for itself",
                self.shared.member_name(from)
            ))),
        }
    }

    /// Terms and indices of log ids in a request must be plausible.
    fn sane(&self, ids: impl IntoIterator<Item = openraft::LogId<u64>>) -> Result<(), Status> {
        let max_term = self.max_term();
        for id in ids {
            if id.leader_id.term > max_term || id.index > MAX_LOG_INDEX {
                return Err(Status::invalid_argument(format!(
                    "log id {id} is implausible"
                )));
            }
        }
        Ok(())
    }

    /// Snapshot chunks are accepted only in order, per sender, and only up to
    /// [`MAX_SNAPSHOT_BYTES`] (a chunk at a far offset would make the receiving buffer
    /// allocate without bound); the whole snapshot must be one this store can read before its
    /// last chunk reaches openraft. Returns the state to keep once openraft took the chunk.
    fn check_chunk(
        &self,
        from: u64,
        r: &openraft::raft::InstallSnapshotRequest<TypeConfig>,
    ) -> Result<Option<Receiving>, Status> {
        let id = r.meta.snapshot_id.clone();
        let mut rx = self
            .receiving
            .lock()
            .map_err(|_| Status::internal("snapshot state lock poisoned"))?;
        // Taken out while this chunk is checked; put back once openraft took it.
        let (next, mut buf) = match rx.remove(&from) {
            _ if r.offset == 0 => (0, Vec::new()),
            Some((cur, next, buf)) if cur == id => (next, buf),
            other => {
                if let Some(o) = other {
                    rx.insert(from, o);
                }
                return Err(Status::invalid_argument(format!(
                    "snapshot {id}: chunk at offset {} without its beginning",
                    r.offset
                )));
            }
        };
        drop(rx);
        if r.offset != next {
            return Err(Status::invalid_argument(format!(
                "snapshot {id}: chunk at offset {}, expected {next}",
                r.offset
            )));
        }
        let end = next.saturating_add(r.data.len() as u64);
        if end > MAX_SNAPSHOT_BYTES {
            return Err(Status::invalid_argument(format!(
                "snapshot {id}: larger than {MAX_SNAPSHOT_BYTES} bytes"
            )));
        }
        buf.extend_from_slice(&r.data);
        if r.done {
            crate::raft::store::check_snapshot(&buf)
                .map_err(|e| Status::invalid_argument(format!("snapshot {id}: {e}")))?;
            return Ok(None);
        }
        Ok(Some((id, end, buf)))
    }
}

#[tonic::async_trait]
impl raft_server::Raft for RaftService {
    async fn append_entries(
        &self,
        request: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        let (r, from): (openraft::raft::AppendEntriesRequest<TypeConfig>, _) =
            self.accept(request)?;
        self.own_vote(&r.vote, from)?;
        self.sane(
            r.prev_log_id
                .into_iter()
                .chain(r.leader_commit)
                .chain(r.entries.iter().map(|e| e.log_id)),
        )?;
        raft_reply(self.shared.raft.append_entries(r).await)
    }

    async fn vote(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let (r, from): (openraft::raft::VoteRequest<u64>, _) = self.accept(request)?;
        self.own_vote(&r.vote, from)?;
        self.sane(r.last_log_id)?;
        raft_reply(self.shared.raft.vote(r).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        let (r, from): (openraft::raft::InstallSnapshotRequest<TypeConfig>, _) =
            self.accept(request)?;
        self.own_vote(&r.vote, from)?;
        self.sane(r.meta.last_log_id)?;
        let keep = self.check_chunk(from, &r)?;
        let res = self.shared.raft.install_snapshot(r).await;
        // Advance only once openraft took the chunk (a retried chunk is then still expected).
        if res.is_ok() {
            if let Ok(mut rx) = self.receiving.lock() {
                match keep {
                    Some(k) => {
                        rx.insert(from, k);
                    }
                    None => {
                        rx.remove(&from);
                    }
                }
            }
        }
        raft_reply(res)
    }
}

pub fn state_name(s: ServerState) -> &'static str {
    match s {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

/// The operator API.
pub struct AdminService(pub Shared);

impl AdminService {
    /// A client to the leader for forwarding an operator call, or an error if we cannot.
    /// An operator operation: begun here when this member leads, else forwarded to the leader
    /// (which checks the caller again against its own policy). `args` gives (cluster, target,
    /// accept_data_loss) of the request.
    async fn operation<R, F, Fut>(
        &self,
        request: Request<R>,
        kind: pgw_core::facts::OperationKind,
        args: impl FnOnce(&R) -> (String, String, bool),
        forward: F,
    ) -> Result<Response<OperationReply>, Status>
    where
        F: FnOnce(AdminClient<tonic::transport::Channel>, Request<R>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<OperationReply>, Status>>,
    {
        let forwarded = request.metadata().contains_key(FORWARDED);
        let who = caller(&request)?;
        let bearer = request.metadata().get("authorization").cloned();
        let req = request.into_inner();
        if !self.is_leader() {
            let c = self.leader_client(forwarded)?;
            return forward(c, forward_request(req, Some(&who), bearer)?).await;
        }
        let (cluster, target, accept_data_loss) = args(&req);
        self.begin_reply(&cluster, kind, target, accept_data_loss, &who)
            .await
    }

    fn leader_client(
        &self,
        forwarded: bool,
    ) -> Result<AdminClient<tonic::transport::Channel>, Status> {
        let m = self.0.raft.metrics().borrow().clone();
        let Some(leader) = m.current_leader else {
            return Err(Status::unavailable(
                "no leader elected at the moment; retry",
            ));
        };
        if forwarded {
            return Err(Status::unavailable(
                "leadership moved while forwarding; retry",
            ));
        }
        let addr = self
            .0
            .leader_addr(leader)
            .ok_or_else(|| Status::unavailable("leader address unknown"))?;
        let ch = (self.0.channels)(&addr)
            .map_err(|e| Status::unavailable(format!("cannot reach leader at {addr}: {e}")))?;
        Ok(AdminClient::new(ch))
    }

    fn is_leader(&self) -> bool {
        self.0.is_leader()
    }

    /// `switchover --room ROOM [--all]`: records a room move; the leader's decision loop carries
    /// it out one cluster at a time (see `pgw_core::room_move`).
    async fn room_move(
        &self,
        request: Request<SwitchoverRequest>,
    ) -> Result<Response<OperationReply>, Status> {
        let forwarded = request.metadata().contains_key(FORWARDED);
        let who = caller(&request)?;
        let bearer = request.metadata().get("authorization").cloned();
        let req = request.into_inner();
        let cfg = &self.0.cfg();
        if !cfg.members.iter().any(|m| m.room() == req.room) {
            let rooms: std::collections::BTreeSet<&str> =
                cfg.members.iter().map(|m| m.room()).collect();
            return Err(Status::invalid_argument(format!(
                "no member stands in room `{}` (rooms: {})",
                req.room,
                rooms.into_iter().collect::<Vec<_>>().join(", ")
            )));
        }
        if !req.target.is_empty() {
            return Err(Status::invalid_argument(
                "--room picks the target itself: give --to or --room, not both",
            ));
        }
        let clusters = if req.all {
            cfg.switch_order()
        } else {
            self.cluster_known(&req.cluster)?;
            vec![req.cluster.clone()]
        };
        for c in &clusters {
            let there = cfg.servers(c).iter().any(|x| {
                cfg.members
                    .iter()
                    .any(|m| m.name == x.member && m.room() == req.room)
            });
            if !there {
                return Err(Status::failed_precondition(format!(
                    "cluster `{c}` has no server in room `{}`; nothing moved",
                    req.room
                )));
            }
        }
        if !self.is_leader() {
            let c = self.leader_client(forwarded)?;
            let mut c = c;
            return c
                .switchover(forward_request(req, Some(&who), bearer)?)
                .await;
        }
        let cmd = Command::BeginRoomMove {
            room: req.room.clone(),
            clusters,
        };
        match self.0.propose_as(cmd, Some(who.name())).await? {
            (_, Outcome::Rejected { reason }, _) => {
                Err(Status::failed_precondition(format!("refused: {reason}")))
            }
            (idx, _, _) => {
                self.0.leader.wake.notify_one();
                self.move_reply(idx).map(Response::new)
            }
        }
    }

    /// A room move as an operation reply (cluster "all").
    fn move_reply(&self, id: u64) -> Result<OperationReply, Status> {
        let facts = self.0.sm.applied().facts;
        let mv = facts.moves.get(&id).ok_or_else(|| {
            Status::not_found(format!(
                "no room move {id} (only the latest {} are kept)",
                pgw_core::facts::OPERATIONS_LIMIT
            ))
        })?;
        let running = mv.state == pgw_core::facts::OperationState::Running;
        // Progress: each cluster's step, in order.
        let steps: Vec<String> = mv
            .clusters
            .iter()
            .map(|c| {
                let f = facts.cluster(c);
                let op = f.and_then(|f| f.operations.values().rfind(|o| o.part_of == Some(id)));
                match op {
                    Some(o) => format!(
                        "{c}: switchover {} to {} {}",
                        o.id,
                        o.target.as_deref().unwrap_or("-"),
                        format!("{:?}", o.state).to_lowercase()
                    ),
                    None => format!(
                        "{c}: primary {}",
                        f.and_then(|f| f.primary.as_deref()).unwrap_or("none")
                    ),
                }
            })
            .collect();
        let detail = if mv.detail.is_empty() {
            steps.join("; ")
        } else {
            format!("{} ({})", mv.detail, steps.join("; "))
        };
        Ok(OperationReply {
            id,
            cluster: "all".into(),
            kind: "room_move".into(),
            target: mv.room.clone(),
            state: format!("{:?}", mv.state).to_lowercase(),
            detail,
            started_ms: mv.started_ms,
            finished_ms: mv.finished_ms.unwrap_or(0),
            waiting_for: if running {
                self.0
                    .leader
                    .waiting(&format!("room move {id}"))
                    .unwrap_or_default()
            } else {
                String::new()
            },
        })
    }

    fn operation_reply(&self, cluster: &str, id: u64) -> Result<OperationReply, Status> {
        if cluster == "all" {
            return self.move_reply(id);
        }
        let facts = self.0.sm.applied().facts;
        if !facts
            .cluster(cluster)
            .is_some_and(|c| c.operations.contains_key(&id))
            && facts.moves.contains_key(&id)
        {
            return self.move_reply(id);
        }
        let c = facts
            .cluster(cluster)
            .ok_or_else(|| Status::not_found(format!("unknown cluster `{cluster}`")))?;
        let op = c.operations.get(&id).ok_or_else(|| {
            Status::not_found(format!(
                "no operation {id} in cluster `{cluster}` (only the latest {} are kept)",
                pgw_core::facts::OPERATIONS_LIMIT
            ))
        })?;
        let running = op.state == pgw_core::facts::OperationState::Running;
        Ok(OperationReply {
            id: op.id,
            cluster: cluster.to_string(),
            kind: format!("{:?}", op.kind).to_lowercase(),
            target: op.target.clone().unwrap_or_default(),
            state: format!("{:?}", op.state).to_lowercase(),
            detail: op.detail.clone(),
            started_ms: op.started_ms,
            finished_ms: op.finished_ms.unwrap_or(0),
            waiting_for: if running {
                self.0.leader.waiting(cluster).unwrap_or_default()
            } else {
                String::new()
            },
        })
    }

    /// [`Self::begin`] as a gRPC answer.
    async fn begin_reply(
        &self,
        cluster: &str,
        kind: pgw_core::facts::OperationKind,
        target: String,
        accept_data_loss: bool,
        who: &Caller,
    ) -> Result<Response<OperationReply>, Status> {
        self.begin(cluster, kind, target, accept_data_loss, who)
            .await
            .map(Response::new)
    }

    /// Starts an operation after validation (on the leader, which has the observations).
    async fn begin(
        &self,
        cluster: &str,
        kind: pgw_core::facts::OperationKind,
        target: String,
        accept_data_loss: bool,
        who: &Caller,
    ) -> Result<OperationReply, Status> {
        use pgw_core::facts::OperationKind;
        use pgw_core::failover::PgRole;
        self.cluster_known(cluster)?;
        let facts = self.0.sm.applied().facts;
        let f = facts.cluster(cluster).ok_or_else(|| {
            Status::failed_precondition(format!("cluster `{cluster}` is not bootstrapped yet"))
        })?;
        if let Some(r) = f.running_operation() {
            return Err(Status::failed_precondition(format!(
                "operation {} ({:?}) is still running",
                r.id, r.kind
            )));
        }
        let fresh = |m: &str| self.0.leader.fresh_report(cluster, m);
        let servers = self.0.cfg().server_names(cluster);
        let cfg_now = self.0.cfg();
        let data: Vec<&pgw_core::MemberConfig> = cfg_now
            .members
            .iter()
            .filter(|m| servers.contains(&m.name))
            .collect();
        if !target.is_empty() && !data.iter().any(|m| m.name == target) {
            return Err(Status::invalid_argument(format!(
                "`{target}` is not a server of cluster `{cluster}`"
            )));
        }
        let target = match kind {
            OperationKind::Switchover => {
                let p = f.primary.clone().ok_or_else(|| {
                    Status::failed_precondition("the cluster has no primary; a switchover needs a healthy one (use `pgwctl failover`)")
                })?;
                let po = fresh(&p)
                    .filter(|o| o.role == PgRole::Primary)
                    .ok_or_else(|| {
                        Status::failed_precondition(format!(
                            "the primary {p} is not healthy; a switchover needs a healthy one"
                        ))
                    })?;
                // Healthy sync replicas of the current primary.
                let healthy = |m: &str| -> Option<u64> {
                    let o = fresh(m)?;
                    let sync = po.standbys.get(m).is_some_and(|s| s.is_synchronous());
                    (o.role == PgRole::Replica
                        && o.streaming
                        && sync
                        && f.sync_standbys.contains(m))
                    .then_some(o.flush_lsn)
                };
                if target.is_empty() {
                    let mut best: Vec<(&pgw_core::MemberConfig, u64)> = data
                        .iter()
                        .filter(|m| m.name != p)
                        .filter_map(|m| healthy(&m.name).map(|l| (*m, l)))
                        .collect();
                    best.sort_by(|a, b| {
                        b.1.cmp(&a.1)
                            .then(b.0.priority.cmp(&a.0.priority))
                            .then(a.0.name.cmp(&b.0.name))
                    });
                    best.first().map(|(m, _)| m.name.clone()).ok_or_else(|| {
                        Status::failed_precondition(
                            "no healthy synchronous replica to switch over to",
                        )
                    })?
                } else {
                    if target == p {
                        return Err(Status::failed_precondition(format!(
                            "{target} is already the primary"
                        )));
                    }
                    if healthy(&target).is_none() {
                        return Err(Status::failed_precondition(format!(
                            "{target} is not a healthy synchronous replica of {p} (it must be streaming and in sync); refusing"
                        )));
                    }
                    target
                }
            }
            OperationKind::Failover => {
                if target.is_empty() {
                    return Err(Status::invalid_argument(
                        "a forced failover needs --to MEMBER",
                    ));
                }
                if let Some(p) = &f.primary {
                    if fresh(p).is_some_and(|o| o.role == PgRole::Primary && !o.crashed) {
                        return Err(Status::failed_precondition(format!(
                            "{p} is a healthy primary; use `pgwctl switchover --to {target}` instead"
                        )));
                    }
                }
                if f.primary.as_deref() == Some(target.as_str()) {
                    return Err(Status::failed_precondition(format!(
                        "{target} is already the primary"
                    )));
                }
                target
            }
            OperationKind::Recover => {
                if target.is_empty() {
                    return Err(Status::invalid_argument("a recovery needs a MEMBER"));
                }
                let p = f.primary.clone().ok_or_else(|| {
                    Status::failed_precondition(
                        "the cluster has no primary to rebuild from; wait for the failover (or force one)",
                    )
                })?;
                if p == target {
                    return Err(Status::failed_precondition(format!(
                        "{target} is the primary; switch over first (`pgwctl switchover`)"
                    )));
                }
                if !fresh(&p).is_some_and(|o| o.role == PgRole::Primary) {
                    return Err(Status::failed_precondition(format!(
                        "the primary {p} is not healthy; a recovery needs it as the source"
                    )));
                }
                target
            }
            OperationKind::Restart => {
                if target.is_empty() {
                    return Err(Status::invalid_argument("a restart needs a MEMBER"));
                }
                let running = fresh(&target)
                    .is_some_and(|o| matches!(o.role, PgRole::Primary | PgRole::Replica));
                if !running {
                    return Err(Status::failed_precondition(format!(
                        "{target} is not reporting a running postgres; nothing to restart (`pgwctl recover` rebuilds a failed member)"
                    )));
                }
                target
            }
        };
        let detail = match kind {
            OperationKind::Switchover => format!(
                "switchover from {} to {target}",
                f.primary.clone().unwrap_or_default()
            ),
            OperationKind::Recover => format!(
                "recover {target} from {}",
                f.primary.clone().unwrap_or_default()
            ),
            OperationKind::Restart => {
                if f.primary.as_deref() == Some(target.as_str()) {
                    format!("restart {target} (the primary) in place")
                } else {
                    format!("restart {target}")
                }
            }
            OperationKind::Failover => format!(
                "forced failover to {target}{}",
                if accept_data_loss {
                    " (data loss accepted)"
                } else {
                    ""
                }
            ),
        };
        let cmd = Command::BeginOperation {
            cluster: cluster.to_string(),
            operation: kind,
            target: Some(target),
            expected_epoch: f.epoch,
            detail,
            accept_data_loss,
            part_of: None,
        };
        match self.0.propose_as(cmd, Some(who.name())).await? {
            (_, Outcome::Rejected { reason }, _) => {
                Err(Status::failed_precondition(format!("refused: {reason}")))
            }
            (idx, _, _) => {
                self.0.leader.wake.notify_one();
                self.operation_reply(cluster, idx)
            }
        }
    }

    fn cluster_known(&self, name: &str) -> Result<(), Status> {
        if self.0.cfg().clusters.iter().any(|c| c.name == name) {
            Ok(())
        } else {
            let cfg_now = self.0.cfg();
            let known: Vec<&str> = cfg_now.clusters.iter().map(|c| c.name.as_str()).collect();
            Err(Status::not_found(format!(
                "unknown cluster `{name}`; this group watches: {}",
                known.join(", ")
            )))
        }
    }
}

/// How status names a node: primary | sync_replica | replica | down | fenced.
fn pgpool_status(r: crate::member::PoolReport) -> pgw_proto::PgpoolStatus {
    pgw_proto::PgpoolStatus {
        room: r.room,
        address: r.address,
        reachable: r.reachable,
        primary: r.primary.unwrap_or_default(),
        agrees: r.agrees,
        error: r.error,
        nodes: r
            .nodes
            .into_iter()
            .map(|(member, n)| pgw_proto::PgpoolNode {
                member,
                status: n.status.as_str().to_string(),
                role: if n.primary { "primary" } else { "standby" }.to_string(),
            })
            .collect(),
        disagreeing_ms: r
            .disagreeing_since
            .map(|t| t.elapsed().as_millis() as u64)
            .unwrap_or(0),
        last_command: r.last_command,
    }
}

fn node_role(
    o: &pgw_core::failover::Observation,
    f: Option<&pgw_core::ClusterFacts>,
    primary_obs: Option<&pgw_core::failover::Observation>,
) -> &'static str {
    use pgw_core::failover::PgRole;
    match o.role {
        PgRole::Primary if f.and_then(|f| f.primary.as_deref()) == Some(o.member.as_str()) => {
            "primary"
        }
        PgRole::Primary => "fenced",
        // A standby cluster's leader: a replica of the main group's primary.
        PgRole::Replica
            if f.is_some_and(|f| {
                f.standby.is_some() && f.primary.as_deref() == Some(o.member.as_str())
            }) =>
        {
            "standby_leader"
        }
        PgRole::Replica => {
            let sync = primary_obs
                .and_then(|p| p.standbys.get(&o.member))
                .is_some_and(|st| st.is_synchronous());
            if sync {
                "sync_replica"
            } else {
                "replica"
            }
        }
        PgRole::Down if o.crashed => "fenced",
        PgRole::Down | PgRole::Empty | PgRole::Unknown => "down",
    }
}

#[tonic::async_trait]
impl admin_server::Admin for AdminService {
    async fn report(
        &self,
        request: Request<ReportRequest>,
    ) -> Result<Response<ReportReply>, Status> {
        let forwarded = request.metadata().contains_key(FORWARDED);
        let who = caller(&request)?;
        let mut req = request.into_inner();
        self.0.check_member(req.identity.as_ref(), &who)?;
        let mut obs: pgw_core::failover::Observation = serde_json::from_slice(&req.observation)
            .map_err(|e| Status::invalid_argument(format!("malformed observation: {e}")))?;
        // A member reports for itself; a relay (a member handing on a report it received) may
        // carry another member's. Either way, only configured data members and clusters are
        // kept: anything else is dropped and counted, so the report map cannot grow.
        let relayed = obs.member != who.name();
        if relayed && !forwarded {
            return Err(Status::permission_denied(format!(
                "member `{}` may only report for itself, not for `{}`",
                who.name(),
                obs.member
            )));
        }
        if !self.0.cfg().clusters.iter().any(|c| c.name == obs.cluster) {
            telemetry::report_dropped("unknown_cluster");
            return Err(Status::invalid_argument(format!(
                "`{}` is not a cluster of this group",
                obs.cluster
            )));
        }
        let servers = self.0.cfg().server_names(&obs.cluster);
        let data_member = |m: &str| servers.contains(m);
        if !data_member(&obs.member) {
            telemetry::report_dropped("unknown_member");
            return Err(Status::invalid_argument(format!(
                "`{}` is not a server of cluster `{}`",
                obs.member, obs.cluster
            )));
        }
        if relayed {
            // A relayed report counts only with its member's own signature.
            let scheme = u16::try_from(req.scheme).unwrap_or(0);
            self.0
                .tls
                .verify_member_signature(
                    &obs.member,
                    &req.cert,
                    scheme,
                    &req.observation,
                    &req.signature,
                )
                .map_err(|e| {
                    Status::permission_denied(format!(
                        "report for `{}` relayed by `{}` refused: {e}",
                        obs.member,
                        who.name()
                    ))
                })?;
        }
        obs.standbys.retain(|m, _| data_member(m));
        let m = self.0.raft.metrics().borrow().clone();
        if self.0.handing_over() {
            return Err(Status::unavailable(
                "handing Raft leadership over; report to the next leader",
            ));
        }
        if !crate::member::leads(&m, self.0.cfg().me().map(|x| x.id)) {
            // A member that cannot reach the leader sends its reports through the others too:
            // relay once (the leader still confirms its leadership before granting; the lease
            // counts from when the reporter sent it, so a relay only makes it shorter).
            if !forwarded && m.current_leader.is_some() {
                let limit = Duration::from_millis(self.0.cfg().failover.lease_ms);
                let mut c = self.leader_client(false)?;
                // Relayed under our own name; the report keeps its member's signature.
                req.identity = Some(self.0.identity());
                let fwd = forward_request(req, None, None)?;
                return match tokio::time::timeout(limit, c.report(fwd)).await {
                    Ok(r) => r,
                    Err(_) => Err(Status::unavailable(
                        "the leader did not answer the relayed report",
                    )),
                };
            }
            let st = Status::unavailable("not the leader");
            return Err(match m.current_leader {
                Some(l) => st.with_leader(l),
                None => st,
            });
        }
        let facts = self.0.sm.applied().facts;
        let epoch = facts.cluster(&obs.cluster).map(|f| f.epoch).unwrap_or(0);
        let cluster = obs.cluster.clone();
        let mut lease_ok = false;
        if let Some(req) = self.0.leader.record_report(obs, !relayed, &facts) {
            // Renew only after a majority confirmed we still lead (a deposed leader cannot);
            // the arbiter then checks the primary record did not move meanwhile and that no
            // decision to move it is in flight.
            let limit = Duration::from_millis(self.0.cfg().raft.rpc_timeout_ms);
            if let Ok(Ok(_)) = tokio::time::timeout(limit, self.0.raft.ensure_linearizable()).await
            {
                let facts = self.0.sm.applied().facts;
                lease_ok = self.0.leader.record_grant(&req, &facts);
            }
        }
        let primary_flush_lsn = facts
            .cluster(&cluster)
            .and_then(|f| f.primary.clone())
            .and_then(|p| self.0.leader.fresh_report(&cluster, &p))
            .map(|o| o.flush_lsn);
        Ok(Response::new(ReportReply {
            lease_ok,
            epoch,
            leader: self.0.cfg().member.clone(),
            primary_flush_lsn,
        }))
    }

    async fn switchover(
        &self,
        request: Request<SwitchoverRequest>,
    ) -> Result<Response<OperationReply>, Status> {
        if !request.get_ref().room.is_empty() {
            return self.room_move(request).await;
        }
        if request.get_ref().all {
            return Err(Status::invalid_argument(
                "--all moves every cluster into one room: give --room ROOM",
            ));
        }
        self.operation(
            request,
            pgw_core::facts::OperationKind::Switchover,
            |r| (r.cluster.clone(), r.target.clone(), false),
            |mut c, r| async move { c.switchover(r).await },
        )
        .await
    }

    async fn failover(
        &self,
        request: Request<FailoverRequest>,
    ) -> Result<Response<OperationReply>, Status> {
        self.operation(
            request,
            pgw_core::facts::OperationKind::Failover,
            |r| (r.cluster.clone(), r.target.clone(), r.accept_data_loss),
            |mut c, r| async move { c.failover(r).await },
        )
        .await
    }

    async fn recover(
        &self,
        request: Request<RecoverRequest>,
    ) -> Result<Response<OperationReply>, Status> {
        self.operation(
            request,
            pgw_core::facts::OperationKind::Recover,
            |r| (r.cluster.clone(), r.member.clone(), false),
            |mut c, r| async move { c.recover(r).await },
        )
        .await
    }

    async fn restart(
        &self,
        request: Request<RestartRequest>,
    ) -> Result<Response<OperationReply>, Status> {
        self.operation(
            request,
            pgw_core::facts::OperationKind::Restart,
            |r| (r.cluster.clone(), r.member.clone(), false),
            |mut c, r| async move { c.restart(r).await },
        )
        .await
    }

    async fn reload(
        &self,
        request: Request<ReloadRequest>,
    ) -> Result<Response<ReloadReply>, Status> {
        let who = caller(&request)?;
        let path = self.0.live.config_path().ok_or_else(|| {
            Status::failed_precondition("this member was not started from a config file")
        })?;
        let new = Config::load(&path)
            .map_err(|e| Status::invalid_argument(format!("{}: {e}", path.display())))?;
        self.0.cfg().reload_diff(&new).map_err(|e| {
            Status::failed_precondition(format!("{}: {e}; nothing reloaded", path.display()))
        })?;
        tracing::info!(by = %who.name(), "reload of {} asked", path.display());
        let mut notes = Vec::new();
        match self.0.tls.reload() {
            Ok(()) => notes.push("certificates re-read".to_string()),
            Err(e) => notes.push(format!(
                "certificates not reloaded (keeping the running ones): {e}"
            )),
        }
        let (mut changed, mut pending_restart) = (false, Vec::new());
        for pg in &new.postgres {
            let cluster = new.pg_cluster_of(pg);
            let (c, outcome) = self
                .0
                .live
                .apply(
                    &cluster,
                    pg.settings.clone(),
                    pg.hba.clone(),
                    Duration::from_secs(20),
                )
                .await;
            changed |= c;
            let several = new.postgres.len() > 1;
            match outcome {
                Some(Ok(p)) => pending_restart.extend(p.into_iter().map(|x| {
                    if several {
                        format!("{cluster}: {x}")
                    } else {
                        x
                    }
                })),
                Some(Err(e)) => {
                    return Err(Status::internal(format!(
                        "postgres settings of cluster `{cluster}`: {e}"
                    )))
                }
                None => notes.push(format!(
                    "the watcher of cluster `{cluster}` is busy (a clone or rewind): it applies the settings when done"
                )),
            }
        }
        Ok(Response::new(ReloadReply {
            member: self.0.cfg().member.clone(),
            changed,
            pending_restart,
            notes,
        }))
    }

    async fn get_operation(
        &self,
        request: Request<OperationRequest>,
    ) -> Result<Response<OperationReply>, Status> {
        let req = request.into_inner();
        if req.cluster != "all" {
            self.cluster_known(&req.cluster)?;
        }
        Ok(Response::new(self.operation_reply(&req.cluster, req.id)?))
    }

    async fn hello(&self, request: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        let who = caller(&request)?;
        let req = request.into_inner();
        if let Some(id) = &req.identity {
            if matches!(who, Caller::Member { .. }) {
                // A member names itself; a mismatch of cluster or member list is only logged
                // here: the caller decides what to do with our answer.
                if let Err(e) = self.0.check_member(Some(id), &who) {
                    if e.code() == tonic::Code::PermissionDenied {
                        return Err(e);
                    }
                }
            }
        }
        let m = self.0.raft.metrics().borrow().clone();
        let initialized = m.last_log_index.is_some() || m.vote.leader_id().term > 0;
        let cfg_now = self.0.cfg();
        let me = cfg_now.me();
        Ok(Response::new(HelloReply {
            cluster_id: self.0.cfg().cluster_id.clone(),
            fingerprint: self.0.config.roster().group.clone(),
            member: self.0.cfg().member.clone(),
            node_id: me.map(|m| m.id).unwrap_or_default(),
            initialized,
            members: self.0.cfg().members_canonical(),
            generation: self.0.config.roster().generation,
        }))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusReply>, Status> {
        let s = &self.0;
        let m = s.raft.metrics().borrow().clone();
        let applied = s.sm.applied();
        let me_id = s.cfg().me().map(|m| m.id).unwrap_or_default();
        let standings = crate::membership::standings(s);
        let mut members: Vec<MemberInfo> = s
            .cfg()
            .members
            .iter()
            .map(|mc| MemberInfo {
                name: mc.name.clone(),
                node_id: mc.id,
                role: mc.role.to_string(),
                grpc: mc.grpc.clone(),
                http: mc.http.clone(),
                reachable: mc.id == me_id || s.reach.get(mc.id).is_some_and(|p| p.reachable),
                room: mc.room().to_string(),
                standing: standings
                    .get(&mc.id)
                    .copied()
                    .unwrap_or("joining")
                    .to_string(),
            })
            .collect();
        // Members Raft still counts although the group no longer lists them.
        for (id, st) in standings.iter().filter(|(_, st)| **st == "leaving") {
            members.push(MemberInfo {
                name: s.member_name(*id),
                node_id: *id,
                reachable: s.reach.get(*id).is_some_and(|p| p.reachable),
                standing: st.to_string(),
                ..Default::default()
            });
        }
        let roster = s.config.roster();
        let clusters = s
            .cfg()
            .clusters
            .iter()
            .map(|c| {
                let f = applied.facts.cluster(&c.name);
                let servers: std::collections::BTreeMap<String, String> = s
                    .cfg()
                    .servers(&c.name)
                    .into_iter()
                    .filter_map(|x| x.postgres.clone().map(|a| (x.member, a)))
                    .collect();
                ClusterStatus {
                    primary_address: f
                        .and_then(|f| f.primary.as_ref())
                        .and_then(|p| servers.get(p).cloned())
                        .unwrap_or_default(),
                    standby: crate::standby::status(s, &c.name),
                    name: c.name.clone(),
                    primary: f.and_then(|f| f.primary.clone()).unwrap_or_default(),
                    epoch: f.map(|f| f.epoch).unwrap_or(0),
                    paused: f.is_some_and(|f| f.paused),
                    sync_standbys: f
                        .map(|f| f.sync_standbys.iter().cloned().collect())
                        .unwrap_or_default(),
                    sync_quorum: f.map(|f| f.sync_quorum).unwrap_or(c.sync_quorum),
                    nodes: {
                        let reports = s.leader.reports(&c.name);
                        let primary_obs = f
                            .and_then(|f| f.primary.as_ref())
                            .and_then(|p| reports.get(p))
                            .map(|(o, _)| o.clone());
                        let now = s.leader.now_ms();
                        let stale_ms = s.leader.fresh_ms();
                        reports
                            .values()
                            .map(|(o, at)| NodeStatus {
                                member: o.member.clone(),
                                role: if now.saturating_sub(*at) > stale_ms {
                                    "down".to_string()
                                } else {
                                    node_role(o, f, primary_obs.as_ref()).to_string()
                                },
                                lsn: crate::sidecar::observe::format_lsn(o.flush_lsn),
                                lag_bytes: primary_obs
                                    .as_ref()
                                    .filter(|p| p.member != o.member)
                                    .map(|p| p.flush_lsn.saturating_sub(o.flush_lsn))
                                    .unwrap_or(0),
                                timeline: o.timeline,
                                error: o.error.clone().unwrap_or_default(),
                                address: servers.get(&o.member).cloned().unwrap_or_default(),
                                replay_lag_ms: o.replay_lag_ms.map(|x| x as i64).unwrap_or(-1),
                            })
                            .collect()
                    },
                    history_len: f.map(|f| f.history.len() as u64).unwrap_or(0),
                    // A standby cluster commits nothing of its own (its distance from the main
                    // group is the lag shown with it): never degraded.
                    degraded: f.is_none_or(|f| f.standby.is_none())
                        && (f
                        .and_then(|f| f.primary.as_ref())
                        .and_then(|p| s.leader.reports(&c.name).get(p).map(|(o, _)| o.degraded))
                        .unwrap_or(false)
                        || f.is_some_and(|f| {
                            f.primary.is_some() && f.sync_standbys.is_empty() && f.epoch > 0
                        })
                        // After degraded mode, until a synchronous standby holds everything
                        // acknowledged meanwhile (it has passed the resync point), a failover
                        // could still lose commits: RPO > 0 until then.
                        || f.is_some_and(|f| f.standby.is_none() && f.resync_pending)
                        || f.is_some_and(|f| {
                            let reports = s.leader.reports(&c.name);
                            f.resync_lsn > 0
                                && !reports.is_empty()
                                && !f.sync_standbys.iter().any(|m| {
                                    reports.get(m).is_some_and(|(o, _)| o.flush_lsn >= f.resync_lsn)
                                })
                        })),
                    waiting_for: s.leader.waiting(&c.name).unwrap_or_default(),
                    pgpool: s
                        .pgpool
                        .all()
                        .into_iter()
                        .filter(|p| p.cluster == c.name)
                        .map(pgpool_status)
                        .collect(),
                }
            })
            .collect();
        Ok(Response::new(StatusReply {
            cluster_id: s.cfg().cluster_id.clone(),
            member: s.cfg().member.clone(),
            node_id: me_id,
            raft_state: state_name(m.state).to_string(),
            leader: m
                .current_leader
                .map(|l| s.member_name(l))
                .unwrap_or_default(),
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            last_applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            members,
            clusters,
            uptime_ms: s.started.elapsed().as_millis() as u64,
            active_cluster: s.cfg().active_cluster().unwrap_or_default().to_string(),
            membership_changing: crate::membership::changing(s),
            roster_version: roster.version,
            generation: roster.generation,
            automatic_failover_off: s.cfg().automatic_failover_off().unwrap_or_default(),
        }))
    }

    async fn member_change(
        &self,
        request: Request<pgw_proto::MemberChangeRequest>,
    ) -> Result<Response<pgw_proto::MemberChangeReply>, Status> {
        let forwarded = request.metadata().contains_key(FORWARDED);
        let who = caller(&request)?;
        let bearer = request.metadata().get("authorization").cloned();
        let req = request.into_inner();
        if !self.is_leader() {
            let mut c = self.leader_client(forwarded)?;
            return c
                .member_change(forward_request(req, Some(&who), bearer)?)
                .await;
        }
        let (next, event) = crate::membership::plan(&self.0, &req)?;
        let node_id = req.member.as_ref().map(|m| m.id).unwrap_or(0);
        let (log_index, roster_version, committed_by) =
            crate::membership::commit(&self.0, next, event.clone(), who.name()).await?;
        tracing::info!(by = %who.name(), "{event}");
        Ok(Response::new(pgw_proto::MemberChangeReply {
            log_index,
            committed_by,
            roster_version,
            node_id,
            result: event,
        }))
    }

    async fn promote_group(
        &self,
        request: Request<pgw_proto::PromoteGroupRequest>,
    ) -> Result<Response<pgw_proto::PromoteGroupReply>, Status> {
        let forwarded = request.metadata().contains_key(FORWARDED);
        let who = caller(&request)?;
        let bearer = request.metadata().get("authorization").cloned();
        let req = request.into_inner();
        if !self.is_leader() {
            let mut c = self.leader_client(forwarded)?;
            return c
                .promote_group(forward_request(req, Some(&who), bearer)?)
                .await;
        }
        crate::standby::promote(&self.0, &req, who.name())
            .await
            .map(Response::new)
    }

    async fn get_roster(
        &self,
        request: Request<pgw_proto::RosterRequest>,
    ) -> Result<Response<pgw_proto::RosterReply>, Status> {
        let who = caller(&request)?;
        let req = request.into_inner();
        // The joiner has no roster yet: its cluster id and certificate are what is checked.
        if req.identity.as_ref().map(|i| i.cluster_id.as_str()) != Some(&self.0.cfg().cluster_id) {
            return Err(Status::failed_precondition(format!(
                "cluster id mismatch: this member belongs to `{}`",
                self.0.cfg().cluster_id
            )));
        }
        let roster = crate::membership::roster_for(&self.0, who.name())?;
        Ok(Response::new(pgw_proto::RosterReply {
            cluster_id: self.0.cfg().cluster_id.clone(),
            roster,
        }))
    }

    async fn set_paused(
        &self,
        request: Request<SetPausedRequest>,
    ) -> Result<Response<DecisionReply>, Status> {
        let forwarded = request.metadata().contains_key(FORWARDED);
        let who = caller(&request)?;
        let bearer = request.metadata().get("authorization").cloned();
        let req = request.into_inner();
        self.cluster_known(&req.cluster)?;
        let cmd = Command::SetPaused {
            cluster: req.cluster.clone(),
            paused: req.paused,
            reason: if req.reason.is_empty() {
                "operator request".into()
            } else {
                req.reason.clone()
            },
        };
        match self.0.propose_as(cmd, Some(who.name())).await {
            Ok((_, Outcome::Rejected { reason }, _)) => Err(Status::failed_precondition(format!(
                "decision rejected: {reason}"
            ))),
            Ok((log_index, outcome, by)) => {
                Ok(Response::new(decision_reply(log_index, by, &outcome)))
            }
            Err(status) if !forwarded && leader_hint(&status).is_some() => {
                let leader = leader_hint(&status).unwrap_or_default();
                let addr = self
                    .0
                    .leader_addr(leader)
                    .ok_or_else(|| Status::unavailable("leader address unknown"))?;
                let ch = (self.0.channels)(&addr).map_err(|e| {
                    Status::unavailable(format!("cannot reach leader at {addr}: {e}"))
                })?;
                AdminClient::new(ch)
                    .set_paused(forward_request(req, Some(&who), bearer)?)
                    .await
            }
            Err(status) => Err(status),
        }
    }

    async fn hook_result(
        &self,
        request: Request<pgw_proto::HookResultRequest>,
    ) -> Result<Response<DecisionReply>, Status> {
        let who = caller(&request)?;
        let req = request.into_inner();
        self.0.check_member(req.identity.as_ref(), &who)?;
        self.cluster_known(&req.cluster)?;
        if !self.is_leader() {
            let leader = self.0.raft.metrics().borrow().current_leader;
            return Err(match leader {
                Some(l) => Status::unavailable("not the leader").with_leader(l),
                None => Status::unavailable("no leader elected at the moment; retry"),
            });
        }
        let detail: String = req.detail.chars().take(300).collect();
        let cmd = Command::RecordHook {
            cluster: req.cluster,
            member: who.name().to_string(),
            hook: req.hook,
            epoch: req.epoch,
            succeeded: req.succeeded,
            attempts: req.attempts,
            detail,
        };
        let (idx, out, by) = self.0.propose(cmd).await?;
        Ok(Response::new(decision_reply(idx, by, &out)))
    }

    async fn pcp(&self, request: Request<PcpRequest>) -> Result<Response<PcpReply>, Status> {
        let who = caller(&request)?;
        let req = request.into_inner();
        self.0.check_member(req.identity.as_ref(), &who)?;
        let nodes = crate::pgpool::local_pcp(&self.0, &req).await?;
        Ok(Response::new(PcpReply { nodes }))
    }

    async fn history(
        &self,
        request: Request<HistoryRequest>,
    ) -> Result<Response<HistoryReply>, Status> {
        let req = request.into_inner();
        let applied = self.0.sm.applied();
        let limit = if req.limit == 0 {
            50
        } else {
            req.limit as usize
        };
        let mut entries = Vec::new();
        for (name, c) in &applied.facts.clusters {
            if !req.cluster.is_empty() && *name != req.cluster {
                continue;
            }
            entries.extend(c.history.iter().map(|h| HistoryEntry {
                log_index: h.log_index,
                at_ms: h.at_ms,
                cluster: name.clone(),
                event: match &h.asked_by {
                    Some(a) => format!("{} (by {}, asked by {a})", h.event, h.by),
                    None => format!("{} (by {})", h.event, h.by),
                },
                epoch: h.epoch,
            }));
        }
        if !req.cluster.is_empty() && !applied.facts.clusters.contains_key(&req.cluster) {
            self.cluster_known(&req.cluster)?;
        }
        entries.sort_by_key(|e| e.log_index);
        let skip = entries.len().saturating_sub(limit);
        Ok(Response::new(HistoryReply {
            entries: entries.into_iter().skip(skip).collect(),
        }))
    }
}

fn decision_reply(log_index: u64, by: String, o: &Outcome) -> DecisionReply {
    let result = match o {
        Outcome::Applied { epoch } => format!("applied (epoch {epoch})"),
        Outcome::Unchanged { epoch } => format!("already so (epoch {epoch})"),
        Outcome::Rejected { reason } => format!("rejected: {reason}"),
    };
    DecisionReply {
        log_index,
        committed_by: by,
        result,
    }
}
