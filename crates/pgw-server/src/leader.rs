//! The leader's side of failover: it keeps the latest sidecar reports (observed state) beside
//! the committed facts (intended state), grants primary leases, and runs the decision rule.
//! Only decisions go through the Raft log; reports stay in the leader's memory.

use std::time::Duration;

use pgw_core::failover::{decide, decide_operation, Candidate, Decision, LeaderView};
use pgw_core::Role;

use crate::member::{now_ms, Shared};

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
            let granted = s.leader.granted(&c.name);
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
                    let age = now_ms().saturating_sub(op.started_ms);
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
                    s.leader.set_waiting(&c.name, None);
                }
                Decision::Wait(why) => {
                    if s.leader.set_waiting(&c.name, Some(&why)) {
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
                        if !s.leader.begin_replacing(&c.name, f.epoch, granted) {
                            continue;
                        }
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
                        s.leader.end_replacing(&c.name);
                    }
                }
            }
        }
    }
}
