//! The leader's side of failover: it keeps the latest sidecar reports (observed state) beside
//! the committed facts (intended state), grants primary leases, and runs the decision rule.
//! Only decisions go through the Raft log; reports stay in the leader's memory.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgw_core::failover::{decide, decide_operation, Candidate, Decision, LeaderView, Observation};
use pgw_core::Role;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::service::Shared;

#[derive(Default)]
struct Inner {
    /// cluster -> member -> (latest report, leader-clock ms when it arrived)
    reports: BTreeMap<String, BTreeMap<String, (Observation, u64)>>,
    /// cluster -> leader-clock ms of the last lease grant to its primary
    granted: BTreeMap<String, u64>,
    /// Whether we were leader at the last check, and since when.
    leader_since: Option<u64>,
    /// cluster -> why the last decision had to wait (for logs and status)
    waiting: BTreeMap<String, String>,
    /// cluster -> epoch at which a proposal that moves the primary record is in flight: no
    /// lease is granted at that epoch meanwhile (the decision used the grants before it).
    replacing: BTreeMap<String, u64>,
}

/// Longer than any report can travel: a sidecar gives up on a report at its fence point
/// (`lease_ms - fence_budget_ms`), and a relay adds at most `lease_ms` (both far below this with
/// any sane lease). A run numbered lower than the previous one (a wall-clock step back across a
/// watcher restart) is heard again after this.
const REPORT_IN_FLIGHT_MS: u64 = 5_000;

/// Shared leader-side failover state (empty on followers).
#[derive(Clone)]
pub struct LeaderState {
    inner: Arc<Mutex<Inner>>,
    base: Instant,
    pub wake: Arc<Notify>,
}

impl Default for LeaderState {
    fn default() -> Self {
        Self::new()
    }
}

impl LeaderState {
    pub fn new() -> Self {
        Self {
            inner: Arc::default(),
            base: Instant::now(),
            wake: Arc::new(Notify::new()),
        }
    }

    /// Leader monotonic clock in ms.
    pub fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    /// Keeps a report unless an older one would replace a newer one. Returns whether it may
    /// renew a lease: a report strictly newer (same run, later sequence; or a later run) than
    /// the kept one; one kept only because the kept one has aged (a restarted sidecar whose
    /// clock stepped back) counts only when it came straight from its member (`direct`), never
    /// when relayed, so a relayed copy replayed later cannot renew anything.
    pub fn record_report(&self, obs: Observation, direct: bool) -> bool {
        let now = self.now_ms();
        let mut renews = false;
        if let Ok(mut g) = self.inner.lock() {
            let per = g.reports.entry(obs.cluster.clone()).or_default();
            let (newer, replaces) = match per.get(&obs.member) {
                None => (true, true),
                Some((old, at)) => (
                    (obs.incarnation, obs.seq) > (old.incarnation, old.seq),
                    obs.supersedes(old, now.saturating_sub(*at), REPORT_IN_FLIGHT_MS),
                ),
            };
            if replaces {
                renews = newer || direct;
                per.insert(obs.member.clone(), (obs, now));
            }
        }
        self.wake.notify_one();
        renews
    }

    /// Records a lease grant to `cluster`'s primary at `epoch`; false (no grant) while a
    /// proposal that moves the primary record at that epoch is in flight.
    pub fn record_grant(&self, cluster: &str, epoch: u64) -> bool {
        let now = self.now_ms();
        let Ok(mut g) = self.inner.lock() else {
            return false;
        };
        if g.replacing.get(cluster) == Some(&epoch) {
            return false;
        }
        g.granted.insert(cluster.to_string(), now);
        true
    }

    /// Latest reports of one cluster (for status).
    pub fn reports(&self, cluster: &str) -> BTreeMap<String, (Observation, u64)> {
        self.inner
            .lock()
            .ok()
            .and_then(|g| g.reports.get(cluster).cloned())
            .unwrap_or_default()
    }

    /// Leader-clock ms since which this member leads (`None`: not leading, or not noticed yet).
    pub fn leader_since(&self) -> Option<u64> {
        self.inner.lock().ok().and_then(|g| g.leader_since)
    }

    pub fn waiting(&self, cluster: &str) -> Option<String> {
        self.inner
            .lock()
            .ok()
            .and_then(|g| g.waiting.get(cluster).cloned())
    }

    /// Called on every leadership check; on becoming leader, forgets old reports and treats
    /// "now" as the last possible lease grant of the predecessor (see `pgw_core::lease`).
    fn leadership(&self, is_leader: bool, clusters: &[String]) {
        let now = self.now_ms();
        if let Ok(mut g) = self.inner.lock() {
            match (is_leader, g.leader_since) {
                (true, None) => {
                    g.leader_since = Some(now);
                    g.reports.clear();
                    for c in clusters {
                        g.granted.insert(c.clone(), now);
                    }
                }
                (false, Some(_)) => {
                    g.leader_since = None;
                    g.reports.clear();
                }
                _ => {}
            }
        }
    }
}

/// How long a switchover or forced failover may take before it is failed.
const OPERATION_TIMEOUT_MS: u64 = 30_000;
/// How long a recovery (a fresh base backup) may take before it is failed.
const RECOVER_TIMEOUT_MS: u64 = 600_000;
/// A planned restart (the shutdown checkpoint of a busy server can take a while).
const RESTART_TIMEOUT_MS: u64 = 120_000;

/// Runs the decision rule while this member leads. Runs on every member (arbiters too).
pub async fn decision_loop(s: Shared) {
    if !s.cfg.manages_postgres() {
        return;
    }
    let me = s.cfg.me().map(|m| m.id);
    let clusters: Vec<String> = s.cfg.clusters.iter().map(|c| c.name.clone()).collect();
    let candidates: Vec<Candidate> = s
        .cfg
        .members
        .iter()
        .filter(|m| m.role == Role::Data)
        .map(|m| Candidate {
            name: m.name.clone(),
            priority: m.priority,
        })
        .collect();
    let fo = s.cfg.failover.clone();
    let lease = fo.lease();
    let fresh_ms = (fo.report_interval_ms * 5).max(500);
    let tick = Duration::from_millis((fo.report_interval_ms / 2).max(10));
    loop {
        let _ = tokio::time::timeout(tick, s.leader.wake.notified()).await;
        let m = s.raft.metrics().borrow().clone();
        if m.state == openraft::ServerState::Shutdown {
            return;
        }
        let is_leader =
            m.current_leader == me && me.is_some() && m.state == openraft::ServerState::Leader;
        s.leader.leadership(is_leader, &clusters);
        if !is_leader {
            continue;
        }
        let facts = s.sm.applied().facts;
        for c in &s.cfg.clusters {
            let Some(f) = facts.cluster(&c.name) else {
                continue;
            };
            let reports = s.leader.reports(&c.name);
            let granted = s
                .leader
                .inner
                .lock()
                .ok()
                .and_then(|g| g.granted.get(&c.name).copied())
                .unwrap_or(0);
            let view = LeaderView {
                facts: f,
                reports: &reports,
                data_members: &candidates,
                now: s.leader.now_ms(),
                fresh_ms,
                replace_after: lease.replace_after(granted),
                bootstrap: c.bootstrap_primary.as_deref(),
                sync_quorum: c.sync_quorum,
                allow_degraded: c.allow_degraded,
            };
            // A running operator operation takes precedence (and works while paused).
            let decision = match f.running_operation() {
                Some(op) => {
                    let age = crate::service::now_ms().saturating_sub(op.started_ms);
                    let limit = match op.kind {
                        pgw_core::facts::OperationKind::Recover => RECOVER_TIMEOUT_MS,
                        pgw_core::facts::OperationKind::Restart => RESTART_TIMEOUT_MS,
                        _ => OPERATION_TIMEOUT_MS,
                    };
                    decide_operation(&view, op, age, limit)
                }
                None => decide(&view),
            };
            match decision {
                Decision::Steady => {
                    if let Ok(mut g) = s.leader.inner.lock() {
                        g.waiting.remove(&c.name);
                    }
                }
                Decision::Wait(why) => {
                    let changed = s
                        .leader
                        .inner
                        .lock()
                        .ok()
                        .map(|mut g| {
                            g.waiting.insert(c.name.clone(), why.clone()) != Some(why.clone())
                        })
                        .unwrap_or(false);
                    if changed {
                        tracing::warn!(cluster = %c.name, "waiting: {why}");
                    }
                }
                Decision::Propose(cmd) => {
                    let moves_primary = matches!(
                        cmd,
                        pgw_core::facts::Command::SetPrimary { .. }
                            | pgw_core::facts::Command::ClearPrimary { .. }
                    );
                    if moves_primary {
                        // No grant may slip in between the view this decision used and its
                        // commit: a grant newer than the view's means the primary renewed.
                        let Ok(mut g) = s.leader.inner.lock() else {
                            continue;
                        };
                        if g.granted.get(&c.name).copied().unwrap_or(0) != granted {
                            continue;
                        }
                        g.replacing.insert(c.name.clone(), f.epoch);
                    }
                    tracing::info!(cluster = %c.name, ?cmd, "decision");
                    let kind = serde_json::to_value(&cmd)
                        .ok()
                        .and_then(|v| v.get("kind").and_then(|k| k.as_str()).map(str::to_string))
                        .unwrap_or_default();
                    metrics::counter!(crate::telemetry::DECISIONS, "cluster" => c.name.clone(), "kind" => kind).increment(1);
                    match s.propose(cmd).await {
                        Ok((idx, out, _)) => {
                            tracing::info!(cluster = %c.name, log_index = idx, ?out, "decision committed")
                        }
                        Err(e) => {
                            tracing::warn!(cluster = %c.name, "decision not committed: {}", e.message())
                        }
                    }
                    if moves_primary {
                        // Committed: the epoch moved and grants at the old one are refused by
                        // the report handler; not committed: grants may resume.
                        if let Ok(mut g) = s.leader.inner.lock() {
                            g.replacing.remove(&c.name);
                        }
                    }
                }
            }
        }
    }
}
