//! The replicated cluster facts: what the Raft log decides, applied deterministically.
//!
//! `Facts::apply` is a pure function of the current facts, the log index and the proposal. It
//! never reads a clock (the proposer stamps `at_ms`) and never fails: a command that does not
//! fit the current facts is *rejected* (recorded as such, facts unchanged), so every member that
//! applies the same log reaches the same facts.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

/// How many history entries each cluster keeps (oldest dropped first).
pub const HISTORY_LIMIT: usize = 256;

/// A decision proposed to the Raft log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Hash)]
pub struct Proposal {
    pub command: Command,
    /// Wall-clock milliseconds at the proposer (informational; never used to decide).
    pub at_ms: u64,
    /// Member that proposed it.
    pub by: String,
    /// The operator who asked for it (certificate name or `token:<role>`), for operator
    /// requests; `None` for the group's own decisions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asked_by: Option<String>,
}

/// The decisions the group can take. Every variant is keyed by PostgreSQL cluster name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Command {
    /// Makes a configured cluster known to the group (idempotent). `standby`: it starts as a
    /// standby of another group's cluster (`standby_of`).
    EnsureCluster {
        cluster: String,
        sync_quorum: u32,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        standby: bool,
    },
    /// Standby cluster only: the main group's primary moved (or was first found); the standby
    /// leader follows `upstream` from now on.
    SetUpstream { cluster: String, upstream: Upstream },
    /// Standby cluster only (`pgwctl promote-group`): it becomes a normal cluster; its standby
    /// leader is promoted (epoch + 1). `lsn` is the WAL position the standby leader had
    /// replicated from the main group, as last reported.
    PromoteGroup {
        cluster: String,
        expected_epoch: u64,
        lsn: u64,
    },
    /// Assigns the primary role. Applies only if `expected_epoch` is the current epoch; the new
    /// epoch is `expected_epoch + 1` (the fencing token).
    SetPrimary {
        cluster: String,
        member: String,
        expected_epoch: u64,
        reason: String,
        /// The sync set the new primary will replicate to, recorded in the same entry so that
        /// the set never shrinks to exclude standbys that may be needed to prove a commit.
        #[serde(default)]
        sync_standbys: Option<BTreeSet<String>>,
    },
    /// Records that the cluster has no primary (e.g. while one is fenced), bumping the epoch.
    ClearPrimary {
        cluster: String,
        expected_epoch: u64,
        reason: String,
    },
    /// Replaces the synchronous standby set and quorum k (`ANY k (standbys)`).
    SetSyncSet {
        cluster: String,
        standbys: BTreeSet<String>,
        quorum: u32,
        expected_epoch: u64,
    },
    /// Pauses or resumes automation for one cluster.
    SetPaused {
        cluster: String,
        paused: bool,
        reason: String,
    },
    /// Starts an operator operation (its id is this entry's log index). A switchover also
    /// clears the primary (epoch + 1) and records the target the group will promote once the
    /// old primary has shut down cleanly and the target has all its WAL.
    BeginOperation {
        cluster: String,
        operation: OperationKind,
        target: Option<String>,
        expected_epoch: u64,
        detail: String,
        /// Forced failover only: promote the target even if it cannot be proven to hold
        /// every acknowledged commit.
        #[serde(default)]
        accept_data_loss: bool,
        /// The room move this switchover is a step of.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        part_of: Option<u64>,
    },
    /// The first primary is up: from now on an empty data directory on the primary is a lost
    /// disk, never a reason to run initdb.
    MarkBootstrapped { cluster: String },
    /// The primary has applied a widened sync set after degraded mode: commits from `lsn` on
    /// are synchronous again; a failover candidate must have at least this much WAL.
    ResyncDone { cluster: String, lsn: u64 },
    /// Records how an operation ended.
    FinishOperation {
        cluster: String,
        id: u64,
        succeeded: bool,
        detail: String,
    },
    /// Group-level: moves every cluster in `clusters` (in that order) to a primary in `room`,
    /// one switchover after another (`pgwctl switchover --room ROOM --all`). Its id is this
    /// entry's log index; each cluster's switchover is an operation `part_of` it.
    BeginRoomMove { room: String, clusters: Vec<String> },
    /// Group-level: records how a room move ended.
    FinishRoomMove {
        id: u64,
        succeeded: bool,
        detail: String,
    },
    /// Group-level: replaces the group's member list (`pgwctl member add|remove|replace`).
    /// Applies only on top of the roster it was computed from (`roster.version` is one more);
    /// refused when it drops a member recorded as some cluster's primary. `event` is the line
    /// every cluster's history gets.
    SetRoster {
        roster: crate::roster::Roster,
        event: String,
    },
    /// A role-change hook ran on `member` (recorded in the cluster's history; changes nothing
    /// else).
    RecordHook {
        cluster: String,
        member: String,
        hook: String,
        epoch: u64,
        succeeded: bool,
        attempts: u32,
        detail: String,
    },
}

/// Kinds of operator operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "snake_case")]
pub enum OperationKind {
    /// Planned, zero-loss change of primary.
    Switchover,
    /// Operator-forced promotion of a target while the primary is lost.
    Failover,
    /// Rebuild a (failed) non-primary member from the primary; automation keeps running.
    Recover,
    /// Restart a member's postgres in place (planned): a replica rejoins, the primary stays
    /// primary at the same epoch.
    Restart,
}

/// Progress of an operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "snake_case")]
pub enum OperationState {
    Running,
    Succeeded,
    Failed,
}

/// An operator operation, as recorded in the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Hash)]
pub struct Operation {
    pub id: u64,
    pub kind: OperationKind,
    pub target: Option<String>,
    pub state: OperationState,
    pub detail: String,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
    pub by: String,
    #[serde(default)]
    pub accept_data_loss: bool,
    /// The room move this operation is a step of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part_of: Option<u64>,
}

/// A move of every listed cluster's primary into one room (`pgwctl switchover --room --all`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Hash)]
pub struct RoomMove {
    pub id: u64,
    pub room: String,
    /// In the order they are moved.
    pub clusters: Vec<String>,
    pub state: OperationState,
    pub detail: String,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
    pub by: String,
}

/// How many finished operations each cluster keeps.
pub const OPERATIONS_LIMIT: usize = 64;

impl Command {
    /// The command's kind, as in its serialized `kind` tag (metrics label, logs).
    pub fn kind(&self) -> &'static str {
        match self {
            Command::EnsureCluster { .. } => "ensure_cluster",
            Command::SetUpstream { .. } => "set_upstream",
            Command::PromoteGroup { .. } => "promote_group",
            Command::SetPrimary { .. } => "set_primary",
            Command::ClearPrimary { .. } => "clear_primary",
            Command::SetSyncSet { .. } => "set_sync_set",
            Command::SetPaused { .. } => "set_paused",
            Command::BeginOperation { .. } => "begin_operation",
            Command::MarkBootstrapped { .. } => "mark_bootstrapped",
            Command::ResyncDone { .. } => "resync_done",
            Command::FinishOperation { .. } => "finish_operation",
            Command::BeginRoomMove { .. } => "begin_room_move",
            Command::FinishRoomMove { .. } => "finish_room_move",
            Command::RecordHook { .. } => "record_hook",
            Command::SetRoster { .. } => "set_roster",
        }
    }

    /// Every member name the command refers to.
    pub fn members(&self) -> Vec<&str> {
        match self {
            Command::SetPrimary {
                member,
                sync_standbys,
                ..
            } => std::iter::once(member.as_str())
                .chain(sync_standbys.iter().flatten().map(String::as_str))
                .collect(),
            Command::SetSyncSet { standbys, .. } => standbys.iter().map(String::as_str).collect(),
            Command::BeginOperation { target, .. } => target.iter().map(String::as_str).collect(),
            // The upstream is another group's member, never one of ours.
            Command::EnsureCluster { .. }
            | Command::SetUpstream { .. }
            | Command::PromoteGroup { .. }
            | Command::ClearPrimary { .. }
            | Command::SetPaused { .. }
            | Command::MarkBootstrapped { .. }
            | Command::ResyncDone { .. }
            | Command::FinishOperation { .. }
            | Command::BeginRoomMove { .. }
            | Command::FinishRoomMove { .. }
            | Command::SetRoster { .. }
            | Command::RecordHook { .. } => Vec::new(),
        }
    }

    pub fn cluster(&self) -> &str {
        match self {
            Command::EnsureCluster { cluster, .. }
            | Command::SetUpstream { cluster, .. }
            | Command::PromoteGroup { cluster, .. }
            | Command::SetPrimary { cluster, .. }
            | Command::ClearPrimary { cluster, .. }
            | Command::SetSyncSet { cluster, .. }
            | Command::SetPaused { cluster, .. }
            | Command::BeginOperation { cluster, .. }
            | Command::MarkBootstrapped { cluster }
            | Command::ResyncDone { cluster, .. }
            | Command::FinishOperation { cluster, .. }
            | Command::RecordHook { cluster, .. } => cluster,
            // Group-level commands belong to no one cluster.
            Command::BeginRoomMove { .. }
            | Command::FinishRoomMove { .. }
            | Command::SetRoster { .. } => "",
        }
    }

    /// Whether the command is about the whole group rather than one cluster.
    pub fn is_group_level(&self) -> bool {
        matches!(
            self,
            Command::BeginRoomMove { .. }
                | Command::FinishRoomMove { .. }
                | Command::SetRoster { .. }
        )
    }
}

/// What applying a proposal did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Applied { epoch: u64 },
    Unchanged { epoch: u64 },
    Rejected { reason: String },
}

impl Outcome {
    pub fn is_rejected(&self) -> bool {
        matches!(self, Outcome::Rejected { .. })
    }
}

/// One line of a cluster's operation history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Hash)]
pub struct HistoryEntry {
    pub log_index: u64,
    pub at_ms: u64,
    pub by: String,
    pub event: String,
    pub epoch: u64,
    /// The operator who asked for it (see [`Proposal::asked_by`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asked_by: Option<String>,
}

/// What the group knows about one PostgreSQL cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Hash)]
pub struct ClusterFacts {
    pub name: String,
    /// Member currently holding the primary role, if any.
    pub primary: Option<String>,
    /// Fencing token: grows by one with every change of the primary record.
    pub epoch: u64,
    pub sync_standbys: BTreeSet<String>,
    pub sync_quorum: u32,
    pub paused: bool,
    pub history: VecDeque<HistoryEntry>,
    /// The last primary, while the cluster has none (set by ClearPrimary, cleared by
    /// SetPrimary). It holds every commit it acknowledged, so it may be restarted in place.
    #[serde(default)]
    pub former_primary: Option<String>,
    /// The member a running switchover will promote.
    #[serde(default)]
    pub switchover_target: Option<String>,
    /// Operator operations by id (running ones and the most recent finished ones).
    #[serde(default)]
    pub operations: BTreeMap<u64, Operation>,
    /// The first primary has run (see `MarkBootstrapped`).
    #[serde(default)]
    pub bootstrapped: bool,
    /// The sync set was widened after degraded mode and the primary has not yet confirmed
    /// that commits are synchronous again: no replica is proven complete meanwhile.
    #[serde(default)]
    pub resync_pending: bool,
    /// WAL position from which commits are synchronous again after degraded mode.
    #[serde(default)]
    pub resync_lsn: u64,
    /// A standby cluster of another group (`standby_of`) until `pgwctl promote-group`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby: Option<Standby>,
}

/// What a standby cluster follows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Hash)]
pub struct Standby {
    /// The main group's primary, once found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<Upstream>,
}

/// The main group's primary, as that group reported it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Hash)]
pub struct Upstream {
    /// Its member name in the main group.
    pub member: String,
    /// Its PostgreSQL `host:port`.
    pub postgres: String,
    /// The main group's epoch of that primary.
    pub epoch: u64,
}

impl ClusterFacts {
    /// The running operation, if any.
    pub fn running_operation(&self) -> Option<&Operation> {
        self.operations
            .values()
            .find(|o| o.state == OperationState::Running)
    }
}

impl ClusterFacts {
    fn new(name: &str, sync_quorum: u32) -> Self {
        Self {
            name: name.to_string(),
            primary: None,
            epoch: 0,
            sync_standbys: BTreeSet::new(),
            sync_quorum,
            paused: false,
            history: VecDeque::new(),
            former_primary: None,
            switchover_target: None,
            operations: BTreeMap::new(),
            bootstrapped: false,
            resync_pending: false,
            resync_lsn: 0,
            standby: None,
        }
    }

    pub(crate) fn record(&mut self, log_index: u64, p: &Proposal, event: String) {
        if self.history.len() >= HISTORY_LIMIT {
            self.history.pop_front();
        }
        self.history.push_back(HistoryEntry {
            log_index,
            at_ms: p.at_ms,
            by: p.by.clone(),
            event,
            epoch: self.epoch,
            asked_by: p.asked_by.clone(),
        });
    }
}

/// All replicated facts, keyed by PostgreSQL cluster name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, Hash)]
pub struct Facts {
    pub clusters: BTreeMap<String, ClusterFacts>,
    /// Room moves by id (the running one and the most recent finished ones).
    #[serde(default)]
    pub moves: BTreeMap<u64, RoomMove>,
    /// The group's member list once it has changed at run time (`None`: the founding list of
    /// the config files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roster: Option<crate::roster::Roster>,
}

fn reject(reason: impl Into<String>) -> Outcome {
    Outcome::Rejected {
        reason: reason.into(),
    }
}

impl Facts {
    pub fn cluster(&self, name: &str) -> Option<&ClusterFacts> {
        self.clusters.get(name)
    }

    /// Applies one committed proposal, first refusing a command that names a member that is
    /// not one of its cluster's servers (`servers`: cluster name -> members holding it, from
    /// the config every member shares): such a command is rejected and changes nothing.
    /// Deterministic; never panics.
    pub fn apply_checked(
        &mut self,
        log_index: u64,
        p: &Proposal,
        servers: &BTreeMap<String, BTreeSet<String>>,
    ) -> Outcome {
        let cluster = p.command.cluster();
        let held = servers.get(cluster);
        if let Some(unknown) = p
            .command
            .members()
            .into_iter()
            .find(|m| !held.is_some_and(|h| h.contains(*m)))
        {
            return reject(format!(
                "`{unknown}` is not a server of cluster `{cluster}` in this group"
            ));
        }
        self.apply(log_index, p)
    }

    /// Applies one committed proposal. Deterministic; never panics.
    /// The running room move, if any.
    pub fn running_move(&self) -> Option<&RoomMove> {
        self.moves
            .values()
            .find(|m| m.state == OperationState::Running)
    }

    fn apply_group(&mut self, log_index: u64, p: &Proposal) -> Outcome {
        match &p.command {
            Command::BeginRoomMove { room, clusters } => {
                if let Some(r) = self.running_move() {
                    return reject(format!("room move {} is still running", r.id));
                }
                if clusters.is_empty() {
                    return reject("a room move needs at least one cluster");
                }
                if let Some(c) = clusters.iter().find(|c| !self.clusters.contains_key(*c)) {
                    return reject(format!("unknown cluster `{c}`"));
                }
                let finished: Vec<u64> = self
                    .moves
                    .values()
                    .filter(|m| m.state != OperationState::Running)
                    .map(|m| m.id)
                    .collect();
                if finished.len() >= OPERATIONS_LIMIT {
                    if let Some(oldest) = finished.first() {
                        self.moves.remove(oldest);
                    }
                }
                self.moves.insert(
                    log_index,
                    RoomMove {
                        id: log_index,
                        room: room.clone(),
                        clusters: clusters.clone(),
                        state: OperationState::Running,
                        detail: String::new(),
                        started_ms: p.at_ms,
                        finished_ms: None,
                        by: p.by.clone(),
                    },
                );
                let order = clusters.join(", then ");
                for c in clusters {
                    if let Some(cf) = self.clusters.get_mut(c) {
                        cf.record(
                            log_index,
                            p,
                            format!("room move {log_index} to {room} started ({order})"),
                        );
                    }
                }
                Outcome::Applied { epoch: 0 }
            }
            Command::FinishRoomMove {
                id,
                succeeded,
                detail,
            } => {
                let Some(m) = self.moves.get_mut(id) else {
                    return reject(format!("no room move {id}"));
                };
                if m.state != OperationState::Running {
                    return Outcome::Unchanged { epoch: 0 };
                }
                m.state = if *succeeded {
                    OperationState::Succeeded
                } else {
                    OperationState::Failed
                };
                m.detail = detail.clone();
                m.finished_ms = Some(p.at_ms);
                let what = if *succeeded { "succeeded" } else { "failed" };
                for c in m.clusters.clone() {
                    if let Some(cf) = self.clusters.get_mut(&c) {
                        cf.record(log_index, p, format!("room move {id} {what}: {detail}"));
                    }
                }
                Outcome::Applied { epoch: 0 }
            }
            Command::SetRoster { roster, event } => {
                if let Some(cur) = &self.roster {
                    if let Err(e) = cur.check_successor(roster) {
                        return reject(e.to_string());
                    }
                } else if roster.version != 1 {
                    return reject(format!(
                        "roster changed meanwhile (version 0, change computed on {}); retry",
                        roster.version.saturating_sub(1)
                    ));
                }
                let names: BTreeSet<&str> =
                    roster.members.iter().map(|m| m.name.as_str()).collect();
                if let Some(c) = self.clusters.values().find(|c| {
                    c.primary
                        .as_ref()
                        .is_some_and(|p| !names.contains(p.as_str()))
                }) {
                    return reject(format!(
                        "`{}` holds the primary of cluster `{}`: switch it over first",
                        c.primary.clone().unwrap_or_default(),
                        c.name
                    ));
                }
                self.roster = Some(roster.clone());
                for cf in self.clusters.values_mut() {
                    cf.record(log_index, p, event.clone());
                }
                Outcome::Applied { epoch: 0 }
            }
            _ => reject("not a group-level command"),
        }
    }

    /// Cluster name -> member recorded as its primary.
    pub fn primaries(&self) -> BTreeMap<String, String> {
        self.clusters
            .values()
            .filter_map(|c| c.primary.clone().map(|p| (c.name.clone(), p)))
            .collect()
    }

    pub fn apply(&mut self, log_index: u64, p: &Proposal) -> Outcome {
        if p.command.is_group_level() {
            return self.apply_group(log_index, p);
        }
        let name = p.command.cluster().to_string();
        if let Command::EnsureCluster {
            cluster,
            sync_quorum,
            standby,
        } = &p.command
        {
            if let Some(c) = self.clusters.get(cluster) {
                return Outcome::Unchanged { epoch: c.epoch };
            }
            if *sync_quorum == 0 {
                return reject("sync_quorum must be >= 1");
            }
            let mut c = ClusterFacts::new(cluster, *sync_quorum);
            if *standby {
                c.standby = Some(Standby::default());
            }
            c.record(
                log_index,
                p,
                if *standby {
                    "cluster registered as a standby of another group's cluster".to_string()
                } else {
                    format!("cluster registered (sync quorum {sync_quorum})")
                },
            );
            self.clusters.insert(cluster.clone(), c);
            return Outcome::Applied { epoch: 0 };
        }
        let Some(c) = self.clusters.get_mut(&name) else {
            return reject(format!("unknown cluster `{name}`"));
        };
        match &p.command {
            Command::EnsureCluster { .. } => Outcome::Unchanged { epoch: c.epoch },
            Command::SetUpstream { upstream, .. } => {
                let Some(sb) = c.standby.as_mut() else {
                    return reject("not a standby cluster");
                };
                if sb.upstream.as_ref() == Some(upstream) {
                    return Outcome::Unchanged { epoch: c.epoch };
                }
                if sb
                    .upstream
                    .as_ref()
                    .is_some_and(|u| u.epoch > upstream.epoch)
                {
                    return reject(format!(
                        "the main group's epoch {} is older than the one followed ({})",
                        upstream.epoch,
                        sb.upstream.as_ref().map(|u| u.epoch).unwrap_or(0)
                    ));
                }
                sb.upstream = Some(upstream.clone());
                c.record(
                    log_index,
                    p,
                    format!(
                        "following the main group's primary {} at {} (its epoch {})",
                        upstream.member, upstream.postgres, upstream.epoch
                    ),
                );
                Outcome::Applied { epoch: c.epoch }
            }
            Command::PromoteGroup {
                expected_epoch,
                lsn,
                ..
            } => {
                if c.standby.is_none() {
                    return reject("not a standby cluster (already promoted?)");
                }
                if *expected_epoch != c.epoch {
                    return reject(format!(
                        "stale epoch: expected {expected_epoch}, current {}",
                        c.epoch
                    ));
                }
                let Some(leader) = c.primary.clone() else {
                    return reject("the standby cluster has no standby leader to promote");
                };
                let from = c
                    .standby
                    .take()
                    .and_then(|s| s.upstream)
                    .map(|u| format!("{} (epoch {})", u.member, u.epoch))
                    .unwrap_or_else(|| "-".into());
                c.epoch += 1;
                c.sync_standbys.clear();
                c.record(
                    log_index,
                    p,
                    format!(
                        "group promoted: {leader} is the primary (epoch {}); it had replicated up to {:X}/{:X} from the main group's primary {from}",
                        c.epoch,
                        lsn >> 32,
                        lsn & 0xffff_ffff
                    ),
                );
                Outcome::Applied { epoch: c.epoch }
            }
            Command::SetPrimary {
                member,
                expected_epoch,
                reason,
                sync_standbys,
                ..
            } => {
                if *expected_epoch != c.epoch {
                    return reject(format!(
                        "stale epoch: expected {expected_epoch}, current {}",
                        c.epoch
                    ));
                }
                c.epoch += 1;
                c.primary = Some(member.clone());
                c.former_primary = None;
                c.switchover_target = None;
                if let Some(set) = sync_standbys {
                    if !c.sync_standbys.is_empty() {
                        c.sync_standbys = set.clone();
                    }
                }
                // The new primary cannot be its own standby.
                c.sync_standbys.remove(member);
                c.record(
                    log_index,
                    p,
                    format!("primary := {member} (epoch {}): {reason}", c.epoch),
                );
                Outcome::Applied { epoch: c.epoch }
            }
            Command::ClearPrimary {
                expected_epoch,
                reason,
                ..
            } => {
                if *expected_epoch != c.epoch {
                    return reject(format!(
                        "stale epoch: expected {expected_epoch}, current {}",
                        c.epoch
                    ));
                }
                c.epoch += 1;
                let was = c.primary.take();
                if was.is_some() {
                    c.former_primary = was.clone();
                }
                let old = was.unwrap_or_else(|| "-".into());
                c.record(
                    log_index,
                    p,
                    format!("no primary (was {old}, epoch {}): {reason}", c.epoch),
                );
                Outcome::Applied { epoch: c.epoch }
            }
            Command::SetSyncSet {
                standbys,
                quorum,
                expected_epoch,
                ..
            } => {
                if *expected_epoch != c.epoch {
                    return reject(format!(
                        "stale epoch: expected {expected_epoch}, current {}",
                        c.epoch
                    ));
                }
                if let Some(p) = &c.primary {
                    if standbys.contains(p) {
                        return reject(format!("the primary {p} cannot be a sync standby"));
                    }
                }
                if !standbys.is_empty() && (*quorum == 0 || *quorum as usize > standbys.len()) {
                    return reject(format!(
                        "quorum {quorum} does not fit {} standbys",
                        standbys.len()
                    ));
                }
                if c.sync_standbys.is_empty() && !standbys.is_empty() && c.bootstrapped {
                    // Widening after degraded mode: not proven until the primary confirms.
                    c.resync_pending = true;
                }
                if standbys.is_empty() {
                    c.resync_pending = false;
                }
                c.sync_standbys = standbys.clone();
                c.sync_quorum = *quorum;
                let list: Vec<&str> = standbys.iter().map(String::as_str).collect();
                c.record(
                    log_index,
                    p,
                    format!("sync set := ANY {quorum} ({})", list.join(", ")),
                );
                Outcome::Applied { epoch: c.epoch }
            }
            Command::BeginOperation {
                operation: kind,
                target,
                expected_epoch,
                detail,
                accept_data_loss,
                part_of,
                ..
            } => {
                if let Some(r) = c.running_operation() {
                    return reject(format!(
                        "operation {} ({:?}) is still running",
                        r.id, r.kind
                    ));
                }
                if *expected_epoch != c.epoch {
                    return reject(format!(
                        "stale epoch: expected {expected_epoch}, current {}",
                        c.epoch
                    ));
                }
                if *kind == OperationKind::Recover {
                    match (&c.primary, target) {
                        (_, None) => return reject("a recovery needs a target member"),
                        (None, _) => return reject("no primary to rebuild from"),
                        (Some(p), Some(t)) if p == t => {
                            return reject(format!("{t} is the primary; switch over first"))
                        }
                        _ => {}
                    }
                }
                if *kind == OperationKind::Restart && target.is_none() {
                    return reject("a restart needs a target member");
                }
                if *kind == OperationKind::Switchover {
                    let Some(old) = c.primary.take() else {
                        return reject("no primary to switch over from");
                    };
                    if target.as_deref() == Some(old.as_str()) {
                        c.primary = Some(old);
                        return reject("the target is already the primary");
                    }
                    c.epoch += 1;
                    c.former_primary = Some(old);
                    c.switchover_target = target.clone();
                }
                let finished: Vec<u64> = c
                    .operations
                    .values()
                    .filter(|o| o.state != OperationState::Running)
                    .map(|o| o.id)
                    .collect();
                if finished.len() >= OPERATIONS_LIMIT {
                    if let Some(oldest) = finished.first() {
                        c.operations.remove(oldest);
                    }
                }
                c.operations.insert(
                    log_index,
                    Operation {
                        id: log_index,
                        kind: *kind,
                        target: target.clone(),
                        state: OperationState::Running,
                        detail: detail.clone(),
                        started_ms: p.at_ms,
                        finished_ms: None,
                        by: p.by.clone(),
                        accept_data_loss: *accept_data_loss,
                        part_of: *part_of,
                    },
                );
                c.record(
                    log_index,
                    p,
                    format!(
                        "operation {log_index} started: {kind:?} to {} (epoch {}): {detail}",
                        target.as_deref().unwrap_or("-"),
                        c.epoch
                    ),
                );
                Outcome::Applied { epoch: c.epoch }
            }
            Command::MarkBootstrapped { .. } => {
                if c.bootstrapped {
                    return Outcome::Unchanged { epoch: c.epoch };
                }
                c.bootstrapped = true;
                c.record(log_index, p, "cluster bootstrapped".into());
                Outcome::Applied { epoch: c.epoch }
            }
            Command::ResyncDone { lsn, .. } => {
                if !c.resync_pending {
                    return Outcome::Unchanged { epoch: c.epoch };
                }
                c.resync_pending = false;
                c.resync_lsn = *lsn;
                c.record(log_index, p, format!("synchronous again from LSN {lsn:X}"));
                Outcome::Applied { epoch: c.epoch }
            }
            Command::FinishOperation {
                id,
                succeeded,
                detail,
                ..
            } => {
                let Some(op) = c.operations.get_mut(id) else {
                    return reject(format!("no operation {id}"));
                };
                if op.state != OperationState::Running {
                    return Outcome::Unchanged { epoch: c.epoch };
                }
                op.state = if *succeeded {
                    OperationState::Succeeded
                } else {
                    OperationState::Failed
                };
                op.detail = detail.clone();
                op.finished_ms = Some(p.at_ms);
                if !*succeeded {
                    c.switchover_target = None;
                }
                let what = if *succeeded { "succeeded" } else { "failed" };
                c.record(log_index, p, format!("operation {id} {what}: {detail}"));
                Outcome::Applied { epoch: c.epoch }
            }
            Command::RecordHook {
                member,
                hook,
                epoch,
                succeeded,
                attempts,
                detail,
                ..
            } => {
                let what = if *succeeded { "ran" } else { "FAILED" };
                c.record(
                    log_index,
                    p,
                    format!(
                        "hook {hook} on {member} {what} for epoch {epoch} (attempt {attempts}): {detail}"
                    ),
                );
                Outcome::Applied { epoch: c.epoch }
            }
            Command::BeginRoomMove { .. }
            | Command::FinishRoomMove { .. }
            | Command::SetRoster { .. } => reject("a group-level command"),
            Command::SetPaused { paused, reason, .. } => {
                if c.paused == *paused {
                    return Outcome::Unchanged { epoch: c.epoch };
                }
                c.paused = *paused;
                let what = if *paused { "paused" } else { "resumed" };
                c.record(log_index, p, format!("automation {what}: {reason}"));
                Outcome::Applied { epoch: c.epoch }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn prop(command: Command) -> Proposal {
        Proposal {
            command,
            at_ms: 1,
            by: "t".into(),
            asked_by: None,
        }
    }

    #[test]
    fn a_standby_cluster_follows_newer_upstreams_only_and_is_promoted_once() {
        let mut f = Facts::default();
        let ensure = Command::EnsureCluster {
            cluster: "g".into(),
            sync_quorum: 1,
            standby: true,
        };
        assert!(matches!(f.apply(1, &prop(ensure)), Outcome::Applied { .. }));
        let up = |epoch| Command::SetUpstream {
            cluster: "g".into(),
            upstream: Upstream {
                member: format!("m{epoch}"),
                postgres: "10.0.0.1:5432".into(),
                epoch,
            },
        };
        assert!(matches!(f.apply(2, &prop(up(4))), Outcome::Applied { .. }));
        assert!(matches!(f.apply(3, &prop(up(3))), Outcome::Rejected { .. }));
        assert!(matches!(
            f.apply(4, &prop(up(4))),
            Outcome::Unchanged { .. }
        ));
        let promote = |e| Command::PromoteGroup {
            cluster: "g".into(),
            expected_epoch: e,
            lsn: 0x1_0000_0200,
        };
        assert!(
            matches!(f.apply(5, &prop(promote(0))), Outcome::Rejected { .. }),
            "no standby leader yet"
        );
        let set = Command::SetPrimary {
            cluster: "g".into(),
            member: "a".into(),
            expected_epoch: 0,
            reason: "standby leader".into(),
            sync_standbys: Some(BTreeSet::new()),
        };
        assert!(matches!(
            f.apply(6, &prop(set)),
            Outcome::Applied { epoch: 1 }
        ));
        assert!(matches!(
            f.apply(7, &prop(promote(1))),
            Outcome::Applied { epoch: 2 }
        ));
        let c = f.cluster("g").expect("g");
        assert!(c.standby.is_none());
        assert_eq!(c.primary.as_deref(), Some("a"));
        let last = &c.history.back().expect("history").event;
        assert!(last.contains("1/200") && last.contains("m4"), "{last}");
        assert!(matches!(
            f.apply(8, &prop(promote(2))),
            Outcome::Rejected { .. }
        ));
        assert!(matches!(f.apply(9, &prop(up(5))), Outcome::Rejected { .. }));
    }

    fn ensure(c: &str) -> Proposal {
        prop(Command::EnsureCluster {
            cluster: c.into(),
            sync_quorum: 1,
            standby: false,
        })
    }

    fn roster_of(names: &[&str], version: u64) -> crate::roster::Roster {
        let members = names
            .iter()
            .enumerate()
            .map(|(i, n)| crate::config::MemberConfig {
                name: (*n).into(),
                id: i as u64 + 1,
                role: crate::config::Role::Data,
                grpc: format!("127.0.0.1:{}", 7000 + i),
                http: format!("127.0.0.1:{}", 8000 + i),
                priority: 100,
                postgres: None,
                pgpool: None,
                pcp: None,
                room: None,
                spare: false,
            })
            .collect();
        crate::roster::Roster {
            version,
            generation: 0,
            group: "g".into(),
            members,
            retired_ids: BTreeSet::new(),
            founders: Vec::new(),
            pools: Default::default(),
        }
    }

    #[test]
    fn set_roster_applies_in_order_and_never_drops_the_primary() {
        let mut f = Facts::default();
        f.apply(1, &ensure("global"));
        f.apply(
            2,
            &prop(Command::SetPrimary {
                cluster: "global".into(),
                member: "a".into(),
                expected_epoch: 0,
                reason: "t".into(),
                sync_standbys: None,
            }),
        );
        let set = |r: crate::roster::Roster| {
            prop(Command::SetRoster {
                roster: r,
                event: "member list changed".into(),
            })
        };
        // The first change is version 1; anything else was computed on another list.
        assert!(f
            .apply(3, &set(roster_of(&["a", "b", "c"], 2)))
            .is_rejected());
        assert!(f.roster.is_none());
        assert_eq!(
            f.apply(4, &set(roster_of(&["a", "b", "c", "d"], 1))),
            Outcome::Applied { epoch: 0 }
        );
        assert_eq!(f.roster.as_ref().map(|r| r.version), Some(1));
        // Stale: a second change computed on version 0 again.
        assert!(f.apply(5, &set(roster_of(&["a", "b"], 1))).is_rejected());
        // A list without the primary's member is refused, whatever its version.
        let o = f.apply(6, &set(roster_of(&["b", "c", "d"], 2)));
        assert!(
            matches!(&o, Outcome::Rejected { reason } if reason.contains("holds the primary")),
            "{o:?}"
        );
        assert_eq!(f.roster.as_ref().map(|r| r.members.len()), Some(4));
        // Every cluster's history names the change.
        let h = &f.cluster("global").expect("global").history;
        assert!(h.iter().any(|e| e.event == "member list changed"));
    }

    #[test]
    fn set_primary_requires_current_epoch() {
        let mut f = Facts::default();
        assert_eq!(f.apply(1, &ensure("global")), Outcome::Applied { epoch: 0 });
        let set = |m: &str, e| {
            prop(Command::SetPrimary {
                cluster: "global".into(),
                member: m.into(),
                expected_epoch: e,
                reason: "test".into(),
                sync_standbys: None,
            })
        };
        assert_eq!(f.apply(2, &set("a", 0)), Outcome::Applied { epoch: 1 });
        assert!(f.apply(3, &set("b", 0)).is_rejected());
        assert_eq!(
            f.cluster("global").map(|c| c.primary.clone()),
            Some(Some("a".into()))
        );
        assert_eq!(f.apply(4, &set("b", 1)), Outcome::Applied { epoch: 2 });
        let c = f.cluster("global").expect("exists");
        assert_eq!(c.primary.as_deref(), Some("b"));
        assert_eq!(c.history.len(), 3);
    }

    #[test]
    fn clusters_are_independent() {
        let mut f = Facts::default();
        f.apply(1, &ensure("global"));
        f.apply(2, &ensure("recovery"));
        f.apply(
            3,
            &prop(Command::SetPaused {
                cluster: "recovery".into(),
                paused: true,
                reason: "op".into(),
            }),
        );
        assert!(!f.cluster("global").expect("g").paused);
        assert!(f.cluster("recovery").expect("r").paused);
        assert!(f
            .apply(
                4,
                &prop(Command::SetPaused {
                    cluster: "nope".into(),
                    paused: true,
                    reason: String::new()
                })
            )
            .is_rejected());
    }

    #[test]
    fn history_is_bounded() {
        let mut f = Facts::default();
        f.apply(1, &ensure("g"));
        for i in 0..(HISTORY_LIMIT as u64 * 2) {
            f.apply(
                i + 2,
                &prop(Command::SetPaused {
                    cluster: "g".into(),
                    paused: i % 2 == 0,
                    reason: String::new(),
                }),
            );
        }
        assert_eq!(f.cluster("g").expect("g").history.len(), HISTORY_LIMIT);
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        let cluster = prop_oneof![Just("global".to_string()), Just("recovery".to_string())];
        let member = prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("c".to_string())
        ];
        prop_oneof![
            (cluster.clone(), 0u32..3, any::<bool>()).prop_map(
                |(cluster, sync_quorum, standby)| Command::EnsureCluster {
                    cluster,
                    sync_quorum,
                    standby,
                }
            ),
            (cluster.clone(), member.clone(), 0u64..6).prop_map(|(cluster, member, epoch)| {
                Command::SetUpstream {
                    cluster,
                    upstream: Upstream {
                        member,
                        postgres: "10.0.0.1:5432".into(),
                        epoch,
                    },
                }
            }),
            (cluster.clone(), 0u64..6, any::<u64>()).prop_map(|(cluster, e, lsn)| {
                Command::PromoteGroup {
                    cluster,
                    expected_epoch: e,
                    lsn,
                }
            }),
            (cluster.clone(), member.clone(), 0u64..6, any::<bool>()).prop_map(
                |(cluster, member, e, with_set)| {
                    Command::SetPrimary {
                        cluster,
                        member,
                        expected_epoch: e,
                        reason: "p".into(),
                        sync_standbys: with_set
                            .then(|| ["a", "b", "c"].iter().map(|s| s.to_string()).collect()),
                    }
                }
            ),
            (cluster.clone(), 0u64..6)
                .prop_map(|(cluster, _)| Command::MarkBootstrapped { cluster }),
            (cluster.clone(), 0u64..1000)
                .prop_map(|(cluster, lsn)| Command::ResyncDone { cluster, lsn }),
            (cluster.clone(), 0u64..6).prop_map(|(cluster, e)| Command::ClearPrimary {
                cluster,
                expected_epoch: e,
                reason: "p".into()
            }),
            (
                cluster.clone(),
                proptest::collection::btree_set(member.clone(), 0..3),
                0u32..3,
                0u64..6
            )
                .prop_map(|(cluster, standbys, quorum, e)| Command::SetSyncSet {
                    cluster,
                    standbys,
                    quorum,
                    expected_epoch: e
                }),
            (cluster.clone(), any::<bool>()).prop_map(|(cluster, paused)| Command::SetPaused {
                cluster,
                paused,
                reason: "p".into()
            }),
            (
                cluster.clone(),
                any::<bool>(),
                proptest::option::of(member.clone()),
                0u64..6
            )
                .prop_map(|(cluster, sw, target, e)| Command::BeginOperation {
                    cluster,
                    operation: if sw {
                        OperationKind::Switchover
                    } else {
                        OperationKind::Failover
                    },
                    target,
                    expected_epoch: e,
                    detail: "p".into(),
                    accept_data_loss: false,
                    part_of: None,
                }),
            (cluster, 0u64..40, any::<bool>()).prop_map(|(cluster, id, ok)| {
                Command::FinishOperation {
                    cluster,
                    id,
                    succeeded: ok,
                    detail: "p".into(),
                }
            }),
        ]
    }

    /// Commands with arbitrary strings and numbers (as a forged or corrupted entry could
    /// carry), mixed with well-formed ones so that clusters exist.
    fn arb_wild_command() -> impl Strategy<Value = Command> {
        let name = prop_oneof![
            Just("global".to_string()),
            Just("recovery".to_string()),
            Just("a".to_string()),
            Just("b".to_string()),
            any::<String>()
        ];
        prop_oneof![
            arb_command(),
            (name.clone(), any::<u32>()).prop_map(|(cluster, sync_quorum)| {
                Command::EnsureCluster {
                    cluster,
                    sync_quorum,
                    standby: false,
                }
            }),
            (
                name.clone(),
                name.clone(),
                any::<u64>(),
                any::<String>(),
                proptest::option::of(proptest::collection::btree_set(name.clone(), 0..4))
            )
                .prop_map(
                    |(cluster, member, expected_epoch, reason, sync_standbys)| {
                        Command::SetPrimary {
                            cluster,
                            member,
                            expected_epoch,
                            reason,
                            sync_standbys,
                        }
                    }
                ),
            (
                name.clone(),
                proptest::collection::btree_set(name.clone(), 0..5),
                any::<u32>(),
                any::<u64>()
            )
                .prop_map(|(cluster, standbys, quorum, expected_epoch)| {
                    Command::SetSyncSet {
                        cluster,
                        standbys,
                        quorum,
                        expected_epoch,
                    }
                }),
            (
                name.clone(),
                0u8..4,
                proptest::option::of(name.clone()),
                any::<u64>(),
                any::<bool>()
            )
                .prop_map(|(cluster, kind, target, expected_epoch, adl)| {
                    Command::BeginOperation {
                        cluster,
                        operation: match kind {
                            0 => OperationKind::Recover,
                            1 => OperationKind::Restart,
                            2 => OperationKind::Switchover,
                            _ => OperationKind::Failover,
                        },
                        target,
                        expected_epoch,
                        detail: String::new(),
                        accept_data_loss: adl,
                        part_of: None,
                    }
                }),
            (name.clone(), any::<u64>())
                .prop_map(|(cluster, lsn)| Command::ResyncDone { cluster, lsn }),
            (name, any::<u64>(), any::<bool>(), any::<String>()).prop_map(
                |(cluster, id, ok, detail)| {
                    Command::FinishOperation {
                        cluster,
                        id,
                        succeeded: ok,
                        detail,
                    }
                }
            ),
        ]
    }

    #[test]
    fn a_commands_kind_is_its_serialized_tag() {
        let cmds = [
            Command::EnsureCluster {
                cluster: "g".into(),
                sync_quorum: 1,
                standby: false,
            },
            Command::MarkBootstrapped {
                cluster: "g".into(),
            },
            Command::ResyncDone {
                cluster: "g".into(),
                lsn: 1,
            },
            Command::ClearPrimary {
                cluster: "g".into(),
                expected_epoch: 1,
                reason: String::new(),
            },
        ];
        for c in cmds {
            let v = serde_json::to_value(&c).expect("json");
            assert_eq!(v["kind"].as_str(), Some(c.kind()));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
        /// Fuzzing `apply_checked`: no command panics; one naming a member outside the group
        /// is rejected and changes nothing.
        #[test]
        fn apply_checked_never_panics_and_refuses_strangers(
            cmds in proptest::collection::vec(arb_wild_command(), 0..80)
        ) {
            let members: BTreeSet<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
            // "global" is held by a, b, c; "recovery" by a and b only.
            let mut servers = BTreeMap::new();
            servers.insert("global".to_string(), members.clone());
            let recovery: BTreeSet<String> = ["a", "b"].iter().map(|s| s.to_string()).collect();
            servers.insert("recovery".to_string(), recovery);
            let mut f = Facts::default();
            for (i, c) in cmds.iter().enumerate() {
                let before = f.clone();
                let out = f.apply_checked(i as u64 + 1, &prop(c.clone()), &servers);
                let held = servers.get(c.cluster());
                if c.members().iter().any(|m| !held.is_some_and(|h| h.contains(*m))) {
                    prop_assert!(out.is_rejected());
                }
                if out.is_rejected() {
                    prop_assert_eq!(&f, &before);
                }
            }
        }
    }

    proptest! {
        /// Two replicas applying the same log reach the same facts and outcomes, and the
        /// serialised facts round-trip (snapshots are faithful).
        #[test]
        fn apply_is_deterministic(cmds in proptest::collection::vec(arb_command(), 0..60)) {
            let mut a = Facts::default();
            let mut b = Facts::default();
            for (i, c) in cmds.iter().enumerate() {
                let p = prop(c.clone());
                let oa = a.apply(i as u64 + 1, &p);
                let ob = b.apply(i as u64 + 1, &p);
                prop_assert_eq!(oa, ob);
            }
            prop_assert_eq!(&a, &b);
            let text = serde_json::to_string(&a).expect("serialises");
            let back: Facts = serde_json::from_str(&text).expect("parses");
            prop_assert_eq!(back, a);
        }

        /// Epochs never decrease, and grow exactly when the primary record changes.
        #[test]
        fn epochs_only_grow(cmds in proptest::collection::vec(arb_command(), 0..80)) {
            let mut f = Facts::default();
            for (i, c) in cmds.iter().enumerate() {
                let before = f.clone();
                let out = f.apply(i as u64 + 1, &prop(c.clone()));
                for (name, after) in &f.clusters {
                    if let Some(prev) = before.clusters.get(name) {
                        prop_assert!(after.epoch >= prev.epoch);
                        if after.primary != prev.primary {
                            prop_assert_eq!(after.epoch, prev.epoch + 1);
                        }
                    }
                }
                if out.is_rejected() {
                    prop_assert_eq!(&f, &before);
                }
                for after in f.clusters.values() {
                    if let Some(p) = &after.primary {
                        prop_assert!(!after.sync_standbys.contains(p));
                    }
                }
            }
        }
    }
}
