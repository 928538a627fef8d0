//! Every room's pgpool-II, kept in line with the group's decisions.
//!
//! The Raft leader (arbiter or not) reads each pgpool's node list through PCP and sends the
//! one command [`pgw_core::pgpool::Target::next_action`] asks for, after confirming with a
//! quorum that it still leads: a member on the minority side of a partition never rewrites a
//! pgpool. A pgpool that was unreachable during a change is corrected as soon as it answers
//! again; until then (and while it disagrees for any reason) status and metrics say so.

pub mod managed;
pub mod pcp;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgw_core::pgpool::{pool_primary, PcpAction, Target};
use tokio::time::Instant;

use crate::service::Shared;
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

/// What the leader last saw of one room's pgpool.
#[derive(Debug, Clone, Default)]
pub struct PoolReport {
    pub room: String,
    /// Client address (what applications connect to).
    pub address: String,
    pub reachable: bool,
    /// Why it is unreachable or cannot be repointed (no secrets in here).
    pub error: String,
    /// member -> (status, pgpool role) in backend order.
    pub nodes: Vec<(String, NodeInfo)>,
    /// The member pgpool sends writes to.
    pub primary: Option<String>,
    pub agrees: bool,
    /// Since when it has disagreed with the group (leader clock).
    pub disagreeing_since: Option<Instant>,
    /// The PCP command sent last, and when.
    pub last_command: String,
}

/// The leader's view of every pgpool, shared with the status service.
#[derive(Clone, Default)]
pub struct PoolViews(Arc<Mutex<BTreeMap<String, PoolReport>>>);

impl PoolViews {
    pub fn all(&self) -> Vec<PoolReport> {
        self.0
            .lock()
            .map(|g| g.values().cloned().collect())
            .unwrap_or_default()
    }

    fn put(&self, r: PoolReport) {
        if let Ok(mut g) = self.0.lock() {
            g.insert(r.room.clone(), r);
        }
    }

    fn clear(&self, room: &str) {
        if let Ok(mut g) = self.0.lock() {
            g.remove(room);
        }
    }
}

/// The cluster the rooms' pgpools serve.
pub fn pgpool_cluster(cfg: &pgw_core::Config) -> Option<String> {
    cfg.local_pg_cluster()
        .or_else(|| cfg.clusters.first().map(|c| c.name.clone()))
}

/// Starts the supervisor of the local pgpool (if managed) and one reconciler per room.
pub fn spawn(s: &Shared) -> Result<(), PgpoolError> {
    let Some(pp) = s.cfg.pgpool.clone() else {
        return Ok(());
    };
    let password = managed::read_password(&pp.pcp_password_file)?;
    if let Some(m) = managed::ManagedPgpool::new(&s.cfg, &password)? {
        tokio::spawn(m.supervise());
    }
    let creds = Credentials {
        user: pp.pcp_user.clone(),
        password,
    };
    for m in s.cfg.data_members() {
        if let (Some(addr), Some(pcp)) = (m.pgpool.clone(), m.pcp.clone()) {
            tokio::spawn(reconcile(
                s.clone(),
                m.name.clone(),
                addr,
                pcp,
                creds.clone(),
            ));
        }
    }
    Ok(())
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

/// How long after a change of the primary record an old primary is left to the promote (it is
/// fenced by the protocol meanwhile; see `Target::transition`). A promotion takes a few hundred
/// ms; after this, a pgpool still writing to the old primary has it detached.
const TRANSITION_HOLD: Duration = Duration::from_millis(2000);

async fn reconcile(s: Shared, room: String, address: String, pcp_addr: String, creds: Credentials) {
    let Some(cluster) = pgpool_cluster(&s.cfg) else {
        return;
    };
    let backends = s.cfg.pgpool_backends();
    let names: Vec<String> = backends.iter().map(|b| b.0.clone()).collect();
    let me = s.cfg.me().map(|m| m.id);
    let fo = s.cfg.failover.clone();
    let fresh_ms = (fo.report_interval_ms * 5).max(500);
    let fast = Duration::from_millis(fo.report_interval_ms);
    let slow = Duration::from_millis(
        s.cfg
            .pgpool
            .as_ref()
            .map(|p| p.check_interval_ms)
            .unwrap_or(pgw_core::config::defaults::PGPOOL_CHECK_INTERVAL_MS),
    );
    let timeout = Duration::from_millis(s.cfg.raft.rpc_timeout_ms);
    let label = [("room", room.clone())];
    let mut client: Option<PcpClient> = None;
    let mut last_target: Option<Target> = None;
    let mut last_check = Instant::now() - slow;
    let mut last_action: Option<(PcpAction, Instant)> = None;
    let mut report = PoolReport {
        room: room.clone(),
        address: address.clone(),
        ..Default::default()
    };
    let mut last_error = String::new();
    // When the primary record last changed (a failover or switchover under way).
    let mut epoch_at: Option<(u64, Instant)> = None;
    loop {
        tokio::time::sleep(fast).await;
        let m = s.raft.metrics().borrow().clone();
        if m.state == openraft::ServerState::Shutdown {
            return;
        }
        let leading =
            me.is_some() && m.current_leader == me && m.state == openraft::ServerState::Leader;
        if !leading {
            if client.take().is_some() || last_target.is_some() {
                s.pgpool.clear(&room);
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
            // First sight as leader: not a transition.
            None => epoch_at = Some((f.epoch, Instant::now() - TRANSITION_HOLD)),
            Some(_) => epoch_at = Some((f.epoch, Instant::now())),
        }
        target.transition = epoch_at.is_some_and(|(_, t)| t.elapsed() < TRANSITION_HOLD);
        // Talk to pgpool when the target moved, while it disagrees, or every check interval.
        let due =
            last_target.as_ref() != Some(&target) || !report.agrees || last_check.elapsed() >= slow;
        if !due {
            continue;
        }
        last_check = Instant::now();
        last_target = Some(target.clone());
        // A fresh PCP connection per round: pgpool restarts its PCP process after every
        // failover or failback, and a worker forked by the old one can no longer signal pgpool's
        // main process (its requests are accepted and silently lost).
        client = None;
        if client.is_none() {
            match PcpClient::connect(&pcp_addr, &creds, timeout).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    unreachable(&s, &mut report, &label, e.to_string(), &mut last_error);
                    continue;
                }
            }
        }
        let Some(c) = client.as_mut() else { continue };
        let nodes = match c.node_info().await {
            Ok(n) => n,
            Err(e) => {
                client = None;
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
                tracing::error!(%room, "pgpool not repointed: {why}");
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
        let r = match a {
            PcpAction::Detach(i) => c.detach(i).await,
            PcpAction::Attach(i) => c.attach(i).await,
            PcpAction::Promote(i) => c.promote(i).await,
        };
        let kind = match a {
            PcpAction::Detach(_) => "detach",
            PcpAction::Attach(_) => "attach",
            PcpAction::Promote(_) => "promote",
        };
        match r {
            Ok(()) => {
                tracing::info!(%room, epoch = f.epoch, "pgpool: {text}");
                metrics::counter!(crate::telemetry::PGPOOL_COMMANDS, "room" => room.clone(), "command" => kind).increment(1);
                report.last_command = text;
                s.pgpool.put(report.clone());
            }
            Err(e) => {
                tracing::warn!(%room, "pgpool: {text} failed: {e}");
                client = None; // pgpool closes the connection after a refused request
            }
        }
        last_action = Some((a, Instant::now()));
    }
}

fn set_agrees(report: &mut PoolReport, agrees: bool, label: &[(&'static str, String); 1]) {
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
    label: &[(&'static str, String); 1],
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
