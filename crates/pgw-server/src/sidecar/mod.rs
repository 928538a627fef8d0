//! The sidecar of a data member: watches and manages the local PostgreSQL, reports to the Raft
//! leader, renews the primary lease and fences its own server when it cannot.
//!
//! Every round: observe postgres, compute the local plan from the *committed* facts
//! ([`pgw_core::failover::plan_local`]), carry it out, observe again, report. It never acts on
//! remembered roles: a restarted watcher reaches the same plan from its durable Raft state.

pub mod lease_record;
pub mod observe;
pub mod pgctl;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgw_core::config::PostgresConfig;
use pgw_core::failover::{plan_local, LocalAction, Observation, PgRole};
use pgw_core::guard::{step as guard_step, FenceReason, GuardAction, GuardInput, GuardState};
use pgw_core::ClusterFacts;
use pgw_proto::admin_client::AdminClient;
use pgw_proto::ReportRequest;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::member::Shared;
use lease_record::LeaseRecord;
use observe::{Local, Observer};
use pgctl::{Managed, PgAddr, PgCtl, PgError};

/// How long a standby may point at the primary without streaming before it is rewound.
const STUCK_REPLICA: Duration = Duration::from_secs(8);

/// `ANY k ("a", "b")` for the recorded sync set, or empty.
pub fn sync_names(f: &ClusterFacts) -> String {
    if f.sync_standbys.is_empty() {
        return String::new();
    }
    let names: Vec<String> = f.sync_standbys.iter().map(|s| format!("\"{s}\"")).collect();
    format!("ANY {} ({})", f.sync_quorum.max(1), names.join(", "))
}

/// State shared by the sidecar's reporter and actor tasks.
#[derive(Default)]
struct SideState {
    /// Latest observation and its sequence number.
    local: Local,
    seq: u64,
    /// The highest epoch of the facts the actor has brought postgres in line with.
    epoch_seen: u64,
    /// The local guard's memory: when postgres was last seen as primary, fenced, crashed
    /// ([`pgw_core::guard`], the one place the fence and crash rules live).
    guard: GuardState,
    /// When the last renewal that the leader acknowledged was sent.
    lease_sent: Option<Instant>,
    /// The facts epoch that renewal was granted at: a primary role taken at a later epoch
    /// needs a grant at that epoch (an earlier one may run out a moment later).
    lease_epoch: Option<u64>,
    /// The epoch at which the actor last asked the reporter for a lease at once.
    lease_asked_epoch: Option<u64>,
    /// The actor is in the middle of an action (initdb, start, clone...): what the reporter
    /// sees of postgres meanwhile is transitional, not a crash.
    busy: bool,
    /// When the actor last finished an action: an observation begun before then may have
    /// caught the action's transitional state (a restart's stopped postmaster) too.
    busy_ended: Option<Instant>,
    /// Since when our standby has been pointed at the primary without streaming.
    stuck_since: Option<Instant>,
    /// The next start as a replica must rewind first (the standby's history diverged).
    force_rewind: bool,
    /// The next start as a replica must clone afresh: a rewind did not make it stream (its
    /// checks can be fooled, e.g. by two promotions that reached the same timeline number).
    force_clone: bool,
    /// When the last rewind finished.
    rewound_at: Option<Instant>,
    /// Since when our standby has been "starting up" (not consistent, refusing connections).
    starting_since: Option<Instant>,
    /// Primary in degraded mode: not waiting for synchronous standbys.
    degraded: bool,
    /// Since when the primary has had no standby connected.
    no_standby_since: Option<Instant>,
    /// When the actor applied a widened sync set while the group waits for resync.
    sync_applied_at: Option<Instant>,
    /// The highest recovery operation (`pgwctl recover`) carried out here.
    recovered: u64,
    /// The highest restart operation (`pgwctl restart`) carried out here.
    restarted: u64,
    /// Reports sent and not answered yet (bounded: see `report`).
    reports_in_flight: usize,
    /// Sequence number of the last report made.
    report_seq: u64,
    /// When the replication and rewind roles were last checked on our primary (`None`: not in
    /// this run; a failed check is retried after a while).
    roles_checked: Option<(Instant, bool)>,
}

impl SideState {
    /// Ends an action; only a real one (busy) stamps `busy_ended`: an idle round of the actor
    /// must not hide a crash observed meanwhile.
    fn end_busy(&mut self) {
        if self.busy {
            self.busy_ended = Some(Instant::now());
        }
        self.busy = false;
    }
}

/// The address of every server of `cluster`, by member, from the running config (it follows
/// the group's member list).
fn servers_of(s: &Shared, cluster: &str) -> BTreeMap<String, PgAddr> {
    let mut out = BTreeMap::new();
    for x in s.cfg().servers(cluster) {
        if let Some(a) = x.postgres.as_deref().and_then(PgAddr::parse) {
            out.insert(x.member.clone(), a);
        }
    }
    out
}

pub struct Sidecar {
    s: Shared,
    ctl: PgCtl,
    cluster: String,
    state: Arc<Mutex<SideState>>,
    observed: Arc<Notify>,
    acted: Arc<Notify>,
    started: Instant,
    /// Records every acknowledged renewal, so that a restarted watcher keeps its predecessor's
    /// fencing deadline.
    record: Arc<LeaseRecord>,
    /// The last renewal a previous run of this watcher recorded (same boot), if any.
    prior_sent: Option<Instant>,
    /// Tells this run's reports from an earlier run's (see `Observation::incarnation`).
    incarnation: u64,
}

impl Sidecar {
    /// Every server of this sidecar's cluster, by member (live: follows the member list).
    /// Observes the local server. Standbys that are not servers of this cluster (a standby
    /// group in another region streaming from us) are not ours: they never count for the sync
    /// set or degraded mode.
    async fn observe(&self, observer: &mut observe::Observer) -> Local {
        let servers = self.members_pg();
        let mut local = observer.observe(&self.ctl, &servers).await;
        local.standbys.retain(|name, _| servers.contains_key(name));
        local
    }

    /// Every server of the cluster by member name; in a standby cluster also the main group's
    /// primary it follows, as [`pgw_core::failover::MAIN_UPSTREAM`].
    fn members_pg(&self) -> BTreeMap<String, PgAddr> {
        let mut all = servers_of(&self.s, &self.cluster);
        if let Some(up) = self
            .facts()
            .and_then(|f| f.standby)
            .and_then(|sb| sb.upstream)
        {
            match PgAddr::parse(&up.postgres) {
                Some(a) => {
                    all.insert(pgw_core::failover::MAIN_UPSTREAM.to_string(), a);
                }
                None => tracing::warn!(
                    address = %up.postgres,
                    "the main group's primary has an address this member cannot use"
                ),
            }
        }
        all
    }

    /// The sidecar of this member's server `pg` (one `[[postgres]]` entry).
    pub fn new(s: Shared, pg: PostgresConfig) -> Result<Sidecar, PgError> {
        let cluster = s.cfg().pg_cluster_of(&pg);
        let members_pg = servers_of(&s, &cluster);
        let addr = members_pg
            .get(&s.cfg().member)
            .cloned()
            .ok_or_else(|| PgError::Tool {
                what: "config".into(),
                message: format!("this member has no postgres address in cluster `{cluster}`"),
            })?;
        let ctl = PgCtl::new(pg, &s.cfg().member, addr)?;
        ctl.prepare_dirs()?;
        // The first cluster keeps the file name it always had (upgrades keep their deadline).
        let first = s.cfg().clusters.first().is_some_and(|c| c.name == cluster);
        let record = LeaseRecord::new(&s.cfg().data_dir, (!first).then_some(cluster.as_str()));
        let prior_sent = record.load();
        Ok(Sidecar {
            record: Arc::new(record),
            prior_sent,
            s,
            ctl,
            cluster,
            state: Arc::default(),
            observed: Arc::new(Notify::new()),
            acted: Arc::new(Notify::new()),
            started: Instant::now(),
            // Wall-clock nanoseconds at start: differs between runs of the sidecar.
            incarnation: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0),
        })
    }

    /// Starts the reporter and the actor; returns at once.
    pub fn spawn(self) {
        tracing::info!(cluster = %self.cluster, data_dir = %self.ctl.data().display(), "sidecar started");
        if let Some(p) = self.prior_sent {
            let left = self
                .lease_deadline()
                .saturating_duration_since(Instant::now());
            tracing::info!(
                "a previous run renewed the primary lease {} ms ago: its fencing deadline holds ({} ms left)",
                p.elapsed().as_millis(),
                left.as_millis()
            );
        }
        let me = Arc::new(self);
        tokio::spawn(Arc::clone(&me).reporter());
        tokio::spawn(Arc::clone(&me).lease_guard());
        tokio::spawn(me.actor());
    }

    /// Fences on time whatever the reporter is doing: an observation of a hung postgres can take
    /// seconds (each step has a 1 s timeout), and the lease rule needs fencing finished by
    /// `sent + lease_ms`. The reporter runs the same guard; this task makes the deadline exact.
    async fn lease_guard(self: Arc<Self>) {
        let tick = Duration::from_millis((self.s.cfg().failover.report_interval_ms / 2).max(10));
        loop {
            let deadline = self.lease_deadline();
            let now = Instant::now();
            if now < deadline {
                tokio::time::sleep((deadline - now).min(tick)).await;
                continue;
            }
            self.guard(None);
            tokio::time::sleep(tick).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SideState> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn facts(&self) -> Option<ClusterFacts> {
        self.s.sm.applied().facts.cluster(&self.cluster).cloned()
    }

    fn lease_deadline(&self) -> Instant {
        // A watcher that starts beside a running primary keeps its predecessor's deadline (the
        // leader counts from its last grant, not from our restart); with no record of one, it
        // counts its own start as the last renewal.
        let first = self
            .prior_sent
            .map_or(self.started, |p| p.min(self.started));
        let sent = self.lock().lease_sent.unwrap_or(first);
        sent + Duration::from_millis(self.s.cfg().failover.lease().fence_at(0))
    }

    /// A lease granted at `epoch` is still running.
    fn lease_valid(&self, epoch: u64) -> bool {
        let granted_here = {
            let st = self.lock();
            st.lease_sent.is_some() && st.lease_epoch == Some(epoch)
        };
        granted_here && Instant::now() < self.lease_deadline()
    }

    /// Milliseconds of the sidecar's clock (since its start; earlier instants count as 0).
    fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.started).as_millis() as u64
    }

    /// Runs the local guard ([`pgw_core::guard::step`]) on the committed facts and what is known
    /// of postgres: `seen` is a fresh observation (with when it began and since when postgres
    /// has not answered), `None` from the watchdog. Carries the actions out; returns whether it
    /// fenced.
    fn guard(&self, seen: Option<(&Local, Instant, Option<Instant>)>) -> bool {
        let Some(f) = self.facts() else {
            return false;
        };
        let now = Instant::now();
        let deadline = self.lease_deadline();
        let actions = {
            let mut st = self.lock();
            let role = match seen {
                Some((l, _, _)) => l.role,
                None => st.local.role,
            };
            let input = GuardInput {
                now: self.ms(now),
                named_primary: f.primary.as_deref() == Some(self.s.cfg().member.as_str()),
                epoch: f.epoch,
                lease_deadline: self.ms(deadline),
                role,
                postmaster_alive: self.ctl.postmaster_alive(),
                died: seen.is_some_and(|(l, _, _)| l.died),
                unresponsive_since: seen.and_then(|(_, _, u)| u).map(|u| self.ms(u)),
                observed_at: seen.map(|(_, t0, _)| self.ms(t0)).unwrap_or(self.ms(now)),
                busy: st.busy,
                busy_ended: st.busy_ended.map(|e| self.ms(e)),
                hung_after_ms: self.s.cfg().failover.hung_after_ms,
                lease_needed: self.s.cfg().silent_primary_replaceable(),
            };
            // A deadline before this run began (a previous run's) is already past.
            let input = if deadline <= self.started {
                GuardInput {
                    lease_deadline: 0,
                    ..input
                }
            } else {
                input
            };
            guard_step(&mut st.guard, &input)
        };
        let mut fenced = false;
        for a in actions {
            match a {
                GuardAction::Fence { epoch, reason } => {
                    let why = match reason {
                        FenceReason::LeaseExpired => {
                            "primary lease not renewed in time".to_string()
                        }
                        FenceReason::Hung { for_ms } => {
                            format!("not answering for {for_ms} ms (hung)")
                        }
                    };
                    tracing::error!(epoch, "fencing local postgres: {why}");
                    self.ctl.kill_all();
                    fenced = true;
                }
                GuardAction::ReleaseCrashed { epoch } => {
                    tracing::error!(
                        epoch,
                        "our postgres died while primary; not restarting it, handing over"
                    );
                }
            }
        }
        fenced
    }

    /// Observes postgres, enforces the lease and hang rules, reports to the leader.
    async fn reporter(self: Arc<Self>) {
        let interval = Duration::from_millis(self.s.cfg().failover.report_interval_ms);
        let mut observer = Observer::new();
        let mut unresponsive_since: Option<Instant> = None;
        let mut last_refusal: Option<String> = None;
        let mut client: Option<(String, AdminClient<tonic::transport::Channel>)> = None;
        loop {
            let t0 = Instant::now();
            // What the actor had done before this observation: reported with it, so that a
            // WAL position is never paired with an epoch acted on after it was read.
            let epoch_seen_before = self.lock().epoch_seen;
            // The guard runs before observing too: a slow observation must not delay fencing
            // past the deadline.
            if self.guard(None) {
                observer.reset();
            }
            let mut local = self.observe(&mut observer).await;
            let facts = self.facts();
            let cfg_now = self.s.cfg();
            let me = cfg_now.member.as_str();
            let (i_am_primary, epoch) = facts
                .as_ref()
                .map(|f| (f.primary.as_deref() == Some(me), f.epoch))
                .unwrap_or((false, 0));
            // A refusal (bad password, too many connections, starting up...) proves the
            // postmaster answers: logged when it starts or changes, shown in status, counted,
            // and never treated as a hang.
            if local.refused != last_refusal {
                match &local.refused {
                    Some(r) => tracing::warn!(
                        "postgres refuses the watcher (it is running; its state is unknown until it lets us in): {r}"
                    ),
                    None if last_refusal.is_some() => {
                        tracing::info!("postgres lets the watcher in again")
                    }
                    None => {}
                }
                metrics::gauge!(crate::telemetry::POSTGRES_REFUSED, "cluster" => self.cluster.clone())
                    .set(if local.refused.is_some() { 1.0 } else { 0.0 });
                last_refusal = local.refused.clone();
            }
            if local.unresponsive {
                unresponsive_since.get_or_insert(t0);
            } else {
                unresponsive_since = None;
            }
            if self.guard(Some((&local, t0, unresponsive_since))) {
                // Fenced: see what is left, and let the guard record it.
                observer.reset();
                local = self.observe(&mut observer).await;
                if !local.unresponsive {
                    unresponsive_since = None;
                }
                self.guard(Some((&local, t0, unresponsive_since)));
            }
            self.track_degraded(i_am_primary, &local);
            {
                let mut st = self.lock();
                st.local = local.clone();
                st.seq += 1;
                let narrowed = i_am_primary
                    && local.role == Some(PgRole::Primary)
                    && pgw_core::guard::narrows_locally(
                        self.s.cfg().silent_primary_replaceable(),
                        st.degraded,
                    );
                if let Ok(mut all) = self.s.local.write() {
                    let r = all.entry(self.cluster.clone()).or_default();
                    r.role = local.role;
                    r.streaming = local.streaming;
                    r.flush_lsn = local.flush_lsn;
                    r.narrowed_locally = narrowed;
                }
            }
            self.observed.notify_one();
            self.report(&local, epoch, epoch_seen_before, &mut client);
            let wait = interval.saturating_sub(t0.elapsed());
            let _ = tokio::time::timeout(wait, self.acted.notified()).await;
        }
    }

    /// After degraded mode: once the widened set has been applied for a second and a standby is
    /// synchronous, our flushed LSN marks where commits are synchronous again.
    fn sync_since(&self, local: &Local, st: &SideState) -> Option<u64> {
        let f = self.facts()?;
        let cfg_now = self.s.cfg();
        let me = cfg_now.member.as_str();
        let applied = st.sync_applied_at?;
        let sync = local.standbys.values().any(|v| v.is_synchronous());
        (f.resync_pending
            && f.primary.as_deref() == Some(me)
            && local.role == Some(PgRole::Primary)
            && applied.elapsed() >= Duration::from_secs(1)
            && sync)
            .then_some(local.flush_lsn)
    }

    /// Degraded mode (only if the cluster allows it): a primary with no standby connected for
    /// `degrade_after_ms` stops waiting for synchronous standbys; it narrows in postgres first,
    /// the leader then records the empty sync set. A returning standby ends it.
    fn track_degraded(&self, i_am_primary: bool, local: &Local) {
        let cfg_now = self.s.cfg();
        let Some(cc) = cfg_now.clusters.iter().find(|c| c.name == self.cluster) else {
            return;
        };
        let mut st = self.lock();
        if pgw_core::guard::degraded_mode_over(cc.allow_degraded, i_am_primary) {
            if st.degraded {
                tracing::info!("degraded mode over: this member is no longer the primary");
            }
            st.degraded = false;
            st.no_standby_since = None;
            return;
        }
        if local.role != Some(PgRole::Primary) {
            // Not seen running as primary this time (no answer, restarting): what we know of
            // degraded mode stands (see `degraded_mode_over`).
            st.no_standby_since = None;
            return;
        }
        if local.standbys.is_empty() {
            let since = *st.no_standby_since.get_or_insert_with(Instant::now);
            if !st.degraded && since.elapsed() >= Duration::from_millis(cc.degrade_after_ms) {
                tracing::warn!(
                    "no standby for {} ms: degraded mode, commits no longer wait for a standby (RPO > 0)",
                    since.elapsed().as_millis()
                );
                st.degraded = true;
            }
        } else {
            st.no_standby_since = None;
            let lease_needed = cfg_now.silent_primary_replaceable();
            let recorded = self.facts().is_some_and(|f| f.sync_standbys.is_empty());
            if st.degraded && pgw_core::guard::may_leave_degraded(lease_needed, recorded) {
                tracing::info!("a standby is back: leaving degraded mode");
                st.degraded = false;
            }
        }
    }

    /// Sends a report (and lease renewal) to the leader without waiting for the answer: with a
    /// round trip of several hundred ms between rooms, renewals sent one after another would
    /// each wait for the previous one and the lease would lapse. Answers are applied as they
    /// come: the lease counts from the latest *sent* renewal that was granted.
    fn report(
        self: &Arc<Self>,
        local: &Local,
        epoch: u64,
        epoch_seen_before: u64,
        client: &mut Option<(String, AdminClient<tonic::transport::Channel>)>,
    ) {
        // The leader we know, if any: a member cut off from the leader soon campaigns and knows
        // none, yet the others may still relay its reports to the leader they know.
        let leader = self.s.raft.metrics().borrow().current_leader;
        let obs = {
            let mut st = self.lock();
            st.report_seq += 1;
            Observation {
                member: self.s.cfg().member.clone(),
                cluster: self.cluster.clone(),
                role: local.role.unwrap_or(PgRole::Unknown),
                timeline: local.timeline,
                flush_lsn: local.flush_lsn,
                replay_lsn: local.replay_lsn,
                streaming: local.streaming,
                receiving: local.receiving,
                epoch_seen: epoch_seen_before.min(st.epoch_seen),
                crashed: st.guard.crashed_at_epoch == Some(epoch)
                    || st.guard.fenced_at_epoch == Some(epoch),
                epoch,
                degraded: st.degraded,
                sync_since: self.sync_since(local, &st),
                standbys: local.standbys.clone(),
                recovered: st.recovered,
                restarted: st.restarted,
                incarnation: self.incarnation,
                seq: st.report_seq,
                error: local.refused.clone(),
                replay_lag_ms: local.replay_lag_ms,
            }
        };
        let Ok(bytes) = serde_json::to_vec(&obs) else {
            return;
        };
        // Signed, so that a member relaying it to the leader cannot alter it.
        let signed = self.s.tls.sign(&bytes).unwrap_or_default();
        let mut targets = Vec::new();
        if let Some(addr) =
            leader.and_then(|l| self.s.cfg().member_by_id(l).map(|x| x.grpc.clone()))
        {
            if client.as_ref().is_none_or(|(a, _)| *a != addr) {
                if let Ok(ch) = (self.s.channels)(&addr) {
                    *client = Some((addr.clone(), AdminClient::new(ch)));
                }
            }
            if let Some((a, c)) = client.as_ref() {
                if *a == addr {
                    targets.push(c.clone());
                }
            }
        }
        let seq = self.lock().report_seq;
        // The same report also goes through another member, which relays it to the leader: a
        // room that lost only its link to the leader keeps its lease. One other member in turn
        // while we know the leader; every other member while we do not.
        let relays: Vec<String> = self
            .s
            .cfg()
            .voters()
            .filter(|x| x.name != self.s.cfg().member && Some(x.id) != leader)
            .map(|x| x.grpc.clone())
            .collect();
        // No relay when we are the leader: the direct report does not leave this process.
        let i_lead = leader.is_some() && self.s.cfg().me().map(|m| m.id) == leader;
        if !relays.is_empty() && !i_lead {
            let picked: Vec<&String> = if leader.is_some() {
                vec![&relays[(seq as usize) % relays.len()]]
            } else {
                relays.iter().collect()
            };
            for r in picked {
                if let Ok(ch) = (self.s.channels)(r) {
                    targets.push(AdminClient::new(ch));
                }
            }
        }
        // A renewal answered after the fence point is of no use: that bounds each report, and
        // with one report per interval, how many can be in flight.
        let fo = &self.s.cfg().failover;
        let limit = Duration::from_millis(fo.lease_ms.saturating_sub(fo.fence_budget_ms))
            .max(Duration::from_millis(fo.report_interval_ms));
        let max_in_flight = 2 * ((fo.lease_ms / fo.report_interval_ms.max(1)) as usize + 1);
        let sent = Instant::now();
        for mut c in targets {
            {
                let mut st = self.lock();
                if st.reports_in_flight >= max_in_flight {
                    tracing::debug!("{} reports unanswered: skipping one", st.reports_in_flight);
                    return;
                }
                st.reports_in_flight += 1;
            }
            let mut req = tonic::Request::new(ReportRequest {
                identity: Some(self.s.identity()),
                observation: bytes.clone(),
                cert: signed.2.clone(),
                scheme: u32::from(signed.0),
                signature: signed.1.clone(),
            });
            req.set_timeout(limit);
            let me = self.clone();
            tokio::spawn(async move {
                let res = tokio::time::timeout(limit, c.report(req)).await;
                let mut st = me.lock();
                st.reports_in_flight = st.reports_in_flight.saturating_sub(1);
                match res {
                    Ok(Ok(r)) => {
                        let r = r.into_inner();
                        if let Ok(mut all) = me.s.local.write() {
                            all.entry(me.cluster.clone()).or_default().primary_lsn =
                                r.primary_flush_lsn;
                        }
                        if r.lease_ok && st.lease_sent.is_none_or(|s| s < sent) {
                            let first_at_epoch = st.lease_epoch != Some(epoch);
                            st.lease_sent = Some(sent);
                            st.lease_epoch = Some(epoch);
                            drop(st);
                            if let Err(e) = me.record.store(sent) {
                                tracing::warn!("lease renewal not recorded: {e}");
                            }
                            // A primary role waiting for its first lease at this epoch (a
                            // promotion) goes ahead now, not at the next observation.
                            if first_at_epoch {
                                me.observed.notify_one();
                            }
                        }
                    }
                    Ok(Err(e)) => tracing::debug!("report to leader: {}", e.message()),
                    Err(_) => tracing::debug!("report to leader timed out"),
                }
            });
        }
    }

    /// Once per run on the primary (again every 10 s while it fails): the replication and
    /// rewind roles exist. A failure is logged and shown, never fatal: replicas then cannot
    /// log in, which status shows as well.
    async fn ensure_roles(&self) {
        let due = match self.lock().roles_checked {
            None => true,
            Some((_, true)) => false,
            Some((at, false)) => at.elapsed() > Duration::from_secs(10),
        };
        if !due {
            return;
        }
        let monitor = self.s.cfg().pgpool_check_user();
        let ok = match self.ctl.ensure_roles(monitor.as_deref()).await {
            Ok(created) => {
                for r in created {
                    tracing::info!(role = %r, "created PostgreSQL role {r} (password from postgres.passfile)");
                }
                true
            }
            Err(e) => {
                tracing::error!("{e}");
                false
            }
        };
        self.lock().roles_checked = Some((Instant::now(), ok));
    }

    fn managed_for(&self, f: &ClusterFacts, follow: Option<&str>) -> Managed {
        Managed {
            primary_conninfo: follow
                .and_then(|p| self.members_pg().get(p).cloned())
                .map(|a| {
                    self.ctl
                        .conninfo(&a, &self.s.cfg().member, self.ctl.cfg.replication_role())
                }),
            // The set recorded in Raft: degraded mode is recorded there first, except where
            // nothing can replace the primary (pgw_core::guard::narrows_locally).
            synchronous_standby_names: if f.primary.as_deref() != Some(self.s.cfg().member.as_str())
                || pgw_core::guard::narrows_locally(
                    self.s.cfg().silent_primary_replaceable(),
                    self.lock().degraded,
                ) {
                String::new()
            } else {
                sync_names(f)
            },
        }
    }

    async fn apply_managed(&self, m: &Managed, running: bool) -> Result<(), PgError> {
        if self.ctl.write_managed(m)? && running {
            self.ctl.reload().await?;
            if !m.synchronous_standby_names.is_empty() {
                self.lock().sync_applied_at = Some(Instant::now());
            }
        }
        Ok(())
    }

    /// Brings postgres in line with the committed facts, one action per fresh observation.
    async fn actor(self: Arc<Self>) {
        let interval = Duration::from_millis(self.s.cfg().failover.report_interval_ms);
        let mut facts_rx = self.s.raft.metrics();
        let Some(mut reload_rx) = self.s.live.subscribe(&self.cluster) else {
            tracing::error!(cluster = %self.cluster, "no reload channel for this server");
            return;
        };
        let mut reload_applied = 0u64;
        let mut acted_on_seq = 0u64;
        let mut last_error: Option<String> = None;
        let me = self.s.cfg().member.clone();
        loop {
            tokio::select! {
                _ = self.observed.notified() => {}
                _ = facts_rx.changed() => {}
                _ = reload_rx.changed() => {}
                _ = tokio::time::sleep(interval) => {}
            }
            if reload_rx.borrow().generation > reload_applied {
                let want = reload_rx.borrow_and_update().clone();
                reload_applied = want.generation;
                let result = self.apply_reload(&want).await;
                self.s.live.report(
                    &self.cluster,
                    crate::reload::Applied {
                        generation: want.generation,
                        result: result.map_err(|e| e.to_string()),
                    },
                );
            }
            let Some(f) = self.facts() else { continue };
            let (local, seq) = {
                let st = self.lock();
                (st.local.clone(), st.seq)
            };
            if seq <= acted_on_seq {
                continue; // wait for an observation made after our last action
            }
            if let Some((id, primary)) = self.recovery_due(&f) {
                self.lock().busy = true;
                let r = self.rebuild(&f, &primary).await;
                let mut st = self.lock();
                st.end_busy();
                acted_on_seq = st.seq;
                match r {
                    Ok(()) => {
                        st.recovered = id;
                        st.epoch_seen = st.epoch_seen.max(f.epoch);
                        drop(st);
                        self.acted.notify_one();
                        last_error = None;
                    }
                    Err(e) => {
                        let msg = format!("recovery (operation {id}) failed: {e}; retrying");
                        if last_error.as_deref() != Some(msg.as_str()) {
                            tracing::error!("{msg}");
                        }
                        last_error = Some(msg);
                    }
                }
                continue;
            }
            if let Some(id) = self.restart_due(&f, &local) {
                self.lock().busy = true;
                let r = self.ctl.restart().await;
                let mut st = self.lock();
                st.end_busy();
                match r {
                    Ok(()) => {
                        tracing::info!(
                            operation = id,
                            "postgres restarted in place (pgwctl restart)"
                        );
                        st.restarted = id;
                        drop(st);
                        acted_on_seq = self.lock().seq;
                        self.acted.notify_one();
                        last_error = None;
                    }
                    Err(e) => {
                        drop(st);
                        let msg = format!("restart (operation {id}) failed: {e}");
                        if last_error.as_deref() != Some(msg.as_str()) {
                            tracing::error!("{msg}");
                        }
                        last_error = Some(msg);
                    }
                }
                continue;
            }
            if self.stuck_starting_up(&f, &local).await {
                acted_on_seq = self.lock().seq;
                continue;
            }
            let Some(role) = local.role else { continue }; // unresponsive: the reporter handles it
            let action = plan_local(&me, &f, role, local.upstream.as_deref());
            self.lock().busy = action != LocalAction::Nothing;
            let result = self.act(&f, &action, &local).await;
            self.lock().end_busy();
            match result {
                Ok(did) => {
                    // StartDetached does nothing for a former primary: it stays down, which is
                    // what this epoch asks of it.
                    if did || matches!(action, LocalAction::Nothing | LocalAction::StartDetached) {
                        let mut st = self.lock();
                        st.epoch_seen = st.epoch_seen.max(f.epoch);
                    }
                    if did {
                        acted_on_seq = self.lock().seq;
                        self.acted.notify_one();
                    }
                    last_error = None;
                }
                Err(e) => {
                    let msg = e.to_string();
                    if last_error.as_deref() != Some(msg.as_str()) {
                        tracing::error!(?action, "local action failed: {msg}");
                    }
                    if matches!(
                        action,
                        LocalAction::StartPrimary | LocalAction::InitPrimary | LocalAction::Promote
                    ) {
                        // We cannot serve as primary: hand over rather than retry forever.
                        self.lock().guard.crashed_at_epoch = Some(f.epoch);
                    }
                    last_error = Some(msg);
                    acted_on_seq = self.lock().seq;
                }
            }
        }
    }

    /// A running `pgwctl recover` of this member not carried out yet: (operation id, primary).
    fn recovery_due(&self, f: &ClusterFacts) -> Option<(u64, String)> {
        let me = &self.s.cfg().member;
        let op = f.running_operation().filter(|o| {
            o.kind == pgw_core::facts::OperationKind::Recover && o.target.as_ref() == Some(me)
        })?;
        if op.id <= self.lock().recovered {
            return None;
        }
        let p = f.primary.clone().filter(|p| p != me)?;
        Some((op.id, p))
    }

    /// `pgwctl reload`: new [postgres] settings and hba into the files and, if postgres runs,
    /// `pg_ctl reload`; returns the settings that still need a restart.
    async fn apply_reload(&self, want: &crate::reload::PgLive) -> Result<Vec<String>, PgError> {
        self.ctl.set_live(want.settings.clone(), want.hba.clone());
        let local = self.lock().local.clone();
        let running = matches!(local.role, Some(PgRole::Primary) | Some(PgRole::Replica));
        if !self.ctl.has_cluster() {
            return Ok(Vec::new());
        }
        let mut changed = self.ctl.write_hba()?;
        if let Some(f) = self.facts() {
            let m = self.managed_for(&f, local.upstream.as_deref());
            changed |= self.ctl.write_managed(&m)?;
        }
        if !running {
            return Ok(Vec::new()); // read at its next start
        }
        if changed {
            self.ctl.reload().await?;
            tracing::info!("postgres settings reloaded (pgwctl reload)");
            // The postmaster re-reads its files asynchronously.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        self.ctl.pending_restart().await
    }

    /// A standby we just rewound that stays "starting up" (it never reaches a consistent state,
    /// so it refuses every connection, ours included) while the group wants it to follow a
    /// primary: the rewind's checks were fooled (e.g. two promotions that reached the same
    /// timeline number), and it would wait forever for WAL no primary has. After a while it is
    /// stopped and cloned afresh (the old directory kept). A standby that was not just rewound
    /// is left to its recovery, however long. Returns whether it acted.
    async fn stuck_starting_up(&self, f: &ClusterFacts, local: &Local) -> bool {
        let cfg_now = self.s.cfg();
        let me = cfg_now.member.as_str();
        let rewound_recently = self
            .lock()
            .rewound_at
            .is_some_and(|t| t.elapsed() < Duration::from_secs(300));
        let starting = rewound_recently
            && local.role.is_none()
            && local
                .refused
                .as_deref()
                .is_some_and(|r| r.contains("57P03"))
            && f.primary.as_deref().is_some_and(|p| p != me)
            && self.ctl.is_standby_dir();
        if !starting {
            self.lock().starting_since = None;
            return false;
        }
        let since = *self.lock().starting_since.get_or_insert_with(Instant::now);
        if since.elapsed() < STUCK_REPLICA * 2 {
            return false;
        }
        {
            let mut st = self.lock();
            st.starting_since = None;
            st.rewound_at = None;
            st.force_clone = true;
        }
        tracing::warn!(
            "our standby has been starting up for {} s after a rewind without becoming consistent: stopping it to clone afresh",
            since.elapsed().as_secs()
        );
        if self.ctl.stop(true).await.is_err() {
            self.ctl.kill_all();
        }
        true
    }

    /// A `pgwctl restart` of this member not carried out yet, while postgres runs in the role
    /// the group gave it (a primary only with a valid lease: it must come back as one).
    fn restart_due(&self, f: &ClusterFacts, local: &Local) -> Option<u64> {
        let me = &self.s.cfg().member;
        let op = f.running_operation().filter(|o| {
            o.kind == pgw_core::facts::OperationKind::Restart && o.target.as_ref() == Some(me)
        })?;
        if op.id <= self.lock().restarted {
            return None;
        }
        let primary = f.primary.as_deref() == Some(me.as_str());
        let ok = match local.role {
            Some(PgRole::Primary) => primary && self.lease_valid(f.epoch),
            Some(PgRole::Replica) => !primary,
            _ => false,
        };
        ok.then_some(op.id)
    }

    /// `pgwctl recover`: stop postgres, move its data directory aside (never deleted), clone
    /// afresh from the primary and start as its replica.
    async fn rebuild(&self, f: &ClusterFacts, primary: &str) -> Result<(), PgError> {
        let src = self
            .members_pg()
            .get(primary)
            .cloned()
            .ok_or_else(|| PgError::Tool {
                what: "recover".into(),
                message: format!("no postgres address for {primary}"),
            })?;
        // The source must answer before anything here is touched.
        self.ctl.checkpoint(&src).await?;
        tracing::warn!(%primary, epoch = f.epoch, "recovery: rebuilding from {primary}");
        if self.ctl.postmaster_pid().is_some() && self.ctl.stop(false).await.is_err() {
            self.ctl.kill_all();
        }
        if self.ctl.data().exists()
            && std::fs::read_dir(self.ctl.data()).is_ok_and(|mut d| d.next().is_some())
        {
            let old = self.ctl.move_aside()?;
            tracing::warn!(moved_to = %old.display(), "recovery: old data directory kept");
        }
        self.ctl.basebackup(&src).await?;
        self.ctl.set_standby(true)?;
        let m = self.managed_for(f, Some(primary));
        self.ctl.write_managed(&m)?;
        self.ctl.start().await?;
        {
            let mut st = self.lock();
            st.force_rewind = false;
            st.stuck_since = None;
        }
        tracing::info!(%primary, "recovery: started as replica of {primary}");
        Ok(())
    }

    /// Carries out one planned action. Returns whether anything was done.
    async fn act(
        &self,
        f: &ClusterFacts,
        action: &LocalAction,
        local: &Local,
    ) -> Result<bool, PgError> {
        let running = matches!(local.role, Some(PgRole::Primary) | Some(PgRole::Replica));
        self.ctl.set_cascading(f.standby.is_some());
        match action {
            LocalAction::Nothing => {
                self.lock().stuck_since = None;
                if local.role == Some(PgRole::Primary)
                    && f.primary.as_deref() == Some(self.s.cfg().member.as_str())
                {
                    self.ensure_roles().await;
                }
                // Keep the owned settings current (sync names on the primary).
                if running {
                    let m = self.managed_for(f, local.upstream.as_deref());
                    self.apply_managed(&m, true).await?;
                }
                Ok(false)
            }
            LocalAction::InitPrimary | LocalAction::StartPrimary | LocalAction::Promote => {
                if !self.lease_valid(f.epoch) {
                    // The reporter renews it: at once, once per epoch (a failover waits for
                    // this; afterwards at its own pace).
                    let first = {
                        let mut st = self.lock();
                        let first = st.lease_asked_epoch != Some(f.epoch);
                        st.lease_asked_epoch = Some(f.epoch);
                        first
                    };
                    if first {
                        self.acted.notify_one();
                    }
                    return Ok(false);
                }
                {
                    let st = self.lock();
                    if st.guard.crashed_at_epoch == Some(f.epoch)
                        || st.guard.fenced_at_epoch == Some(f.epoch)
                    {
                        return Ok(false); // the group must decide again
                    }
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
                tracing::warn!(
                    epoch = f.epoch,
                    "the group has no primary: stopping our primary postgres (fence)"
                );
                if self.ctl.stop(true).await.is_err() {
                    self.ctl.kill_all();
                }
                Ok(true)
            }
            LocalAction::DataDirLost => {
                let e = self.lock().guard.crashed_at_epoch;
                if e != Some(f.epoch) {
                    tracing::error!(
                        epoch = f.epoch,
                        data_dir = %self.ctl.data().display(),
                        "we are the primary but our data directory is empty (lost disk?): not running initdb over an existing cluster; handing over"
                    );
                    self.lock().guard.crashed_at_epoch = Some(f.epoch);
                }
                Ok(false)
            }
            LocalAction::StartDetached => {
                if !self.ctl.is_standby_dir() {
                    return Ok(false); // a former primary waits for the group's decision
                }
                let m = self.managed_for(f, None);
                self.ctl.write_managed(&m)?;
                self.ctl.start().await?;
                tracing::info!(
                    epoch = f.epoch,
                    "started as a detached standby to report its WAL position"
                );
                Ok(true)
            }
            LocalAction::Demote => {
                tracing::info!(
                    epoch = f.epoch,
                    "switchover: shutting down cleanly so the standbys receive all WAL"
                );
                self.ctl.stop(false).await?;
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
                    if self.ctl.stop(false).await.is_err() {
                        self.ctl.kill_all();
                    }
                    return Ok(true);
                }
                let m = self.managed_for(f, Some(primary));
                if !self.ctl.write_managed(&m)? {
                    // Already pointed there. A standby that still does not stream after a while
                    // has diverged (it holds WAL the new primary never had): rewind it.
                    let since = *self.lock().stuck_since.get_or_insert_with(Instant::now);
                    // Only when the primary answers: an unreachable primary is not divergence.
                    if since.elapsed() > STUCK_REPLICA
                        && !local.streaming
                        && match self.members_pg().get(primary.as_str()) {
                            Some(a) => self.ctl.checkpoint(a).await.is_ok(),
                            None => false,
                        }
                    {
                        let clone = {
                            let mut st = self.lock();
                            // Rewound a moment ago and still not streaming: the rewind did
                            // not help.
                            let clone = st
                                .rewound_at
                                .is_some_and(|t| t.elapsed() < STUCK_REPLICA * 3);
                            if clone {
                                st.force_clone = true;
                            } else {
                                st.force_rewind = true;
                            }
                            st.stuck_since = None;
                            clone
                        };
                        tracing::warn!(%primary, "not streaming from {primary} for {} s: stopping to {}", since.elapsed().as_secs(), if clone { "clone afresh" } else { "rewind" });
                        if self.ctl.stop(false).await.is_err() {
                            self.ctl.kill_all();
                        }
                        return Ok(true);
                    }
                    return Ok(false);
                }
                self.lock().stuck_since = None;
                self.ctl.reload().await?;
                tracing::info!(%primary, "following");
                Ok(true)
            }
            LocalAction::StartReplica { primary } => {
                let Some(src) = self.members_pg().get(primary).cloned() else {
                    return Ok(false);
                };
                if local.role == Some(PgRole::Empty) {
                    tracing::info!(%primary, "cloning from the primary (pg_basebackup)");
                    self.ctl.basebackup(&src).await?;
                } else if std::mem::take(&mut self.lock().force_clone) {
                    // The source must answer before anything here is touched.
                    self.ctl.checkpoint(&src).await?;
                    let old = self.ctl.move_aside()?;
                    tracing::warn!(moved_to = %old.display(), %primary, "a rewind did not make this standby stream: cloning afresh, old data directory kept");
                    self.ctl.basebackup(&src).await?;
                } else if !self.ctl.is_standby_dir()
                    || std::mem::take(&mut self.lock().force_rewind)
                {
                    tracing::info!(%primary, "former primary: rewinding onto {primary}'s timeline");
                    // A source we cannot reach is no reason to give up our data: retry later.
                    self.ctl.checkpoint(&src).await?;
                    if let Err(e) = self.ctl.rewind(&src).await {
                        tracing::warn!("pg_rewind failed ({e}); moving the data directory aside and cloning afresh");
                        let old = self.ctl.move_aside()?;
                        tracing::warn!(moved_to = %old.display(), "old data directory kept");
                        self.ctl.basebackup(&src).await?;
                    } else {
                        self.lock().rewound_at = Some(Instant::now());
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
}

/// The sync set as names, for status.
pub fn standby_set(f: &ClusterFacts) -> BTreeSet<String> {
    f.sync_standbys.clone()
}
