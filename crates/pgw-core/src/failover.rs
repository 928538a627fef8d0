//! Who may be primary: the leader's decision rule and each data member's local plan. Pure.
//!
//! An unplanned failover takes two committed steps:
//! 1. `ClearPrimary` (epoch e -> e+1): the old primary is no longer primary. Every data member
//!    that sees it stops its postgres from following or acting as the old primary: a primary is
//!    stopped (fenced), a replica detaches (empty `primary_conninfo`). Because the old primary
//!    runs in strict synchronous mode, once its standbys have detached it cannot acknowledge a
//!    commit any more, even if its own watcher is hung.
//! 2. `SetPrimary(candidate)` (e+1 -> e+2), chosen by [`choose_candidate`] from the detached
//!    replicas' final flushed LSNs (invariant 2). The candidate promotes; the others follow it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::facts::{ClusterFacts, Command, Operation, OperationKind, Standby, Upstream};

/// What the local PostgreSQL is doing, as its sidecar sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "snake_case")]
pub enum PgRole {
    /// Accepting writes (not in recovery).
    Primary,
    /// In recovery (a standby).
    Replica,
    /// Not running, but its data directory holds a cluster.
    Down,
    /// No data directory yet.
    Empty,
    /// The postmaster is alive but does not answer (starting, shutting down, hung, or out of
    /// connections). Never treated as stopped.
    Unknown,
}

/// One sidecar report about its local PostgreSQL of one cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Hash)]
pub struct Observation {
    pub member: String,
    pub cluster: String,
    pub role: PgRole,
    pub timeline: u32,
    /// Primary: WAL flushed locally. Replica: WAL received and flushed by the walreceiver.
    pub flush_lsn: u64,
    pub replay_lsn: u64,
    /// Whether a walreceiver is streaming (replicas).
    pub streaming: bool,
    /// Whether a walreceiver process exists at all, in any state (replicas). Only a replica
    /// without one has a final WAL position: a walreceiver that is shutting down may still
    /// flush WAL after it stopped `streaming`.
    #[serde(default)]
    pub receiving: bool,
    /// The highest epoch of the cluster facts the sidecar has acted on.
    pub epoch_seen: u64,
    /// Set by a primary's sidecar that saw its postmaster die: it will not restart it as a
    /// primary, so the group need not wait for the lease.
    pub crashed: bool,
    /// The facts epoch the sidecar saw when it made this report (`crashed` refers to it).
    #[serde(default)]
    pub epoch: u64,
    /// Primary only: it has had no standby for `degrade_after_ms` and asks to run degraded
    /// (the group records the empty sync set first; only then does postgres stop waiting).
    #[serde(default)]
    pub degraded: bool,
    /// Primary only, after degraded mode: its flushed LSN right after it applied the widened
    /// sync set (commits from here on are synchronous again).
    #[serde(default)]
    pub sync_since: Option<u64>,
    /// Primary only: standbys connected (application_name -> sync_state).
    pub standbys: BTreeMap<String, SyncState>,
    /// The highest recovery operation (`pgwctl recover`) this member has carried out.
    #[serde(default)]
    pub recovered: u64,
    /// The highest restart operation (`pgwctl restart`) this member has carried out.
    #[serde(default)]
    pub restarted: u64,
    /// Which run of the sidecar made this report, and its place in that run: reports travel
    /// concurrently (a renewal must not wait for the previous one's round trip), so the leader
    /// keeps a report only if it is newer than the one it has from the same run.
    #[serde(default)]
    pub incarnation: u64,
    #[serde(default)]
    pub seq: u64,
    /// The server answered but refused the sidecar (why, with the SQLSTATE): it is running,
    /// its state unknown; shown in status, never treated as a hang.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Replicas: milliseconds since the last replayed transaction was committed upstream
    /// (0 when everything received is replayed; `None` unknown). Status only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_lag_ms: Option<u64>,
}

impl Observation {
    /// Whether this report should replace `older` (same member, received `older_age_ms` ago):
    /// a later one of the same run, one of a later run (a restarted sidecar starts counting
    /// again; runs are numbered by their start time), or anything once the kept one is older
    /// than any report can be in flight (so a run numbered lower by a clock step is not shut
    /// out).
    pub fn supersedes(&self, older: &Observation, older_age_ms: u64, in_flight_ms: u64) -> bool {
        (self.incarnation, self.seq) > (older.incarnation, older.seq) || older_age_ms > in_flight_ms
    }
}

/// A standby's `pg_stat_replication.sync_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncState {
    Sync,
    Quorum,
    Potential,
    Async,
    /// Anything else a server says (a newer release's value).
    #[serde(other)]
    Unknown,
}

impl SyncState {
    pub fn parse(s: &str) -> SyncState {
        match s {
            "sync" => SyncState::Sync,
            "quorum" => SyncState::Quorum,
            "potential" => SyncState::Potential,
            "async" => SyncState::Async,
            _ => SyncState::Unknown,
        }
    }

    /// Its flush can acknowledge a commit (`sync`, or one of the `ANY k` quorum).
    pub fn is_synchronous(self) -> bool {
        matches!(self, SyncState::Sync | SyncState::Quorum)
    }
}

/// A data member as the decision rule needs it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Candidate {
    pub name: String,
    pub priority: u32,
}

/// The leader's knowledge of one cluster at one instant.
#[derive(Debug, Clone)]
pub struct LeaderView<'a> {
    pub facts: &'a ClusterFacts,
    /// Latest report per member, with the leader-clock time it arrived (ms).
    pub reports: &'a BTreeMap<String, (Observation, u64)>,
    pub data_members: &'a [Candidate],
    /// Leader monotonic clock (ms).
    pub now: u64,
    /// A report older than this is not fresh.
    pub fresh_ms: u64,
    /// Earliest leader-clock time the current primary may be replaced if silent
    /// (see [`crate::lease::LeaseTiming::replace_after`]).
    pub replace_after: u64,
    /// Preferred member for the very first primary, if configured.
    pub bootstrap: Option<&'a str>,
    pub sync_quorum: u32,
    /// The cluster may run without synchronous standbys (see `allow_degraded`).
    pub allow_degraded: bool,
    /// Standby clusters: the main group's primary as the leader last read it.
    pub main: Option<&'a Upstream>,
    /// A silent primary may be replaced once its lease ran out (three voters or more; see
    /// `Config::silent_primary_replaceable`).
    pub replace_silent: bool,
}

/// What the leader should do about one cluster now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing to do.
    Steady,
    /// Propose this command.
    Propose(Command),
    /// Something must happen but cannot yet; the reason is shown in status and logs.
    Wait(String),
}

impl LeaderView<'_> {
    fn fresh(&self, member: &str) -> Option<&Observation> {
        self.reports
            .get(member)
            .filter(|(_, at)| self.now.saturating_sub(*at) <= self.fresh_ms)
            .map(|(o, _)| o)
    }

    fn priority(&self, member: &str) -> u32 {
        self.data_members
            .iter()
            .find(|c| c.name == member)
            .map(|c| c.priority)
            .unwrap_or(0)
    }
}

/// The sync standby set the group wants for a primary: every other data member.
pub fn desired_sync_set(data_members: &[Candidate], primary: &str) -> BTreeSet<String> {
    data_members
        .iter()
        .filter(|c| c.name != primary)
        .map(|c| c.name.clone())
        .collect()
}

/// The leader's rule. Deterministic in its inputs.
pub fn decide(v: &LeaderView<'_>) -> Decision {
    if v.facts.paused {
        return Decision::Steady;
    }
    if let Some(sb) = &v.facts.standby {
        return decide_standby(v, sb);
    }
    decide_unpaused(v)
}

/// The name a standby cluster's sidecars give the main group's primary (no member name can
/// contain `@`).
pub const MAIN_UPSTREAM: &str = "@main";

/// A standby cluster of another group (`standby_of`): its primary is the *standby leader*, a
/// replica of the main group's primary that the others replicate from (cascading, all
/// asynchronous). It never accepts writes, so replacing it needs no fencing and no proof of
/// completeness: the most advanced replica takes over. The leader follows the main group's
/// primary wherever it moves (`SetUpstream`).
fn decide_standby(v: &LeaderView<'_>, sb: &Standby) -> Decision {
    let f = v.facts;
    let cluster = f.name.clone();
    if let Some(m) = v.main {
        let newer = sb.upstream.as_ref().is_none_or(|u| u.epoch <= m.epoch);
        if sb.upstream.as_ref() != Some(m) && newer {
            return Decision::Propose(Command::SetUpstream {
                cluster,
                upstream: m.clone(),
            });
        }
    }
    let replace = |why: String| {
        // The most advanced replica (a cascade of the old leader, or of the main group);
        // at the very start, any member that reports (it clones from the main group).
        let mut best: Vec<&Observation> = v
            .data_members
            .iter()
            .filter(|c| Some(c.name.as_str()) != f.primary.as_deref())
            .filter_map(|c| v.fresh(&c.name))
            .filter(|o| !o.crashed && matches!(o.role, PgRole::Replica | PgRole::Down))
            .collect();
        if best.is_empty() && f.epoch == 0 {
            best = v
                .data_members
                .iter()
                .filter_map(|c| v.fresh(&c.name))
                .filter(|o| o.role == PgRole::Empty)
                .collect();
            if let Some(b) = v.bootstrap {
                if best.iter().any(|o| o.member == b) {
                    best.retain(|o| o.member == b);
                }
            }
        }
        match best.iter().max_by(|a, b| {
            (a.role == PgRole::Replica)
                .cmp(&(b.role == PgRole::Replica))
                .then(a.timeline.cmp(&b.timeline))
                .then(
                    a.replay_lsn
                        .max(a.flush_lsn)
                        .cmp(&b.replay_lsn.max(b.flush_lsn)),
                )
                .then(v.priority(&a.member).cmp(&v.priority(&b.member)))
                .then(b.member.cmp(&a.member))
        }) {
            Some(o) => Decision::Propose(Command::SetPrimary {
                cluster: cluster.clone(),
                member: o.member.clone(),
                sync_standbys: Some(BTreeSet::new()),
                expected_epoch: f.epoch,
                reason: format!("standby leader: {} ({why})", o.member),
            }),
            None => Decision::Wait(format!("no member to lead the standby cluster ({why})")),
        }
    };
    let Some(p) = &f.primary else {
        return replace("the standby cluster has no leader yet".into());
    };
    match v.fresh(p) {
        Some(o) if o.crashed && o.epoch == f.epoch => replace(format!("{p}'s postgres crashed")),
        Some(o) if o.role == PgRole::Replica && !f.bootstrapped => {
            let _ = o;
            Decision::Propose(Command::MarkBootstrapped { cluster })
        }
        Some(o) if o.role == PgRole::Primary => Decision::Wait(format!(
            "{p} runs as a primary although the cluster is a standby; its sidecar fences it"
        )),
        Some(_) => Decision::Steady,
        None if v.now >= v.replace_after => replace(format!("{p} is silent")),
        None => Decision::Wait(format!("{p} is silent; waiting before replacing it")),
    }
}

fn decide_unpaused(v: &LeaderView<'_>) -> Decision {
    let f = v.facts;
    let cluster = f.name.clone();
    match &f.primary {
        None if f.epoch == 0 => bootstrap(v),
        None => match choose_candidate(v) {
            Ok(member) => Decision::Propose(Command::SetPrimary {
                cluster,
                member: member.clone(),
                    sync_standbys: Some(desired_sync_set(v.data_members, &member)),
                expected_epoch: f.epoch,
                reason: format!("failover: {member} holds every acknowledged commit"),
            }),
            Err(why) => match restart_in_place(v) {
                Some(former) => Decision::Propose(Command::SetPrimary {
                    cluster,
                    member: former.clone(),
                    sync_standbys: Some(desired_sync_set(v.data_members, &former)),
                    expected_epoch: f.epoch,
                    reason: format!("restart in place: no replica is proven complete ({why}); {former} was the last primary"),
                }),
                None => Decision::Wait(why),
            },
        },
        Some(p) => {
            let obs = v.fresh(p);
            let healthy = obs.is_some_and(|o| o.role == PgRole::Primary && !o.crashed);
            if healthy {
                let o = obs.cloned().unwrap_or_else(|| unreachable_obs(p));
                if !f.bootstrapped {
                    return Decision::Propose(Command::MarkBootstrapped { cluster });
                }
                if f.resync_pending {
                    if let Some(lsn) = o.sync_since {
                        return Decision::Propose(Command::ResyncDone { cluster, lsn });
                    }
                }
                // Degraded mode: the primary stopped waiting for standbys (narrowed in postgres
                // first); record the empty set. It is widened again only once a standby streams.
                if o.degraded {
                    if f.sync_standbys.is_empty() {
                        return Decision::Steady;
                    }
                    return Decision::Propose(Command::SetSyncSet {
                        cluster,
                        standbys: BTreeSet::new(),
                        quorum: f.sync_quorum.max(1),
                        expected_epoch: f.epoch,
                    });
                }
                let want = desired_sync_set(v.data_members, p);
                if f.sync_standbys.is_empty() && !want.is_empty() && f.epoch > 0 && o.standbys.is_empty() && v.allow_degraded {
                    return Decision::Wait(format!("{p} runs degraded (no standby connected)"));
                }
                if want != f.sync_standbys || (f.sync_quorum != v.sync_quorum && !want.is_empty()) {
                    let quorum = v.sync_quorum.min(want.len() as u32).max(1);
                    return Decision::Propose(Command::SetSyncSet {
                        cluster,
                        standbys: want,
                        quorum,
                        expected_epoch: f.epoch,
                    });
                }
                return Decision::Steady;
            }
            if let Some(o) = obs {
                // A primary whose sidecar declared it crashed (it will not restart it) is
                // released at once. A primary that is merely down is being (re)started by its
                // sidecar, which keeps renewing the lease; if that sidecar goes silent, the
                // lease rule below applies.
                // (A primary still in recovery is being promoted; if that fails its sidecar
                // declares it crashed.)
                // It ran degraded (commits acknowledged without a standby) and the group has
                // not recorded that yet (a primary that nothing else could replace narrows
                // first): record it before anything else, so that no standby is taken for
                // complete.
                if o.crashed && o.degraded && !f.sync_standbys.is_empty() && o.epoch == f.epoch {
                    return Decision::Propose(Command::SetSyncSet {
                        cluster,
                        standbys: BTreeSet::new(),
                        quorum: f.sync_quorum.max(1),
                        expected_epoch: f.epoch,
                    });
                }
                if o.crashed && o.epoch == f.epoch {
                    return Decision::Propose(Command::ClearPrimary {
                        cluster,
                        expected_epoch: f.epoch,
                        reason: format!("{p}: postgres crashed"),
                    });
                }
                // Its sidecar is alive and working on it (starting, promoting).
                return Decision::Wait(format!("{p} is not serving yet ({:?})", o.role));
            }
            if !v.replace_silent {
                Decision::Wait(format!(
                    "{p} is silent; with fewer than three voters a silent primary is never replaced automatically (a lost room is recovered by pg-watcher --force-new-group --i-know-the-others-are-down)"
                ))
            } else if v.now >= v.replace_after {
                Decision::Propose(Command::ClearPrimary {
                    cluster,
                    expected_epoch: f.epoch,
                    reason: format!("{p}: lost (no report, lease expired)"),
                })
            } else {
                Decision::Wait(format!("{p} is silent; waiting for its lease to expire"))
            }
        }
    }
}

fn unreachable_obs(member: &str) -> Observation {
    Observation {
        member: member.to_string(),
        cluster: String::new(),
        role: PgRole::Down,
        timeline: 0,
        flush_lsn: 0,
        replay_lsn: 0,
        streaming: false,
        epoch_seen: 0,
        crashed: false,
        epoch: 0,
        degraded: false,
        sync_since: None,
        standbys: BTreeMap::new(),
        recovered: 0,
        restarted: 0,
        incarnation: 0,
        seq: 0,
        receiving: false,
        error: None,
        replay_lag_ms: None,
    }
}

fn bootstrap(v: &LeaderView<'_>) -> Decision {
    let f = v.facts;
    let primaries: Vec<&Observation> = v
        .data_members
        .iter()
        .filter_map(|c| v.fresh(&c.name))
        .filter(|o| o.role == PgRole::Primary)
        .collect();
    if primaries.len() > 1 {
        let names: Vec<&str> = primaries.iter().map(|o| o.member.as_str()).collect();
        return Decision::Wait(format!(
            "refusing to bootstrap: several servers already run as primary: {}",
            names.join(", ")
        ));
    }
    let chosen = if let Some(o) = primaries.first() {
        Some(o.member.clone())
    } else if v
        .data_members
        .iter()
        .any(|c| v.fresh(&c.name).is_some_and(|o| o.role != PgRole::Empty))
    {
        return Decision::Wait(
            "refusing to bootstrap: a member has an existing data directory but none runs as primary; start it or clear it"
                .into(),
        );
    } else if let Some(b) = v.bootstrap {
        v.fresh(b).map(|_| b.to_string())
    } else {
        let mut alive: Vec<&Candidate> = v
            .data_members
            .iter()
            .filter(|c| v.fresh(&c.name).is_some())
            .collect();
        alive.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.name.cmp(&b.name)));
        alive.first().map(|c| c.name.clone())
    };
    match chosen {
        Some(member) => {
            // Record the sync set before the first primary exists, so that it never runs
            // without synchronous standbys (widen in Raft before postgres).
            let want = desired_sync_set(v.data_members, &member);
            if f.sync_standbys != want && !want.is_empty() {
                let quorum = v.sync_quorum.min(want.len() as u32).max(1);
                return Decision::Propose(Command::SetSyncSet {
                    cluster: f.name.clone(),
                    standbys: want,
                    quorum,
                    expected_epoch: 0,
                });
            }
            Decision::Propose(Command::SetPrimary {
                cluster: f.name.clone(),
                member: member.clone(),
                sync_standbys: Some(desired_sync_set(v.data_members, &member)),
                expected_epoch: 0,
                reason: format!("bootstrap: {member} becomes the first primary"),
            })
        }
        None => Decision::Wait("waiting for the bootstrap member's sidecar to report".into()),
    }
}

/// When no replica can be proven to hold every acknowledged commit, the last primary still
/// can: every commit it acknowledged is in its own WAL, and no other primary has been
/// appointed since (the facts say so). It qualifies when its sidecar reports its postgres
/// stopped (not wiped) and has acted on the current epoch (so it is not running as primary).
fn restart_in_place(v: &LeaderView<'_>) -> Option<String> {
    let former = v.facts.former_primary.as_ref()?;
    let o = v.fresh(former)?;
    // Give the standbys the chance first: every one that is reporting must have acted on this
    // epoch (detached) before we conclude that none of them can be proven complete.
    let standbys_acted = v
        .facts
        .sync_standbys
        .iter()
        .all(|m| v.fresh(m).is_none_or(|s| s.epoch_seen >= v.facts.epoch));
    (o.role == PgRole::Down && o.epoch_seen >= v.facts.epoch && standbys_acted)
        .then(|| former.clone())
}

/// Invariant 2: with `ANY k (n standbys)`, at least `n - k + 1` standbys of the recorded sync
/// set must have reported after detaching (so every acknowledged commit is on one of them), and
/// the candidate must have the highest flushed LSN among them, on the highest timeline. Ties
/// go to the higher priority, then the smaller name.
pub fn choose_candidate(v: &LeaderView<'_>) -> Result<String, String> {
    choose_candidate_preferring(v, None)
}

/// [`choose_candidate`], where `preferred` wins ties on WAL position (a switchover target).
pub fn choose_candidate_preferring(
    v: &LeaderView<'_>,
    preferred: Option<&str>,
) -> Result<String, String> {
    let f = v.facts;
    if f.resync_pending {
        return Err("the sync set is being re-established after degraded mode; no replica is proven complete yet".into());
    }
    let n = f.sync_standbys.len();
    if n == 0 {
        return Err("no synchronous standby is recorded; no replica is proven to hold every acknowledged commit".into());
    }
    let k = (f.sync_quorum as usize).clamp(1, n);
    let need = n - k + 1;
    let reporters: Vec<&Observation> = f
        .sync_standbys
        .iter()
        .filter_map(|m| v.fresh(m))
        .filter(|o| {
            o.role == PgRole::Replica && !o.streaming && !o.receiving && o.epoch_seen >= f.epoch
        })
        .collect();
    // After degraded mode only standbys past the resync point can hold every acked commit.
    let reporters: Vec<&Observation> = reporters
        .into_iter()
        .filter(|o| o.flush_lsn >= f.resync_lsn)
        .collect();
    if reporters.len() < need {
        let names: Vec<&str> = reporters.iter().map(|o| o.member.as_str()).collect();
        return Err(format!(
            "{} of {n} sync standbys have reported detached [{}]; ANY {k} needs {need}",
            reporters.len(),
            names.join(", ")
        ));
    }
    let max_tli = reporters.iter().map(|o| o.timeline).max().unwrap_or(0);
    let best = reporters
        .iter()
        .filter(|o| o.timeline == max_tli)
        .max_by(|a, b| {
            a.flush_lsn
                .cmp(&b.flush_lsn)
                .then(
                    (Some(a.member.as_str()) == preferred)
                        .cmp(&(Some(b.member.as_str()) == preferred)),
                )
                .then(v.priority(&a.member).cmp(&v.priority(&b.member)))
                .then(b.member.cmp(&a.member))
        })
        .ok_or_else(|| "no candidate on the current timeline".to_string())?;
    let max_lsn = reporters.iter().map(|o| o.flush_lsn).max().unwrap_or(0);
    if best.flush_lsn < max_lsn {
        return Err(format!(
            "the most advanced standby is on an older timeline than {}; refusing",
            best.member
        ));
    }
    Ok(best.member.clone())
}

/// A forced failover whose target cannot be proven complete is refused after this long.
pub const FORCED_REFUSAL_MS: u64 = 5_000;

/// The leader's rule while an operator operation runs; it takes precedence over [`decide`]
/// (and works while automation is paused: the operator asked for it). `age_ms` is how long the
/// operation has run; after `timeout_ms` a switchover that could not complete is failed and
/// ordinary failover rules take over.
pub fn decide_operation(
    v: &LeaderView<'_>,
    op: &Operation,
    age_ms: u64,
    timeout_ms: u64,
) -> Decision {
    let f = v.facts;
    let cluster = f.name.clone();
    let finish = |ok: bool, detail: String| {
        Decision::Propose(Command::FinishOperation {
            cluster: cluster.clone(),
            id: op.id,
            succeeded: ok,
            detail,
        })
    };
    let serving = |m: &str| v.fresh(m).is_some_and(|o| o.role == PgRole::Primary);
    let Some(t) = op.target.clone() else {
        if op.kind == OperationKind::Failover && op.accept_data_loss {
            return most_advanced_survivor(v, op, age_ms, timeout_ms);
        }
        return finish(false, "operation has no target".into());
    };
    match (&f.primary, op.kind) {
        (Some(p), OperationKind::Restart) if *p == t => {
            // The primary restarts in place. Its watcher keeps renewing the lease meanwhile, so
            // automation waits for it; once it falls silent, the ordinary rules (lease expiry)
            // apply as to any silent primary.
            let Some(o) = v.fresh(&t) else {
                return decide(v);
            };
            if o.restarted >= op.id && o.role == PgRole::Primary && o.epoch == f.epoch {
                return finish(
                    true,
                    format!("{t} restarted in place, primary at epoch {}", f.epoch),
                );
            }
            if age_ms > timeout_ms {
                return finish(
                    false,
                    format!(
                        "{t} did not come back as primary within {} s",
                        timeout_ms / 1000
                    ),
                );
            }
            Decision::Wait(format!("{t} (the primary) is restarting in place"))
        }
        (_, OperationKind::Recover | OperationKind::Restart) => {
            // A rebuild or a replica's restart never holds up automation: the failover rules
            // keep running meanwhile.
            let recover = op.kind == OperationKind::Recover;
            if f.primary.as_deref() == Some(t.as_str()) {
                return finish(false, format!("{t} became the primary during its recovery"));
            }
            let done = v.fresh(&t).is_some_and(|o| {
                (if recover { o.recovered } else { o.restarted }) >= op.id
                    && o.role == PgRole::Replica
                    && o.streaming
                    && o.epoch_seen >= f.epoch
            }) && f
                .primary
                .as_deref()
                .and_then(|p| v.fresh(p))
                .is_some_and(|p| p.standbys.contains_key(&t));
            if done {
                let p = f.primary.clone().unwrap_or_default();
                return finish(
                    true,
                    if recover {
                        format!("{t} rebuilt and streaming from {p}")
                    } else {
                        format!("{t} restarted and streaming again from {p}")
                    },
                );
            }
            if age_ms > timeout_ms {
                return finish(
                    false,
                    format!(
                        "{t} did not come back as a streaming replica within {} s",
                        timeout_ms / 1000
                    ),
                );
            }
            match decide(v) {
                Decision::Steady | Decision::Wait(_) => Decision::Wait(if recover {
                    format!("{t} is being rebuilt from the primary")
                } else {
                    format!("{t} is restarting")
                }),
                d => d,
            }
        }
        (Some(p), _) if *p == t => {
            if serving(p) {
                finish(true, format!("{t} is primary (epoch {})", f.epoch))
            } else {
                Decision::Wait(format!("{t} is being promoted"))
            }
        }
        (Some(p), OperationKind::Switchover) => {
            finish(false, format!("{p} became primary instead of {t}"))
        }
        (Some(p), OperationKind::Failover) => {
            if serving(p) && !v.fresh(p).is_some_and(|o| o.crashed) {
                return finish(false, format!("{p} is a healthy primary; use a switchover"));
            }
            if age_ms > timeout_ms {
                return finish(
                    false,
                    format!("{p} could not be released within {} s", timeout_ms / 1000),
                );
            }
            // Release the lost primary under the usual rules (crash report or lease expiry).
            match decide_unpaused(v) {
                d @ Decision::Propose(Command::ClearPrimary { .. }) => d,
                Decision::Wait(w) => Decision::Wait(w),
                _ => Decision::Wait(format!("waiting to release {p}")),
            }
        }
        (None, OperationKind::Switchover) => {
            if age_ms > timeout_ms {
                return finish(
                    false,
                    format!(
                        "timed out after {} s; ordinary failover rules apply",
                        timeout_ms / 1000
                    ),
                );
            }
            if let Some(old) = &f.former_primary {
                match v.fresh(old).map(|o| o.role) {
                    Some(PgRole::Down) => {}
                    _ => return Decision::Wait(format!("waiting for {old} to shut down cleanly")),
                }
            }
            match choose_candidate_preferring(v, Some(&t)) {
                Ok(c) if c == t => Decision::Propose(Command::SetPrimary {
                    cluster,
                    member: t.clone(),
                    sync_standbys: Some(desired_sync_set(v.data_members, &t)),
                    expected_epoch: f.epoch,
                    reason: format!(
                        "switchover (operation {}): {t} has all WAL of the old primary",
                        op.id
                    ),
                }),
                Ok(c) => Decision::Wait(format!("{t} is behind {c}; waiting for it to catch up")),
                Err(why) => Decision::Wait(why),
            }
        }
        (None, OperationKind::Failover) => {
            let forced = |why: String| {
                let ok = v.fresh(&t).is_some_and(|o| {
                    o.role == PgRole::Replica
                        && !o.streaming
                        && !o.receiving
                        && o.epoch_seen >= f.epoch
                });
                if ok {
                    Decision::Propose(Command::SetPrimary {
                        cluster: cluster.clone(),
                        member: t.clone(),
                        sync_standbys: Some(desired_sync_set(v.data_members, &t)),
                        expected_epoch: f.epoch,
                        reason: format!(
                            "forced failover (operation {}), data loss accepted: {why}",
                            op.id
                        ),
                    })
                } else {
                    Decision::Wait(format!("{t} has not reported as a detached replica yet"))
                }
            };
            match choose_candidate(v) {
                Ok(c) if c == t => Decision::Propose(Command::SetPrimary {
                    cluster,
                    member: t.clone(),
                    sync_standbys: Some(desired_sync_set(v.data_members, &t)),
                    expected_epoch: f.epoch,
                    reason: format!("forced failover (operation {}): {t} holds every acknowledged commit", op.id),
                }),
                Ok(c) if op.accept_data_loss => forced(format!("{c} has more WAL")),
                Ok(c) => finish(
                    false,
                    format!("refused: {c} has more WAL than {t}; promoting {t} could lose acknowledged commits (pass --accept-data-loss to do it anyway)"),
                ),
                Err(why) if op.accept_data_loss => forced(why),
                // Reports need a moment after the detach; then refuse rather than hang.
                Err(why) if age_ms > timeout_ms.min(FORCED_REFUSAL_MS) => finish(
                    false,
                    format!("refused: {t} cannot be proven to hold every acknowledged commit: {why} (pass --accept-data-loss to do it anyway)"),
                ),
                Err(why) => Decision::Wait(why),
            }
        }
    }
}

/// How long a forced recovery waits for every surviving server to report before it promotes
/// the most advanced of those that did.
pub const RECOVERY_WAIT_MS: u64 = 15_000;

/// The forced failover of a recovery after losing the majority (`--force-new-group`): no
/// target was named; once every surviving server has reported as a detached replica (or
/// [`RECOVERY_WAIT_MS`] has passed and at least one has), the most advanced one (highest
/// timeline, then WAL position, then priority) is promoted. Commits the lost primary
/// acknowledged after that position are lost: the promotion says which position it kept.
fn most_advanced_survivor(
    v: &LeaderView<'_>,
    op: &Operation,
    age_ms: u64,
    timeout_ms: u64,
) -> Decision {
    let f = v.facts;
    let finish = |ok: bool, detail: String| {
        Decision::Propose(Command::FinishOperation {
            cluster: f.name.clone(),
            id: op.id,
            succeeded: ok,
            detail,
        })
    };
    if let Some(p) = &f.primary {
        return if v.fresh(p).is_some_and(|o| o.role == PgRole::Primary) {
            finish(true, format!("{p} is primary (epoch {})", f.epoch))
        } else {
            Decision::Wait(format!("{p} is being promoted"))
        };
    }
    let detached: Vec<&Observation> = v
        .data_members
        .iter()
        .filter_map(|c| v.fresh(&c.name))
        .filter(|o| {
            o.role == PgRole::Replica && !o.streaming && !o.receiving && o.epoch_seen >= f.epoch
        })
        .collect();
    let all = detached.len() == v.data_members.len();
    if detached.is_empty() || (!all && age_ms < RECOVERY_WAIT_MS) {
        if age_ms > timeout_ms {
            return finish(
                false,
                format!(
                    "no surviving server reported as a detached replica within {} s",
                    timeout_ms / 1000
                ),
            );
        }
        let names: Vec<&str> = detached.iter().map(|o| o.member.as_str()).collect();
        return Decision::Wait(format!(
            "forced recovery: {} of {} surviving servers reported detached [{}]",
            detached.len(),
            v.data_members.len(),
            names.join(", ")
        ));
    }
    let Some(best) = detached.iter().max_by(|a, b| {
        a.timeline
            .cmp(&b.timeline)
            .then(a.flush_lsn.cmp(&b.flush_lsn))
            .then(v.priority(&a.member).cmp(&v.priority(&b.member)))
            .then(b.member.cmp(&a.member))
    }) else {
        return Decision::Wait("forced recovery: no surviving server reported".into());
    };
    let lsn = best.flush_lsn;
    Decision::Propose(Command::SetPrimary {
        cluster: f.name.clone(),
        member: best.member.clone(),
        sync_standbys: Some(desired_sync_set(v.data_members, &best.member)),
        expected_epoch: f.epoch,
        reason: format!(
            "forced recovery (operation {}), data loss accepted: {} is the most advanced of {} surviving server(s) (timeline {}, WAL {:X}/{:X}); commits the lost primary acknowledged after {:X}/{:X} are lost",
            op.id,
            best.member,
            detached.len(),
            best.timeline,
            lsn >> 32,
            lsn & 0xffff_ffff,
            lsn >> 32,
            lsn & 0xffff_ffff,
        ),
    })
}

/// What a data member's sidecar should do with its local postgres.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalAction {
    Nothing,
    /// Create a new cluster and start it as primary (bootstrap).
    InitPrimary,
    /// Start the existing cluster as a primary.
    StartPrimary,
    /// Promote the local standby.
    Promote,
    /// Make postgres stop acting as primary (stop it at once).
    Fence,
    /// Shut the primary down cleanly for a switchover: a fast shutdown sends all WAL to the
    /// connected standbys before it completes.
    Demote,
    /// Stop following anyone (empty `primary_conninfo`).
    Detach,
    /// Follow `primary` (clone first if empty, rewind first if diverged).
    Follow {
        primary: String,
    },
    /// Start postgres (as a standby) to follow `primary`.
    StartReplica {
        primary: String,
    },
    /// Start a stopped standby without an upstream (only standby data directories).
    StartDetached,
    /// We are the recorded primary but our data directory is empty after bootstrap: a lost
    /// disk. Never initdb over it; hand over.
    DataDirLost,
}

/// The local plan: a pure function of the committed facts and what postgres is doing.
/// `upstream` is the member the local standby currently follows, if any.
pub fn plan_local(
    me: &str,
    facts: &ClusterFacts,
    role: PgRole,
    upstream: Option<&str>,
) -> LocalAction {
    if let Some(sb) = &facts.standby {
        return plan_standby(me, facts, sb, role, upstream);
    }
    match (&facts.primary, role) {
        (Some(p), PgRole::Empty) if p == me && !facts.bootstrapped => LocalAction::InitPrimary,
        (Some(p), PgRole::Empty) if p == me => LocalAction::DataDirLost,
        (_, PgRole::Unknown) => LocalAction::Nothing,
        (Some(p), PgRole::Down) if p == me => LocalAction::StartPrimary,
        (Some(p), PgRole::Replica) if p == me => LocalAction::Promote,
        (Some(p), PgRole::Primary) if p == me => LocalAction::Nothing,
        (Some(p), PgRole::Primary) => LocalAction::Follow { primary: p.clone() },
        (Some(p), PgRole::Replica) if upstream != Some(p.as_str()) => {
            LocalAction::Follow { primary: p.clone() }
        }
        (Some(_), PgRole::Replica) => LocalAction::Nothing,
        (Some(p), PgRole::Down) | (Some(p), PgRole::Empty) => {
            LocalAction::StartReplica { primary: p.clone() }
        }
        (None, PgRole::Primary) if facts.epoch > 0 && facts.switchover_target.is_some() => {
            LocalAction::Demote
        }
        (None, PgRole::Primary) if facts.epoch > 0 => LocalAction::Fence,
        // During a switchover standbys keep streaming from the old primary until it is down,
        // so they receive everything it wrote before its shutdown checkpoint.
        (None, PgRole::Replica)
            if facts.switchover_target.is_some()
                && upstream.is_some()
                && upstream == facts.former_primary.as_deref() =>
        {
            LocalAction::Nothing
        }
        (None, PgRole::Replica) if upstream.is_some() => LocalAction::Detach,
        // A stopped standby is started detached so that it can report its WAL position.
        (None, PgRole::Down) if facts.epoch > 0 => LocalAction::StartDetached,
        (None, _) => LocalAction::Nothing,
    }
}

/// A standby cluster's server: the standby leader replicates from the main group's primary
/// ([`MAIN_UPSTREAM`]), every other server from the standby leader; none ever runs as a
/// primary (one that does is fenced).
fn plan_standby(
    me: &str,
    facts: &ClusterFacts,
    sb: &Standby,
    role: PgRole,
    upstream: Option<&str>,
) -> LocalAction {
    match role {
        PgRole::Unknown => return LocalAction::Nothing,
        PgRole::Primary => return LocalAction::Fence,
        _ => {}
    }
    let source = match facts.primary.as_deref() {
        Some(p) if p == me && sb.upstream.is_some() => MAIN_UPSTREAM,
        Some(p) if p != me => p,
        // No leader, or the main group's primary not found yet: keep what runs.
        _ => {
            return match role {
                PgRole::Down if facts.bootstrapped => LocalAction::StartDetached,
                _ => LocalAction::Nothing,
            }
        }
    };
    match role {
        PgRole::Replica if upstream == Some(source) => LocalAction::Nothing,
        PgRole::Replica => LocalAction::Follow {
            primary: source.to_string(),
        },
        PgRole::Down | PgRole::Empty => LocalAction::StartReplica {
            primary: source.to_string(),
        },
        _ => LocalAction::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::{Facts, Outcome, Proposal};
    use proptest::prelude::*;

    fn members() -> Vec<Candidate> {
        ["a", "b", "c"]
            .iter()
            .map(|n| Candidate {
                name: n.to_string(),
                priority: if *n == "c" { 50 } else { 100 },
            })
            .collect()
    }

    #[test]
    fn concurrent_reports_never_replace_a_newer_one() {
        let mut a = obs("a", PgRole::Replica, 10, true, 1);
        a.incarnation = 7;
        a.seq = 5;
        let mut older = a.clone();
        older.seq = 4;
        let mut newer = a.clone();
        newer.seq = 6;
        assert!(!older.supersedes(&a, 0, 2000));
        assert!(!a.clone().supersedes(&a, 0, 2000));
        assert!(newer.supersedes(&a, 0, 2000));
        // A restarted sidecar counts from 1 again: its reports are taken...
        let mut restarted = a.clone();
        restarted.incarnation = 8;
        restarted.seq = 1;
        assert!(restarted.supersedes(&a, 0, 2000));
        // ...and a late report of the earlier run does not displace them.
        assert!(!a.supersedes(&restarted, 0, 2000));
        // A kept report older than anything in flight is replaced whatever the numbering.
        assert!(older.supersedes(&a, 2001, 2000));
    }

    fn obs(m: &str, role: PgRole, lsn: u64, streaming: bool, epoch: u64) -> Observation {
        Observation {
            member: m.into(),
            cluster: "g".into(),
            role,
            timeline: 1,
            flush_lsn: lsn,
            replay_lsn: lsn,
            streaming,
            epoch_seen: epoch,
            crashed: false,
            epoch,
            degraded: false,
            sync_since: None,
            standbys: BTreeMap::new(),
            recovered: 0,
            restarted: 0,
            incarnation: 0,
            seq: 0,
            receiving: false,
            error: None,
            replay_lag_ms: None,
        }
    }

    fn facts_with(primary: Option<&str>, epoch: u64, sync: &[&str], k: u32) -> ClusterFacts {
        let mut f = Facts::default();
        let p = |c| Proposal {
            command: c,
            at_ms: 0,
            by: "t".into(),
            asked_by: None,
        };
        f.apply(
            1,
            &p(Command::EnsureCluster {
                cluster: "g".into(),
                sync_quorum: k,
                standby: false,
            }),
        );
        let mut c = f.cluster("g").cloned().expect("g");
        c.primary = primary.map(str::to_string);
        c.epoch = epoch;
        c.sync_standbys = sync.iter().map(|s| s.to_string()).collect();
        c.sync_quorum = k;
        c
    }

    fn view<'a>(
        f: &'a ClusterFacts,
        r: &'a BTreeMap<String, (Observation, u64)>,
        m: &'a [Candidate],
        now: u64,
        replace_after: u64,
    ) -> LeaderView<'a> {
        LeaderView {
            facts: f,
            reports: r,
            data_members: m,
            now,
            fresh_ms: 1000,
            replace_after,
            bootstrap: None,
            sync_quorum: 1,
            allow_degraded: false,
            main: None,
            replace_silent: true,
        }
    }

    fn restart_op(id: u64, target: &str) -> Operation {
        Operation {
            id,
            kind: OperationKind::Restart,
            target: Some(target.into()),
            state: crate::facts::OperationState::Running,
            detail: String::new(),
            started_ms: 0,
            finished_ms: None,
            by: "ops".into(),
            accept_data_loss: false,
            part_of: None,
        }
    }

    fn finished_ok(d: &Decision) -> bool {
        matches!(
            d,
            Decision::Propose(Command::FinishOperation {
                succeeded: true,
                ..
            })
        )
    }

    #[test]
    fn a_standby_cluster_follows_the_main_group_and_replaces_its_leader_without_fencing() {
        let m = members();
        let main = Upstream {
            member: "x".into(),
            postgres: "10.0.0.1:5432".into(),
            epoch: 3,
        };
        let mut f = facts_with(None, 0, &[], 1);
        f.standby = Some(Standby::default());
        let mut r = BTreeMap::new();
        for o in ["a", "b", "c"] {
            r.insert(o.to_string(), (obs(o, PgRole::Empty, 0, false, 0), 10));
        }
        let mut v = view(&f, &r, &m, 10, 0);
        v.main = Some(&main);
        assert_eq!(
            decide(&v),
            Decision::Propose(Command::SetUpstream {
                cluster: "g".into(),
                upstream: main.clone()
            })
        );
        f.standby = Some(Standby {
            upstream: Some(main.clone()),
        });
        let mut v = view(&f, &r, &m, 10, 0);
        v.main = Some(&main);
        // No leader yet: a member that reports leads (it clones from the main group).
        let d = decide(&v);
        assert!(
            matches!(d, Decision::Propose(Command::SetPrimary { ref member, ref sync_standbys, .. }) if member == "a" && sync_standbys.as_ref().is_some_and(|s| s.is_empty())),
            "{d:?}"
        );
        // An older main epoch is never followed back.
        let old = Upstream {
            epoch: 2,
            ..main.clone()
        };
        let mut v = view(&f, &r, &m, 10, 0);
        v.main = Some(&old);
        assert!(!matches!(
            decide(&v),
            Decision::Propose(Command::SetUpstream { .. })
        ));
        // Leading and streaming: bootstrapped, then steady.
        f.primary = Some("a".into());
        f.epoch = 1;
        r.insert(
            "a".to_string(),
            (obs("a", PgRole::Replica, 80, true, 1), 10),
        );
        for (o, lsn) in [("b", 90), ("c", 100)] {
            r.insert(o.to_string(), (obs(o, PgRole::Replica, lsn, true, 1), 10));
        }
        let d = decide(&view(&f, &r, &m, 10, 0));
        assert!(
            matches!(d, Decision::Propose(Command::MarkBootstrapped { .. })),
            "{d:?}"
        );
        f.bootstrapped = true;
        assert_eq!(decide(&view(&f, &r, &m, 10, 0)), Decision::Steady);
        // The leader falls silent: the most advanced replica takes over, no ClearPrimary.
        r.remove("a");
        assert!(matches!(
            decide(&view(&f, &r, &m, 10, 5000)),
            Decision::Wait(_)
        ));
        let d = decide(&view(&f, &r, &m, 10, 0));
        assert!(
            matches!(d, Decision::Propose(Command::SetPrimary { ref member, expected_epoch: 1, .. }) if member == "c"),
            "{d:?}"
        );
        // Where each server replicates from.
        let plan = |me: &str, role, up| plan_local(me, &f, role, up);
        assert_eq!(
            plan("a", PgRole::Empty, None),
            LocalAction::StartReplica {
                primary: MAIN_UPSTREAM.into()
            }
        );
        assert_eq!(
            plan("a", PgRole::Replica, Some(MAIN_UPSTREAM)),
            LocalAction::Nothing
        );
        assert_eq!(
            plan("b", PgRole::Replica, Some(MAIN_UPSTREAM)),
            LocalAction::Follow {
                primary: "a".into()
            }
        );
        assert_eq!(plan("b", PgRole::Replica, Some("a")), LocalAction::Nothing);
        assert_eq!(plan("b", PgRole::Primary, None), LocalAction::Fence);
    }

    #[test]
    fn with_fewer_than_three_voters_a_silent_primary_is_never_replaced() {
        let m = members();
        let f = facts_with(Some("a"), 4, &["b"], 1);
        let mut r = BTreeMap::new();
        r.insert(
            "b".to_string(),
            (obs("b", PgRole::Replica, 90, false, 4), 10),
        );
        let mut v = view(&f, &r, &m, 10_000, 0);
        assert!(matches!(
            decide(&v),
            Decision::Propose(Command::ClearPrimary { .. })
        ));
        v.replace_silent = false;
        assert!(matches!(decide(&v), Decision::Wait(ref w) if w.contains("never replaced")));
        // A crashed primary (its sidecar stopped it) is still released.
        let mut a = obs("a", PgRole::Down, 100, false, 4);
        a.crashed = true;
        r.insert("a".to_string(), (a, 10_000));
        let mut v = view(&f, &r, &m, 10_000, 0);
        v.replace_silent = false;
        assert!(matches!(
            decide(&v),
            Decision::Propose(Command::ClearPrimary { .. })
        ));
    }

    #[test]
    fn a_crashed_primary_that_ran_degraded_has_that_recorded_before_it_is_released() {
        let m = members();
        let f = facts_with(Some("a"), 4, &["b", "c"], 1);
        let mut r = BTreeMap::new();
        let mut a = obs("a", PgRole::Down, 500, false, 4);
        a.crashed = true;
        a.degraded = true;
        r.insert("a".to_string(), (a.clone(), 10));
        for o in ["b", "c"] {
            r.insert(o.to_string(), (obs(o, PgRole::Replica, 400, false, 4), 10));
        }
        let d = decide(&view(&f, &r, &m, 10, 0));
        assert!(
            matches!(d, Decision::Propose(Command::SetSyncSet { ref standbys, expected_epoch: 4, .. }) if standbys.is_empty()),
            "{d:?}"
        );
        // Recorded: now released as usual (and no standby is proven complete afterwards).
        let recorded = facts_with(Some("a"), 4, &[], 1);
        let d = decide(&view(&recorded, &r, &m, 10, 0));
        assert!(
            matches!(d, Decision::Propose(Command::ClearPrimary { .. })),
            "{d:?}"
        );
        // Not degraded: released at once.
        a.degraded = false;
        r.insert("a".to_string(), (a, 10));
        let d = decide(&view(&f, &r, &m, 10, 0));
        assert!(
            matches!(d, Decision::Propose(Command::ClearPrimary { .. })),
            "{d:?}"
        );
    }

    #[test]
    fn a_forced_recovery_waits_for_every_survivor_then_promotes_the_most_advanced() {
        // After --force-new-group: b and c survived, the primary a was lost; no target.
        let survivors = vec![
            Candidate {
                name: "b".into(),
                priority: 100,
            },
            Candidate {
                name: "c".into(),
                priority: 100,
            },
        ];
        let f = facts_with(None, 6, &["b", "c"], 1);
        let mut op = restart_op(9, "x");
        op.kind = OperationKind::Failover;
        op.target = None;
        op.accept_data_loss = true;
        let mut r = BTreeMap::new();
        r.insert(
            "b".to_string(),
            (obs("b", PgRole::Replica, 80, false, 6), 10),
        );
        // One of two reported: wait for the other (it may be the more advanced one)...
        let d = decide_operation(&view(&f, &r, &survivors, 10, 0), &op, 1_000, 120_000);
        assert!(
            matches!(d, Decision::Wait(ref w) if w.contains("1 of 2")),
            "{d:?}"
        );
        // ...but not forever: after the wait, the best of those that reported.
        let d = decide_operation(
            &view(&f, &r, &survivors, 10, 0),
            &op,
            RECOVERY_WAIT_MS + 1,
            120_000,
        );
        assert!(
            matches!(d, Decision::Propose(Command::SetPrimary { ref member, .. }) if member == "b"),
            "{d:?}"
        );
        // Both reported: the one with more WAL, at once, and the reason names its position.
        r.insert(
            "c".to_string(),
            (obs("c", PgRole::Replica, 0x1_0000_0090, false, 6), 10),
        );
        let d = decide_operation(&view(&f, &r, &survivors, 10, 0), &op, 1_000, 120_000);
        match d {
            Decision::Propose(Command::SetPrimary {
                member,
                expected_epoch,
                reason,
                ..
            }) => {
                assert_eq!((member.as_str(), expected_epoch), ("c", 6));
                assert!(reason.contains("1/90"), "{reason}");
            }
            d => panic!("{d:?}"),
        }
        // A survivor still streaming from someone has not acted on the epoch: not a candidate.
        let mut r2 = BTreeMap::new();
        r2.insert(
            "b".to_string(),
            (obs("b", PgRole::Replica, 80, true, 5), 10),
        );
        let d = decide_operation(&view(&f, &r2, &survivors, 10, 0), &op, 130_000, 120_000);
        assert!(
            matches!(
                d,
                Decision::Propose(Command::FinishOperation {
                    succeeded: false,
                    ..
                })
            ),
            "{d:?}"
        );
        // Promoted and serving: done.
        let mut done = facts_with(Some("c"), 7, &["b"], 1);
        done.operations.insert(9, op.clone());
        r.insert(
            "c".to_string(),
            (obs("c", PgRole::Primary, 0x1_0000_0090, false, 7), 10),
        );
        assert!(finished_ok(&decide_operation(
            &view(&done, &r, &survivors, 10, 0),
            &op,
            2_000,
            120_000
        )));
    }

    #[test]
    fn a_restart_of_the_primary_holds_automation_only_while_its_watcher_reports() {
        let m = members();
        let f = facts_with(Some("a"), 5, &["b", "c"], 1);
        let op = restart_op(7, "a");
        let mut r = BTreeMap::new();
        // Restarting: its postgres is down, its watcher reports; nothing moves.
        r.insert("a".to_string(), (obs("a", PgRole::Down, 0, false, 5), 10));
        for o in ["b", "c"] {
            r.insert(o.to_string(), (obs(o, PgRole::Replica, 90, true, 5), 10));
        }
        let v = view(&f, &r, &m, 10, 0);
        assert!(matches!(
            decide_operation(&v, &op, 1_000, 120_000),
            Decision::Wait(_)
        ));
        // Back as primary at the same epoch, having carried the operation out: done.
        let mut back = obs("a", PgRole::Primary, 100, false, 5);
        back.restarted = 7;
        r.insert("a".to_string(), (back.clone(), 10));
        assert!(finished_ok(&decide_operation(
            &view(&f, &r, &m, 10, 0),
            &op,
            2_000,
            120_000
        )));
        // An earlier restart's report does not finish this one.
        back.restarted = 6;
        r.insert("a".to_string(), (back, 10));
        assert!(!finished_ok(&decide_operation(
            &view(&f, &r, &m, 10, 0),
            &op,
            2_000,
            120_000
        )));
        // Its watcher falls silent: the ordinary rules (lease expiry, failover) apply.
        r.insert("a".to_string(), (obs("a", PgRole::Down, 0, false, 5), 0));
        let v = view(&f, &r, &m, 5_000, 4_000);
        assert_eq!(decide_operation(&v, &op, 5_000, 120_000), decide(&v));
        // Too long: the operation fails and automation takes over.
        r.insert(
            "a".to_string(),
            (obs("a", PgRole::Down, 0, false, 5), 130_000),
        );
        let v = view(&f, &r, &m, 130_000, 0);
        assert!(matches!(
            decide_operation(&v, &op, 130_000, 120_000),
            Decision::Propose(Command::FinishOperation {
                succeeded: false,
                ..
            })
        ));
    }

    #[test]
    fn a_restarted_replica_is_done_when_it_streams_to_the_primary_again() {
        let m = members();
        let mut f = facts_with(Some("a"), 5, &["b", "c"], 1);
        f.bootstrapped = true;
        let op = restart_op(9, "b");
        let mut r = BTreeMap::new();
        let mut a = obs("a", PgRole::Primary, 100, false, 5);
        a.standbys.insert("c".into(), SyncState::Quorum);
        r.insert("a".to_string(), (a.clone(), 10));
        let mut b = obs("b", PgRole::Replica, 100, true, 5);
        b.restarted = 9;
        r.insert("b".to_string(), (b, 10));
        r.insert(
            "c".to_string(),
            (obs("c", PgRole::Replica, 100, true, 5), 10),
        );
        // Streaming, but the primary does not see it yet.
        let d = decide_operation(&view(&f, &r, &m, 10, 0), &op, 1_000, 120_000);
        assert!(matches!(d, Decision::Wait(_)), "{d:?}");
        a.standbys.insert("b".into(), SyncState::Quorum);
        r.insert("a".to_string(), (a, 10));
        assert!(finished_ok(&decide_operation(
            &view(&f, &r, &m, 10, 0),
            &op,
            1_000,
            120_000
        )));
    }

    #[test]
    fn candidate_needs_n_minus_k_plus_one_detached_reports() {
        let m = members();
        let f = facts_with(None, 3, &["b", "c"], 1);
        let mut r = BTreeMap::new();
        r.insert(
            "b".to_string(),
            (obs("b", PgRole::Replica, 100, false, 3), 10),
        );
        // Only one of two standbys: ANY 1 (b, c) needs both.
        assert!(choose_candidate(&view(&f, &r, &m, 10, 0)).is_err());
        r.insert(
            "c".to_string(),
            (obs("c", PgRole::Replica, 120, false, 3), 10),
        );
        assert_eq!(
            choose_candidate(&view(&f, &r, &m, 10, 0)),
            Ok("c".to_string())
        );
        // Still streaming from the old primary: not final, not eligible.
        r.insert(
            "c".to_string(),
            (obs("c", PgRole::Replica, 120, true, 3), 10),
        );
        assert!(choose_candidate(&view(&f, &r, &m, 10, 0)).is_err());
        // Not streaming any more, but its walreceiver is still shutting down (and may flush
        // more WAL): its position is not final either.
        let mut stopping = obs("c", PgRole::Replica, 120, false, 3);
        stopping.receiving = true;
        r.insert("c".to_string(), (stopping, 10));
        assert!(choose_candidate(&view(&f, &r, &m, 10, 0)).is_err());
        // A stale epoch_seen means it has not detached for this failover yet.
        r.insert(
            "c".to_string(),
            (obs("c", PgRole::Replica, 120, false, 2), 10),
        );
        assert!(choose_candidate(&view(&f, &r, &m, 10, 0)).is_err());
        // ANY 2 (b, c): one report is enough.
        let f2 = facts_with(None, 3, &["b", "c"], 2);
        assert_eq!(
            choose_candidate(&view(&f2, &r, &m, 10, 0)),
            Ok("b".to_string())
        );
    }

    #[test]
    fn ties_go_to_priority_and_timeline_matters() {
        let m = members();
        let f = facts_with(None, 3, &["b", "c"], 1);
        let mut r = BTreeMap::new();
        r.insert(
            "b".to_string(),
            (obs("b", PgRole::Replica, 100, false, 3), 10),
        );
        r.insert(
            "c".to_string(),
            (obs("c", PgRole::Replica, 100, false, 3), 10),
        );
        assert_eq!(
            choose_candidate(&view(&f, &r, &m, 10, 0)),
            Ok("b".to_string())
        );
        let mut old_tli = obs("c", PgRole::Replica, 500, false, 3);
        old_tli.timeline = 0;
        r.insert("c".to_string(), (old_tli, 10));
        assert!(
            choose_candidate(&view(&f, &r, &m, 10, 0)).is_err(),
            "more WAL on an old timeline: refuse"
        );
    }

    #[test]
    fn silent_primary_waits_for_lease() {
        let m = members();
        let f = facts_with(Some("a"), 1, &["b", "c"], 1);
        let r = BTreeMap::new();
        assert!(matches!(
            decide(&view(&f, &r, &m, 100, 200)),
            Decision::Wait(_)
        ));
        assert!(matches!(
            decide(&view(&f, &r, &m, 200, 200)),
            Decision::Propose(Command::ClearPrimary {
                expected_epoch: 1,
                ..
            })
        ));
    }

    #[test]
    fn a_reporting_primary_is_not_replaced_on_lease_time() {
        let m = members();
        let f = facts_with(Some("b"), 3, &["c"], 1);
        let mut r = BTreeMap::new();
        r.insert(
            "b".to_string(),
            (obs("b", PgRole::Replica, 100, false, 3), 100),
        );
        assert!(
            matches!(decide(&view(&f, &r, &m, 100, 0)), Decision::Wait(_)),
            "being promoted"
        );
    }

    #[test]
    fn former_primary_restarts_in_place_only_without_a_proven_replica() {
        let m = members();
        let mut f = facts_with(None, 4, &["b", "c"], 1);
        f.former_primary = Some("a".into());
        let mut r = BTreeMap::new();
        r.insert("a".to_string(), (obs("a", PgRole::Down, 0, false, 4), 10));
        r.insert(
            "b".to_string(),
            (obs("b", PgRole::Replica, 100, false, 4), 10),
        );
        match decide(&view(&f, &r, &m, 10, 0)) {
            Decision::Propose(Command::SetPrimary { member, .. }) => assert_eq!(member, "a"),
            d => panic!("{d:?}"),
        }
        r.insert(
            "c".to_string(),
            (obs("c", PgRole::Replica, 90, false, 4), 10),
        );
        match decide(&view(&f, &r, &m, 10, 0)) {
            Decision::Propose(Command::SetPrimary { member, .. }) => assert_eq!(member, "b"),
            d => panic!("{d:?}"),
        }
        // A former primary that has not acted on this epoch (may still run) does not qualify.
        r.remove("c");
        r.insert("a".to_string(), (obs("a", PgRole::Down, 0, false, 3), 10));
        assert!(matches!(
            decide(&view(&f, &r, &m, 10, 0)),
            Decision::Wait(_)
        ));
    }

    #[test]
    fn promotion_records_the_full_sync_set_so_a_second_failure_waits() {
        // a failed, b is promoted from {b, c}: the recorded set must become {a, c}, not {c},
        // so that if b fails before c caught up, c alone is not "proven" complete.
        let m = members();
        let f = facts_with(None, 2, &["b", "c"], 1);
        let mut r = BTreeMap::new();
        r.insert(
            "b".to_string(),
            (obs("b", PgRole::Replica, 100, false, 2), 10),
        );
        r.insert(
            "c".to_string(),
            (obs("c", PgRole::Replica, 90, false, 2), 10),
        );
        let cmd = match decide(&view(&f, &r, &m, 10, 0)) {
            Decision::Propose(c @ Command::SetPrimary { .. }) => c,
            d => panic!("{d:?}"),
        };
        let mut facts = Facts::default();
        facts.clusters.insert("g".into(), f.clone());
        facts.apply(
            9,
            &Proposal {
                command: cmd,
                at_ms: 0,
                by: "t".into(),
                asked_by: None,
            },
        );
        let g = facts.cluster("g").expect("g");
        assert_eq!(
            g.sync_standbys.iter().cloned().collect::<Vec<_>>(),
            vec!["a".to_string(), "c".to_string()]
        );
        // b fails; only c reports: not enough for ANY 1 (a, c).
        let mut f2 = g.clone();
        f2.primary = None;
        f2.epoch += 1;
        let mut r2 = BTreeMap::new();
        r2.insert(
            "c".to_string(),
            (obs("c", PgRole::Replica, 95, false, f2.epoch), 10),
        );
        assert!(choose_candidate(&view(&f2, &r2, &m, 10, 0)).is_err());
    }

    #[test]
    fn an_empty_primary_after_bootstrap_is_a_lost_disk_not_a_new_cluster() {
        let mut f = facts_with(Some("a"), 1, &["b", "c"], 1);
        assert_eq!(
            plan_local("a", &f, PgRole::Empty, None),
            LocalAction::InitPrimary
        );
        f.bootstrapped = true;
        assert_eq!(
            plan_local("a", &f, PgRole::Empty, None),
            LocalAction::DataDirLost
        );
    }

    #[test]
    fn no_candidate_while_resync_is_pending_or_behind_the_resync_point() {
        let m = members();
        let mut f = facts_with(None, 5, &["b", "c"], 2);
        let mut r = BTreeMap::new();
        r.insert(
            "b".to_string(),
            (obs("b", PgRole::Replica, 100, false, 5), 10),
        );
        f.resync_pending = true;
        assert!(choose_candidate(&view(&f, &r, &m, 10, 0)).is_err());
        f.resync_pending = false;
        f.resync_lsn = 200;
        assert!(
            choose_candidate(&view(&f, &r, &m, 10, 0)).is_err(),
            "b lacks commits acked while degraded"
        );
        f.resync_lsn = 100;
        assert_eq!(
            choose_candidate(&view(&f, &r, &m, 10, 0)),
            Ok("b".to_string())
        );
    }

    #[test]
    fn crashed_primary_is_released_at_once() {
        let m = members();
        let f = facts_with(Some("a"), 1, &["b", "c"], 1);
        let mut r = BTreeMap::new();
        let mut o = obs("a", PgRole::Down, 100, false, 1);
        o.crashed = true;
        let mut stale = o.clone();
        stale.epoch = 0;
        r.insert("a".to_string(), (stale, 100));
        assert!(
            matches!(decide(&view(&f, &r, &m, 100, 10_000)), Decision::Wait(_)),
            "a crash report about an older epoch is ignored"
        );
        r.insert("a".to_string(), (o, 100));
        assert!(matches!(
            decide(&view(&f, &r, &m, 100, 10_000)),
            Decision::Propose(Command::ClearPrimary { .. })
        ));
    }

    #[test]
    fn bootstrap_picks_existing_primary_or_highest_priority() {
        let m = members();
        let f = facts_with(None, 0, &[], 1);
        let mut r = BTreeMap::new();
        r.insert("c".to_string(), (obs("c", PgRole::Empty, 0, false, 0), 10));
        r.insert("b".to_string(), (obs("b", PgRole::Empty, 0, false, 0), 10));
        // First the sync set for the future primary b, then b itself.
        match decide(&view(&f, &r, &m, 10, 0)) {
            Decision::Propose(Command::SetSyncSet { standbys, .. }) => {
                assert_eq!(
                    standbys.into_iter().collect::<Vec<_>>(),
                    vec!["a".to_string(), "c".to_string()]
                )
            }
            d => panic!("{d:?}"),
        }
        let mut f = facts_with(None, 0, &["a", "c"], 1);
        match decide(&view(&f, &r, &m, 10, 0)) {
            Decision::Propose(Command::SetPrimary { member, .. }) => assert_eq!(member, "b"),
            d => panic!("{d:?}"),
        }
        f.sync_standbys = ["a", "b"].iter().map(|s| s.to_string()).collect();
        r.insert(
            "c".to_string(),
            (obs("c", PgRole::Primary, 9, false, 0), 10),
        );
        match decide(&view(&f, &r, &m, 10, 0)) {
            Decision::Propose(Command::SetPrimary { member, .. }) => assert_eq!(member, "c"),
            d => panic!("{d:?}"),
        }
        r.insert(
            "b".to_string(),
            (obs("b", PgRole::Primary, 9, false, 0), 10),
        );
        assert!(matches!(
            decide(&view(&f, &r, &m, 10, 0)),
            Decision::Wait(_)
        ));
    }

    #[test]
    fn local_plan_table() {
        let f = facts_with(Some("a"), 2, &["b", "c"], 1);
        assert_eq!(
            plan_local("a", &f, PgRole::Primary, None),
            LocalAction::Nothing
        );
        assert_eq!(
            plan_local("a", &f, PgRole::Replica, Some("b")),
            LocalAction::Promote
        );
        assert_eq!(
            plan_local("b", &f, PgRole::Replica, Some("a")),
            LocalAction::Nothing
        );
        assert_eq!(
            plan_local("b", &f, PgRole::Replica, None),
            LocalAction::Follow {
                primary: "a".into()
            }
        );
        assert_eq!(
            plan_local("b", &f, PgRole::Primary, None),
            LocalAction::Follow {
                primary: "a".into()
            }
        );
        let none = facts_with(None, 3, &["b", "c"], 1);
        assert_eq!(
            plan_local("a", &none, PgRole::Primary, None),
            LocalAction::Fence
        );
        assert_eq!(
            plan_local("b", &none, PgRole::Replica, Some("a")),
            LocalAction::Detach
        );
        assert_eq!(
            plan_local("b", &none, PgRole::Replica, None),
            LocalAction::Nothing
        );
    }

    fn arb_obs(m: &'static str) -> impl Strategy<Value = Option<Observation>> {
        proptest::option::of((0u64..1000, any::<bool>(), 0u32..3, 0u64..6).prop_map(
            move |(lsn, streaming, tli, ep)| {
                let mut o = obs(m, PgRole::Replica, lsn, streaming, ep);
                o.timeline = tli;
                o
            },
        ))
    }

    proptest! {
        /// Whatever the reports, a chosen candidate holds every commit acknowledged under
        /// ANY k (sync set): for any set of k standbys that could have acknowledged the last
        /// commit, the candidate's flushed LSN is at least the smallest flushed LSN among them
        /// restricted to the reporters (a commit acked by k standbys is on at least one reporter).
        #[test]
        fn chosen_candidate_has_every_acknowledged_commit(
            ob in arb_obs("b"), oc in arb_obs("c"), k in 1u32..3, epoch in 1u64..6,
        ) {
            let m = members();
            let f = facts_with(None, epoch, &["b", "c"], k);
            let mut r = BTreeMap::new();
            for o in [ob, oc].into_iter().flatten() {
                r.insert(o.member.clone(), (o, 10u64));
            }
            let v = view(&f, &r, &m, 10, 0);
            if let Ok(c) = choose_candidate(&v) {
                let chosen = &r[&c].0;
                let eligible: Vec<&Observation> = r.values().map(|(o, _)| o)
                    .filter(|o| !o.streaming && o.epoch_seen >= epoch).collect();
                // Enough standbys reported that any k-subset of the set meets the reporters.
                prop_assert!(eligible.len() > 2 - k as usize, "n - k + 1 reporters");
                // The candidate has the most WAL of all eligible reporters.
                for o in &eligible {
                    prop_assert!(chosen.flush_lsn >= o.flush_lsn);
                }
                prop_assert!(!chosen.streaming);
            }
        }

        /// The leader never proposes a SetPrimary that the facts would reject, nor two primaries.
        #[test]
        fn proposals_apply(
            primary in proptest::option::of(prop_oneof![Just("a"), Just("b"), Just("c")]),
            epoch in 0u64..4,
            ob in arb_obs("b"), oc in arb_obs("c"),
            now in 0u64..3000, ra in 0u64..3000,
        ) {
            let m = members();
            let f = facts_with(primary, epoch, &["b", "c"], 1);
            let mut r = BTreeMap::new();
            for o in [ob, oc].into_iter().flatten() {
                r.insert(o.member.clone(), (o, now));
            }
            if let Decision::Propose(cmd) = decide(&view(&f, &r, &m, now, ra)) {
                let mut facts = Facts::default();
                facts.clusters.insert("g".into(), f.clone());
                let out = facts.apply(99, &Proposal { command: cmd, at_ms: 0, by: "t".into(), asked_by: None });
                prop_assert!(!matches!(out, Outcome::Rejected { .. }), "{out:?}");
            }
        }
    }
}
