//! The sidecar of a data member: watches and manages the local PostgreSQL, reports to the Raft
//! leader, renews the primary lease and fences its own server when it cannot.
//!
//! Every round: observe postgres, compute the local plan from the *committed* facts
//! ([`pgw_core::failover::plan_local`]), carry it out, observe again, report. It never acts on
//! remembered roles: a restarted watcher reaches the same plan from its durable Raft state.

pub mod observe;
pub mod pgctl;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use pgw_core::failover::{plan_local, LocalAction, Observation, PgRole};
use pgw_core::ClusterFacts;
use pgw_proto::admin_client::AdminClient;
use pgw_proto::ReportRequest;
use tokio::time::Instant;

use crate::service::Shared;
use observe::{Local, Observer};
use pgctl::{Managed, PgAddr, PgCtl, PgError};

/// `ANY k ("a", "b")` for the recorded sync set, or empty.
pub fn sync_names(f: &ClusterFacts) -> String {
    if f.sync_standbys.is_empty() {
        return String::new();
    }
    let names: Vec<String> = f.sync_standbys.iter().map(|s| format!("\"{s}\"")).collect();
    format!("ANY {} ({})", f.sync_quorum.max(1), names.join(", "))
}

pub struct Sidecar {
    s: Shared,
    ctl: PgCtl,
    cluster: String,
    members_pg: BTreeMap<String, PgAddr>,
    observer: Observer,
    epoch_seen: u64,
    /// When the last renewal that the leader acknowledged was sent.
    lease_sent: Option<Instant>,
    unresponsive_since: Option<Instant>,
    /// Our postgres died while we were primary at this epoch: do not restart it as primary
    /// until the group decides again.
    crashed_at_epoch: Option<u64>,
    /// We stopped postgres ourselves (lease lost) at this epoch.
    fenced_at_epoch: Option<u64>,
    report_client: Option<(String, AdminClient<tonic::transport::Channel>)>,
    last_error: Option<String>,
    started: Instant,
}

impl Sidecar {
    pub fn new(s: Shared) -> Result<Option<Sidecar>, PgError> {
        let Some(pg) = s.cfg.postgres.clone() else {
            return Ok(None);
        };
        let cluster = s.cfg.local_pg_cluster().unwrap_or_default();
        let mut members_pg = BTreeMap::new();
        for m in s.cfg.data_members() {
            if let Some(a) = m.postgres.as_deref().and_then(PgAddr::parse) {
                members_pg.insert(m.name.clone(), a);
            }
        }
        let addr = members_pg.get(&s.cfg.member).cloned().ok_or_else(|| PgError::Tool {
            what: "config".into(),
            message: "this member has no postgres address".into(),
        })?;
        let ctl = PgCtl::new(pg, &s.cfg.member, addr)?;
        ctl.prepare_dirs()?;
        Ok(Some(Sidecar {
            s,
            ctl,
            cluster,
            members_pg,
            observer: Observer::new(),
            epoch_seen: 0,
            lease_sent: None,
            unresponsive_since: None,
            crashed_at_epoch: None,
            fenced_at_epoch: None,
            report_client: None,
            last_error: None,
            started: Instant::now(),
        }))
    }

    fn lease_valid(&self) -> bool {
        let lease = self.s.cfg.failover.lease();
        match self.lease_sent {
            Some(t) => {
                let deadline = t + Duration::from_millis(lease.fence_at(0));
                Instant::now() < deadline
            }
            None => false,
        }
    }

    fn managed_for(&self, f: &ClusterFacts, follow: Option<&str>) -> Managed {
        Managed {
            primary_conninfo: follow
                .and_then(|p| self.members_pg.get(p))
                .map(|a| self.ctl.conninfo(a, &self.s.cfg.member)),
            synchronous_standby_names: if f.primary.as_deref() == Some(self.s.cfg.member.as_str()) {
                sync_names(f)
            } else {
                String::new()
            },
        }
    }

    async fn apply_managed(&mut self, m: &Managed, running: bool) -> Result<(), PgError> {
        if self.ctl.write_managed(m)? && running {
            self.ctl.reload().await?;
        }
        Ok(())
    }

    /// Runs forever.
    pub async fn run(mut self) {
        let interval = Duration::from_millis(self.s.cfg.failover.report_interval_ms);
        let mut facts_rx = self.s.raft.metrics();
        tracing::info!(cluster = %self.cluster, data_dir = %self.ctl.data().display(), "sidecar started");
        loop {
            let t0 = Instant::now();
            let again = self.round().await;
            if again {
                continue;
            }
            let wait = interval.saturating_sub(t0.elapsed());
            // Wake early when the committed state changes.
            let _ = tokio::time::timeout(wait, facts_rx.changed()).await;
        }
    }

    /// One observe-act-report round. Returns true when another round should follow at once.
    async fn round(&mut self) -> bool {
        let me = self.s.cfg.member.clone();
        let facts = self.s.sm.applied().facts.cluster(&self.cluster).cloned();
        let mut local = self.observer.observe(&self.ctl, &self.members_pg).await;
        let Some(f) = facts else {
            // Cluster not registered yet; report so the leader sees us.
            self.report(&local, 0).await;
            return false;
        };
        let i_am_primary = f.primary.as_deref() == Some(me.as_str());

        // A hung postgres: fence it when we are (or think we are) primary.
        if local.unresponsive {
            let since = *self.unresponsive_since.get_or_insert_with(Instant::now);
            let hung = since.elapsed() >= Duration::from_millis(self.s.cfg.failover.hung_after_ms);
            if hung && i_am_primary {
                tracing::error!("postgres has not answered for {} ms: killing it (fencing)", since.elapsed().as_millis());
                self.ctl.kill_all();
                self.crashed_at_epoch = Some(f.epoch);
                self.observer.reset();
                local = self.observer.observe(&self.ctl, &self.members_pg).await;
            } else {
                self.report(&local, f.epoch).await;
                return false;
            }
        } else {
            self.unresponsive_since = None;
        }
        if i_am_primary && local.died && self.crashed_at_epoch != Some(f.epoch) && self.fenced_at_epoch != Some(f.epoch) {
            tracing::error!(epoch = f.epoch, "our postgres died while primary; not restarting it, handing over");
            self.crashed_at_epoch = Some(f.epoch);
        }

        // Lease: a primary that has not renewed in time fences its own postgres.
        // A watcher that starts beside a running primary counts its own start as the last
        // renewal: it must get a grant within the lease like everyone else.
        let lease_ref = self.lease_sent.unwrap_or(self.started);
        let expired = Instant::now() >= lease_ref + Duration::from_millis(self.s.cfg.failover.lease().fence_at(0));
        if i_am_primary && local.role == Some(PgRole::Primary) && expired {
            tracing::error!("primary lease not renewed in time: fencing local postgres");
            self.ctl.kill_all();
            self.fenced_at_epoch = Some(f.epoch);
            self.observer.reset();
            local = self.observer.observe(&self.ctl, &self.members_pg).await;
        }

        let role = local.role.unwrap_or(PgRole::Down);
        let action = plan_local(&me, &f, role, local.upstream.as_deref());
        let mut acted = false;
        let result = self.act(&f, &action, &local).await;
        match result {
            Ok(did) => {
                acted = did;
                if did || action == LocalAction::Nothing {
                    self.epoch_seen = self.epoch_seen.max(f.epoch);
                }
                self.last_error = None;
            }
            Err(e) => {
                let msg = e.to_string();
                if self.last_error.as_deref() != Some(msg.as_str()) {
                    tracing::error!(?action, "local action failed: {msg}");
                }
                self.last_error = Some(msg);
            }
        }
        if acted {
            self.observer.reset();
            local = self.observer.observe(&self.ctl, &self.members_pg).await;
        }
        let lease_was_valid = self.lease_valid();
        self.report(&local, f.epoch).await;
        // A pending promotion / start waits only for the lease: go again at once when it came.
        matches!(action, LocalAction::Promote | LocalAction::StartPrimary | LocalAction::InitPrimary)
            && !lease_was_valid
            && self.lease_valid()
    }

    /// Carries out one planned action. Returns whether anything was done.
    async fn act(&mut self, f: &ClusterFacts, action: &LocalAction, local: &Local) -> Result<bool, PgError> {
        let running = matches!(local.role, Some(PgRole::Primary) | Some(PgRole::Replica));
        match action {
            LocalAction::Nothing => {
                // Keep the owned settings current (sync names on the primary).
                if running {
                    let follow = local.upstream.clone();
                    let m = self.managed_for(f, follow.as_deref());
                    self.apply_managed(&m, true).await?;
                }
                Ok(false)
            }
            LocalAction::InitPrimary | LocalAction::StartPrimary | LocalAction::Promote => {
                if !self.lease_valid() {
                    return Ok(false); // renew first (the report below does it)
                }
                if matches!(action, LocalAction::StartPrimary)
                    && (self.crashed_at_epoch == Some(f.epoch) || self.fenced_at_epoch == Some(f.epoch))
                {
                    return Ok(false); // the group must decide again
                }
                let m = self.managed_for(f, None);
                match action {
                    LocalAction::InitPrimary => {
                        tracing::info!("bootstrap: initdb and start as the first primary");
                        self.ctl.initdb().await?;
                        self.ctl.set_standby(false)?;
                        self.ctl.write_managed(&m)?;
                        self.ctl.start().await?;
                    }
                    LocalAction::StartPrimary => {
                        tracing::info!(epoch = f.epoch, "starting postgres as primary");
                        self.ctl.set_standby(false)?;
                        self.ctl.write_managed(&m)?;
                        self.ctl.start().await?;
                    }
                    _ => {
                        tracing::info!(epoch = f.epoch, "promoting local standby");
                        self.apply_managed(&m, true).await?;
                        self.ctl.promote().await?;
                        self.ctl.set_standby(false)?;
                        tracing::info!(epoch = f.epoch, "promoted");
                    }
                }
                Ok(true)
            }
            LocalAction::Fence => {
                tracing::warn!(epoch = f.epoch, "the group has no primary: stopping our primary postgres (fence)");
                if self.ctl.stop(true).await.is_err() {
                    self.ctl.kill_all();
                }
                Ok(true)
            }
            LocalAction::Detach => {
                let m = self.managed_for(f, None);
                self.apply_managed(&m, true).await?;
                tracing::info!(epoch = f.epoch, "detached from the former primary");
                Ok(true)
            }
            LocalAction::Follow { primary } => {
                if local.role == Some(PgRole::Primary) {
                    tracing::warn!(%primary, "we run as primary but {primary} is: stopping to rejoin as replica");
                    self.ctl.stop(false).await?;
                    return Ok(true);
                }
                let m = self.managed_for(f, Some(primary));
                self.apply_managed(&m, true).await?;
                tracing::info!(%primary, "following");
                Ok(true)
            }
            LocalAction::StartReplica { primary } => {
                let Some(src) = self.members_pg.get(primary).cloned() else {
                    return Ok(false);
                };
                if local.role == Some(PgRole::Empty) {
                    tracing::info!(%primary, "cloning from the primary (pg_basebackup)");
                    self.ctl.basebackup(&src).await?;
                } else if !self.ctl.is_standby_dir() {
                    tracing::info!(%primary, "former primary: rewinding onto {primary}'s timeline");
                    if let Err(e) = self.ctl.rewind(&src).await {
                        tracing::warn!("pg_rewind failed ({e}); moving the data directory aside and cloning afresh");
                        let old = self.ctl.move_aside()?;
                        tracing::warn!(moved_to = %old.display(), "old data directory kept");
                        self.ctl.basebackup(&src).await?;
                    }
                }
                self.ctl.set_standby(true)?;
                let m = self.managed_for(f, Some(primary));
                self.ctl.write_managed(&m)?;
                self.ctl.start().await?;
                tracing::info!(%primary, "started as replica");
                Ok(true)
            }
        }
    }

    async fn report(&mut self, local: &Local, _epoch: u64) {
        let m = self.s.raft.metrics().borrow().clone();
        let Some(leader) = m.current_leader else { return };
        let Some(addr) = self.s.cfg.member_by_id(leader).map(|x| x.grpc.clone()) else { return };
        let crashed = self.crashed_at_epoch.is_some_and(|e| Some(e) == self.current_epoch());
        let obs = Observation {
            member: self.s.cfg.member.clone(),
            cluster: self.cluster.clone(),
            role: local.role.unwrap_or(PgRole::Down),
            timeline: local.timeline,
            flush_lsn: local.flush_lsn,
            replay_lsn: local.replay_lsn,
            streaming: local.streaming,
            epoch_seen: self.epoch_seen,
            crashed: crashed || self.fenced_at_epoch.is_some_and(|e| Some(e) == self.current_epoch()),
            standbys: local.standbys.clone(),
        };
        let Ok(bytes) = serde_json::to_vec(&obs) else { return };
        if self.report_client.as_ref().is_none_or(|(a, _)| *a != addr) {
            match (self.s.channels)(&addr) {
                Ok(ch) => self.report_client = Some((addr.clone(), AdminClient::new(ch))),
                Err(_) => return,
            }
        }
        let Some((_, client)) = self.report_client.as_mut() else { return };
        let sent = Instant::now();
        let mut req = tonic::Request::new(ReportRequest {
            identity: Some(self.s.identity()),
            observation: bytes,
        });
        let limit = Duration::from_millis(self.s.cfg.failover.report_interval_ms * 5).max(Duration::from_millis(500));
        req.set_timeout(limit);
        match tokio::time::timeout(limit, client.report(req)).await {
            Ok(Ok(r)) => {
                if r.into_inner().lease_ok {
                    self.lease_sent = Some(sent);
                }
            }
            Ok(Err(e)) => tracing::debug!("report to leader: {}", e.message()),
            Err(_) => tracing::debug!("report to leader timed out"),
        }
    }

    fn current_epoch(&self) -> Option<u64> {
        self.s.sm.applied().facts.cluster(&self.cluster).map(|c| c.epoch)
    }
}

/// The sync set as names, for status.
pub fn standby_set(f: &ClusterFacts) -> BTreeSet<String> {
    f.sync_standbys.clone()
}
