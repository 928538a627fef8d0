//! Carries out [`pgw_core::placement`]: the Raft leader stays away from the members that host a
//! primary. Every heartbeat this member turns its own election timer on or off
//! (`may_campaign`), and while it leads and hosts a primary it hands leadership over
//! (`should_hand_over`): it stops acting as leader (`Shared::handing_over`: no decisions,
//! proposals, lease grants or pgpool commands) and stops its heartbeats, so that the other
//! voters' election timers run out and one of them is elected; after `grace` without a new
//! leader it resumes. The primary's lease outlasts the change (see `validate()`).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pgw_core::placement::{may_campaign, should_hand_over, Peer};

use crate::member::Shared;

/// Whether this member hosts the primary (or standby leader) of any cluster.
fn hosts_primary(s: &Shared) -> bool {
    let facts = s.sm.applied().facts;
    let me = s.cfg().member.clone();
    s.cfg().clusters.iter().any(|c| {
        facts
            .cluster(&c.name)
            .is_some_and(|f| f.primary.as_deref() == Some(me.as_str()))
    })
}

/// How long the primaries must have stayed put before a hand-over.
const SETTLE: Duration = Duration::from_secs(2);

pub async fn placement_loop(s: Shared) {
    let cfg = s.cfg();
    let tick = Duration::from_millis(cfg.raft.heartbeat_ms);
    let grace_ms = 4 * cfg.raft.election_timeout_max_ms;
    let recent = Duration::from_millis(4 * cfg.raft.heartbeat_ms.max(50));
    let me = cfg.me().map(|m| m.id).unwrap_or_default();
    let mut leaderless_since: Option<Instant> = None;
    let mut elect_on = true;
    let mut handing: Option<Instant> = None;
    let mut last_try: Option<Instant> = None;
    // The primaries as last seen, and since when (a hand-over waits until they settled).
    let mut primaries: Vec<Option<String>> = Vec::new();
    let mut primaries_since = Instant::now();
    loop {
        tokio::time::sleep(tick).await;
        let m = s.raft.metrics().borrow().clone();
        if m.state == openraft::ServerState::Shutdown {
            return;
        }
        let hosts = hosts_primary(&s);
        let now_primaries: Vec<Option<String>> = {
            let facts = s.sm.applied().facts;
            s.cfg()
                .clusters
                .iter()
                .map(|c| facts.cluster(&c.name).and_then(|f| f.primary.clone()))
                .collect()
        };
        if now_primaries != primaries {
            primaries = now_primaries;
            primaries_since = Instant::now();
        }
        let known_leader = m.current_leader.filter(|l| *l != me || handing.is_none());
        if known_leader.is_some() {
            leaderless_since = None;
        } else if leaderless_since.is_none() {
            leaderless_since = Some(Instant::now());
        }
        let leaderless_ms = leaderless_since
            .map(|t| t.elapsed().as_millis() as u64)
            .unwrap_or(0);
        let want = may_campaign(hosts, leaderless_ms, grace_ms);
        if want != elect_on {
            s.raft.runtime_config().elect(want);
            elect_on = want;
            tracing::debug!(on = want, "election timer");
        }
        let leading = crate::member::leads(&m, Some(me));
        if let Some(t0) = handing {
            let done = !leading;
            if done || t0.elapsed() >= Duration::from_millis(grace_ms) {
                s.raft.runtime_config().heartbeat(true);
                s.handing_over.store(false, Ordering::SeqCst);
                handing = None;
                if done {
                    let to = m
                        .current_leader
                        .map(|l| s.member_name(l))
                        .unwrap_or_else(|| "(election under way)".into());
                    tracing::info!(
                        "Raft leadership handed over in {} ms; leader now {to}",
                        t0.elapsed().as_millis()
                    );
                } else {
                    tracing::warn!(
                        "nobody took Raft leadership within {grace_ms} ms: leading again"
                    );
                }
            }
            continue;
        }
        if !leading {
            continue;
        }
        let last = m.last_log_index.unwrap_or(0);
        let facts = s.sm.applied().facts;
        let peers: Vec<Peer> = m
            .replication
            .as_ref()
            .map(|r| {
                r.iter()
                    .filter(|(id, _)| **id != me)
                    .filter(|(id, _)| m.membership_config.membership().get_node(id).is_some())
                    .filter(|(id, _)| {
                        m.membership_config
                            .membership()
                            .voter_ids()
                            .any(|v| v == **id)
                    })
                    .map(|(id, matched)| {
                        let name = s.member_name(*id);
                        Peer {
                            id: *id,
                            hosts_primary: s.cfg().clusters.iter().any(|c| {
                                facts
                                    .cluster(&c.name)
                                    .is_some_and(|f| f.primary.as_deref() == Some(name.as_str()))
                            }),
                            caught_up: matched.is_some_and(|l| l.index >= last),
                            recent: s.reach.get(*id).is_some_and(|p| {
                                p.reachable && p.last_ok.is_some_and(|t| t.elapsed() < recent)
                            }),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let ago = last_try.map(|t| t.elapsed().as_millis() as u64);
        let settled =
            primaries_since.elapsed() >= SETTLE && s.pgpool.all().iter().all(|p| p.agrees);
        if should_hand_over(me, hosts, settled, &peers, ago, 5 * grace_ms) {
            s.handing_over.store(true, Ordering::SeqCst);
            s.raft.runtime_config().heartbeat(false);
            handing = Some(Instant::now());
            last_try = Some(Instant::now());
            tracing::info!(
                "this member leads and hosts a primary: handing Raft leadership over (a loss of this room must not also cost an election)"
            );
        }
    }
}
