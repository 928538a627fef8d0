//! The member context: what every part of this member shares (config, Raft, the applied facts,
//! peer reachability, certificates) and the state the leader keeps beside the facts. The gRPC
//! and HTTP services, the leader's decision loop, the sidecar and the pgpool reconciler all work
//! from it; it depends on none of them.

pub mod leader_state;
pub mod pool_views;

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use openraft::error::{ClientWriteError, RaftError};
use pgw_core::roster::Roster;
use pgw_core::{Command, Config, Outcome, Proposal};
use pgw_proto::Identity;
use tonic::Status;

use crate::auth::Caller;
use crate::raft::network::Reachability;
use crate::raft::store::StateMachineStore;
use crate::raft::types::Raft;
use crate::telemetry;
pub use leader_state::LeaderState;
pub use pool_views::{PoolReport, PoolViews};

/// Whether Raft metrics `m` say member `me` leads: it is in the leader state and names itself
/// leader. The one leadership rule (decisions, grants, pgpool, forwarding, the metric).
pub fn leads(m: &openraft::RaftMetrics<u64, openraft::BasicNode>, me: Option<u64>) -> bool {
    me.is_some() && m.current_leader == me && m.state == openraft::ServerState::Leader
}

/// Wall-clock milliseconds since the epoch: for stamps people read (history, operations).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The config a member runs with: its file's settings and, once the group's member list has
/// changed at run time, that list (see `pgw_core::roster`). Swapped as a whole when the roster
/// changes; readers take a snapshot with [`LiveConfig::get`] and never see half of a change.
#[derive(Clone)]
pub struct LiveConfig {
    file: Arc<Config>,
    current: Arc<std::sync::RwLock<Running>>,
    /// Held while a new roster is stored and swapped in (one writer of roster.pgw at a time).
    pub changing: Arc<std::sync::Mutex<()>>,
}

#[derive(Clone)]
struct Running {
    cfg: Arc<Config>,
    roster: Arc<Roster>,
}

impl LiveConfig {
    /// `roster`: the group's member list as last stored here (`None`: the file's founding
    /// list).
    pub fn new(file: Config, roster: Option<Roster>) -> LiveConfig {
        let roster = roster.unwrap_or_else(|| Roster::founding(&file));
        let cfg = pgw_core::roster::effective(&file, &roster);
        LiveConfig {
            file: Arc::new(file),
            current: Arc::new(std::sync::RwLock::new(Running {
                cfg: Arc::new(cfg),
                roster: Arc::new(roster),
            })),
            changing: Default::default(),
        }
    }

    fn running(&self) -> Running {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn get(&self) -> Arc<Config> {
        self.running().cfg
    }

    /// The member list this member runs with (version 0: the founding list of the files).
    pub fn roster(&self) -> Arc<Roster> {
        self.running().roster
    }

    /// The config file as read at start (its member list only bootstrapped the group).
    pub fn file(&self) -> &Config {
        &self.file
    }

    /// Runs with `c` (the file's settings and `roster`'s members) from now on.
    pub fn set(&self, c: Config, roster: Roster) {
        let r = Running {
            cfg: Arc::new(c),
            roster: Arc::new(roster),
        };
        match self.current.write() {
            Ok(mut g) => *g = r,
            Err(p) => *p.into_inner() = r,
        }
    }
}

/// What every service needs to know about this member.
#[derive(Clone)]
pub struct Shared {
    pub config: LiveConfig,
    pub raft: Raft,
    pub sm: StateMachineStore,
    pub reach: Reachability,
    pub started: Instant,
    /// Opens channels to other members (TCP in the daemon, simulated in tests).
    pub channels: crate::raft::network::ChannelMaker,
    /// Observed state and leases, used while this member leads.
    pub leader: LeaderState,
    /// What each local sidecar last saw its postgres doing, by cluster (empty without one).
    pub local: std::sync::Arc<std::sync::RwLock<std::collections::BTreeMap<String, LocalView>>>,
    /// What the leader last saw of every room's pgpool (empty on followers).
    pub pgpool: PoolViews,
    /// This member's certificates (signs its reports, verifies relayed ones).
    pub tls: crate::tls::Tls,
    /// Refused calls, logged once per interval per caller and reason.
    pub refusals: crate::tls::RefusalLog,
    /// `pgwctl reload`: the config file's path and the live [postgres] settings.
    pub live: Arc<crate::reload::Live>,
    /// Who may call (member certificates follow the roster).
    pub policy: Arc<crate::auth::Policy>,
    /// Which member answers at which address (channels verify the certificate's name).
    pub book: crate::raft::network::PeerBook,
    /// This leader is handing leadership over (leadership placement): it acts as a follower
    /// (no decisions, proposals, lease grants or pgpool commands) until another member leads.
    pub handing_over: Arc<std::sync::atomic::AtomicBool>,
}

impl Shared {
    /// The running config (file settings + the group's member list), a consistent snapshot.
    pub fn cfg(&self) -> Arc<Config> {
        self.config.get()
    }

    pub fn identity(&self) -> Identity {
        let cfg_now = self.cfg();
        let me = cfg_now.me();
        let roster = self.config.roster();
        Identity {
            generation: roster.generation,
            cluster_id: self.cfg().cluster_id.clone(),
            fingerprint: roster.group.clone(),
            from: me.map(|m| m.id).unwrap_or_default(),
            from_name: self.cfg().member.clone(),
        }
    }

    /// Refuses a member call whose identity is not the member its certificate names, or whose
    /// cluster id or member list differs from ours.
    pub fn check_member(&self, id: Option<&Identity>, caller: &Caller) -> Result<(), Status> {
        let Caller::Member { name, id: cert_id } = caller else {
            return Err(Status::permission_denied(
                "only members of the group may call this",
            ));
        };
        let Some(ident) = id else {
            return Err(Status::failed_precondition("call carries no identity"));
        };
        if ident.from != *cert_id || ident.from_name != *name {
            self.refusals.refuse_key(
                name,
                &format!(
                    "impersonation: claims to come from `{}` (id {})",
                    ident.from_name, ident.from
                ),
            );
            return Err(Status::permission_denied(format!(
                "member `{name}` may only speak for itself, not for `{}` (id {})",
                ident.from_name, ident.from
            )));
        }
        self.check_identity(Some(ident))
    }

    /// Refuses a caller whose cluster id or member list differs from ours.
    pub fn check_identity(&self, id: Option<&Identity>) -> Result<(), Status> {
        let Some(id) = id else {
            return Err(Status::failed_precondition("call carries no identity"));
        };
        if id.cluster_id != self.cfg().cluster_id {
            self.refusals.refuse_key(
                &id.from_name,
                &format!(
                    "cluster id: `{}` differs from ours `{}`",
                    id.cluster_id,
                    self.cfg().cluster_id
                ),
            );
            return Err(Status::failed_precondition(format!(
                "cluster id mismatch: caller `{}` has `{}`, member `{}` has `{}`",
                id.from_name,
                id.cluster_id,
                self.cfg().member,
                self.cfg().cluster_id
            )));
        }
        let roster = self.config.roster();
        if id.generation != roster.generation {
            self.refusals.refuse_key(
                &id.from_name,
                &format!(
                    "group generation {} (ours is {})",
                    id.generation, roster.generation
                ),
            );
            return Err(crate::auth::with_generation(
                Status::failed_precondition(format!(
                    "`{}` belongs to group generation {}, but this group is at generation {}{}",
                    id.from_name,
                    id.generation,
                    roster.generation,
                    if id.generation < roster.generation {
                        ": the group was recovered without it (pg-watcher --force-new-group); it rejoins only through `pgwctl member add` (under a new id) and `pg-watcher --join`"
                    } else {
                        ""
                    }
                )),
                roster.generation,
            ));
        }
        let ours = roster.group.clone();
        if id.fingerprint != ours {
            self.refusals.refuse_key(
                &id.from_name,
                &format!(
                    "member list: fingerprint {} differs from ours {ours}",
                    id.fingerprint
                ),
            );
            return Err(Status::failed_precondition(format!(
                "member list mismatch: caller `{}` has fingerprint {}, member `{}` has {} ({})",
                id.from_name,
                id.fingerprint,
                self.cfg().member,
                ours,
                self.cfg().members_canonical()
            )));
        }
        Ok(())
    }

    /// Whether this member leads now (see [`leads`]).
    pub fn is_leader(&self) -> bool {
        self.leads(&self.raft.metrics().borrow())
    }

    /// [`leads`] for this member, given a metrics snapshot: false while it hands leadership
    /// over.
    pub fn leads(&self, m: &openraft::RaftMetrics<u64, openraft::BasicNode>) -> bool {
        leads(m, self.cfg().me().map(|x| x.id)) && !self.handing_over()
    }

    pub fn handing_over(&self) -> bool {
        self.handing_over.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn member_name(&self, id: u64) -> String {
        self.cfg()
            .member_by_id(id)
            .map(|m| m.name.clone())
            .unwrap_or_else(|| format!("node-{id}"))
    }

    /// Proposes a decision and waits until it is committed and applied. On a follower the
    /// decision is handed to the leader. Returns (log index, outcome, committing member).
    pub async fn propose(&self, command: Command) -> Result<(u64, Outcome, String), Status> {
        self.propose_as(command, None).await
    }

    /// [`Self::propose`] for an operator request: `asked_by` (who asked) is recorded with the
    /// decision and shown in the history.
    pub async fn propose_as(
        &self,
        command: Command,
        asked_by: Option<&str>,
    ) -> Result<(u64, Outcome, String), Status> {
        // A configured cluster is registered in the facts before its first decision.
        let name = command.cluster().to_string();
        let registered = self.sm.applied().facts.cluster(&name).is_some();
        if !registered && !matches!(command, Command::EnsureCluster { .. }) {
            if let Some(c) = self.cfg().clusters.iter().find(|c| c.name == name) {
                Box::pin(self.propose(ensure_command(c))).await?;
            }
        }
        let p = Proposal {
            command,
            at_ms: now_ms(),
            by: self.cfg().member.clone(),
            asked_by: asked_by.map(str::to_string),
        };
        if self.handing_over() {
            // Any write would reach the followers and hold their election timers back.
            return Err(Status::unavailable(
                "handing Raft leadership over to a member without a primary; retry",
            ));
        }
        let t0 = Instant::now();
        match self.raft.client_write(p).await {
            Ok(resp) => {
                telemetry::commit_latency(t0.elapsed());
                Ok((resp.log_id.index, resp.data, self.cfg().member.clone()))
            }
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(match f.leader_id {
                    Some(l) => Status::unavailable(format!(
                        "not the leader; leader is {}",
                        self.member_name(l)
                    ))
                    .with_leader(l),
                    None => Status::unavailable("no leader elected at the moment; retry"),
                })
            }
            Err(e) => Err(Status::unavailable(format!("decision not committed: {e}"))),
        }
    }

    pub fn leader_addr(&self, id: u64) -> Option<String> {
        self.cfg().member_by_id(id).map(|m| m.grpc.clone())
    }
}

pub trait WithLeader {
    fn with_leader(self, id: u64) -> Self;
}
impl WithLeader for Status {
    fn with_leader(mut self, id: u64) -> Self {
        if let Ok(v) = id.to_string().parse() {
            self.metadata_mut().insert("x-pgw-leader", v);
        }
        self
    }
}

/// What this member's sidecar last saw of its own server (for the HTTP checks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LocalView {
    /// `None`: not observed yet, or the server did not answer.
    pub role: Option<pgw_core::failover::PgRole>,
    /// A walreceiver is streaming (replicas).
    pub streaming: bool,
    pub flush_lsn: u64,
    /// The primary's flushed LSN as the leader last heard it (from the reply to our report).
    pub primary_lsn: Option<u64>,
    /// Our primary stopped waiting for a lost standby on its own (degraded where nothing can
    /// replace it: `pgw_core::guard::narrows_locally`); its room's pgpool narrows too.
    pub narrowed_locally: bool,
}

impl LocalView {
    /// Bytes this replica is behind the primary; `None` when unknown.
    pub fn lag_bytes(&self) -> Option<u64> {
        self.primary_lsn.map(|p| p.saturating_sub(self.flush_lsn))
    }
}

/// The command that registers configured cluster `c` in the facts.
pub fn ensure_command(c: &pgw_core::config::PgClusterConfig) -> Command {
    Command::EnsureCluster {
        cluster: c.name.clone(),
        sync_quorum: c.sync_quorum,
        standby: c.standby_of.is_some(),
    }
}
