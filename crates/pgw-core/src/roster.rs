//! The group's membership as the group itself holds it.
//!
//! The config file's `[[members]]` only bootstrap a group. From the first `pgwctl member add`,
//! `remove` or `replace` on, the member list lives in the replicated facts as a [`Roster`]:
//! every member runs with its file's settings and the roster's member list
//! ([`effective`]), and a member started with `--join` learns the list from the group.
//!
//! Two numbers fence it. `version` grows with every change, so a change is applied only on top
//! of the list it was computed from. `generation` grows only when an operator forces a new
//! group out of the survivors of a lost majority (`pg-watcher --force-new-group`): members of an
//! older generation are refused by every member of the new one and rejoin only through
//! `pgwctl member add`.
//!
//! [`membership_step`] is the reconciler's one rule: from the roster (intended) and Raft's
//! membership (observed), the next change to make, one at a time.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::config::{Config, MemberConfig};

/// The group's member list, replicated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Hash)]
pub struct Roster {
    /// Grows by one with every change of the list.
    pub version: u64,
    /// Grows by one with every forced recovery (a new group out of the survivors).
    pub generation: u64,
    /// Digest of the founding member list: names the group across all its changes.
    pub group: String,
    pub members: Vec<MemberConfig>,
    /// Node ids of members that left: never given to anyone again (a returning old host with
    /// its old id would otherwise be taken for the new one by Raft).
    #[serde(default)]
    pub retired_ids: BTreeSet<u64>,
    /// The founding member list (what the config files bootstrapped): the log entries written
    /// before the first change are checked against it on every member, old or joined.
    #[serde(default)]
    pub founders: Vec<MemberConfig>,
    /// Each pooled cluster's pgpool backends in backend order, `(member, postgres)`, once the
    /// list changed: append-only, because a running pgpool-II never renumbers its backends; a
    /// member that left stays as a backend the leader keeps detached (see [`with_pools`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pools: BTreeMap<String, Vec<(String, String)>>,
}

/// Why a membership change is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RosterError {
    #[error("member `{0}` is already in the group")]
    NameTaken(String),
    #[error("node id {id} is already used by `{by}`")]
    IdTaken { id: u64, by: String },
    #[error("node id {0} belonged to a member that left the group; ids are never reused")]
    IdRetired(u64),
    #[error("{field} {addr} is already used by `{by}`")]
    AddrTaken {
        field: &'static str,
        addr: String,
        by: String,
    },
    #[error("no member `{0}` in the group")]
    Unknown(String),
    #[error(
        "`{member}` holds the primary of cluster `{cluster}`: switch it over first (pgwctl switchover --cluster {cluster})"
    )]
    HoldsPrimary { member: String, cluster: String },
    #[error(
        "the group would have {0} voter(s); it needs at least 2 (and 3 for automatic failover)"
    )]
    TooFewVoters(usize),
    #[error("the group would have {0} voters; at most 7")]
    TooManyVoters(usize),
    #[error("the group would have {0} members; at most 32")]
    TooManyMembers(usize),
    #[error("roster changed meanwhile (version {found}, change computed on {expected}); retry")]
    Stale { expected: u64, found: u64 },
    #[error("a change of the group's generation is only made offline (--force-new-group)")]
    Generation,
    #[error("`{0}` is not a spare (it votes already)")]
    NotSpare(String),
    #[error("name at least one surviving member")]
    NoSurvivors,
}

/// What `pgwctl status` and the reconciler call a member's place in Raft.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Standing {
    Voter,
    NonVoter,
}

impl Roster {
    /// The roster a group starts with: the founding members of its config files.
    pub fn founding(cfg: &Config) -> Roster {
        Roster {
            version: 0,
            generation: 0,
            group: cfg.members_fingerprint(),
            members: cfg.members.clone(),
            retired_ids: BTreeSet::new(),
            founders: cfg.members.clone(),
            pools: BTreeMap::new(),
        }
    }

    /// The config the log entries before the first change were checked with.
    pub fn founding_config(&self, file: &Config) -> Config {
        let mut c = file.clone();
        c.members = self.founders.clone();
        c.generation = self.generation;
        c
    }

    pub fn get(&self, name: &str) -> Option<&MemberConfig> {
        self.members.iter().find(|m| m.name == name)
    }

    /// Members that vote once caught up (data and arbiter members that are not spares).
    pub fn voter_ids(&self) -> BTreeSet<u64> {
        self.members
            .iter()
            .filter(|m| m.votes())
            .map(|m| m.id)
            .collect()
    }

    pub fn ids(&self) -> BTreeSet<u64> {
        self.members.iter().map(|m| m.id).collect()
    }

    fn check_new(&self, m: &MemberConfig) -> Result<(), RosterError> {
        if self.get(&m.name).is_some() {
            return Err(RosterError::NameTaken(m.name.clone()));
        }
        if let Some(x) = self.members.iter().find(|x| x.id == m.id) {
            return Err(RosterError::IdTaken {
                id: m.id,
                by: x.name.clone(),
            });
        }
        if self.retired_ids.contains(&m.id) {
            return Err(RosterError::IdRetired(m.id));
        }
        for x in &self.members {
            for (field, a, b) in [("grpc", &m.grpc, &x.grpc), ("http", &m.http, &x.http)] {
                if a == b {
                    return Err(RosterError::AddrTaken {
                        field,
                        addr: a.clone(),
                        by: x.name.clone(),
                    });
                }
            }
            if m.postgres.is_some() && m.postgres == x.postgres {
                return Err(RosterError::AddrTaken {
                    field: "postgres",
                    addr: m.postgres.clone().unwrap_or_default(),
                    by: x.name.clone(),
                });
            }
        }
        Ok(())
    }

    fn check_size(&self) -> Result<(), RosterError> {
        let voters = self.voter_ids().len();
        // A group forced out of survivors may run on one voter until members are added back.
        let least = if self.generation > 0 { 1 } else { 2 };
        if voters < least {
            return Err(RosterError::TooFewVoters(voters));
        }
        if voters > 7 {
            return Err(RosterError::TooManyVoters(voters));
        }
        if self.members.len() > 32 {
            return Err(RosterError::TooManyMembers(self.members.len()));
        }
        Ok(())
    }

    fn check_leaving(
        &self,
        name: &str,
        primaries: &BTreeMap<String, String>,
    ) -> Result<&MemberConfig, RosterError> {
        let m = self
            .get(name)
            .ok_or_else(|| RosterError::Unknown(name.to_string()))?;
        if let Some((cluster, _)) = primaries.iter().find(|(_, p)| p.as_str() == name) {
            return Err(RosterError::HoldsPrimary {
                member: name.to_string(),
                cluster: cluster.clone(),
            });
        }
        Ok(m)
    }

    /// The roster with `m` added (as a non-voter until it has caught up).
    pub fn add(&self, m: MemberConfig) -> Result<Roster, RosterError> {
        self.check_new(&m)?;
        let mut r = self.clone();
        r.version += 1;
        r.members.push(m);
        r.check_size()?;
        Ok(r)
    }

    /// The roster without `name`. `primaries`: cluster -> member recorded as its primary.
    pub fn remove(
        &self,
        name: &str,
        primaries: &BTreeMap<String, String>,
    ) -> Result<Roster, RosterError> {
        let old = self.check_leaving(name, primaries)?.clone();
        let mut r = self.clone();
        r.version += 1;
        r.members.retain(|x| x.name != name);
        r.retired_ids.insert(old.id);
        r.check_size()?;
        Ok(r)
    }

    /// The roster with `old` (a dead host) replaced by `new`, in one change: Raft moves the
    /// vote from one to the other in one joint step once `new` has caught up.
    pub fn replace(
        &self,
        old: &str,
        new: MemberConfig,
        primaries: &BTreeMap<String, String>,
    ) -> Result<Roster, RosterError> {
        let gone = self.check_leaving(old, primaries)?.clone();
        let mut without = self.clone();
        without.members.retain(|x| x.name != old);
        without.retired_ids.insert(gone.id);
        without.check_new(&new)?;
        without.version += 1;
        without.members.push(new);
        without.check_size()?;
        Ok(without)
    }

    /// The roster with the spare `name` voting (`pgwctl member promote`): the leader makes it
    /// a voter once it has caught up, through joint consensus, so it needs a majority.
    pub fn promote(&self, name: &str) -> Result<Roster, RosterError> {
        let m = self
            .get(name)
            .ok_or_else(|| RosterError::Unknown(name.to_string()))?;
        if !m.spare {
            return Err(RosterError::NotSpare(name.to_string()));
        }
        let mut r = self.clone();
        r.version += 1;
        for x in r.members.iter_mut().filter(|x| x.name == name) {
            x.spare = false;
        }
        r.check_size()?;
        Ok(r)
    }

    /// The first roster of a new generation made of `survivors` (`pg-watcher
    /// --force-new-group`, offline): every other member's id is retired (a returning host is
    /// refused by generation and comes back only through `pgwctl member add` under a new id);
    /// spares among the survivors vote. The survivors found the new generation.
    pub fn force(&self, survivors: &BTreeSet<String>) -> Result<Roster, RosterError> {
        if survivors.is_empty() {
            return Err(RosterError::NoSurvivors);
        }
        if let Some(unknown) = survivors.iter().find(|n| self.get(n).is_none()) {
            return Err(RosterError::Unknown(unknown.clone()));
        }
        let mut r = self.clone();
        r.generation += 1;
        r.version = 0;
        r.members = self
            .members
            .iter()
            .filter(|m| survivors.contains(&m.name))
            .cloned()
            .map(|mut m| {
                m.spare = false;
                m
            })
            .collect();
        r.retired_ids.extend(
            self.members
                .iter()
                .filter(|m| !survivors.contains(&m.name))
                .map(|m| m.id),
        );
        r.founders = r.members.clone();
        r.check_size()?;
        Ok(r)
    }

    /// Members of this roster that `next` no longer lists.
    pub fn lost_in(&self, next: &Roster) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| next.get(&m.name).is_none_or(|n| n.id != m.id))
            .map(|m| m.name.clone())
            .collect()
    }

    /// Whether `next` may replace `self` in the facts: computed on this version, same group
    /// and generation, and a valid list.
    pub fn check_successor(&self, next: &Roster) -> Result<(), RosterError> {
        if next.version != self.version + 1 {
            return Err(RosterError::Stale {
                expected: next.version.saturating_sub(1),
                found: self.version,
            });
        }
        if next.generation != self.generation || next.group != self.group {
            return Err(RosterError::Generation);
        }
        next.check_size()
    }
}

/// `next` with each pooled cluster's pgpool backend list carried on from the list running
/// pgpools have now (`before`'s: the founding servers, or the roster's) and this list's new
/// servers appended. Nothing is ever removed or reordered: pgpool-II numbers its backends by
/// position, and a member that left stays as a backend that is never attached again.
pub fn with_pools(mut next: Roster, before: &Config, file: &Config) -> Roster {
    let after = effective(file, &next);
    for c in before.pooled_clusters() {
        let mut list = before.pgpool_backends(&c);
        for b in after.pgpool_backends(&c) {
            if !list.iter().any(|(m, _)| *m == b.0) {
                list.push(b);
            }
        }
        next.pools.insert(c, list);
    }
    next
}

/// A member's running config: its file's settings with the group's member list (and its
/// generation, and its pgpool backend lists).
pub fn effective(file: &Config, roster: &Roster) -> Config {
    let mut c = file.clone();
    c.members = roster.members.clone();
    c.generation = roster.generation;
    c.pools = roster.pools.clone();
    // The first primary is history once the list changed: a member that left cannot be named.
    for cl in c.clusters.iter_mut() {
        if cl
            .bootstrap_primary
            .as_ref()
            .is_some_and(|b| roster.get(b).is_none())
        {
            cl.bootstrap_primary = None;
        }
    }
    c
}

/// The next change the leader makes to Raft's membership, one at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Add this roster member as a non-voter (it starts receiving the log).
    AddLearner { id: u64, addr: String },
    /// Make exactly these the voters (openraft's joint consensus carries it out).
    SetVoters(BTreeSet<u64>),
    /// Drop these non-voters, which left the roster.
    RemoveLearners(BTreeSet<u64>),
}

/// Raft's membership as the leader sees it.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub voters: BTreeSet<u64>,
    pub learners: BTreeSet<u64>,
    /// Non-voters whose log is close enough to the leader's to vote without stalling commits.
    pub caught_up: BTreeSet<u64>,
    /// A joint configuration is being committed: make no other change meanwhile.
    pub joint: bool,
}

/// From the roster (intended) and Raft's membership (observed), the next change.
///
/// - A roster member Raft does not know is added as a non-voter first.
/// - Voters become exactly the roster's voting members that have caught up; a voter that left
///   the roster is kept while a roster voter it makes way for is still catching up (a replaced
///   host's vote moves in one joint step, never leaving the group smaller meanwhile).
/// - Non-voters that left the roster are dropped last.
pub fn membership_step(roster: &Roster, seen: &Observed) -> Option<Step> {
    if seen.joint {
        return None;
    }
    let known: BTreeSet<u64> = seen.voters.union(&seen.learners).copied().collect();
    if let Some(m) = roster.members.iter().find(|m| !known.contains(&m.id)) {
        return Some(Step::AddLearner {
            id: m.id,
            addr: m.grpc.clone(),
        });
    }
    let wanted = roster.voter_ids();
    let waiting: BTreeSet<u64> = wanted
        .iter()
        .filter(|id| !seen.voters.contains(id) && !seen.caught_up.contains(id))
        .copied()
        .collect();
    let mut target: BTreeSet<u64> = wanted
        .iter()
        .filter(|id| seen.voters.contains(id) || seen.caught_up.contains(id))
        .copied()
        .collect();
    if !waiting.is_empty() {
        // Keep departing voters until their successors can vote.
        target.extend(seen.voters.iter().filter(|id| !wanted.contains(id)));
    }
    if target != seen.voters && target.len() >= 2 {
        return Some(Step::SetVoters(target));
    }
    let ids = roster.ids();
    let stale: BTreeSet<u64> = seen
        .learners
        .iter()
        .filter(|id| !ids.contains(id))
        .copied()
        .collect();
    if !stale.is_empty() {
        return Some(Step::RemoveLearners(stale));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Role;

    fn member(name: &str, id: u64, role: Role) -> MemberConfig {
        MemberConfig {
            name: name.into(),
            id,
            role,
            grpc: format!("127.0.0.1:{}", 7000 + id),
            http: format!("127.0.0.1:{}", 8000 + id),
            priority: 100,
            postgres: (role == Role::Data).then(|| format!("127.0.0.1:{}", 9000 + id)),
            pgpool: None,
            pcp: None,
            room: None,
            spare: false,
        }
    }

    fn three() -> Roster {
        Roster {
            version: 0,
            generation: 0,
            group: "g".into(),
            members: vec![
                member("a", 1, Role::Data),
                member("b", 2, Role::Data),
                member("c", 3, Role::Arbiter),
            ],
            retired_ids: BTreeSet::new(),
            founders: Vec::new(),
            pools: Default::default(),
        }
    }

    fn ids(v: &[u64]) -> BTreeSet<u64> {
        v.iter().copied().collect()
    }

    fn primary(cluster: &str, m: &str) -> BTreeMap<String, String> {
        [(cluster.to_string(), m.to_string())].into_iter().collect()
    }

    #[test]
    fn force_keeps_the_survivors_retires_the_rest_and_makes_spares_vote() {
        let mut r = three();
        let mut spare = member("s", 4, Role::Arbiter);
        spare.spare = true;
        r = r.add(spare).expect("add spare");
        assert_eq!(r.voter_ids(), ids(&[1, 2, 3]), "a spare does not vote");
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(r.force(&BTreeSet::new()), Err(RosterError::NoSurvivors));
        assert_eq!(
            r.force(&names(&["b", "x"])),
            Err(RosterError::Unknown("x".into()))
        );
        let f = r.force(&names(&["b", "s"])).expect("force");
        assert_eq!((f.generation, f.version), (1, 0));
        assert_eq!(
            f.voter_ids(),
            ids(&[2, 4]),
            "the spare votes in the new generation"
        );
        assert_eq!(f.founders, f.members);
        assert!(f.retired_ids.is_superset(&ids(&[1, 3])));
        assert_eq!(r.lost_in(&f), vec!["a".to_string(), "c".to_string()]);
        // The lost come back only under new ids.
        assert_eq!(
            f.add(member("a", 1, Role::Data)),
            Err(RosterError::IdRetired(1))
        );
        let back = f
            .add(member("a", 11, Role::Data))
            .expect("a under a new id");
        assert_eq!(back.generation, 1);
        // One survivor is a group of one voter (generation > 0 only).
        let alone = r.force(&names(&["b"])).expect("one survivor");
        assert_eq!(alone.voter_ids(), ids(&[2]));
        assert_eq!(
            r.remove("a", &BTreeMap::new())
                .and_then(|x| x.remove("b", &BTreeMap::new())),
            Err(RosterError::TooFewVoters(1)),
            "generation 0 never runs on one voter"
        );
    }

    #[test]
    fn promote_makes_only_a_spare_vote() {
        let mut spare = member("s", 4, Role::Arbiter);
        spare.spare = true;
        let r = three().add(spare).expect("add spare");
        assert_eq!(r.promote("a"), Err(RosterError::NotSpare("a".into())));
        assert_eq!(r.promote("zz"), Err(RosterError::Unknown("zz".into())));
        let p = r.promote("s").expect("promote");
        assert_eq!(p.version, r.version + 1);
        assert_eq!(p.voter_ids(), ids(&[1, 2, 3, 4]));
    }

    #[test]
    fn add_refuses_duplicates_and_retired_ids() {
        let r = three();
        assert_eq!(
            r.add(member("a", 9, Role::Arbiter)),
            Err(RosterError::NameTaken("a".into()))
        );
        assert!(matches!(
            r.add(member("d", 2, Role::Arbiter)),
            Err(RosterError::IdTaken { id: 2, .. })
        ));
        let mut same_addr = member("d", 4, Role::Arbiter);
        same_addr.grpc = r.members[0].grpc.clone();
        assert!(matches!(
            r.add(same_addr),
            Err(RosterError::AddrTaken { field: "grpc", .. })
        ));
        let gone = r.remove("c", &BTreeMap::new()).expect("remove c");
        assert_eq!(gone.version, 1);
        assert_eq!(
            gone.add(member("c2", 3, Role::Arbiter)),
            Err(RosterError::IdRetired(3))
        );
        let added = r.add(member("d", 4, Role::Arbiter)).expect("add d");
        assert_eq!(added.version, 1);
        assert_eq!(added.voter_ids(), ids(&[1, 2, 3, 4]));
    }

    #[test]
    fn remove_refuses_the_primary_and_a_group_of_one() {
        let r = three();
        assert_eq!(
            r.remove("a", &primary("global", "a")),
            Err(RosterError::HoldsPrimary {
                member: "a".into(),
                cluster: "global".into()
            })
        );
        assert_eq!(
            r.remove("zz", &BTreeMap::new()),
            Err(RosterError::Unknown("zz".into()))
        );
        let two = r.remove("c", &BTreeMap::new()).expect("two voters stay");
        assert_eq!(
            two.remove("b", &BTreeMap::new()),
            Err(RosterError::TooFewVoters(1))
        );
    }

    #[test]
    fn replace_moves_the_vote_in_one_change() {
        let r = three();
        let next = r
            .replace("c", member("e", 5, Role::Arbiter), &primary("global", "a"))
            .expect("replace");
        assert_eq!(next.voter_ids(), ids(&[1, 2, 5]));
        assert!(next.retired_ids.contains(&3));
        assert_eq!(r.check_successor(&next), Ok(()));
        // Computed on a roster that changed meanwhile: refused.
        let other = r.add(member("d", 4, Role::Arbiter)).expect("add");
        assert!(matches!(
            other.check_successor(&next),
            Err(RosterError::Stale { .. })
        ));
        // The new member must not take a name or address in use.
        assert!(r
            .replace("c", member("b", 6, Role::Arbiter), &BTreeMap::new())
            .is_err());
    }

    #[test]
    fn reconciler_adds_then_promotes_then_drops() {
        let r = three()
            .replace("c", member("e", 5, Role::Arbiter), &BTreeMap::new())
            .expect("replace");
        // Raft still has a, b, c voting.
        let mut seen = Observed {
            voters: ids(&[1, 2, 3]),
            ..Default::default()
        };
        assert_eq!(
            membership_step(&r, &seen),
            Some(Step::AddLearner {
                id: 5,
                addr: "127.0.0.1:7005".into()
            })
        );
        seen.learners = ids(&[5]);
        // e has not caught up: c keeps its vote, nothing changes.
        assert_eq!(membership_step(&r, &seen), None);
        seen.caught_up = ids(&[5]);
        assert_eq!(
            membership_step(&r, &seen),
            Some(Step::SetVoters(ids(&[1, 2, 5])))
        );
        // While the joint configuration commits, nothing else.
        seen.joint = true;
        assert_eq!(membership_step(&r, &seen), None);
        seen = Observed {
            voters: ids(&[1, 2, 5]),
            ..Default::default()
        };
        assert_eq!(membership_step(&r, &seen), None);
    }

    #[test]
    fn reconciler_removes_a_voter_and_stale_learners() {
        let r = three().remove("c", &BTreeMap::new()).expect("remove");
        let seen = Observed {
            voters: ids(&[1, 2, 3]),
            learners: ids(&[7]),
            ..Default::default()
        };
        assert_eq!(
            membership_step(&r, &seen),
            Some(Step::SetVoters(ids(&[1, 2])))
        );
        let seen = Observed {
            voters: ids(&[1, 2]),
            learners: ids(&[3, 7]),
            ..Default::default()
        };
        assert_eq!(
            membership_step(&r, &seen),
            Some(Step::RemoveLearners(ids(&[3, 7])))
        );
    }

    #[test]
    fn sidecar_members_stay_non_voters() {
        let r = three()
            .add(member("s", 6, Role::Sidecar))
            .expect("add sidecar");
        let seen = Observed {
            voters: ids(&[1, 2, 3]),
            learners: ids(&[6]),
            caught_up: ids(&[6]),
            joint: false,
        };
        assert_eq!(membership_step(&r, &seen), None);
    }
}
