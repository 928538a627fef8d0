//! The arbiter: what the Raft leader keeps beside the committed facts, and what it decides.
//! Pure: events in, actions out; every time is the leader's own monotonic clock in ms, passed
//! in. The server holds one `Arbiter` behind a lock and carries the actions out (proposals
//! through Raft, answers to reports).
//!
//! ```text
//!  report from a sidecar ──on_report──► kept (newest per member) ──► renews? ──► grant(now)
//!                                                                        (after a quorum check)
//!  leadership change ─────on_leadership─► forget reports; every lease counts as just granted
//!  tick(facts, now) ──► per cluster: decide / decide_operation ──► Steady | Wait(why) |
//!                       Propose(cmd) (a primary move blocks grants at that epoch until
//!                       on_proposed)
//! ```

use std::collections::BTreeMap;

use crate::config::Config;
use crate::facts::{Command, Facts, OperationKind};
use crate::failover::{decide, decide_operation, Candidate, Decision, LeaderView, Observation};
use crate::lease::LeaseTiming;

/// Longer than any report can travel: a sidecar gives up on a report at its fence point
/// (`lease_ms - fence_budget_ms`), and a relay adds at most `lease_ms` (both far below this with
/// any sane lease). A run numbered lower than the previous one (a wall-clock step back across a
/// watcher restart) is heard again after this.
pub const REPORT_IN_FLIGHT_MS: u64 = 5_000;
/// How long a switchover or forced failover may take before it is failed.
pub const OPERATION_TIMEOUT_MS: u64 = 30_000;
/// How long a recovery (a fresh base backup) may take before it is failed.
pub const RECOVER_TIMEOUT_MS: u64 = 600_000;
/// A planned restart (the shutdown checkpoint of a busy server can take a while).
pub const RESTART_TIMEOUT_MS: u64 = 120_000;

/// How long a report counts as current: five report intervals, at least 500 ms. The one
/// freshness rule (decisions, pgpool targets and status all use it).
pub fn fresh_ms(report_interval_ms: u64) -> u64 {
    (report_interval_ms * 5).max(500)
}

/// One cluster's rules, from the config.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClusterRules {
    pub name: String,
    /// The cluster's servers: the only candidates and synchronous standbys.
    pub candidates: Vec<Candidate>,
    pub bootstrap: Option<String>,
    pub sync_quorum: u32,
    pub allow_degraded: bool,
}

/// What the arbiter needs of the config.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ArbiterConfig {
    /// member -> the room it stands in (room moves)
    pub rooms: BTreeMap<String, String>,
    pub clusters: Vec<ClusterRules>,
    pub lease: LeaseTiming,
    pub fresh_ms: u64,
    /// See [`Config::silent_primary_replaceable`].
    pub replace_silent: bool,
}

impl ArbiterConfig {
    pub fn from_config(cfg: &Config) -> ArbiterConfig {
        ArbiterConfig {
            rooms: cfg
                .members
                .iter()
                .map(|m| (m.name.clone(), m.room().to_string()))
                .collect(),
            clusters: cfg
                .clusters
                .iter()
                .map(|c| ClusterRules {
                    name: c.name.clone(),
                    candidates: cfg
                        .servers(&c.name)
                        .iter()
                        .filter_map(|x| cfg.members.iter().find(|m| m.name == x.member))
                        .map(|m| Candidate {
                            name: m.name.clone(),
                            priority: m.priority,
                        })
                        .collect(),
                    bootstrap: c.bootstrap_primary.clone(),
                    sync_quorum: c.sync_quorum,
                    allow_degraded: c.allow_degraded,
                })
                .collect(),
            lease: cfg.failover.lease(),
            fresh_ms: fresh_ms(cfg.failover.report_interval_ms),
            replace_silent: cfg.silent_primary_replaceable(),
        }
    }
}

/// A lease renewal waiting for the leader's majority confirmation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GrantRequest {
    pub cluster: String,
    pub member: String,
    pub epoch: u64,
}

/// What the server must do after a tick.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    /// Propose `command`; then call [`Arbiter::on_proposed`] for the cluster (committed or
    /// not). While it is in flight no lease is granted at the epoch it was decided at when it
    /// moves the primary record.
    Propose { cluster: String, command: Command },
    /// Nothing can happen yet; `changed` when the reason differs from the last one (log it).
    Wait {
        cluster: String,
        why: String,
        changed: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Arbiter {
    cfg: ArbiterConfig,
    /// cluster -> member -> (latest report, when it arrived)
    reports: BTreeMap<String, BTreeMap<String, (Observation, u64)>>,
    /// cluster -> when the last lease grant to its primary was made
    granted: BTreeMap<String, u64>,
    /// Since when this member leads (`None`: it does not).
    leader_since: Option<u64>,
    /// cluster -> why its last decision had to wait
    waiting: BTreeMap<String, String>,
    /// cluster -> the epoch at which a proposal that moves the primary record is in flight
    replacing: BTreeMap<String, u64>,
    /// cluster -> (running operation id, when this leader first saw it running)
    op_seen: BTreeMap<String, (u64, u64)>,
    /// (running room move id, when this leader first saw it running)
    move_seen: Option<(u64, u64)>,
    /// Standby clusters: cluster -> the main group's primary as last read from that group.
    mains: BTreeMap<String, crate::facts::Upstream>,
}

impl Arbiter {
    /// Takes new rules after the group's member list changed (a server added or removed):
    /// what was observed stays, except reports of members the group no longer lists.
    pub fn set_config(&mut self, cfg: ArbiterConfig) {
        for reports in self.reports.values_mut() {
            reports.retain(|m, _| cfg.rooms.contains_key(m));
        }
        self.cfg = cfg;
    }

    pub fn new(cfg: ArbiterConfig) -> Arbiter {
        Arbiter {
            cfg,
            reports: BTreeMap::new(),
            granted: BTreeMap::new(),
            leader_since: None,
            waiting: BTreeMap::new(),
            replacing: BTreeMap::new(),
            op_seen: BTreeMap::new(),
            move_seen: None,
            mains: BTreeMap::new(),
        }
    }

    /// Event: the main group of standby cluster `cluster` reported its primary (`None`: it
    /// did not answer, or has none; the standby keeps following what it followed).
    pub fn set_main(&mut self, cluster: &str, main: Option<crate::facts::Upstream>) {
        match main {
            Some(m) => {
                self.mains.insert(cluster.to_string(), m);
            }
            None => {
                self.mains.remove(cluster);
            }
        }
    }

    pub fn config(&self) -> &ArbiterConfig {
        &self.cfg
    }

    /// On every leadership check. Becoming leader forgets old reports and counts `now` as the
    /// last possible lease grant of the predecessor (see [`crate::lease`]); losing it forgets
    /// everything learned as leader.
    pub fn on_leadership(&mut self, is_leader: bool, now: u64) {
        match (is_leader, self.leader_since) {
            (true, None) => {
                self.leader_since = Some(now);
                self.reports.clear();
                self.op_seen.clear();
                self.move_seen = None;
                for c in &self.cfg.clusters {
                    self.granted.insert(c.name.clone(), now);
                }
            }
            (false, Some(_)) => {
                self.leader_since = None;
                self.reports.clear();
                self.op_seen.clear();
                self.move_seen = None;
            }
            _ => {}
        }
    }

    /// Keeps a report unless an older one would replace a newer one. Returns whether it may
    /// renew a lease: a report strictly newer (same run, later sequence; or a later run) than
    /// the kept one; one kept only because the kept one has aged (a restarted sidecar whose
    /// clock stepped back) counts only when it came straight from its member (`direct`), never
    /// when relayed, so a relayed copy replayed later cannot renew anything.
    pub fn on_report(&mut self, obs: Observation, direct: bool, now: u64) -> bool {
        let per = self.reports.entry(obs.cluster.clone()).or_default();
        let (newer, replaces) = match per.get(&obs.member) {
            None => (true, true),
            Some((old, at)) => (
                (obs.incarnation, obs.seq) > (old.incarnation, old.seq),
                obs.supersedes(old, now.saturating_sub(*at), REPORT_IN_FLIGHT_MS),
            ),
        };
        if !replaces {
            return false;
        }
        per.insert(obs.member.clone(), (obs, now));
        newer || direct
    }

    /// A report arrived (`direct`: from its own member, not relayed). Keeps it (see
    /// [`Arbiter::on_report`]) and returns the lease grant to confirm when it may renew the
    /// primary's lease: only a report about the current epoch from the member the facts name
    /// primary (one just cleared or replaced must not get a lease from a report made before it
    /// knew). The server confirms with a majority that it still leads, then calls
    /// [`Arbiter::confirm_grant`] with the facts applied by then.
    pub fn on_renewal(
        &mut self,
        obs: Observation,
        direct: bool,
        facts: &Facts,
        now: u64,
    ) -> Option<GrantRequest> {
        let epoch = facts.cluster(&obs.cluster).map(|f| f.epoch).unwrap_or(0);
        let is_primary = facts
            .cluster(&obs.cluster)
            .and_then(|f| f.primary.as_deref())
            == Some(obs.member.as_str())
            && obs.epoch == epoch;
        let req = GrantRequest {
            cluster: obs.cluster.clone(),
            member: obs.member.clone(),
            epoch,
        };
        let renews = self.on_report(obs, direct, now);
        (is_primary && renews).then_some(req)
    }

    /// After the majority confirmed this member still leads: grants the lease `req` asked for
    /// if the facts still name that member primary at that epoch; see [`Arbiter::grant`].
    pub fn confirm_grant(&mut self, req: &GrantRequest, facts: &Facts, now: u64) -> bool {
        let still = facts.cluster(&req.cluster).is_some_and(|f| {
            f.epoch == req.epoch && f.primary.as_deref() == Some(req.member.as_str())
        });
        still && self.grant(&req.cluster, req.epoch, now)
    }

    /// Records a lease grant to `cluster`'s primary at `epoch` (the caller confirmed with a
    /// quorum that it still leads and that the primary record is unchanged); false, and no
    /// grant, while a proposal that moves the primary record at that epoch is in flight.
    pub fn grant(&mut self, cluster: &str, epoch: u64, now: u64) -> bool {
        if self.replacing.get(cluster) == Some(&epoch) {
            return false;
        }
        self.granted.insert(cluster.to_string(), now);
        true
    }

    /// The proposal emitted for `cluster` is done (committed or not): grants may resume (a
    /// committed move changed the epoch, which the grant's own check refuses).
    pub fn on_proposed(&mut self, cluster: &str) {
        self.replacing.remove(cluster);
    }

    /// Runs the decision rule for every cluster the facts hold; only while leading.
    pub fn tick(&mut self, facts: &Facts, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        if self.leader_since.is_none() {
            return out;
        }
        for rules in &self.cfg.clusters {
            let Some(f) = facts.cluster(&rules.name) else {
                continue;
            };
            if self.replacing.contains_key(&rules.name) {
                continue; // one decision in flight per cluster
            }
            let empty = BTreeMap::new();
            let reports = self.reports.get(&rules.name).unwrap_or(&empty);
            let granted = self.granted.get(&rules.name).copied().unwrap_or(0);
            let view = LeaderView {
                facts: f,
                reports,
                data_members: &rules.candidates,
                now,
                fresh_ms: self.cfg.fresh_ms,
                replace_after: self.cfg.lease.replace_after(granted),
                bootstrap: rules.bootstrap.as_deref(),
                sync_quorum: rules.sync_quorum,
                allow_degraded: rules.allow_degraded,
                main: self.mains.get(&rules.name),
                replace_silent: self.cfg.replace_silent,
            };
            // A running operator operation takes precedence (and works while paused). Its age
            // is measured on this leader's clock from when it first saw it running.
            let decision = match f.running_operation() {
                Some(op) => {
                    let seen = match self.op_seen.get(&rules.name) {
                        Some((id, at)) if *id == op.id => *at,
                        _ => {
                            self.op_seen.insert(rules.name.clone(), (op.id, now));
                            now
                        }
                    };
                    let limit = match op.kind {
                        OperationKind::Recover => RECOVER_TIMEOUT_MS,
                        OperationKind::Restart => RESTART_TIMEOUT_MS,
                        _ => OPERATION_TIMEOUT_MS,
                    };
                    decide_operation(&view, op, now.saturating_sub(seen), limit)
                }
                None => {
                    self.op_seen.remove(&rules.name);
                    decide(&view)
                }
            };
            match decision {
                Decision::Steady => {
                    self.waiting.remove(&rules.name);
                }
                Decision::Wait(why) => {
                    let changed = self.waiting.get(&rules.name) != Some(&why);
                    self.waiting.insert(rules.name.clone(), why.clone());
                    out.push(Action::Wait {
                        cluster: rules.name.clone(),
                        why,
                        changed,
                    });
                }
                Decision::Propose(command) => {
                    if matches!(
                        command,
                        Command::SetPrimary { .. } | Command::ClearPrimary { .. }
                    ) {
                        self.replacing.insert(rules.name.clone(), f.epoch);
                    }
                    out.push(Action::Propose {
                        cluster: rules.name.clone(),
                        command,
                    });
                }
            }
        }
        if let Some(a) = self.room_move_step(facts, now, &out) {
            out.push(a);
        }
        out
    }

    /// The next step of the running room move, unless a decision about the cluster it would
    /// touch is already in this tick's actions (see [`crate::room_move`]).
    fn room_move_step(&mut self, facts: &Facts, now: u64, out: &[Action]) -> Option<Action> {
        let Some(mv) = facts.running_move() else {
            self.move_seen = None;
            return None;
        };
        let seen = match self.move_seen {
            Some((id, at)) if id == mv.id => at,
            _ => {
                self.move_seen = Some((mv.id, now));
                now
            }
        };
        let servers: BTreeMap<String, Vec<Candidate>> = self
            .cfg
            .clusters
            .iter()
            .map(|c| (c.name.clone(), c.candidates.clone()))
            .collect();
        let fresh: BTreeMap<String, BTreeMap<String, Observation>> = self
            .reports
            .iter()
            .map(|(c, per)| {
                let f = per
                    .iter()
                    .filter(|(_, (_, at))| now.saturating_sub(*at) <= self.cfg.fresh_ms)
                    .map(|(m, (o, _))| (m.clone(), o.clone()))
                    .collect();
                (c.clone(), f)
            })
            .collect();
        let view = crate::room_move::MoveView {
            facts,
            rooms: &self.cfg.rooms,
            servers: &servers,
            fresh: &fresh,
            running_ms: now.saturating_sub(seen),
            limit_ms: OPERATION_TIMEOUT_MS * (mv.clusters.len() as u64 + 1),
        };
        match crate::room_move::next_step(mv, &view) {
            crate::room_move::MoveStep::Propose { cluster, command } => {
                let busy = out
                    .iter()
                    .any(|a| matches!(a, Action::Propose { cluster: c, .. } if *c == cluster));
                (!busy).then_some(Action::Propose { cluster, command })
            }
            crate::room_move::MoveStep::Wait(why) => {
                let key = format!("room move {}", mv.id);
                let changed = self.waiting.get(&key) != Some(&why);
                self.waiting.insert(key.clone(), why.clone());
                Some(Action::Wait {
                    cluster: key,
                    why,
                    changed,
                })
            }
        }
    }

    /// `member`'s latest report in `cluster` if it is still fresh at `now` (see [`fresh_ms`]).
    pub fn fresh_report(&self, cluster: &str, member: &str, now: u64) -> Option<&Observation> {
        self.reports
            .get(cluster)?
            .get(member)
            .filter(|(_, at)| now.saturating_sub(*at) <= self.cfg.fresh_ms)
            .map(|(o, _)| o)
    }

    /// Latest reports of one cluster, with when they arrived (for status and pgpool targets).
    pub fn reports(&self, cluster: &str) -> BTreeMap<String, (Observation, u64)> {
        self.reports.get(cluster).cloned().unwrap_or_default()
    }

    pub fn leader_since(&self) -> Option<u64> {
        self.leader_since
    }

    pub fn waiting(&self, cluster: &str) -> Option<String> {
        self.waiting.get(cluster).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::{ClusterFacts, Operation, OperationState, Proposal};
    use crate::failover::PgRole;

    const L: LeaseTiming = LeaseTiming {
        lease_ms: 2300,
        fence_budget_ms: 300,
        drift_ppm: 10_000,
        margin_ms: 100,
    };

    fn arbiter() -> Arbiter {
        Arbiter::new(ArbiterConfig {
            rooms: BTreeMap::new(),
            clusters: vec![ClusterRules {
                name: "g".into(),
                candidates: ["a", "b", "c"]
                    .iter()
                    .map(|n| Candidate {
                        name: n.to_string(),
                        priority: 100,
                    })
                    .collect(),
                bootstrap: None,
                sync_quorum: 1,
                allow_degraded: false,
            }],
            lease: L,
            fresh_ms: fresh_ms(100),
            replace_silent: true,
        })
    }

    /// Facts of cluster `g`: primary `a` at epoch 4, sync set {b, c}, bootstrapped.
    fn facts() -> Facts {
        let mut f = Facts::default();
        f.apply(
            1,
            &Proposal {
                command: Command::EnsureCluster {
                    cluster: "g".into(),
                    sync_quorum: 1,
                    standby: false,
                },
                at_ms: 0,
                by: "t".into(),
                asked_by: None,
            },
        );
        let c: &mut ClusterFacts = f.clusters.get_mut("g").expect("g");
        c.primary = Some("a".into());
        c.epoch = 4;
        c.bootstrapped = true;
        c.sync_standbys = ["b".to_string(), "c".to_string()].into_iter().collect();
        f
    }

    fn obs(m: &str, role: PgRole, seq: u64) -> Observation {
        Observation {
            member: m.into(),
            cluster: "g".into(),
            role,
            timeline: 1,
            flush_lsn: 100,
            replay_lsn: 100,
            streaming: role == PgRole::Replica,
            receiving: role == PgRole::Replica,
            epoch_seen: 4,
            crashed: false,
            epoch: 4,
            degraded: false,
            sync_since: None,
            standbys: BTreeMap::new(),
            recovered: 0,
            restarted: 0,
            incarnation: 1,
            seq,
            error: None,
            replay_lag_ms: None,
        }
    }

    fn moves_primary(a: &[Action]) -> bool {
        a.iter().any(|x| {
            matches!(
                x,
                Action::Propose {
                    command: Command::ClearPrimary { .. } | Command::SetPrimary { .. },
                    ..
                }
            )
        })
    }

    #[test]
    fn new_rules_drop_reports_of_members_no_longer_listed() {
        let cfg = |names: &[&str]| ArbiterConfig {
            rooms: names
                .iter()
                .map(|n| (n.to_string(), n.to_string()))
                .collect(),
            clusters: Vec::new(),
            lease: crate::lease::LeaseTiming {
                lease_ms: 3000,
                fence_budget_ms: 1000,
                drift_ppm: 0,
                margin_ms: 0,
            },
            fresh_ms: 1000,
            replace_silent: true,
        };
        let mut a = Arbiter::new(cfg(&["a", "b", "c"]));
        for m in ["a", "b", "c"] {
            a.reports
                .entry("global".into())
                .or_default()
                .insert(m.into(), (obs(m, PgRole::Replica, 1), 1));
        }
        a.set_config(cfg(&["a", "b", "d"]));
        let left: Vec<&String> = a.reports["global"].keys().collect();
        assert_eq!(left, vec!["a", "b"]);
        assert!(a.cfg.rooms.contains_key("d"));
    }

    #[test]
    fn a_follower_decides_nothing() {
        let mut a = arbiter();
        assert!(a.tick(&facts(), 10_000).is_empty());
    }

    #[test]
    fn a_new_leader_counts_every_lease_as_just_granted_and_blocks_grants_while_moving() {
        let mut a = arbiter();
        let start = 50_000;
        a.on_leadership(true, start);
        let wait = L.leader_wait_ms();
        // The primary is silent; the replicas report. Not before the predecessor's last
        // possible grant has surely expired.
        for t in [start, start + wait / 2, start + wait - 1] {
            a.on_report(obs("b", PgRole::Replica, t), true, t);
            a.on_report(obs("c", PgRole::Replica, t), true, t);
            assert!(!moves_primary(&a.tick(&facts(), t)), "at +{}", t - start);
        }
        let t = start + wait + 1;
        a.on_report(obs("b", PgRole::Replica, t), true, t);
        a.on_report(obs("c", PgRole::Replica, t), true, t);
        let acts = a.tick(&facts(), t);
        assert!(
            matches!(
                acts.as_slice(),
                [Action::Propose {
                    command: Command::ClearPrimary {
                        expected_epoch: 4,
                        ..
                    },
                    ..
                }]
            ),
            "{acts:?}"
        );
        // While that proposal is in flight no lease is granted at epoch 4, and nothing else
        // is decided for the cluster.
        assert!(!a.grant("g", 4, t + 1));
        assert!(a.tick(&facts(), t + 2).is_empty());
        a.on_proposed("g");
        assert!(a.grant("g", 4, t + 3));
    }

    #[test]
    fn a_renewing_primary_is_never_replaced() {
        let mut a = arbiter();
        a.on_leadership(true, 0);
        let mut t = 0;
        for seq in 1..200 {
            t += 100;
            assert!(a.on_report(obs("a", PgRole::Primary, seq), true, t));
            assert!(a.grant("g", 4, t));
            a.on_report(obs("b", PgRole::Replica, seq), true, t);
            a.on_report(obs("c", PgRole::Replica, seq), true, t);
            assert!(!moves_primary(&a.tick(&facts(), t)), "at {t}");
        }
    }

    #[test]
    fn only_a_newer_report_renews_and_a_relayed_replay_never_does() {
        let mut a = arbiter();
        a.on_leadership(true, 0);
        assert!(a.on_report(obs("a", PgRole::Primary, 5), true, 10));
        // The same report again (relayed, or duplicated in flight): kept one stays, no renewal.
        assert!(!a.on_report(obs("a", PgRole::Primary, 5), false, 20));
        assert!(!a.on_report(obs("a", PgRole::Primary, 4), true, 30));
        // Long after (the kept one aged past any flight time): taken again, but only a direct
        // one renews.
        let late = 30 + REPORT_IN_FLIGHT_MS + 1;
        assert!(!a.on_report(obs("a", PgRole::Primary, 3), false, late));
        assert!(a.on_report(
            obs("a", PgRole::Primary, 2),
            true,
            late + REPORT_IN_FLIGHT_MS + 1
        ));
    }

    #[test]
    fn an_operation_times_out_on_the_leaders_own_clock() {
        let mut a = arbiter();
        a.on_leadership(true, 1_000);
        let mut f = facts();
        let c = f.clusters.get_mut("g").expect("g");
        c.operations.insert(
            9,
            Operation {
                id: 9,
                kind: OperationKind::Switchover,
                target: Some("b".into()),
                state: OperationState::Running,
                detail: String::new(),
                // Another machine's wall clock, far in the past: it must not matter.
                started_ms: 0,
                finished_ms: None,
                by: "ops".into(),
                accept_data_loss: false,
                part_of: None,
            },
        );
        c.primary = None;
        let failed = |acts: &[Action]| {
            acts.iter().any(|x| {
                matches!(
                    x,
                    Action::Propose {
                        command: Command::FinishOperation {
                            succeeded: false,
                            ..
                        },
                        ..
                    }
                )
            })
        };
        let first = a.tick(&f, 2_000);
        assert!(!failed(&first), "{first:?}");
        assert!(!failed(&a.tick(&f, 2_000 + OPERATION_TIMEOUT_MS - 1)));
        assert!(failed(&a.tick(&f, 2_001 + OPERATION_TIMEOUT_MS)));
    }

    #[test]
    fn losing_leadership_forgets_what_was_learned() {
        let mut a = arbiter();
        a.on_leadership(true, 0);
        a.on_report(obs("b", PgRole::Replica, 1), true, 10);
        assert_eq!(a.reports("g").len(), 1);
        a.on_leadership(false, 20);
        assert!(a.reports("g").is_empty() && a.leader_since().is_none());
    }

    #[test]
    fn only_the_named_primary_at_the_current_epoch_gets_a_grant_to_confirm() {
        let mut a = arbiter();
        a.on_leadership(true, 0);
        let f = facts();
        // A replica's report, or the primary's made at an older epoch: nothing to grant.
        assert_eq!(
            a.on_renewal(obs("b", PgRole::Replica, 1), true, &f, 10),
            None
        );
        let mut old = obs("a", PgRole::Primary, 2);
        old.epoch = 3;
        assert_eq!(a.on_renewal(old, true, &f, 20), None);
        let req = a
            .on_renewal(obs("a", PgRole::Primary, 3), true, &f, 30)
            .expect("the primary's current report asks for a grant");
        assert_eq!(
            req,
            GrantRequest {
                cluster: "g".into(),
                member: "a".into(),
                epoch: 4
            }
        );
        // The record moved while the majority was being asked: no grant.
        let mut moved = f.clone();
        let c = moved.clusters.get_mut("g").expect("g");
        c.primary = None;
        c.epoch = 5;
        assert!(!a.confirm_grant(&req, &moved, 40));
        assert!(a.confirm_grant(&req, &f, 40));
    }
}
