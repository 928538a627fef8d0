//! A standby cluster of another group, in another region (`[[clusters]] standby_of`; seed
//! 000's non-region pair, Patroni's standby cluster).
//!
//! The rules are pure (`pgw_core::failover`: who leads the standby cluster and whom each server
//! replicates from; `pgw_core::facts`: `SetUpstream`, `PromoteGroup`). This module only asks
//! the main group where its primary is (the leader, every `poll_ms`, with this member's
//! certificate, which the main group lists in `auth.read`), hands that to the arbiter as an
//! event, reports the lag, and carries out `pgwctl promote-group`.

use std::time::Duration;

use pgw_core::config::StandbyOf;
use pgw_core::facts::Upstream;
use pgw_core::Command;
use pgw_proto::admin_client::AdminClient;
use tonic::Status;

use crate::member::leader_state::MainView;
use crate::member::Shared;
use crate::sidecar::observe::{format_lsn, parse_lsn};

/// While this member leads, reads every standby cluster's main group and tells the arbiter.
pub async fn standby_loop(s: Shared) {
    let Some(every) = s
        .cfg()
        .clusters
        .iter()
        .filter_map(|c| c.standby_of.as_ref().map(|so| so.poll_ms))
        .min()
    else {
        return;
    };
    let mut tick = tokio::time::interval(Duration::from_millis(every));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if s.raft.metrics().borrow().state == openraft::ServerState::Shutdown {
            return;
        }
        if !s.is_leader() {
            continue;
        }
        let facts = s.sm.applied().facts;
        for c in &s.cfg().clusters {
            let Some(so) = &c.standby_of else { continue };
            // Promoted: a normal cluster now; the main group is history.
            if facts.cluster(&c.name).is_some_and(|f| f.standby.is_none()) {
                continue;
            }
            let view = read_main(&s, so, &c.name).await;
            if !view.reachable {
                tracing::debug!(cluster = %c.name, "main group unreachable: {}", view.error);
            }
            s.leader.set_main(&c.name, view);
        }
    }
}

/// Asks the main group's members, all at once (a region cut off blackholes every one of them:
/// asked in turn they would add up their timeouts), where the primary of `ours`'s cluster is.
/// Its leader's answer is preferred (it has the WAL positions), then the newest epoch.
pub async fn read_main(s: &Shared, so: &StandbyOf, ours: &str) -> MainView {
    let theirs = so.cluster_of(ours).to_string();
    let mut asks = tokio::task::JoinSet::new();
    for ep in so.endpoints.clone() {
        let tls = s.tls.clone();
        let theirs = theirs.clone();
        asks.spawn(async move {
            let ch = crate::tls::channel(
                &ep,
                None,
                std::sync::Arc::new(move || tls.current().client.clone()),
                Duration::from_millis(800),
            )
            .map_err(|e| format!("{ep}: {e}"))?;
            let mut req = tonic::Request::new(pgw_proto::StatusRequest {});
            req.set_timeout(MAIN_TIMEOUT);
            let reply = AdminClient::new(ch)
                .status(req)
                .await
                .map_err(|e| format!("{ep}: {}", e.message()))?
                .into_inner();
            let Some(c) = reply.clusters.iter().find(|c| c.name == theirs) else {
                return Err(format!("{ep}: the main group has no cluster `{theirs}`"));
            };
            let upstream =
                (!c.primary.is_empty() && !c.primary_address.is_empty()).then(|| Upstream {
                    member: c.primary.clone(),
                    postgres: c.primary_address.clone(),
                    epoch: c.epoch,
                });
            let lsn = c
                .nodes
                .iter()
                .find(|n| n.member == c.primary)
                .and_then(|n| parse_lsn(&n.lsn));
            let view = MainView {
                upstream,
                lsn,
                reachable: true,
                error: String::new(),
            };
            Ok((reply.raft_state == "leader", view))
        });
    }
    let mut best: Option<(bool, MainView)> = None;
    let mut errors = Vec::new();
    while let Some(r) = asks.join_next().await {
        match r {
            Ok(Ok((leads, view))) => {
                let epoch = |v: &MainView| v.upstream.as_ref().map(|u| u.epoch);
                let better = best
                    .as_ref()
                    .is_none_or(|(bl, b)| (leads, epoch(&view)) > (*bl, epoch(b)));
                if better {
                    best = Some((leads, view));
                }
            }
            Ok(Err(e)) => errors.push(e),
            Err(e) => errors.push(format!("asking the main group: {e}")),
        }
    }
    errors.sort();
    best.map(|(_, v)| v).unwrap_or(MainView {
        upstream: None,
        lsn: None,
        reachable: false,
        error: errors.join("; "),
    })
}

/// How long one main-group member may take to answer (the connection gets 0.8 s of it).
const MAIN_TIMEOUT: Duration = Duration::from_millis(1500);

/// The standby status of cluster `name` for `pgwctl status` (figures from the leader).
pub fn status(s: &Shared, name: &str) -> Option<pgw_proto::StandbyStatus> {
    let cfg = s.cfg();
    let so = cfg
        .clusters
        .iter()
        .find(|c| c.name == name)?
        .standby_of
        .clone()?;
    let f = s.sm.applied().facts.cluster(name).cloned();
    let sb = f.as_ref().and_then(|f| f.standby.clone())?;
    let up = sb.upstream.unwrap_or_default();
    let main = s.leader.main_view(name).unwrap_or_default();
    let leader_obs = f
        .as_ref()
        .and_then(|f| f.primary.as_ref())
        .and_then(|p| s.leader.reports(name).get(p).map(|(o, _)| o.clone()));
    let replayed = leader_obs.as_ref().map(|o| o.replay_lsn);
    Some(pgw_proto::StandbyStatus {
        main_cluster: so.cluster_of(name).to_string(),
        endpoints: so.endpoints.clone(),
        upstream: up.member,
        upstream_address: up.postgres,
        upstream_epoch: up.epoch,
        main_reachable: main.reachable,
        lag_bytes: match (main.lsn, replayed) {
            (Some(m), Some(r)) => m.saturating_sub(r),
            _ => 0,
        },
        lag_ms: leader_obs
            .and_then(|o| o.replay_lag_ms)
            .map(|x| x as i64)
            .unwrap_or(-1),
        main_lsn: main.lsn.map(format_lsn).unwrap_or_default(),
        replayed_lsn: replayed.map(format_lsn).unwrap_or_default(),
    })
}

/// `pgwctl promote-group` on the leader: refused unless the cluster is a standby with a
/// standby leader and (without `force`) its main group does not answer with a primary.
pub async fn promote(
    s: &Shared,
    req: &pgw_proto::PromoteGroupRequest,
    who: &str,
) -> Result<pgw_proto::PromoteGroupReply, Status> {
    let cfg = s.cfg();
    let name = if req.cluster.is_empty() {
        cfg.clusters
            .iter()
            .find(|c| c.standby_of.is_some())
            .map(|c| c.name.clone())
            .ok_or_else(|| Status::failed_precondition("no cluster of this group is a standby"))?
    } else {
        req.cluster.clone()
    };
    let so = cfg
        .clusters
        .iter()
        .find(|c| c.name == name)
        .ok_or_else(|| Status::invalid_argument(format!("no cluster `{name}`")))?
        .standby_of
        .clone();
    let facts = s.sm.applied().facts;
    let f = facts.cluster(&name).ok_or_else(|| {
        Status::failed_precondition(format!("cluster `{name}` is not registered yet"))
    })?;
    let Some(sb) = f.standby.clone() else {
        return Err(Status::failed_precondition(format!(
            "cluster `{name}` is not a standby cluster (promoted already?)"
        )));
    };
    let Some(leader) = f.primary.clone() else {
        return Err(Status::failed_precondition(format!(
            "cluster `{name}` has no standby leader yet: nothing to promote"
        )));
    };
    if !req.force {
        if let Some(so) = &so {
            let main = read_main(s, so, &name).await;
            if let Some(u) = main.upstream.filter(|_| main.reachable) {
                return Err(Status::failed_precondition(format!(
                    "the main group answers and its primary `{}` runs at {}: promoting now would make two writable primaries in two regions; promote after losing the main region (or stop its primary first), or pass --force",
                    u.member, u.postgres
                )));
            }
        }
    }
    let obs = s.leader.fresh_report(&name, &leader);
    let lsn = obs
        .as_ref()
        .map(|o| o.flush_lsn.max(o.replay_lsn))
        .unwrap_or(0);
    let command = Command::PromoteGroup {
        cluster: name.clone(),
        expected_epoch: f.epoch,
        lsn,
    };
    let (log_index, out, committed_by) = s.propose_as(command, Some(who)).await?;
    if let pgw_core::Outcome::Rejected { reason } = out {
        return Err(Status::failed_precondition(format!(
            "promotion rejected: {reason}"
        )));
    }
    let upstream = sb
        .upstream
        .map(|u| format!("{} (epoch {}) at {}", u.member, u.epoch, u.postgres))
        .unwrap_or_default();
    let lsn_text = format_lsn(lsn);
    tracing::warn!(cluster = %name, by = %who, standby_leader = %leader, lsn = %lsn_text, "standby cluster promoted");
    Ok(pgw_proto::PromoteGroupReply {
        log_index,
        committed_by,
        member: leader.clone(),
        lsn: lsn_text.clone(),
        upstream: upstream.clone(),
        result: format!(
            "cluster `{name}` promoted: {leader} becomes its primary; it had replicated up to {lsn_text} from the main group's primary {upstream}"
        ),
    })
}
