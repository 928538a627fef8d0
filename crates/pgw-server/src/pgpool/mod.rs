//! Every room's pgpool-II, kept in line with the group's decisions.
//!
//! The Raft leader (arbiter or not) reads each pgpool's node list through PCP and sends the
//! one command [`pgw_core::pgpool::Target::next_action`] asks for, after confirming with a
//! quorum that it still leads: a member on the minority side of a partition never rewrites a
//! pgpool. The PCP sessions themselves are made by the pgpool's own room's watcher
//! ([`local_pcp`], the `Pcp` RPC), which refuses a command decided at another epoch: a PCP
//! worker whose client vanished without a reset (a room cut off mid-request) blocks forever, and
//! pgpool's next failover waits for it, so a PCP session never crosses rooms. Only when that
//! watcher does not answer at all does the leader talk to PCP itself. A pgpool that was unreachable during a change is corrected as soon as it answers
//! again; until then (and while it disagrees for any reason) status and metrics say so.

pub mod managed;
pub mod pcp;

use std::time::Duration;

use pgw_core::pgpool::{pool_primary, PcpAction, Target};
use tokio::time::Instant;

use crate::member::{PoolReport, Shared};
use pcp::{Credentials, NodeInfo, PcpClient};

/// Errors setting up pgpool handling.
#[derive(Debug, thiserror::Error)]
pub enum PgpoolError {
    #[error("config field `{field}`: {message}")]
    Config { field: String, message: String },
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("cannot start pgpool: {message}")]
    Start { message: String },
}

/// Starts the supervisor of each local pgpool (if managed) and one reconciler per pgpool of
/// every cluster (each cluster has its own pgpool in each room).
pub fn spawn(s: &Shared) -> Result<(), PgpoolError> {
    let Some(pp) = s.cfg().pgpool.clone() else {
        return Ok(());
    };
    let password = managed::read_password(&pp.pcp_password_file)?;
    for cluster in s.cfg().managed_pgpools() {
        if let Some(m) = managed::ManagedPgpool::new(&s.cfg(), &cluster, &password)? {
            let live = s.clone();
            tokio::spawn(m.supervise(move || live.cfg()));
        }
    }
    let creds = Credentials {
        user: pp.pcp_user.clone(),
        password,
    };
    for cluster in s.cfg().pooled_clusters() {
        tokio::spawn(narrow_loop(s.clone(), cluster, creds.clone()));
    }
    tokio::spawn(reconcilers(s.clone(), creds));
    Ok(())
}

/// Carries out [`pgw_core::pgpool::narrow_locally`] on this member's own pgpool of `cluster`
/// while its primary runs narrowed on its own (degraded with fewer than three voters: the
/// other room is lost and with it any leader); otherwise idle.
async fn narrow_loop(s: Shared, cluster: String, creds: Credentials) {
    let every = Duration::from_millis(s.cfg().failover.report_interval_ms);
    let mut last: Option<(PcpAction, Instant)> = None;
    loop {
        tokio::time::sleep(every).await;
        if s.raft.metrics().borrow().state == openraft::ServerState::Shutdown {
            return;
        }
        let narrowed = s
            .local
            .read()
            .ok()
            .and_then(|l| l.get(&cluster).map(|v| v.narrowed_locally))
            .unwrap_or(false);
        if !narrowed {
            last = None;
            continue;
        }
        let cfg = s.cfg();
        let Some(pcp) = cfg
            .servers(&cluster)
            .into_iter()
            .find(|x| x.member == cfg.member)
            .and_then(|x| x.pcp)
        else {
            continue;
        };
        let backends = cfg.pgpool_backends(&cluster);
        let Some(own) = backends.iter().position(|b| b.0 == cfg.member) else {
            continue;
        };
        let timeout = Duration::from_millis(cfg.raft.rpc_timeout_ms);
        let Ok(nodes) = run_pcp(&pcp, &creds, timeout, None).await else {
            continue;
        };
        if check_backends(&nodes, &backends).is_err() {
            continue;
        }
        let view: Vec<_> = nodes.iter().map(NodeInfo::pool_node).collect();
        let mut answers = Vec::with_capacity(backends.len());
        for (i, (_, addr)) in backends.iter().enumerate() {
            let probe = i != own && view.get(i).is_some_and(|n| n.status.attached());
            answers.push(!probe || answers_tcp(addr, PROBE_TIMEOUT).await);
        }
        let Some(a) = pgw_core::pgpool::narrow_locally(own, &view, &answers) else {
            continue;
        };
        if last.is_some_and(|(la, at)| la == a && at.elapsed() < Duration::from_secs(2)) {
            continue;
        }
        let text = action_text(a, &backends);
        match run_pcp(&pcp, &creds, timeout, Some(a)).await {
            Ok(_) => {
                tracing::warn!(
                    %cluster,
                    "pgpool: {text}: it does not answer and our primary runs degraded with no group to decide (the leader attaches it again once it serves)"
                );
                let (kind, _) = wire_command(Some(a));
                metrics::counter!(crate::telemetry::PGPOOL_COMMANDS, "room" => cfg.member.clone(), "cluster" => cluster.clone(), "command" => kind).increment(1);
            }
            Err(e) => tracing::warn!(%cluster, "pgpool: {text} failed: {e}"),
        }
        last = Some((a, Instant::now()));
    }
}

/// The longest the leader's pgpool reconciler waits before recomputing its target.
const RECOMPUTE_MS: u64 = 20;

/// How long a backend has to accept a TCP connection in [`narrow_loop`].
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// Whether `addr` (`host:port`) accepts a TCP connection within `limit`.
async fn answers_tcp(addr: &str, limit: Duration) -> bool {
    let Some(a) = crate::sidecar::pgctl::PgAddr::parse(addr) else {
        return true; // not ours to judge: never detach on an address we cannot read
    };
    matches!(
        tokio::time::timeout(
            limit,
            tokio::net::TcpStream::connect((a.host.as_str(), a.port))
        )
        .await,
        Ok(Ok(_))
    )
}

/// One reconciler per pgpool of every pooled cluster's servers, following the member list:
/// a room that joins gets one, a room that leaves loses its own (it ends itself).
async fn reconcilers(s: Shared, creds: Credentials) {
    type Key = (String, String, String, String);
    let mut running: std::collections::BTreeMap<Key, tokio::task::JoinHandle<()>> =
        Default::default();
    loop {
        if s.raft.metrics().borrow().state == openraft::ServerState::Shutdown {
            return;
        }
        running.retain(|_, h| !h.is_finished());
        let cfg = s.cfg();
        for cluster in cfg.pooled_clusters() {
            for x in cfg.servers(&cluster) {
                let (Some(addr), Some(pcp)) = (x.pgpool.clone(), x.pcp.clone()) else {
                    continue;
                };
                let key = (cluster.clone(), x.member.clone(), addr.clone(), pcp.clone());
                if running.contains_key(&key) {
                    continue;
                }
                let h = tokio::spawn(reconcile(
                    s.clone(),
                    cluster.clone(),
                    x.member.clone(),
                    addr,
                    pcp,
                    creds.clone(),
                ));
                running.insert(key, h);
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Whether `room` still serves `cluster` behind the pgpool at `pcp` (the member list changes).
fn still_pooled(s: &Shared, cluster: &str, room: &str, pcp: &str) -> bool {
    s.cfg()
        .servers(cluster)
        .iter()
        .any(|x| x.member == room && x.pcp.as_deref() == Some(pcp))
}

fn action_text(a: PcpAction, backends: &[(String, String)]) -> String {
    let name = |i: usize| backends.get(i).map(|b| b.0.as_str()).unwrap_or("?");
    match a {
        PcpAction::Detach(i) => format!("detach node {i} ({})", name(i)),
        PcpAction::Attach(i) => format!("attach node {i} ({})", name(i)),
        PcpAction::Promote(i) => format!("promote node {i} ({})", name(i)),
    }
}

/// Checks that pgpool's backends are the members' postgres servers, in member order.
fn check_backends(nodes: &[NodeInfo], backends: &[(String, String)]) -> Result<(), String> {
    if nodes.len() != backends.len() {
        return Err(format!(
            "pgpool has {} backends, the group has {} data members with postgres",
            nodes.len(),
            backends.len()
        ));
    }
    for (i, (n, (member, addr))) in nodes.iter().zip(backends).enumerate() {
        let want = crate::sidecar::pgctl::PgAddr::parse(addr);
        let ok = want.is_some_and(|w| w.host == n.host && w.port == n.port);
        if !ok {
            return Err(format!(
                "pgpool backend {i} is {}:{}, but member {member}'s postgres is {addr}",
                n.host, n.port
            ));
        }
    }
    Ok(())
}

/// Converts between PCP node lists and their wire form (`PcpNode`).
fn to_wire(n: &NodeInfo) -> pgw_proto::PcpNode {
    pgw_proto::PcpNode {
        host: n.host.clone(),
        port: u32::from(n.port),
        status: n.status.code(),
        primary: n.primary,
        pg_role: n.pg_role.clone(),
    }
}

fn from_wire(n: &pgw_proto::PcpNode) -> Result<NodeInfo, String> {
    Ok(NodeInfo {
        host: n.host.clone(),
        port: u16::try_from(n.port).map_err(|_| format!("bad port {} in a PCP reply", n.port))?,
        status: pgw_core::pgpool::PoolStatus::from_code(i64::from(n.status)),
        primary: n.primary,
        pg_role: n.pg_role.clone(),
    })
}

/// Runs one PCP request from the leader against this member's own pgpool, over a fresh local
/// connection. A command is refused unless `epoch` is the cluster's current epoch here.
pub async fn local_pcp(
    s: &Shared,
    req: &pgw_proto::PcpRequest,
) -> Result<Vec<pgw_proto::PcpNode>, tonic::Status> {
    use tonic::Status;
    let cfg_now = s.cfg();
    let pp = cfg_now
        .pgpool
        .as_ref()
        .ok_or_else(|| Status::failed_precondition("this member has no [pgpool] section"))?;
    let pcp_addr = s
        .cfg()
        .servers(&req.cluster)
        .into_iter()
        .find(|x| x.member == s.cfg().member)
        .and_then(|x| x.pcp)
        .ok_or_else(|| {
            Status::failed_precondition(format!(
                "this member runs no pgpool of cluster `{}` (no pcp address)",
                req.cluster
            ))
        })?;
    let backends = s.cfg().pgpool_backends(&req.cluster);
    let node = req.node as usize;
    let action = match req.command.as_str() {
        "info" => None,
        "attach" => Some(PcpAction::Attach(node)),
        "detach" => Some(PcpAction::Detach(node)),
        "promote" => Some(PcpAction::Promote(node)),
        other => {
            return Err(Status::invalid_argument(format!(
                "unknown PCP command `{other}` (info, attach, detach, promote)"
            )))
        }
    };
    if action.is_some() {
        // Commands only from the member this one knows as the Raft leader (which confirmed
        // its leadership with a quorum before sending).
        let leader = s.raft.metrics().borrow().current_leader;
        let from = req.identity.as_ref().map(|i| i.from);
        if leader.is_none() || from != leader {
            return Err(Status::failed_precondition(format!(
                "PCP commands are taken from the Raft leader only (sender {}, leader {})",
                from.unwrap_or_default(),
                leader
                    .map(|l| l.to_string())
                    .unwrap_or_else(|| "unknown".into())
            )));
        }
        if node >= backends.len() {
            return Err(Status::invalid_argument(format!(
                "node {node}: pgpool has {} backends",
                backends.len()
            )));
        }
        let cur =
            s.sm.applied()
                .facts
                .cluster(&req.cluster)
                .map(|f| f.epoch)
                .ok_or_else(|| {
                    Status::failed_precondition(format!("unknown cluster `{}`", req.cluster))
                })?;
        if cur != req.epoch {
            return Err(Status::failed_precondition(format!(
                "stale request: decided at epoch {}, this member is at epoch {cur}",
                req.epoch
            )));
        }
    }
    let password = managed::read_password(&pp.pcp_password_file)
        .map_err(|e| Status::failed_precondition(e.to_string()))?;
    let creds = Credentials {
        user: pp.pcp_user.clone(),
        password,
    };
    let timeout = Duration::from_millis(s.cfg().raft.rpc_timeout_ms);
    // ABORTED: the watcher answered, its pgpool did not (the leader must not fall back).
    run_pcp(&pcp_addr, &creds, timeout, action)
        .await
        .map(|n| n.iter().map(to_wire).collect())
        .map_err(|e| Status::aborted(e.to_string()))
}

/// Which member this member's own pgpool of `cluster` sends writes to (`Ok(None)`: none
/// attached as primary), read over a fresh local PCP connection; `Err` when this member runs no
/// pgpool of that cluster or it does not answer.
pub async fn local_pool_primary(s: &Shared, cluster: &str) -> Result<Option<String>, String> {
    let cfg_now = s.cfg();
    let pp = cfg_now.pgpool.as_ref().ok_or("no [pgpool] section")?;
    let pcp_addr = s
        .cfg()
        .servers(cluster)
        .into_iter()
        .find(|x| x.member == s.cfg().member)
        .and_then(|x| x.pcp)
        .ok_or_else(|| format!("no pgpool of cluster `{cluster}` on this member"))?;
    let password = managed::read_password(&pp.pcp_password_file).map_err(|e| e.to_string())?;
    let creds = Credentials {
        user: pp.pcp_user.clone(),
        password,
    };
    let timeout = Duration::from_millis(s.cfg().raft.rpc_timeout_ms);
    let nodes = run_pcp(&pcp_addr, &creds, timeout, None)
        .await
        .map_err(|e| e.to_string())?;
    let view: Vec<_> = nodes.iter().map(NodeInfo::pool_node).collect();
    let names = s.cfg().pgpool_backends(cluster);
    Ok(pool_primary(&view).and_then(|i| names.get(i).map(|b| b.0.clone())))
}

/// One PCP request over a fresh connection (pgpool restarts its PCP process after every
/// failover or failback, and a worker forked by the old one can no longer signal pgpool's main
/// process: its requests are accepted and silently lost). `None` reads the node list; a command
/// answers with an empty one.
async fn run_pcp(
    addr: &str,
    creds: &Credentials,
    timeout: Duration,
    action: Option<PcpAction>,
) -> Result<Vec<NodeInfo>, pcp::PcpError> {
    let mut c = PcpClient::connect(addr, creds, timeout).await?;
    match action {
        None => c.node_info().await,
        Some(PcpAction::Detach(i)) => c.detach(i).await.map(|()| Vec::new()),
        Some(PcpAction::Attach(i)) => c.attach(i).await.map(|()| Vec::new()),
        Some(PcpAction::Promote(i)) => c.promote(i).await.map(|()| Vec::new()),
    }
}

/// The `Pcp` RPC's name and node for a request.
fn wire_command(action: Option<PcpAction>) -> (&'static str, usize) {
    match action {
        None => ("info", 0),
        Some(PcpAction::Attach(i)) => ("attach", i),
        Some(PcpAction::Detach(i)) => ("detach", i),
        Some(PcpAction::Promote(i)) => ("promote", i),
    }
}

/// How the leader reaches one room's pgpool: through that room's watcher (so the PCP session is
/// local to the room), straight to PCP when the leader is that watcher, or when that watcher
/// does not answer at all (its pgpool may still: a watcher crash, not a room loss).
struct PoolLink {
    s: Shared,
    cluster: String,
    room: String,
    room_grpc: String,
    pcp_addr: String,
    creds: Credentials,
    timeout: Duration,
    /// Calls in a row the room's watcher did not answer (direct PCP only after a few).
    silent: u32,
}

/// Why a PCP request through a room's watcher did not go through.
enum LinkError {
    /// The watcher refused it (another epoch, not our leader yet): retry at once next round.
    Refused(String),
    /// pgpool (or the network to it) failed.
    Failed(String),
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::Refused(m) => write!(f, "refused by the room's watcher: {m}"),
            LinkError::Failed(m) => f.write_str(m),
        }
    }
}

/// Consecutive unanswered calls after which the leader talks to a room's PCP itself.
const SILENT_BEFORE_DIRECT: u32 = 3;

impl PoolLink {
    async fn call(
        &mut self,
        action: Option<PcpAction>,
        epoch: u64,
    ) -> Result<Vec<NodeInfo>, LinkError> {
        if self.room != self.s.cfg().member {
            let (command, node) = wire_command(action);
            let req = pgw_proto::PcpRequest {
                identity: Some(self.s.identity()),
                cluster: self.cluster.clone(),
                epoch,
                command: command.to_string(),
                node: node as u32,
            };
            // The watcher's own PCP connect and request take up to 2 x timeout.
            let budget = self.timeout * 3;
            let answered = match (self.s.channels)(&self.room_grpc) {
                Ok(ch) => {
                    let mut c = pgw_proto::admin_client::AdminClient::new(ch);
                    let mut r = tonic::Request::new(req);
                    r.set_timeout(budget);
                    match tokio::time::timeout(budget, c.pcp(r)).await {
                        Ok(Ok(rep)) => Some(Ok(rep.into_inner().nodes)),
                        Ok(Err(st)) if st.code() == tonic::Code::Unavailable => None,
                        Ok(Err(st)) if st.code() == tonic::Code::Aborted => {
                            Some(Err(LinkError::Failed(st.message().to_string())))
                        }
                        Ok(Err(st)) => Some(Err(LinkError::Refused(st.message().to_string()))),
                        Err(_) => None,
                    }
                }
                Err(_) => None,
            };
            match answered {
                Some(r) => {
                    self.silent = 0;
                    return r?
                        .iter()
                        .map(|n| from_wire(n).map_err(LinkError::Failed))
                        .collect();
                }
                None => {
                    self.silent += 1;
                    if self.silent < SILENT_BEFORE_DIRECT {
                        return Err(LinkError::Failed(format!(
                            "{}'s watcher did not answer",
                            self.room
                        )));
                    }
                }
            }
        }
        run_pcp(&self.pcp_addr, &self.creds, self.timeout, action)
            .await
            .map_err(|e| LinkError::Failed(e.to_string()))
    }
}

/// How long after a change of the primary record an old primary is left to the promote (it is
/// fenced by the protocol meanwhile; see `Target::transition`). A promotion takes a few hundred
/// ms; after this, a pgpool still writing to the old primary has it detached.
const TRANSITION_HOLD: Duration = Duration::from_millis(2000);

async fn reconcile(
    s: Shared,
    cluster: String,
    room: String,
    address: String,
    pcp_addr: String,
    creds: Credentials,
) {
    let mut link = PoolLink {
        s: s.clone(),
        cluster: cluster.clone(),
        room: room.clone(),
        room_grpc: s
            .cfg()
            .members
            .iter()
            .find(|m| m.name == room)
            .map(|m| m.grpc.clone())
            .unwrap_or_default(),
        pcp_addr,
        creds,
        timeout: Duration::from_millis(s.cfg().raft.rpc_timeout_ms),
        silent: 0,
    };
    let mut backends = s.cfg().pgpool_backends(&cluster);
    let mut names: Vec<String> = backends.iter().map(|b| b.0.clone()).collect();
    let me = s.cfg().me().map(|m| m.id);
    let fo = s.cfg().failover.clone();
    let fresh_ms = pgw_core::arbiter::fresh_ms(fo.report_interval_ms);
    // How often the target is recomputed (cheap: no PCP unless it moved or is due): a new
    // primary's report is acted on within this, not a report interval later.
    let fast = Duration::from_millis(fo.report_interval_ms.min(RECOMPUTE_MS));
    let poll = Duration::from_millis(fo.report_interval_ms);
    let slow = Duration::from_millis(
        s.cfg()
            .pgpool
            .as_ref()
            .map(|p| p.check_interval_ms)
            .unwrap_or(pgw_core::config::defaults::PGPOOL_CHECK_INTERVAL_MS),
    );
    let timeout = Duration::from_millis(s.cfg().raft.rpc_timeout_ms);
    let label = [("room", room.clone()), ("cluster", cluster.clone())];
    let mut last_target: Option<Target> = None;
    let mut last_check = Instant::now() - slow;
    let mut last_action: Option<(PcpAction, Instant)> = None;
    let mut report = PoolReport {
        cluster: cluster.clone(),
        room: room.clone(),
        address: address.clone(),
        ..Default::default()
    };
    let mut last_error = String::new();
    // When the primary record last changed (a failover or switchover under way).
    let mut epoch_at: Option<(u64, Instant)> = None;
    let pcp_of_room = link.pcp_addr.clone();
    loop {
        tokio::time::sleep(fast).await;
        let m = s.raft.metrics().borrow().clone();
        if m.state == openraft::ServerState::Shutdown {
            return;
        }
        if !still_pooled(&s, &cluster, &room, &pcp_of_room) {
            s.pgpool.clear(&cluster, &room);
            return;
        }
        // The group's backend list only ever grows (`Roster::pools`).
        let now_backends = s.cfg().pgpool_backends(&cluster);
        if now_backends != backends {
            backends = now_backends;
            names = backends.iter().map(|b| b.0.clone()).collect();
        }
        let leading = crate::member::leads(&m, me) && !s.handing_over();
        if !leading {
            if last_target.is_some() {
                s.pgpool.clear(&cluster, &room);
                last_target = None;
            }
            epoch_at = None;
            continue;
        }
        let facts = s.sm.applied().facts;
        let Some(f) = facts.cluster(&cluster) else {
            continue;
        };
        let reports = s.leader.reports(&cluster);
        let now = s.leader.now_ms();
        // Leadership not noticed by the decision loop yet: everyone counts as just heard of.
        let since = s.leader.leader_since().unwrap_or(now);
        let mut target = Target::compute(&names, f, &reports, now, fresh_ms, since);
        match epoch_at {
            Some((e, _)) if e == f.epoch => {}
            // First sight as leader while the cluster has no primary (a forced recovery, or an
            // election in the middle of a failover): a transition, so that pgpool is pointed at
            // the new primary in one step once it serves (a pgpool left without a primary
            // searches for one, and a backend that does not answer at all can hold that search).
            None if f.primary.is_none() => epoch_at = Some((f.epoch, Instant::now())),
            // First sight as leader otherwise: not a transition.
            None => epoch_at = Some((f.epoch, Instant::now() - TRANSITION_HOLD)),
            Some(_) => epoch_at = Some((f.epoch, Instant::now())),
        }
        target.transition = epoch_at.is_some_and(|(_, t)| t.elapsed() < TRANSITION_HOLD);
        // Talk to pgpool at once when the target moved; while it disagrees, once per report
        // interval (every PCP connection forks a pgpool worker); otherwise every check interval.
        let due = last_target.as_ref() != Some(&target)
            || (!report.agrees && last_check.elapsed() >= poll)
            || last_check.elapsed() >= slow;
        if !due {
            continue;
        }
        last_check = Instant::now();
        last_target = Some(target.clone());
        // One request per round, each over a fresh PCP connection (see `run_pcp`).
        let nodes = match link.call(None, f.epoch).await {
            Ok(n) => n,
            Err(e) => {
                unreachable(&s, &mut report, &label, e.to_string(), &mut last_error);
                continue;
            }
        };
        report.reachable = true;
        metrics::gauge!(crate::telemetry::PGPOOL_REACHABLE, &label).set(1.0);
        let view: Vec<_> = nodes.iter().map(NodeInfo::pool_node).collect();
        report.primary = pool_primary(&view).and_then(|i| names.get(i).cloned());
        report.nodes = names.iter().cloned().zip(nodes.iter().cloned()).collect();
        if let Err(why) = check_backends(&nodes, &backends) {
            // A pgpool configured for other servers is never touched.
            report.error = why.clone();
            set_agrees(&mut report, false, &label);
            s.pgpool.put(report.clone());
            if last_error != why {
                tracing::error!(%room, %cluster, "pgpool not repointed: {why}");
                last_error = why;
            }
            continue;
        }
        let action = target.next_action(&view);
        report.error.clear();
        last_error.clear();
        set_agrees(&mut report, action.is_none(), &label);
        s.pgpool.put(report.clone());
        let Some(a) = action else {
            last_action = None;
            continue;
        };
        // pgpool carries requests out asynchronously: give one time before repeating it.
        if last_action.is_some_and(|(la, at)| la == a && at.elapsed() < Duration::from_secs(2)) {
            continue;
        }
        // Only a leader confirmed by a quorum may repoint (no writes from a minority side).
        match tokio::time::timeout(timeout, s.raft.ensure_linearizable()).await {
            Ok(Ok(_)) => {}
            _ => continue,
        }
        let epoch_now =
            s.sm.applied()
                .facts
                .cluster(&cluster)
                .map(|x| x.epoch)
                .unwrap_or(0);
        if epoch_now != f.epoch {
            continue; // decided again meanwhile: recompute
        }
        let text = action_text(a, &backends);
        let (kind, _) = wire_command(Some(a));
        let r = link.call(Some(a), f.epoch).await;
        match r {
            Ok(_) => {
                tracing::info!(%room, epoch = f.epoch, "pgpool: {text}");
                metrics::counter!(crate::telemetry::PGPOOL_COMMANDS, "room" => room.clone(), "cluster" => cluster.clone(), "command" => kind).increment(1);
                report.last_command = text;
                s.pgpool.put(report.clone());
            }
            Err(LinkError::Refused(e)) => {
                // Not carried out (the room's watcher lags or knows another leader): retry
                // next round rather than waiting as for a command pgpool is working on.
                tracing::info!(%room, "pgpool: {text} not sent: {e}");
                continue;
            }
            Err(e) => tracing::warn!(%room, "pgpool: {text} failed: {e}"),
        }
        last_action = Some((a, Instant::now()));
    }
}

fn set_agrees(report: &mut PoolReport, agrees: bool, label: &[(&'static str, String); 2]) {
    report.agrees = agrees;
    if agrees {
        report.disagreeing_since = None;
    } else if report.disagreeing_since.is_none() {
        report.disagreeing_since = Some(Instant::now());
    }
    metrics::gauge!(crate::telemetry::PGPOOL_AGREES, label).set(if agrees { 1.0 } else { 0.0 });
}

fn unreachable(
    s: &Shared,
    report: &mut PoolReport,
    label: &[(&'static str, String); 2],
    why: String,
    last_error: &mut String,
) {
    if *last_error != why {
        tracing::warn!(room = %report.room, "pgpool unreachable: {why}");
        *last_error = why.clone();
    }
    report.reachable = false;
    report.error = why;
    report.primary = None;
    report.nodes.clear();
    set_agrees(report, false, label);
    metrics::gauge!(crate::telemetry::PGPOOL_REACHABLE, label).set(0.0);
    s.pgpool.put(report.clone());
}
