//! The whole group as one state machine for the explorer: the real pure rules (the leader's
//! [`Arbiter`] with `decide`, the sidecar's [`guard::step`] and [`plan_local`], the log's
//! [`Facts::apply`]) wired to abstract PostgreSQL servers and an abstract network.
//!
//! What is abstract, and why it is enough:
//! - PostgreSQL: a WAL is a list of write ids; a standby copies its upstream's next record when
//!   its WAL is a prefix of the upstream's (else it has diverged and must be rewound to the
//!   common prefix); a write is acknowledged as soon as `k` standbys of the primary's
//!   `synchronous_standby_names` hold it (the earliest moment a real client could be told).
//!   Promotion starts a new timeline (its own + 1, as PostgreSQL without an archive does).
//! - Raft: one committed value of the facts, a leader that commits only while it reaches a
//!   majority, elections only when the leader has lost its majority, each member learning the
//!   committed facts at its own pace. Raft itself is openraft's to get right; what is checked
//!   here is what we build on it. A lease grant is confirmed with the majority atomically.
//! - Time: real time advances in ticks of 500 ms; every member's monotonic clock runs at 80 % or
//!   120 % of real time (a drift of 20 %, chosen per member at the start), and the lease is
//!   configured for that drift. The lease watchdog runs at every tick, as the real one wakes at
//!   the deadline.
//! - Messages: at most one report per member in flight (a newer one replaces it) and one lease
//!   answer; any in flight may be delivered late, in any order, lost, or (a report) delivered
//!   twice. A sidecar reports at most three times per tick.
//! - Faults: a link cut, a room isolated, a postmaster crash, a watcher crash (its Raft member,
//!   arbiter and sidecar with it; it restarts with its durable log and lease record).

use std::collections::BTreeSet;

use pgw_core::arbiter::{fresh_ms, Action, Arbiter, ArbiterConfig, ClusterRules};
use pgw_core::facts::{ClusterFacts, Command, Facts, Proposal};
use pgw_core::failover::{plan_local, Candidate, LocalAction, Observation, PgRole, SyncState};
use pgw_core::guard::{self, GuardAction, GuardInput, GuardState};
use pgw_core::lease::LeaseTiming;

use crate::explore::Model;

pub const CLUSTER: &str = "g";
/// Real milliseconds per tick.
pub const TICK_MS: u64 = 500;
/// The lease as configured for the model's clocks (20 % drift).
pub const LEASE: LeaseTiming = LeaseTiming {
    lease_ms: 1000,
    fence_budget_ms: 100,
    drift_ppm: 200_000,
    margin_ms: 50,
};
const SLOW: u64 = 80;
/// Reports a sidecar may send within one tick (the real one reports every 100 ms).
const REPORTS_PER_TICK: u8 = 3;
const FAST: u64 = 120;

/// One rule weakened at a time, to show the checker can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mutation {
    None,
    /// The candidate rule accepts one detached report fewer than `n - k + 1`.
    CandidateOneReportFewer,
    /// The leader waits out the lease as if clocks did not drift (and without margin).
    LeaseWithoutDrift,
    /// The leader grants a renewal even while a decision that moves the primary is in flight.
    GrantWhileMoving,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Three data members.
    ThreeRooms,
    /// Two data members and an arbitration member that runs no database.
    TwoRoomsAndArbiter,
}

#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Last tick.
    pub max_t: u64,
    /// Link cuts, isolations, postmaster and watcher crashes.
    pub faults: u8,
    /// Lost or duplicated messages.
    pub drops: u8,
    /// Client writes.
    pub writes: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Pg {
    pub role: PgRole,
    pub wal: Vec<u8>,
    pub tli: u32,
    pub upstream: Option<usize>,
    /// `synchronous_standby_names`: members and k.
    pub sync: (BTreeSet<usize>, u32),
    /// The postmaster died and left its pid file.
    pub died: bool,
    /// The data directory is a primary's (no standby.signal).
    pub was_primary: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Watcher {
    pub alive: bool,
    pub incarnation: u64,
    pub seq: u64,
    pub guard: GuardState,
    /// When (own clock) the last acknowledged renewal was sent; kept across restarts.
    pub lease_sent: Option<u64>,
    /// The committed facts this member has learned (its Raft log, durable).
    pub known: ClusterFacts,
    pub epoch_seen: u64,
    /// Reports made during the current tick (at most `REPORTS_PER_TICK`).
    pub reported: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Sys {
    pub t: u64,
    pub rate: Vec<u64>,
    /// Cut links, as pairs (i < j).
    pub cut: BTreeSet<(usize, usize)>,
    pub faults: u8,
    pub drops: u8,
    pub writes: u8,
    pub pg: Vec<Option<Pg>>,
    pub w: Vec<Watcher>,
    pub facts: Facts,
    pub log_index: u64,
    pub leader: Option<usize>,
    pub arbiter: Option<Arbiter>,
    pub pending: Option<Command>,
    /// Report in flight from each member: (observation, sent on its clock).
    pub reports: Vec<Option<(Observation, u64)>>,
    /// Lease answer in flight to each member: (granting member, sent, incarnation).
    pub acks: Vec<Option<(usize, u64, u64)>>,
    /// Acknowledged write ids.
    pub acked: BTreeSet<u8>,
    pub next_write: u8,
    /// A transition broke a rule checked on the transition itself.
    pub bad: Option<String>,
}

pub struct System {
    /// Where the exploration starts: each a script of transitions (by label prefix) run from
    /// the steady state through the same transition relation, so every start is reachable.
    /// A step that is not enabled in some variant is skipped.
    pub situations: Vec<Vec<String>>,
    pub names: Vec<String>,
    pub data: Vec<bool>,
    pub mutation: Mutation,
    pub bounds: Bounds,
    pub arbiter_cfg: ArbiterConfig,
}

impl System {
    pub fn new(layout: Layout, mutation: Mutation, bounds: Bounds) -> System {
        let (names, data) = match layout {
            Layout::ThreeRooms => (vec!["a", "b", "c"], vec![true, true, true]),
            Layout::TwoRoomsAndArbiter => (vec!["a", "b", "w"], vec![true, true, false]),
        };
        let names: Vec<String> = names.into_iter().map(String::from).collect();
        let lease = match mutation {
            Mutation::LeaseWithoutDrift => LeaseTiming {
                drift_ppm: 0,
                margin_ms: 0,
                ..LEASE
            },
            _ => LEASE,
        };
        let arbiter_cfg = ArbiterConfig {
            rooms: Default::default(),
            clusters: vec![ClusterRules {
                name: CLUSTER.into(),
                candidates: names
                    .iter()
                    .zip(&data)
                    .filter(|(_, d)| **d)
                    .map(|(n, _)| Candidate {
                        name: n.clone(),
                        priority: 100,
                    })
                    .collect(),
                bootstrap: None,
                sync_quorum: 1,
                allow_degraded: false,
            }],
            lease,
            fresh_ms: fresh_ms(200),
            replace_silent: true,
        };
        System {
            situations: vec![Vec::new()],
            names,
            data,
            mutation,
            bounds,
            arbiter_cfg,
        }
    }

    fn n(&self) -> usize {
        self.names.len()
    }

    fn idx(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    fn now(&self, s: &Sys, m: usize) -> u64 {
        s.t * TICK_MS * s.rate[m] / 100
    }

    fn up(&self, s: &Sys, i: usize, j: usize) -> bool {
        i == j || !s.cut.contains(&(i.min(j), i.max(j)))
    }

    /// `m` reaches a majority of live Raft members (itself included).
    fn majority(&self, s: &Sys, m: usize) -> bool {
        s.w[m].alive
            && (0..self.n())
                .filter(|&j| s.w[j].alive && self.up(s, m, j))
                .count()
                * 2
                > self.n()
    }

    fn cluster<'a>(&self, s: &'a Sys) -> &'a ClusterFacts {
        // The initial state always holds the cluster.
        s.facts.cluster(CLUSTER).expect("the model's cluster")
    }

    fn running(s: &Sys, m: usize, role: PgRole) -> bool {
        s.pg[m].as_ref().is_some_and(|p| p.role == role)
    }

    /// A primary whose standbys can acknowledge a commit now.
    pub fn can_ack(&self, s: &Sys, p: usize) -> bool {
        let Some(pg) = &s.pg[p] else { return false };
        if pg.role != PgRole::Primary {
            return false;
        }
        let attached = pg
            .sync
            .0
            .iter()
            .filter(|&&j| self.streams_from(s, j, p))
            .count();
        !pg.sync.0.is_empty() && attached as u32 >= pg.sync.1
    }

    fn streams_from(&self, s: &Sys, j: usize, p: usize) -> bool {
        let (Some(sj), Some(sp)) = (&s.pg[j], &s.pg[p]) else {
            return false;
        };
        sj.role == PgRole::Replica
            && sj.upstream == Some(p)
            && sp.role == PgRole::Primary
            && self.up(s, j, p)
            && sp.wal.starts_with(&sj.wal)
    }

    fn initial(&self, leader: usize, rate: Vec<u64>) -> Sys {
        let mut facts = Facts::default();
        let data: BTreeSet<String> = self
            .names
            .iter()
            .zip(&self.data)
            .filter(|(_, d)| **d)
            .map(|(n, _)| n.clone())
            .collect();
        let others: BTreeSet<String> = data.iter().filter(|n| *n != "a").cloned().collect();
        let mut index = 0;
        for command in [
            Command::EnsureCluster {
                cluster: CLUSTER.into(),
                sync_quorum: 1,
                standby: false,
            },
            Command::SetSyncSet {
                cluster: CLUSTER.into(),
                standbys: others.clone(),
                quorum: 1,
                expected_epoch: 0,
            },
            Command::SetPrimary {
                cluster: CLUSTER.into(),
                member: "a".into(),
                expected_epoch: 0,
                reason: "bootstrap".into(),
                sync_standbys: Some(others.clone()),
            },
            Command::MarkBootstrapped {
                cluster: CLUSTER.into(),
            },
        ] {
            index += 1;
            facts.apply(index, &proposal(command, "a"));
        }
        strip(&mut facts);
        let known = facts.cluster(CLUSTER).cloned().expect("bootstrapped");
        let epoch = known.epoch;
        let sync: BTreeSet<usize> = others.iter().filter_map(|n| self.idx(n)).collect();
        let pg = (0..self.n())
            .map(|m| {
                self.data[m].then(|| Pg {
                    role: if m == 0 {
                        PgRole::Primary
                    } else {
                        PgRole::Replica
                    },
                    wal: Vec::new(),
                    tli: 1,
                    upstream: (m != 0).then_some(0),
                    sync: if m == 0 {
                        (sync.clone(), 1)
                    } else {
                        (BTreeSet::new(), 0)
                    },
                    died: false,
                    was_primary: m == 0,
                })
            })
            .collect();
        let w = (0..self.n())
            .map(|m| Watcher {
                alive: true,
                incarnation: 1,
                seq: 0,
                guard: GuardState {
                    running_seen_epoch: (m == 0).then_some(epoch),
                    ..GuardState::default()
                },
                lease_sent: (m == 0).then_some(0),
                known: known.clone(),
                epoch_seen: epoch,
                reported: 0,
            })
            .collect();
        let mut arbiter = Arbiter::new(self.arbiter_cfg.clone());
        arbiter.on_leadership(true, 0);
        Sys {
            t: 0,
            rate,
            cut: BTreeSet::new(),
            faults: 0,
            drops: 0,
            writes: 0,
            pg,
            w,
            facts,
            log_index: index,
            leader: Some(leader),
            arbiter: Some(arbiter),
            pending: None,
            reports: vec![None; self.n()],
            acks: vec![None; self.n()],
            acked: BTreeSet::new(),
            next_write: 1,
            bad: None,
        }
    }

    /// Runs a situation's script: each step takes the first enabled transition whose label
    /// starts with it.
    fn script(&self, mut s: Sys, steps: &[String]) -> (Vec<String>, Sys) {
        let mut done = Vec::new();
        for step in steps {
            let mut out = Vec::new();
            self.next(&s, &mut out);
            if let Some((label, n)) = out.into_iter().find(|(l, _)| l.starts_with(step.as_str())) {
                done.push(label);
                s = n;
            }
            // The script's own faults do not count against the exploration's budget.
            s.faults = 0;
            s.drops = 0;
        }
        (done, s)
    }

    fn deadline(&self, s: &Sys, m: usize) -> u64 {
        s.w[m].lease_sent.map(|x| LEASE.fence_at(x)).unwrap_or(0)
    }

    fn lease_valid(&self, s: &Sys, m: usize) -> bool {
        s.w[m].lease_sent.is_some() && self.now(s, m) < self.deadline(s, m)
    }

    fn kill(s: &mut Sys, m: usize) {
        if let Some(p) = s.pg[m].as_mut() {
            if p.role != PgRole::Down {
                p.role = PgRole::Down;
                p.died = true;
            }
        }
    }

    /// The guard, with what is known of postgres now; carries out its fence.
    fn guard(&self, s: &mut Sys, m: usize, observed: bool) {
        let Some(pg) = s.pg[m].clone() else { return };
        let f = &s.w[m].known;
        let input = GuardInput {
            now: self.now(s, m),
            named_primary: f.primary.as_deref() == Some(self.names[m].as_str()),
            epoch: f.epoch,
            lease_deadline: self.deadline(s, m),
            role: Some(pg.role),
            postmaster_alive: pg.role != PgRole::Down,
            died: observed && pg.died,
            unresponsive_since: None,
            observed_at: self.now(s, m),
            busy: false,
            busy_ended: None,
            hung_after_ms: 60_000,
            // The model's group has three voters: a primary must stop at its deadline.
            lease_needed: true,
        };
        for a in guard::step(&mut s.w[m].guard, &input) {
            if let GuardAction::Fence { .. } = a {
                Self::kill(s, m);
            }
        }
    }

    fn observation(&self, s: &Sys, m: usize) -> Option<Observation> {
        let pg = s.pg[m].as_ref()?;
        let w = &s.w[m];
        let epoch = w.known.epoch;
        let streaming = pg.upstream.is_some_and(|u| self.streams_from(s, m, u));
        Some(Observation {
            member: self.names[m].clone(),
            cluster: CLUSTER.into(),
            role: pg.role,
            timeline: pg.tli,
            flush_lsn: pg.wal.len() as u64,
            replay_lsn: pg.wal.len() as u64,
            streaming,
            receiving: pg.role == PgRole::Replica && pg.upstream.is_some(),
            epoch_seen: w.epoch_seen,
            crashed: w.guard.crashed_at_epoch == Some(epoch)
                || w.guard.fenced_at_epoch == Some(epoch),
            epoch,
            degraded: false,
            sync_since: None,
            standbys: (0..self.n())
                .filter(|&j| pg.role == PgRole::Primary && self.streams_from(s, j, m))
                .map(|j| (self.names[j].clone(), SyncState::Quorum))
                .collect(),
            recovered: 0,
            restarted: 0,
            incarnation: w.incarnation,
            seq: w.seq,
            error: None,
            replay_lag_ms: None,
        })
    }

    /// The sidecar's round: watchdog, observe, report, plan and act.
    fn act(&self, s: &mut Sys, m: usize) {
        self.guard(s, m, true);
        let f = s.w[m].known.clone();
        let Some(pg) = s.pg[m].clone() else { return };
        let upstream = pg.upstream.map(|u| self.names[u].clone());
        let action = plan_local(&self.names[m], &f, pg.role, upstream.as_deref());
        let did = match action {
            LocalAction::Nothing => {
                // A standby that cannot stream because it diverged is rewound (the sidecar's
                // escalation: rewind, else clone).
                if let Some(u) = pg.upstream {
                    if pg.role == PgRole::Replica {
                        self.rewind_if_diverged(s, m, u);
                    }
                }
                true
            }
            LocalAction::StartDetached => {
                if !pg.was_primary {
                    let p = s.pg[m].as_mut().expect("data member");
                    p.role = PgRole::Replica;
                    p.upstream = None;
                    p.died = false;
                }
                true
            }
            LocalAction::Promote | LocalAction::StartPrimary => {
                let g = &s.w[m].guard;
                if !self.lease_valid(s, m)
                    || g.crashed_at_epoch == Some(f.epoch)
                    || g.fenced_at_epoch == Some(f.epoch)
                {
                    false
                } else {
                    let sync = f.sync_standbys.iter().filter_map(|n| self.idx(n)).collect();
                    let p = s.pg[m].as_mut().expect("data member");
                    if !p.was_primary {
                        p.tli += 1;
                    }
                    p.role = PgRole::Primary;
                    p.upstream = None;
                    p.died = false;
                    p.was_primary = true;
                    p.sync = (sync, f.sync_quorum);
                    true
                }
            }
            LocalAction::Fence | LocalAction::Demote => {
                Self::kill(s, m);
                true
            }
            LocalAction::Detach => {
                s.pg[m].as_mut().expect("data member").upstream = None;
                true
            }
            LocalAction::Follow { primary } | LocalAction::StartReplica { primary } => {
                match self.idx(&primary) {
                    Some(u) => self.follow(s, m, u),
                    None => false,
                }
            }
            LocalAction::InitPrimary | LocalAction::DataDirLost => false,
        };
        if did {
            s.w[m].epoch_seen = s.w[m].epoch_seen.max(f.epoch);
        }
        // The primary's synchronous_standby_names follow the facts (widened in Raft first).
        if f.primary.as_deref() == Some(self.names[m].as_str()) {
            if let Some(p) = s.pg[m].as_mut().filter(|p| p.role == PgRole::Primary) {
                p.sync = (
                    f.sync_standbys.iter().filter_map(|n| self.idx(n)).collect(),
                    f.sync_quorum,
                );
            }
        }
        // Then it observes again and reports (once per tick): the observation is taken after
        // the action, so it may be paired with the epoch acted on.
        if s.w[m].reported < REPORTS_PER_TICK {
            // Reports are numbered by the tick and their place in it: the same order as a
            // counter, without telling apart states that differ only in how often a member
            // reported before.
            s.w[m].seq = s.t * 8 + u64::from(s.w[m].reported) + 1;
            if let Some(obs) = self.observation(s, m) {
                s.reports[m] = Some((obs, self.now(s, m)));
            }
            s.w[m].reported += 1;
        }
    }

    fn source_ok(&self, s: &Sys, m: usize, u: usize) -> bool {
        Self::running(s, u, PgRole::Primary) && self.up(s, m, u)
    }

    fn rewind_if_diverged(&self, s: &mut Sys, m: usize, u: usize) {
        if !self.source_ok(s, m, u) {
            return;
        }
        let src = s.pg[u].clone().expect("source");
        let p = s.pg[m].as_mut().expect("data member");
        if !src.wal.starts_with(&p.wal) {
            let common = p
                .wal
                .iter()
                .zip(&src.wal)
                .take_while(|(a, b)| a == b)
                .count();
            p.wal.truncate(common);
            p.tli = src.tli;
        }
    }

    /// Follow `u` (a running standby just repoints; a primary or a stopped server is stopped,
    /// rewound against `u` if needed, and started as its standby).
    fn follow(&self, s: &mut Sys, m: usize, u: usize) -> bool {
        let pg = s.pg[m].clone().expect("data member");
        match pg.role {
            PgRole::Replica => {
                s.pg[m].as_mut().expect("data member").upstream = Some(u);
                true
            }
            PgRole::Primary | PgRole::Down => {
                if pg.role == PgRole::Primary {
                    let p = s.pg[m].as_mut().expect("data member");
                    p.role = PgRole::Down;
                    p.died = false;
                }
                if !self.source_ok(s, m, u) {
                    if pg.was_primary {
                        return false; // a former primary is started only after a rewind check
                    }
                } else {
                    self.rewind_if_diverged(s, m, u);
                }
                let p = s.pg[m].as_mut().expect("data member");
                p.role = PgRole::Replica;
                p.upstream = Some(u);
                p.died = false;
                p.was_primary = false;
                p.sync = (BTreeSet::new(), 0);
                true
            }
            _ => false,
        }
    }

    fn replicate(&self, s: &mut Sys, m: usize) -> bool {
        let Some(u) = s.pg[m].as_ref().and_then(|p| p.upstream) else {
            return false;
        };
        if !self.streams_from(s, m, u) {
            return false;
        }
        let src = s.pg[u].clone().expect("upstream");
        let p = s.pg[m].as_mut().expect("data member");
        p.tli = src.tli;
        if p.wal.len() >= src.wal.len() {
            return false;
        }
        p.wal.push(src.wal[p.wal.len()]);
        // The primary hears the flush: what enough sync standbys hold is acknowledged.
        for id in &src.wal {
            let holders = src
                .sync
                .0
                .iter()
                .filter(|&&j| {
                    self.streams_from(s, j, u)
                        && s.pg[j].as_ref().is_some_and(|x| x.wal.contains(id))
                })
                .count();
            if !src.sync.0.is_empty() && holders as u32 >= src.sync.1 {
                s.acked.insert(*id);
            }
        }
        true
    }

    fn deliver_report(&self, s: &mut Sys, m: usize) {
        let Some((obs, sent)) = s.reports[m].take() else {
            return;
        };
        let Some(l) = s.leader else { return };
        let now = self.now(s, l);
        let facts = s.facts.clone();
        let majority = self.majority(s, l);
        let Some(arb) = s.arbiter.as_mut() else {
            return;
        };
        let Some(req) = arb.on_renewal(obs, true, &facts, now) else {
            return;
        };
        if !majority {
            return;
        }
        let mut granted = arb.confirm_grant(&req, &facts, now);
        if self.mutation == Mutation::GrantWhileMoving && !granted {
            granted = facts.cluster(CLUSTER).is_some_and(|f| {
                f.epoch == req.epoch && f.primary.as_deref() == Some(req.member.as_str())
            });
        }
        if granted {
            s.acks[m] = Some((l, sent, s.w[m].incarnation));
        }
    }

    fn deliver_ack(s: &mut Sys, m: usize) {
        let Some((_, sent, inc)) = s.acks[m].take() else {
            return;
        };
        let w = &mut s.w[m];
        if w.alive && w.incarnation == inc && w.lease_sent.is_none_or(|x| x < sent) {
            w.lease_sent = Some(sent);
        }
    }

    fn decide(&self, s: &mut Sys) {
        let Some(l) = s.leader else { return };
        let now = self.now(s, l);
        let mut facts = s.facts.clone();
        if self.mutation == Mutation::CandidateOneReportFewer {
            if let Some(c) = facts.clusters.get_mut(CLUSTER) {
                if c.primary.is_none() {
                    c.sync_quorum += 1;
                }
            }
        }
        let Some(arb) = s.arbiter.as_mut() else {
            return;
        };
        for a in arb.tick(&facts, now) {
            if let Action::Propose { command, .. } = a {
                if s.pending.is_none() {
                    s.pending = Some(command);
                }
            }
        }
    }

    fn commit(&self, s: &mut Sys) {
        let (Some(l), Some(command)) = (s.leader, s.pending.take()) else {
            return;
        };
        let before = self.cluster(s).epoch;
        s.log_index += 1;
        s.facts
            .apply(s.log_index, &proposal(command, &self.names[l]));
        strip(&mut s.facts);
        if self.cluster(s).epoch < before {
            s.bad = Some(format!(
                "epochs only grow: {before} -> {}",
                self.cluster(s).epoch
            ));
        }
        if let Some(arb) = s.arbiter.as_mut() {
            arb.on_proposed(CLUSTER);
        }
        // Raft replicates the entry to every member the leader reaches.
        let f = self.cluster(s).clone();
        for m in 0..self.n() {
            if s.w[m].alive && self.up(s, l, m) {
                s.w[m].known = f.clone();
            }
        }
    }

    fn learn(&self, s: &mut Sys, m: usize) {
        let f = self.cluster(s).clone();
        if f.epoch < s.w[m].known.epoch {
            s.bad = Some(format!(
                "epochs only grow: {} learned epoch {} after {}",
                self.names[m], f.epoch, s.w[m].known.epoch
            ));
        }
        s.w[m].known = f;
    }

    fn elect(&self, s: &mut Sys, m: usize) {
        s.leader = Some(m);
        s.pending = None;
        let mut arb = Arbiter::new(self.arbiter_cfg.clone());
        arb.on_leadership(true, self.now(s, m));
        s.arbiter = Some(arb);
        let f = self.cluster(s).clone();
        s.w[m].known = f; // a Raft leader holds every committed entry
    }

    fn tick(&self, s: &mut Sys) {
        s.t += 1;
        for m in 0..self.n() {
            s.w[m].reported = 0;
            if s.w[m].alive {
                self.guard(s, m, false);
            }
        }
    }

    fn restart_watcher(&self, s: &mut Sys, m: usize) {
        let w = &mut s.w[m];
        w.alive = true;
        w.incarnation += 1;
        w.seq = 0;
        w.guard = GuardState::default();
        w.epoch_seen = 0;
        w.reported = 0;
        // Its first step is the watchdog, with the lease record of the previous run.
        self.guard(s, m, false);
    }

    fn crash_watcher(&self, s: &mut Sys, m: usize) {
        s.w[m].alive = false;
        s.acks[m] = None;
        if s.leader == Some(m) {
            s.leader = None;
            s.arbiter = None;
            s.pending = None;
        }
    }

    fn eligible_leader(&self, s: &Sys, m: usize) -> bool {
        self.majority(s, m)
            && s.leader != Some(m)
            && s.leader
                .is_none_or(|l| !self.majority(s, l) || !s.w[l].alive)
    }

    /// The fault-free, fair continuation used by the liveness check; safety is checked after
    /// every round of it too.
    fn settle(&self, s: &Sys) -> Result<(), Box<(Sys, Option<String>)>> {
        let mut s = s.clone();
        s.cut.clear();
        for m in 0..self.n() {
            if !s.w[m].alive {
                self.restart_watcher(&mut s, m);
            }
        }
        for _ in 0..60 {
            if let Err(e) = self.safety(&s) {
                return Err(Box::new((s, Some(e))));
            }
            if self.recovered(&s) {
                return Ok(());
            }
            if s.leader.is_none_or(|l| !self.majority(&s, l)) {
                if let Some(m) = (0..self.n()).find(|&m| self.eligible_leader(&s, m)) {
                    self.elect(&mut s, m);
                }
            }
            for m in 0..self.n() {
                self.learn(&mut s, m);
            }
            for m in 0..self.n() {
                self.act(&mut s, m);
                self.deliver_report(&mut s, m);
            }
            self.decide(&mut s);
            self.commit(&mut s);
            for m in 0..self.n() {
                Self::deliver_ack(&mut s, m);
            }
            while (0..self.n()).any(|m| self.replicate(&mut s, m)) {}
            self.tick(&mut s);
        }
        if self.recovered(&s) {
            Ok(())
        } else {
            Err(Box::new((s, None)))
        }
    }

    /// The named primary runs, can acknowledge, and holds every acknowledged write.
    fn recovered(&self, s: &Sys) -> bool {
        let Some(p) = self.cluster(s).primary.as_deref().and_then(|p| self.idx(p)) else {
            return false;
        };
        self.can_ack(s, p)
            && s.pg[p]
                .as_ref()
                .is_some_and(|x| s.acked.iter().all(|id| x.wal.contains(id)))
    }
}

fn proposal(command: Command, by: &str) -> Proposal {
    Proposal {
        command,
        at_ms: 0,
        by: by.into(),
        asked_by: None,
    }
}

/// History and operation records are for people; they do not change a decision.
fn strip(f: &mut Facts) {
    for c in f.clusters.values_mut() {
        c.history.clear();
    }
}

impl Model for System {
    type State = Sys;

    fn init(&self) -> Vec<(String, Sys)> {
        let mut out = Vec::new();
        // The old primary (a) and the others (b, and c alike) each slow or fast; the leader in
        // the primary's room or in another. From each, every situation's script.
        for leader in 0..2 {
            for mask in 0..4u32 {
                let rate: Vec<u64> = (0..self.n())
                    .map(|m| {
                        if mask & (1 << m.min(1)) != 0 {
                            FAST
                        } else {
                            SLOW
                        }
                    })
                    .collect();
                let start = format!(
                    "a primary, leader {}, clocks {}",
                    self.names[leader],
                    (0..self.n())
                        .map(|m| format!("{} {}%", self.names[m], rate[m]))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                for situation in &self.situations {
                    let (steps, state) = self.script(self.initial(leader, rate.clone()), situation);
                    let mut label = start.clone();
                    for step in steps {
                        label.push_str(" -> ");
                        label.push_str(&step);
                    }
                    out.push((label, state));
                }
            }
        }
        out
    }

    fn next(&self, s: &Sys, out: &mut Vec<(String, Sys)>) {
        let n = self.n();
        let b = &self.bounds;
        let name = |m: usize| self.names[m].as_str();
        let mut push = |label: String, x: Sys| {
            if x != *s {
                out.push((label, x));
            }
        };
        for m in 0..n {
            if s.pg[m].is_some() && s.w[m].alive {
                let mut x = s.clone();
                let sent = s.w[m].reported < REPORTS_PER_TICK;
                self.act(&mut x, m);
                // The report it sent arrives at once (and the lease answer with it), or later.
                let reachable = x.leader.is_some_and(|l| self.up(&x, m, l) && x.w[l].alive);
                if sent && reachable {
                    let mut y = x.clone();
                    self.deliver_report(&mut y, m);
                    if y.acks[m].is_some() {
                        let mut z = y.clone();
                        Self::deliver_ack(&mut z, m);
                        push(
                            format!("{}'s sidecar runs a round; its lease is renewed", name(m)),
                            z,
                        );
                        push(
                            format!("{}'s sidecar runs a round; its report arrives", name(m)),
                            y,
                        );
                    } else {
                        push(
                            format!("{}'s sidecar runs a round; its report arrives", name(m)),
                            y,
                        );
                    }
                }
                push(format!("{}'s sidecar runs a round", name(m)), x);
            }
            if s.writes < b.writes && Self::running(s, m, PgRole::Primary) {
                let mut x = s.clone();
                let id = x.next_write;
                x.pg[m].as_mut().expect("data member").wal.push(id);
                x.next_write += 1;
                x.writes += 1;
                push(format!("a client writes #{id} on {}", name(m)), x);
            }
            {
                let mut x = s.clone();
                if self.replicate(&mut x, m) {
                    push(format!("{} replicates one record", name(m)), x);
                }
            }
            if s.reports[m].is_some() {
                if s.leader.is_some_and(|l| self.up(s, m, l) && s.w[l].alive) {
                    let mut x = s.clone();
                    self.deliver_report(&mut x, m);
                    push(format!("the leader receives {}'s report", name(m)), x);
                }
                if s.drops < b.drops {
                    let mut x = s.clone();
                    x.reports[m] = None;
                    x.drops += 1;
                    push(format!("{}'s report is lost", name(m)), x);
                    if s.leader.is_some_and(|l| self.up(s, m, l) && s.w[l].alive) {
                        // Duplicated: one copy arrives, the other stays in flight.
                        let mut x = s.clone();
                        let copy = x.reports[m].clone();
                        self.deliver_report(&mut x, m);
                        x.reports[m] = copy;
                        x.drops += 1;
                        push(
                            format!("the leader receives a copy of {}'s report", name(m)),
                            x,
                        );
                    }
                }
            }
            if let Some((from, _, _)) = s.acks[m] {
                if self.up(s, from, m) {
                    let mut x = s.clone();
                    Self::deliver_ack(&mut x, m);
                    push(format!("{} receives its lease renewal", name(m)), x);
                }
                if s.drops < b.drops {
                    let mut x = s.clone();
                    x.acks[m] = None;
                    x.drops += 1;
                    push(format!("{}'s lease renewal is lost", name(m)), x);
                }
            }
            if s.w[m].alive
                && s.w[m].known != *self.cluster(s)
                && s.leader.is_some_and(|l| self.up(s, m, l))
            {
                let mut x = s.clone();
                self.learn(&mut x, m);
                push(
                    format!(
                        "{} learns the committed facts (epoch {})",
                        name(m),
                        x.w[m].known.epoch
                    ),
                    x,
                );
            }
            if self.eligible_leader(s, m) {
                let mut x = s.clone();
                self.elect(&mut x, m);
                push(format!("{} is elected Raft leader", name(m)), x);
            }
            if s.faults < b.faults {
                if Self::running(s, m, PgRole::Primary) || Self::running(s, m, PgRole::Replica) {
                    let mut x = s.clone();
                    Self::kill(&mut x, m);
                    x.faults += 1;
                    push(format!("{}'s postmaster crashes", name(m)), x);
                }
                if s.w[m].alive {
                    let mut x = s.clone();
                    self.crash_watcher(&mut x, m);
                    x.faults += 1;
                    push(format!("{}'s watcher process dies", name(m)), x);
                }
                let mut x = s.clone();
                for j in 0..n {
                    if j != m {
                        x.cut.insert((m.min(j), m.max(j)));
                    }
                }
                x.faults += 1;
                push(format!("room {} is cut off", name(m)), x);
                for j in m + 1..n {
                    let mut x = s.clone();
                    x.cut.insert((m, j));
                    x.faults += 1;
                    push(format!("the link {}-{} is cut", name(m), name(j)), x);
                }
            }
            if !s.w[m].alive {
                let mut x = s.clone();
                self.restart_watcher(&mut x, m);
                push(format!("{}'s watcher restarts", name(m)), x);
            }
        }
        if !s.cut.is_empty() {
            let mut x = s.clone();
            x.cut.clear();
            push("the network heals".into(), x);
        }
        if let Some(l) = s.leader.filter(|&l| s.w[l].alive) {
            match &s.pending {
                None => {
                    // A decision to wait changes only the reason shown to people: not a step.
                    let mut x = s.clone();
                    self.decide(&mut x);
                    if let Some(c) = &x.pending {
                        let what = describe(c);
                        push(format!("the leader {} proposes {what}", name(l)), x);
                    }
                }
                Some(c) if self.majority(s, l) => {
                    let what = describe(c);
                    let mut x = s.clone();
                    self.commit(&mut x);
                    push(
                        format!("{what} commits (epoch {})", self.cluster(&x).epoch),
                        x,
                    );
                }
                Some(_) => {
                    let mut x = s.clone();
                    x.pending = None;
                    if let Some(a) = x.arbiter.as_mut() {
                        a.on_proposed(CLUSTER);
                    }
                    push("the proposal fails (no majority)".into(), x);
                }
            }
        }
        // Last, so that a depth-first search tries the protocol's own steps first.
        if s.t < b.max_t {
            let mut x = s.clone();
            self.tick(&mut x);
            push(format!("time passes (t = {} ms)", x.t * TICK_MS), x);
        }
    }

    fn safety(&self, s: &Sys) -> Result<(), String> {
        if let Some(b) = &s.bad {
            return Err(b.clone());
        }
        let n = self.n();
        let ackers: Vec<&str> = (0..n)
            .filter(|&m| self.can_ack(s, m))
            .map(|m| self.names[m].as_str())
            .collect();
        if ackers.len() > 1 {
            return Err(format!(
                "one writer: {} can all acknowledge commits",
                ackers.join(" and ")
            ));
        }
        let writers: Vec<&str> = (0..n)
            .filter(|&m| Self::running(s, m, PgRole::Primary) && s.w[m].alive)
            .map(|m| self.names[m].as_str())
            .collect();
        if writers.len() > 1 {
            return Err(format!(
                "the lease: {} both run as primary with their watchers alive",
                writers.join(" and ")
            ));
        }
        if let Some(p) = self.cluster(s).primary.as_deref().and_then(|p| self.idx(p)) {
            if let Some(pg) = s.pg[p].as_ref().filter(|x| x.role == PgRole::Primary) {
                let lost: Vec<u8> = s
                    .acked
                    .iter()
                    .filter(|id| !pg.wal.contains(id))
                    .copied()
                    .collect();
                if !lost.is_empty() {
                    return Err(format!(
                        "no acknowledged write lost: the primary {} lacks {lost:?}",
                        self.names[p]
                    ));
                }
            }
        }
        Ok(())
    }

    fn liveness(&self, s: &Sys) -> Result<(), String> {
        let Err(failed) = self.settle(s) else {
            return Ok(());
        };
        let (end, unsafe_) = *failed;
        Err(match unsafe_ {
            Some(e) => format!(
                "{e}, in the fault-free continuation after this state; it ended as: {}",
                self.show(&end)
            ),
            None => format!(
                "60 fault-free rounds after this state left no primary that can acknowledge \
                 every acknowledged write; it ended as: {} (leader's reason: {:?})",
                self.show(&end),
                end.arbiter.as_ref().and_then(|a| a.waiting(CLUSTER))
            ),
        })
    }

    fn show(&self, s: &Sys) -> String {
        let f = self.cluster(s);
        let mut parts = vec![format!(
            "t={} facts: primary {:?} epoch {}; leader {:?}{}",
            s.t * TICK_MS,
            f.primary,
            f.epoch,
            s.leader.map(|l| self.names[l].as_str()),
            if s.cut.is_empty() {
                String::new()
            } else {
                format!(
                    "; cut {}",
                    s.cut
                        .iter()
                        .map(|(i, j)| format!("{}-{}", self.names[*i], self.names[*j]))
                        .collect::<Vec<_>>()
                        .join(",")
                )
            }
        )];
        for m in 0..self.n() {
            let w = &s.w[m];
            let pg = match &s.pg[m] {
                Some(p) => format!(
                    "{:?} tli {} wal {:?}{}",
                    p.role,
                    p.tli,
                    p.wal,
                    p.upstream
                        .map(|u| format!(" <- {}", self.names[u]))
                        .unwrap_or_default()
                ),
                None => "no database".into(),
            };
            parts.push(format!(
                "{}: {pg}; watcher {} knows e{}{}",
                self.names[m],
                if w.alive { "up" } else { "DOWN" },
                w.known.epoch,
                match w.lease_sent {
                    Some(x) if s.pg[m].is_some() =>
                        format!(" lease to {} (now {})", LEASE.fence_at(x), self.now(s, m)),
                    _ => String::new(),
                }
            ));
        }
        parts.push(format!("acked {:?}", s.acked));
        parts.join(" | ")
    }
}

fn describe(c: &Command) -> String {
    match c {
        Command::SetPrimary { member, .. } => format!("SetPrimary({member})"),
        Command::ClearPrimary { reason, .. } => format!("ClearPrimary ({reason})"),
        Command::SetSyncSet {
            standbys, quorum, ..
        } => format!("SetSyncSet(ANY {quorum} {standbys:?})"),
        other => other.kind().to_string(),
    }
}
