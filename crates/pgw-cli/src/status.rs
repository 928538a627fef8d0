//! Gathers the group's status from its members (`pgwctl status`).

use std::time::Duration;

use pgw_proto::{StatusReply, StatusRequest};
use serde::Serialize;

use crate::CliError;

/// `pgwctl status --format json`. Field names are a public contract: add, don't rename.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GroupStatus {
    pub cluster_id: String,
    /// Name of the member that currently leads, if any.
    pub leader: Option<String>,
    pub term: u64,
    pub members: Vec<MemberStatus>,
    pub clusters: Vec<ClusterView>,
    /// The cluster whose primary's room is the group's active room.
    pub active_cluster: Option<String>,
    /// The room of that cluster's primary (`None` while it has none).
    pub active_room: Option<String>,
    /// Raft's membership is changing (a joint configuration is being committed).
    pub membership_changing: bool,
    /// Version of the group's member list (0: the founding list of the config files).
    pub roster_version: u64,
    /// Group generation (grows with every `pg-watcher --force-new-group`).
    pub generation: u64,
    /// Why the group cannot fail over on its own in this layout, if it cannot.
    pub automatic_failover_off: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MemberStatus {
    pub name: String,
    /// The machine room it stands in.
    pub room: String,
    /// `data` or `arbiter`.
    pub role: String,
    /// leader | follower | candidate | learner | unreachable
    pub raft: String,
    pub grpc: String,
    pub http: String,
    pub term: Option<u64>,
    pub last_applied: Option<u64>,
    pub error: Option<String>,
    /// voter | non_voter | joining (listed, not yet in Raft) | leaving (in Raft, no longer
    /// listed), as the leader sees it.
    pub standing: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NodeView {
    pub member: String,
    pub role: String,
    pub lsn: String,
    /// Bytes of WAL behind the primary.
    pub lag_bytes: u64,
    pub timeline: u32,
    /// Why this node's PostgreSQL refuses its watcher (running, state unknown), if it does.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PgpoolView {
    pub room: String,
    /// The member this pgpool sends writes to (`None`: none, or unreachable).
    pub primary: Option<String>,
    /// host:port applications of the room connect to.
    pub address: String,
    /// The leader could read it through PCP at its last check.
    pub reachable: bool,
    /// It routes exactly as the group decided.
    pub agrees: bool,
    /// Why it is unreachable or not repointed.
    pub error: Option<String>,
    /// How long it has disagreed with the group.
    pub disagreeing_ms: u64,
    pub nodes: Vec<PgpoolNodeView>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PgpoolNodeView {
    pub member: String,
    /// up | waiting | down (pgpool's backend status)
    pub status: String,
    /// primary | standby (where pgpool routes writes)
    pub role: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ClusterView {
    pub name: String,
    pub primary: Option<String>,
    /// The room of the primary.
    pub primary_room: Option<String>,
    pub epoch: u64,
    pub paused: bool,
    pub sync_standbys: Vec<String>,
    pub sync_quorum: u32,
    pub nodes: Vec<NodeView>,
    pub pgpool: Vec<PgpoolView>,
    /// Commits do not wait for a synchronous standby (allow_degraded): RPO > 0 meanwhile.
    pub degraded: bool,
    /// What automation is waiting for, if anything.
    pub waiting_for: Option<String>,
    /// Set while the cluster is a standby of another group's cluster.
    pub standby: Option<StandbyView>,
}

/// A standby cluster of another group (figures from the leader).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StandbyView {
    /// Its name in the main group, and the main group's members.
    pub main_cluster: String,
    pub endpoints: Vec<String>,
    /// The main group's primary it follows (member, address, epoch).
    pub upstream: Option<String>,
    pub upstream_address: Option<String>,
    pub upstream_epoch: u64,
    /// The leader's last poll of the main group answered.
    pub main_reachable: bool,
    /// WAL bytes between the main group's primary and what the standby leader replayed.
    pub lag_bytes: u64,
    /// How far replay trails the main group's commits, in ms (`None`: unknown).
    pub lag_ms: Option<u64>,
    pub main_lsn: Option<String>,
    pub replayed_lsn: Option<String>,
}

/// Connects to one member with the default credentials (see [`crate::client`]).
pub async fn connect(addr: &str, timeout: Duration) -> Result<crate::client::Admin, CliError> {
    crate::client::connect(addr, timeout).await
}

/// Asks one member for its own view.
pub async fn member_status(addr: &str, timeout: Duration) -> Result<StatusReply, CliError> {
    let mut c = connect(addr, timeout).await?;
    let fut = c.status(StatusRequest {});
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(CliError::Unreachable {
            endpoint: addr.to_string(),
            message: s.message().to_string(),
        }),
        Err(_) => Err(CliError::Unreachable {
            endpoint: addr.to_string(),
            message: format!("no answer within {} ms", timeout.as_millis()),
        }),
    }
}

/// Asks the first answering endpoint for the member list, then every member for its own state.
pub async fn gather(endpoints: &[String], timeout: Duration) -> Result<GroupStatus, CliError> {
    let mut first = None;
    let mut errors = Vec::new();
    for e in endpoints {
        match member_status(e, timeout).await {
            Ok(r) => {
                first = Some(r);
                break;
            }
            Err(err) => errors.push(err.to_string()),
        }
    }
    let Some(first) = first else {
        return Err(CliError::NoEndpoint(errors.join("; ")));
    };
    let calls = first.members.iter().map(|m| {
        let addr = m.grpc.clone();
        async move {
            if addr.is_empty() {
                return Err(CliError::Refused(
                    "no longer in the group's member list".into(),
                ));
            }
            member_status(&addr, timeout).await
        }
    });
    let replies: Vec<Result<StatusReply, CliError>> = futures_join_all(calls).await;
    let mut members = Vec::new();
    let mut leader: Option<(u64, String)> = None;
    let mut best: Option<StatusReply> = None;
    for (m, r) in first.members.iter().zip(replies) {
        match r {
            Ok(s) => {
                if s.raft_state == "leader" && leader.as_ref().is_none_or(|(t, _)| s.term > *t) {
                    leader = Some((s.term, s.member.clone()));
                    best = Some(s.clone());
                }
                members.push(MemberStatus {
                    name: m.name.clone(),
                    room: room_of(m),
                    role: m.role.clone(),
                    raft: s.raft_state.clone(),
                    grpc: m.grpc.clone(),
                    http: m.http.clone(),
                    term: Some(s.term),
                    last_applied: Some(s.last_applied),
                    error: None,
                    standing: m.standing.clone(),
                });
            }
            Err(e) => members.push(MemberStatus {
                name: m.name.clone(),
                room: room_of(m),
                role: m.role.clone(),
                raft: "unreachable".into(),
                grpc: m.grpc.clone(),
                http: m.http.clone(),
                term: None,
                last_applied: None,
                error: Some(e.to_string()),
                standing: m.standing.clone(),
            }),
        }
    }
    let view = best.unwrap_or(first);
    // Standing as the leader sees it.
    for m in members.iter_mut() {
        if let Some(v) = view.members.iter().find(|v| v.name == m.name) {
            m.standing = v.standing.clone();
        }
    }
    let clusters: Vec<ClusterView> = view
        .clusters
        .iter()
        .map(|c| ClusterView {
            name: c.name.clone(),
            primary: (!c.primary.is_empty()).then(|| c.primary.clone()),
            primary_room: view
                .members
                .iter()
                .find(|m| m.name == c.primary)
                .map(room_of),
            epoch: c.epoch,
            paused: c.paused,
            sync_standbys: c.sync_standbys.clone(),
            sync_quorum: c.sync_quorum,
            nodes: c
                .nodes
                .iter()
                .map(|n| NodeView {
                    member: n.member.clone(),
                    role: n.role.clone(),
                    lsn: n.lsn.clone(),
                    lag_bytes: n.lag_bytes,
                    timeline: n.timeline,
                    error: (!n.error.is_empty()).then(|| n.error.clone()),
                })
                .collect(),
            pgpool: c
                .pgpool
                .iter()
                .map(|p| PgpoolView {
                    room: p.room.clone(),
                    primary: (!p.primary.is_empty()).then(|| p.primary.clone()),
                    address: p.address.clone(),
                    reachable: p.reachable,
                    agrees: p.agrees,
                    error: (!p.error.is_empty()).then(|| p.error.clone()),
                    disagreeing_ms: p.disagreeing_ms,
                    nodes: p
                        .nodes
                        .iter()
                        .map(|n| PgpoolNodeView {
                            member: n.member.clone(),
                            status: n.status.clone(),
                            role: n.role.clone(),
                        })
                        .collect(),
                })
                .collect(),
            degraded: c.degraded,
            waiting_for: (!c.waiting_for.is_empty()).then(|| c.waiting_for.clone()),
            standby: c.standby.as_ref().map(|sb| {
                let opt = |x: &String| (!x.is_empty()).then(|| x.clone());
                StandbyView {
                    main_cluster: sb.main_cluster.clone(),
                    endpoints: sb.endpoints.clone(),
                    upstream: opt(&sb.upstream),
                    upstream_address: opt(&sb.upstream_address),
                    upstream_epoch: sb.upstream_epoch,
                    main_reachable: sb.main_reachable,
                    lag_bytes: sb.lag_bytes,
                    lag_ms: (sb.lag_ms >= 0).then_some(sb.lag_ms as u64),
                    main_lsn: opt(&sb.main_lsn),
                    replayed_lsn: opt(&sb.replayed_lsn),
                }
            }),
        })
        .collect();
    let active_cluster = (!view.active_cluster.is_empty()).then(|| view.active_cluster.clone());
    let active_room = clusters
        .iter()
        .find(|c| Some(&c.name) == active_cluster.as_ref())
        .and_then(|c| c.primary_room.clone());
    Ok(GroupStatus {
        cluster_id: view.cluster_id.clone(),
        leader: leader.as_ref().map(|(_, n)| n.clone()),
        term: leader.map(|(t, _)| t).unwrap_or(view.term),
        members,
        clusters,
        active_cluster,
        active_room,
        membership_changing: view.membership_changing,
        roster_version: view.roster_version,
        generation: view.generation,
        automatic_failover_off: (!view.automatic_failover_off.is_empty())
            .then(|| view.automatic_failover_off.clone()),
    })
}

/// A member's room (older members send none: its name).
fn room_of(m: &pgw_proto::MemberInfo) -> String {
    if m.room.is_empty() {
        m.name.clone()
    } else {
        m.room.clone()
    }
}

/// Runs futures concurrently and collects their results in order (no extra dependency).
async fn futures_join_all<F: std::future::Future + Send + 'static>(
    futs: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        match h.await {
            Ok(v) => out.push(v),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    out
}

/// The table for people.
pub fn render_table(s: &GroupStatus) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "cluster id: {}    leader: {}    term: {}    active room: {}{}\n\n",
        s.cluster_id,
        s.leader.as_deref().unwrap_or("(none)"),
        s.term,
        s.active_room.as_deref().unwrap_or("(none)"),
        s.active_cluster
            .as_ref()
            .map(|c| format!(" (where {c}'s primary is)"))
            .unwrap_or_default()
    ));
    if let Some(why) = &s.automatic_failover_off {
        out.push_str(&format!("AUTOMATIC FAILOVER OFF: {why}\n"));
    }
    if s.membership_changing {
        out.push_str("membership change in flight (joint configuration being committed)\n");
    }
    out.push_str(&format!(
        "{:<14} {:<8} {:<10} {:<12} {:<22} {:>8} {:>12}\n",
        "MEMBER", "ROLE", "VOTE", "RAFT", "GRPC", "TERM", "APPLIED"
    ));
    for m in &s.members {
        out.push_str(&format!(
            "{:<14} {:<8} {:<10} {:<12} {:<22} {:>8} {:>12}\n",
            m.name,
            m.role,
            if m.standing.is_empty() {
                "-"
            } else {
                m.standing.as_str()
            },
            m.raft,
            m.grpc,
            m.term.map(|t| t.to_string()).unwrap_or_else(|| "-".into()),
            m.last_applied
                .map(|t| t.to_string())
                .unwrap_or_else(|| "-".into()),
        ));
    }
    out.push('\n');
    out.push_str(&format!(
        "{:<12} {:<14} {:>6} {:<7} {}\n",
        "PG CLUSTER", "PRIMARY", "EPOCH", "PAUSED", "SYNC"
    ));
    for c in &s.clusters {
        out.push_str(&format!(
            "{:<12} {:<14} {:>6} {:<7} ANY {} ({})\n",
            c.name,
            c.primary.as_deref().unwrap_or("(none)"),
            c.epoch,
            if c.paused { "yes" } else { "no" },
            c.sync_quorum,
            c.sync_standbys.join(", ")
        ));
    }
    for c in &s.clusters {
        if c.degraded {
            out.push_str(&format!(
                "\n{}: DEGRADED - commits do not wait for a synchronous standby (RPO > 0)\n",
                c.name
            ));
        }
        if let Some(w) = &c.waiting_for {
            out.push_str(&format!("\n{}: waiting: {w}\n", c.name));
        }
        if let Some(sb) = &c.standby {
            out.push_str(&format!(
                "\n{}: STANDBY of cluster `{}` at {} (main group {}): following {} at {} (its epoch {}); lag {} bytes, {}\n",
                c.name,
                sb.main_cluster,
                sb.endpoints.join(","),
                if sb.main_reachable { "reachable" } else { "UNREACHABLE" },
                sb.upstream.as_deref().unwrap_or("(not found yet)"),
                sb.upstream_address.as_deref().unwrap_or("-"),
                sb.upstream_epoch,
                sb.lag_bytes,
                sb.lag_ms
                    .map(|m| format!("{:.1} s", m as f64 / 1000.0))
                    .unwrap_or_else(|| "? s".into()),
            ));
        }
    }
    for c in &s.clusters {
        if c.nodes.is_empty() {
            continue;
        }
        out.push_str(&format!(
            "\n{:<12} {:<14} {:<13} {:>4} {:>14} {:>12}\n",
            "PG CLUSTER", "NODE", "ROLE", "TLI", "LSN", "LAG (bytes)"
        ));
        for n in &c.nodes {
            out.push_str(&format!(
                "{:<12} {:<14} {:<13} {:>4} {:>14} {:>12}{}\n",
                c.name,
                n.member,
                n.role,
                n.timeline,
                n.lsn,
                n.lag_bytes,
                n.error
                    .as_deref()
                    .map(|e| format!("  refuses the watcher: {e}"))
                    .unwrap_or_default()
            ));
        }
    }
    for c in &s.clusters {
        if c.pgpool.is_empty() {
            continue;
        }
        out.push_str(&format!(
            "\n{:<12} {:<14} {:<22} {:<14} {:<7} {}\n",
            "PG CLUSTER", "PGPOOL (room)", "ADDRESS", "WRITES TO", "AGREES", "BACKENDS"
        ));
        for p in &c.pgpool {
            let backends = if p.reachable {
                p.nodes
                    .iter()
                    .map(|n| {
                        format!(
                            "{}={}{}",
                            n.member,
                            n.status,
                            if n.role == "primary" { "*" } else { "" }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            } else {
                format!("UNREACHABLE: {}", p.error.as_deref().unwrap_or(""))
            };
            let agrees = if p.agrees {
                "yes".to_string()
            } else {
                format!("NO {:.1}s", p.disagreeing_ms as f64 / 1000.0)
            };
            out.push_str(&format!(
                "{:<12} {:<14} {:<22} {:<14} {:<7} {}\n",
                c.name,
                p.room,
                p.address,
                p.primary.as_deref().unwrap_or("(none)"),
                agrees,
                backends
            ));
            if p.reachable {
                if let Some(e) = &p.error {
                    out.push_str(&format!("{:<27} not repointed: {e}\n", ""));
                }
            }
        }
    }
    out
}
