//! The leader's decision loop: while this member leads, it ticks the arbiter
//! ([`pgw_core::arbiter`], pure) and carries its actions out: proposals through Raft, waiting
//! reasons into the log. Only decisions go through the Raft log; reports stay in the leader's
//! memory.

use std::time::Duration;

use pgw_core::arbiter::Action;

use crate::member::Shared;

/// Runs the decision rule while this member leads. Runs on every member (arbiters too).
pub async fn decision_loop(s: Shared) {
    if !s.cfg().manages_postgres() {
        return;
    }
    let tick = Duration::from_millis((s.cfg().failover.report_interval_ms / 2).max(10));
    loop {
        let _ = tokio::time::timeout(tick, s.leader.wake.notified()).await;
        if s.raft.metrics().borrow().state == openraft::ServerState::Shutdown {
            return;
        }
        let leading = s.is_leader();
        s.leader.leadership(leading);
        if !leading {
            continue;
        }
        let facts = s.sm.applied().facts;
        for action in s.leader.tick(&facts) {
            match action {
                Action::Wait {
                    cluster,
                    why,
                    changed,
                } => {
                    if changed {
                        tracing::warn!(%cluster, "waiting: {why}");
                    }
                }
                Action::Propose { cluster, command } => {
                    tracing::info!(%cluster, ?command, "decision");
                    metrics::counter!(crate::telemetry::DECISIONS, "cluster" => cluster.clone(), "kind" => command.kind()).increment(1);
                    match s.propose(command).await {
                        Ok((idx, out, _)) => {
                            tracing::info!(%cluster, log_index = idx, ?out, "decision committed")
                        }
                        Err(e) => {
                            tracing::warn!(%cluster, "decision not committed: {}", e.message())
                        }
                    }
                    // Committed: the epoch moved and grants at the old one are refused by the
                    // report handler; not committed: grants may resume.
                    s.leader.on_proposed(&cluster);
                }
            }
        }
    }
}
