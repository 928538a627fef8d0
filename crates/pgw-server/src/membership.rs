//! The group's member list at run time: following the roster, reconciling Raft's membership
//! with it (leader), `pgwctl member add|remove|replace`, and `pg-watcher --join`.
//!
//! The rules are pure (`pgw_core::roster`): which changes are allowed, and the next step
//! from the roster (intended) and Raft's membership (observed). This module only reads,
//! proposes and calls openraft.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::{BasicNode, ChangeMembers};
use pgw_core::roster::{self, Observed, Roster, Step};
use pgw_core::{Command, Config, MemberConfig, Outcome, Role};
use pgw_proto::admin_client::AdminClient;
use tonic::Status;

use crate::member::Shared;
use crate::raft::store;
use crate::tls::Tls;

/// How long `--join` keeps asking while no member answers at all.
const JOIN_PATIENCE: Duration = Duration::from_secs(30);

/// A non-voter at most this many entries behind the leader may vote.
const CAUGHT_UP_ENTRIES: u64 = 16;

/// Why `--join` stopped (nothing was stored).
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Unreachable(String),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Config(#[from] pgw_core::ConfigError),
}

/// Takes the applied roster when it is newer than the one this member runs with: stores it
/// (crash-safely, before acting on it), then swaps the running config, the member
/// certificates accepted, the peer addresses and names. Called after every apply.
pub fn follow(s: &Shared) {
    let _one_at_a_time = match s.config.changing.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    let Some(applied) = s.sm.applied().facts.roster else {
        return;
    };
    let current = s.config.roster();
    if applied.version <= current.version && applied.generation == current.generation {
        return;
    }
    if applied.get(&s.config.file().member).is_none() {
        // Removed: store the list (a restart then says so) and keep running idle, refused by
        // the others, until the operator stops this member.
        if current.get(&s.config.file().member).is_some() {
            if let Err(e) = store::write_roster(&s.config.file().data_dir, &applied) {
                tracing::error!("cannot store the group's member list: {e}");
            }
            tracing::warn!(
                version = applied.version,
                "this member was removed from the group; stop it (systemctl disable --now pg-watcher)"
            );
            let mut gone = (*current).clone();
            gone.members.retain(|m| m.name != s.config.file().member);
            gone.version = applied.version;
            s.config.set((*s.cfg()).clone(), gone);
        }
        return;
    }
    let cfg = roster::effective(s.config.file(), &applied);
    if let Err(e) = cfg.validate() {
        tracing::error!(
            version = applied.version,
            "the group's member list does not give a valid config here, keeping version {}: {e}",
            current.version
        );
        return;
    }
    if let Err(e) = store::write_roster(&s.config.file().data_dir, &applied) {
        tracing::error!("cannot store the group's member list: {e}");
        return;
    }
    s.policy.set_members(&cfg);
    s.book.set(&cfg);
    s.reach.set_names(store::names_by_id(&cfg));
    s.leader.set_config(&cfg);
    let names: Vec<&str> = applied.members.iter().map(|m| m.name.as_str()).collect();
    tracing::info!(
        version = applied.version,
        "member list now: {}",
        names.join(", ")
    );
    s.config.set(cfg, applied);
}

/// Follows the roster for as long as Raft runs.
pub async fn follow_loop(s: Shared) {
    let mut rx = s.raft.metrics();
    loop {
        follow(&s);
        if rx.changed().await.is_err() {
            return;
        }
        if rx.borrow().state == openraft::ServerState::Shutdown {
            return;
        }
    }
}

/// Raft's membership as leader `m` sees it.
fn observed(m: &openraft::RaftMetrics<u64, BasicNode>) -> Observed {
    let mem = m.membership_config.membership();
    let voters: BTreeSet<u64> = mem.voter_ids().collect();
    let learners: BTreeSet<u64> = mem.learner_ids().collect();
    let last = m.last_log_index.unwrap_or(0);
    let caught_up = m
        .replication
        .as_ref()
        .map(|r| {
            r.iter()
                .filter(|(id, matched)| {
                    learners.contains(id)
                        && matched
                            .as_ref()
                            .is_some_and(|l| l.index + CAUGHT_UP_ENTRIES >= last)
                })
                .map(|(id, _)| *id)
                .collect()
        })
        .unwrap_or_default();
    Observed {
        voters,
        learners,
        caught_up,
        joint: mem.get_joint_config().len() > 1,
    }
}

/// One reconciling step while this member leads: the next change `membership_step` names.
pub async fn reconcile(s: &Shared, m: &openraft::RaftMetrics<u64, BasicNode>) {
    let r = s.config.roster();
    let Some(step) = roster::membership_step(&r, &observed(m)) else {
        return;
    };
    let name = |id: u64| s.member_name(id);
    match step {
        Step::AddLearner { id, addr } => {
            match s.raft.add_learner(id, BasicNode { addr }, false).await {
                Ok(_) => tracing::info!(member = %name(id), "added as a non-voter"),
                Err(e) => tracing::debug!(member = %name(id), "adding as a non-voter: {e}"),
            }
        }
        Step::SetVoters(v) => {
            let list: Vec<String> = v.iter().map(|id| name(*id)).collect();
            match s.raft.change_membership(v.clone(), true).await {
                Ok(_) => tracing::info!("voters now: {}", list.join(", ")),
                Err(e) => tracing::warn!("changing voters to {}: {e}", list.join(", ")),
            }
        }
        Step::RemoveLearners(ids) => {
            let list: Vec<String> = ids.iter().map(|id| name(*id)).collect();
            match s
                .raft
                .change_membership(ChangeMembers::RemoveNodes(ids), false)
                .await
            {
                Ok(_) => tracing::info!("removed from Raft: {}", list.join(", ")),
                Err(e) => tracing::warn!("removing {}: {e}", list.join(", ")),
            }
        }
    }
}

/// The group's list as applied here (the founding list until the first change).
fn applied_roster(s: &Shared, facts: &pgw_core::Facts) -> Roster {
    facts
        .roster
        .clone()
        .unwrap_or_else(|| (*s.config.roster()).clone())
}

/// A member as `pgwctl member add` describes it, checked.
pub fn member_from_spec(spec: &pgw_proto::MemberSpec) -> Result<MemberConfig, Status> {
    let bad = |field: &str, why: &str| Status::invalid_argument(format!("member.{field}: {why}"));
    let role = match spec.role.as_str() {
        "data" => Role::Data,
        "arbiter" => Role::Arbiter,
        "sidecar" => Role::Sidecar,
        other => {
            return Err(bad(
                "role",
                &format!("`{other}` is not one of data, arbiter, sidecar"),
            ))
        }
    };
    if spec.id == 0 {
        return Err(bad(
            "id",
            "give the new member's node id (>= 1, never used before)",
        ));
    }
    let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
    Ok(MemberConfig {
        name: spec.name.clone(),
        id: spec.id,
        role,
        grpc: spec.grpc.clone(),
        http: spec.http.clone(),
        priority: if spec.priority == 0 {
            pgw_core::config::defaults::PRIORITY
        } else {
            spec.priority
        },
        postgres: opt(&spec.postgres),
        pgpool: opt(&spec.pgpool),
        pcp: opt(&spec.pcp),
        room: opt(&spec.room),
        spare: spec.spare,
    })
}

/// The new roster for a `MemberChange` request, checked by the pure rules and by the config
/// it gives (`validate()` names the bad field). Leader only.
pub fn plan(s: &Shared, req: &pgw_proto::MemberChangeRequest) -> Result<(Roster, String), Status> {
    let facts = s.sm.applied().facts;
    let current = applied_roster(s, &facts);
    let primaries = facts.primaries();
    let refused = |e: roster::RosterError| Status::failed_precondition(e.to_string());
    if !req.promote.is_empty() {
        if req.member.is_some() || !req.old.is_empty() {
            return Err(Status::invalid_argument(
                "promote is a change of its own: name no member to add or remove with it",
            ));
        }
        let next = current.promote(&req.promote).map_err(refused)?;
        let event = format!(
            "spare member {} promoted: it votes once it has caught up",
            req.promote
        );
        return checked(s, next, event);
    }
    let (next, event) = match (&req.member, req.old.as_str()) {
        (Some(spec), "") => {
            let m = member_from_spec(spec)?;
            let event = format!(
                "member {} added ({}, room {}, id {}); a non-voter until it has caught up",
                m.name,
                m.role,
                m.room(),
                m.id
            );
            (current.add(m).map_err(refused)?, event)
        }
        (None, old) if !old.is_empty() => (
            current.remove(old, &primaries).map_err(refused)?,
            format!("member {old} removed"),
        ),
        (Some(spec), old) => {
            let m = member_from_spec(spec)?;
            let event = format!(
                "member {old} replaced by {} ({}, room {}, id {})",
                m.name,
                m.role,
                m.room(),
                m.id
            );
            (current.replace(old, m, &primaries).map_err(refused)?, event)
        }
        (None, _) => {
            return Err(Status::invalid_argument(
                "name a member to add, to remove (old), or both to replace",
            ))
        }
    };
    checked(s, next, event)
}

fn checked(s: &Shared, next: Roster, event: String) -> Result<(Roster, String), Status> {
    let next = roster::with_pools(next, &s.cfg(), s.config.file());
    let cfg = roster::effective(s.config.file(), &next);
    cfg.validate()
        .map_err(|e| Status::invalid_argument(format!("the new member list: {e}")))?;
    Ok((next, event))
}

/// Proposes the planned roster (leader only). Returns (log index, version).
pub async fn commit(
    s: &Shared,
    next: Roster,
    event: String,
    asked_by: &str,
) -> Result<(u64, u64, String), Status> {
    let version = next.version;
    match s
        .propose_as(
            Command::SetRoster {
                roster: next,
                event,
            },
            Some(asked_by),
        )
        .await?
    {
        (_, Outcome::Rejected { reason }, _) => Err(Status::failed_precondition(format!(
            "member change rejected: {reason}"
        ))),
        (index, _, by) => {
            follow(s);
            Ok((index, version, by))
        }
    }
}

/// Stops this member's Raft for good once a peer names a newer group generation: the group
/// was recovered without it (`pg-watcher --force-new-group`), so it must neither vote nor lead
/// in the old one. Records it (a restart is refused, naming the generation), and keeps running
/// idle: the sidecar's lease guard fences a primary here at its deadline (no renewal comes).
pub async fn superseded_loop(s: Shared) {
    let ours = s.config.roster().generation;
    let (g, from) = loop {
        match s.reach.newer_generation() {
            Some((g, from)) if g > ours => break (g, from),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let mark = store::Superseded {
        generation: g,
        ours,
        seen_from: from.clone(),
    };
    if let Err(e) = store::write_superseded(&s.config.file().data_dir, &mark) {
        tracing::error!("cannot record that this member was superseded: {e}");
    }
    tracing::error!(
        generation = g,
        ours,
        from = %from,
        "{}",
        mark.message()
    );
    if let Err(e) = s.raft.shutdown().await {
        tracing::error!("stopping Raft: {e}");
    }
}

/// Before Raft starts: asks every other member (in parallel, briefly) for its group
/// generation. A newer one means the group was recovered without this member: that is
/// recorded (`superseded.pgw`) and returned, so that the member never votes or leads in the
/// old group, even for the moments it would take to hear it through Raft. Members that do not
/// answer prove nothing either way.
pub async fn superseded_at_start(
    running: &Config,
    roster: &Roster,
    tls: &Tls,
) -> Result<Option<store::Superseded>, store::StoreError> {
    let identity = pgw_proto::Identity {
        cluster_id: running.cluster_id.clone(),
        fingerprint: roster.group.clone(),
        from: running.me().map(|m| m.id).unwrap_or_default(),
        from_name: running.member.clone(),
        generation: roster.generation,
    };
    let mut asks = tokio::task::JoinSet::new();
    for m in running.members.iter().filter(|m| m.name != running.member) {
        let tls = tls.clone();
        let identity = identity.clone();
        let (name, addr) = (m.name.clone(), m.grpc.clone());
        asks.spawn(async move {
            let ch = crate::tls::channel(
                &addr,
                None,
                std::sync::Arc::new(move || tls.current().client.clone()),
                Duration::from_millis(500),
            )
            .ok()?;
            let mut req = tonic::Request::new(pgw_proto::HelloRequest {
                identity: Some(identity),
            });
            req.set_timeout(Duration::from_millis(800));
            let g =
                match tokio::time::timeout(Duration::from_secs(1), AdminClient::new(ch).hello(req))
                    .await
                {
                    Ok(Ok(r)) => r.into_inner().generation,
                    Ok(Err(st)) => crate::auth::generation_of(&st)?,
                    Err(_) => return None,
                };
            Some((g, name))
        });
    }
    let mut newest: Option<(u64, String)> = None;
    while let Some(r) = asks.join_next().await {
        if let Ok(Some((g, name))) = r {
            if newest.as_ref().is_none_or(|(x, _)| g > *x) {
                newest = Some((g, name));
            }
        }
    }
    match newest {
        Some((g, from)) if g > roster.generation => {
            let mark = store::Superseded {
                generation: g,
                ours: roster.generation,
                seen_from: from,
            };
            store::write_superseded(&running.data_dir, &mark)?;
            Ok(Some(mark))
        }
        _ => Ok(None),
    }
}

/// The roster a `--join`ing member asked for (it must be in it).
pub fn roster_for(s: &Shared, caller: &str) -> Result<String, Status> {
    let r =
        s.sm.applied()
            .facts
            .roster
            .unwrap_or_else(|| (*s.config.roster()).clone());
    if r.get(caller).is_none() {
        return Err(Status::failed_precondition(format!(
            "`{caller}` is not in the group's member list; run `pgwctl member add {caller} ...` first"
        )));
    }
    serde_json::to_string(&r).map_err(|e| Status::internal(e.to_string()))
}

/// `pg-watcher --join ADDR,...`: fetches the group's member list from the first member that
/// answers, checks that it lists this member as the file describes it, and stores it. A data
/// directory of an older generation (the group was recovered without this member) or of this
/// member under another node id (removed and added back) is cleared first: the group said so.
/// With a list already stored and no member answering, the member starts as it is (joined
/// before). Nothing is stored when anything is wrong.
pub async fn join(cfg: &Config, tls: &Tls, addrs: &[String]) -> Result<(), JoinError> {
    let stored = store::read_roster(&cfg.data_dir)?;
    // The member asked may be starting (right after a forced recovery): keep asking a while
    // as long as nobody answers at all; an answer that refuses is final.
    let patience = std::time::Instant::now() + JOIN_PATIENCE;
    let fetched = loop {
        match fetch_roster(cfg, tls, addrs).await {
            Err(JoinError::Unreachable(e))
                if stored.is_none() && std::time::Instant::now() < patience =>
            {
                tracing::info!("--join: no member answered yet ({e}); asking again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => break other,
        }
    };
    let r = match fetched {
        Ok(r) => r,
        Err(e) if stored.is_some() => {
            tracing::warn!("already joined (the data directory holds the group's member list); the group did not answer: {e}");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    check_joined(cfg, &r)?;
    let mine = cfg.me().map(|m| m.id).unwrap_or_default();
    if let Some((generation, id)) = store::stored_generation(&cfg.data_dir)? {
        if r.generation < generation {
            return Err(JoinError::Refused(format!(
                "the group answered with generation {}, older than this data directory's {generation}: a member of an abandoned group answered",
                r.generation
            )));
        }
        if r.generation > generation || id != mine {
            tracing::warn!(
                from_generation = generation,
                to_generation = r.generation,
                "clearing this member's Raft state of generation {generation} (node id {id}) to join generation {} as node id {mine}",
                r.generation
            );
            store::reset_for_generation(&cfg.data_dir)?;
        } else if stored.as_ref().is_some_and(|s| s.version >= r.version) {
            tracing::info!("already joined (the data directory holds the group's member list)");
            return Ok(());
        }
    }
    store::write_roster(&cfg.data_dir, &r)?;
    tracing::info!(
        version = r.version,
        generation = r.generation,
        "joined: stored the group's member list"
    );
    Ok(())
}

/// The group's member list from the first of `addrs` that gives it.
async fn fetch_roster(cfg: &Config, tls: &Tls, addrs: &[String]) -> Result<Roster, JoinError> {
    let identity = pgw_proto::Identity {
        cluster_id: cfg.cluster_id.clone(),
        fingerprint: String::new(),
        from: cfg.me().map(|m| m.id).unwrap_or_default(),
        from_name: cfg.member.clone(),
        generation: 0,
    };
    let mut errors = Vec::new();
    let mut refused = false;
    for addr in addrs {
        let client_tls = tls.clone();
        let ch = match crate::tls::channel(
            addr,
            None,
            std::sync::Arc::new(move || client_tls.current().client.clone()),
            Duration::from_secs(2),
        ) {
            Ok(c) => c,
            Err(e) => {
                errors.push(format!("{addr}: {e}"));
                continue;
            }
        };
        let mut req = tonic::Request::new(pgw_proto::RosterRequest {
            identity: Some(identity.clone()),
        });
        req.set_timeout(Duration::from_secs(5));
        let reply = match AdminClient::new(ch).get_roster(req).await {
            Ok(r) => r.into_inner(),
            Err(e) => {
                refused |= !matches!(
                    e.code(),
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
                );
                errors.push(format!("{addr}: {}", e.message()));
                continue;
            }
        };
        if reply.cluster_id != cfg.cluster_id {
            return Err(JoinError::Refused(format!(
                "{addr} belongs to cluster id `{}`, this member's config says `{}`",
                reply.cluster_id, cfg.cluster_id
            )));
        }
        let r: Roster = serde_json::from_str(&reply.roster).map_err(|e| {
            JoinError::Refused(format!("{addr} sent an unreadable member list: {e}"))
        })?;
        tracing::info!(from = %addr, version = r.version, generation = r.generation, "the group's member list");
        return Ok(r);
    }
    let why = format!(
        "no member gave the group's member list ({})",
        errors.join("; ")
    );
    Err(if refused {
        JoinError::Refused(why)
    } else {
        JoinError::Unreachable(why)
    })
}

/// The group's record of this member must be what the file says of it (node id, role and
/// addresses), and the resulting config valid.
fn check_joined(cfg: &Config, r: &Roster) -> Result<(), JoinError> {
    let Some(theirs) = r.get(&cfg.member) else {
        return Err(JoinError::Refused(format!(
            "the group does not list `{}`; run `pgwctl member add {} ...` first",
            cfg.member, cfg.member
        )));
    };
    if let Some(mine) = cfg.me() {
        let fields: [(&str, String, String); 4] = [
            ("id", mine.id.to_string(), theirs.id.to_string()),
            ("role", mine.role.to_string(), theirs.role.to_string()),
            ("grpc", mine.grpc.clone(), theirs.grpc.clone()),
            ("http", mine.http.clone(), theirs.http.clone()),
        ];
        for (f, a, b) in fields {
            if a != b {
                return Err(JoinError::Refused(format!(
                    "members[{}].{f}: this file says `{a}`, the group's member list says `{b}`",
                    cfg.member
                )));
            }
        }
    }
    roster::effective(cfg, r).validate()?;
    Ok(())
}

/// Each member's standing for `pgwctl status`: voter, non_voter, joining (listed, not yet in
/// Raft), leaving (in Raft, no longer listed).
pub fn standings(s: &Shared) -> BTreeMap<u64, &'static str> {
    let seen = observed(&s.raft.metrics().borrow());
    let mut out = BTreeMap::new();
    for id in s.config.roster().ids() {
        let st = if seen.voters.contains(&id) {
            "voter"
        } else if seen.learners.contains(&id) {
            "non_voter"
        } else {
            "joining"
        };
        out.insert(id, st);
    }
    for id in seen.voters.union(&seen.learners) {
        out.entry(*id).or_insert("leaving");
    }
    out
}

/// Whether Raft's membership is changing (a joint configuration is being committed).
pub fn changing(s: &Shared) -> bool {
    observed(&s.raft.metrics().borrow()).joint
}
