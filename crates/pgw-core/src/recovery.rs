//! Recovery after losing the majority: the rule behind `pg-watcher --force-new-group`.
//!
//! A group that lost the majority of its voters can decide nothing, by design. An operator who
//! knows the others are gone (or waited until they have been silent longer than the lease, so
//! that a primary among them has fenced itself) forces a new group out of the survivors, on one
//! surviving member, offline. [`force`] computes what that member starts with: a roster of a new
//! generation (the others' ids retired, so that a returning old host is refused by every member
//! of the new one and comes back only through `pgwctl member add`), and the facts it last
//! applied with every running operation ended, and, for each cluster whose primary was lost, a
//! forced failover that promotes the most advanced surviving server (decided at run time by
//! [`crate::failover::decide_operation`], once the survivors report). The history of every
//! cluster says who forced it, who was lost, and which primary's latest commits may be lost.

use std::collections::BTreeSet;

use crate::config::Config;
use crate::facts::{Command, Facts, Operation, OperationKind, OperationState, Proposal};
use crate::roster::{self, Roster, RosterError};

/// What the operator asked for, and where.
#[derive(Debug, Clone)]
pub struct Order {
    /// The members that form the new group (this member among them).
    pub survivors: BTreeSet<String>,
    /// The member the command runs on.
    pub member: String,
    /// Who ran it (OS user and host), for the history.
    pub by: String,
    /// Wall clock, ms (informational, as every history time).
    pub at_ms: u64,
    /// The index the new generation's first state takes (one past the last local log entry):
    /// the forced failovers' operation id.
    pub index: u64,
}

/// What the forcing member starts with.
#[derive(Debug, Clone)]
pub struct Forced {
    pub roster: Roster,
    pub facts: Facts,
    /// Members of the old roster that are not in the new generation.
    pub lost: Vec<String>,
    /// One line per cluster: what happens next.
    pub plan: Vec<String>,
}

/// Why a forced recovery is refused (nothing is changed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForceError {
    #[error("this member (`{0}`) must be one of the survivors")]
    NotASurvivor(String),
    #[error("every member is named a survivor: nothing was lost; a group with its majority changes members with `pgwctl member remove|replace`")]
    NothingLost,
    #[error(transparent)]
    Roster(#[from] RosterError),
}

/// The forced recovery of `facts` (the last state this member applied, its local log replayed
/// onto its snapshot) under `roster` (the member list it ran with); `file` is its config file.
pub fn force(
    facts: &Facts,
    file: &Config,
    roster: &Roster,
    order: &Order,
) -> Result<Forced, ForceError> {
    if !order.survivors.contains(&order.member) {
        return Err(ForceError::NotASurvivor(order.member.clone()));
    }
    // Running pgpools keep their backends: the lost members stay in the list, detached.
    let next = roster::with_pools(
        roster.force(&order.survivors)?,
        &roster::effective(file, roster),
        file,
    );
    let lost = roster.lost_in(&next);
    if lost.is_empty() {
        return Err(ForceError::NothingLost);
    }
    let running = roster::effective(file, &next);
    let survivors: Vec<&str> = next.members.iter().map(|m| m.name.as_str()).collect();
    let head = format!(
        "group forced to generation {} by {} on {}: survivors [{}]; lost [{}] (their ids retired: they rejoin only through `pgwctl member add`)",
        next.generation,
        order.by,
        order.member,
        survivors.join(", "),
        lost.join(", ")
    );
    let p = Proposal {
        command: Command::SetRoster {
            roster: next.clone(),
            event: head.clone(),
        },
        at_ms: order.at_ms,
        by: order.member.clone(),
        asked_by: Some(order.by.clone()),
    };
    let mut out = facts.clone();
    let mut plan = Vec::new();
    for (name, c) in out.clusters.iter_mut() {
        for op in c
            .operations
            .values_mut()
            .filter(|o| o.state == OperationState::Running)
        {
            op.state = OperationState::Failed;
            op.detail = format!(
                "ended by the forced recovery to generation {}",
                next.generation
            );
            op.finished_ms = Some(order.at_ms);
        }
        c.switchover_target = None;
        let servers = running.server_names(name);
        match c.primary.clone() {
            Some(primary) if servers.contains(&primary) => {
                c.record(
                    order.index,
                    &p,
                    format!("{head}; the primary {primary} survived and stays"),
                );
                plan.push(format!("{name}: the primary {primary} survived and stays"));
            }
            primary => {
                let gone = primary
                    .or_else(|| c.former_primary.clone())
                    .unwrap_or_else(|| "-".into());
                c.former_primary = None;
                c.primary = None;
                c.epoch += 1;
                c.sync_standbys.retain(|m| servers.contains(m));
                c.resync_pending = false;
                if servers.is_empty() {
                    let line = format!(
                        "{name}: no server survived; it has no primary until one is added back"
                    );
                    c.record(order.index, &p, format!("{head}; {line}"));
                    plan.push(line);
                    continue;
                }
                let list: Vec<&str> = servers.iter().map(String::as_str).collect();
                c.operations.insert(
                    order.index,
                    Operation {
                        id: order.index,
                        kind: OperationKind::Failover,
                        target: None,
                        state: OperationState::Running,
                        detail: "forced recovery: promote the most advanced surviving server"
                            .into(),
                        started_ms: order.at_ms,
                        finished_ms: None,
                        by: order.member.clone(),
                        accept_data_loss: true,
                        part_of: None,
                    },
                );
                let line = format!(
                    "{name}: the primary {gone} was lost; operation {} promotes the most advanced of [{}]; commits {gone} acknowledged after that server's WAL position may be lost (the promotion names it)",
                    order.index,
                    list.join(", ")
                );
                c.record(order.index, &p, format!("{head}; {line}"));
                plan.push(line);
            }
        }
    }
    for m in out
        .moves
        .values_mut()
        .filter(|m| m.state == OperationState::Running)
    {
        m.state = OperationState::Failed;
        m.detail = format!(
            "ended by the forced recovery to generation {}",
            next.generation
        );
        m.finished_ms = Some(order.at_ms);
    }
    out.roster = Some(next.clone());
    Ok(Forced {
        roster: next,
        facts: out,
        lost,
        plan,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::ClusterFacts;

    fn cfg() -> Config {
        Config::from_toml(
            r#"
cluster_id = "t"
member = "c"
data_dir = "/tmp/x"
[tls]
ca = "/ca"
cert = "/c"
key = "/k"
[[members]]
name = "a"
id = 1
role = "data"
grpc = "127.0.0.1:7001"
http = "127.0.0.1:8001"
postgres = "127.0.0.1:9001"
pgpool = "127.0.0.1:9101"
pcp = "127.0.0.1:9201"
[[members]]
name = "b"
id = 2
role = "data"
grpc = "127.0.0.1:7002"
http = "127.0.0.1:8002"
postgres = "127.0.0.1:9002"
pgpool = "127.0.0.1:9102"
pcp = "127.0.0.1:9202"
[[members]]
name = "c"
id = 3
role = "data"
grpc = "127.0.0.1:7003"
http = "127.0.0.1:8003"
postgres = "127.0.0.1:9003"
pgpool = "127.0.0.1:9103"
pcp = "127.0.0.1:9203"
"#,
            "test",
        )
        .expect("config")
    }

    fn facts(primary: &str) -> Facts {
        let mut f = Facts::default();
        let mut c = ClusterFacts {
            name: "global".into(),
            primary: Some(primary.into()),
            epoch: 7,
            sync_standbys: ["b", "c"].iter().map(|s| s.to_string()).collect(),
            sync_quorum: 1,
            ..Default::default()
        };
        c.operations.insert(
            40,
            Operation {
                id: 40,
                kind: OperationKind::Switchover,
                target: Some("b".into()),
                state: OperationState::Running,
                detail: String::new(),
                started_ms: 1,
                finished_ms: None,
                by: "a".into(),
                accept_data_loss: false,
                part_of: None,
            },
        );
        f.clusters.insert("global".into(), c);
        f
    }

    fn order(survivors: &[&str]) -> Order {
        Order {
            survivors: survivors.iter().map(|s| s.to_string()).collect(),
            member: "c".into(),
            by: "root@host-c".into(),
            at_ms: 5,
            index: 100,
        }
    }

    #[test]
    fn a_lost_primary_is_replaced_by_a_forced_failover_among_the_survivors() {
        let c = cfg();
        let r = Roster::founding(&c);
        let out = force(&facts("a"), &c, &r, &order(&["c"])).expect("force");
        assert_eq!(out.lost, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(out.roster.generation, 1);
        let g = &out.facts.clusters["global"];
        assert_eq!(g.primary, None);
        assert_eq!(g.epoch, 8, "the old primary's epoch is fenced off");
        assert_eq!(g.sync_standbys, ["c".to_string()].into_iter().collect());
        assert_eq!(g.operations[&40].state, OperationState::Failed);
        let op = &g.operations[&100];
        assert_eq!(
            (
                op.kind,
                op.target.clone(),
                op.accept_data_loss,
                op.state.clone()
            ),
            (OperationKind::Failover, None, true, OperationState::Running)
        );
        let last = g.history.back().expect("history");
        assert!(
            last.event.contains("generation 1 by root@host-c on c"),
            "{}",
            last.event
        );
        assert!(
            last.event.contains("the primary a was lost"),
            "{}",
            last.event
        );
        assert_eq!(out.facts.roster.as_ref(), Some(&out.roster));
    }

    #[test]
    fn pgpool_backend_lists_only_ever_grow() {
        let c = cfg();
        let names = |r: &Roster| -> Vec<String> {
            r.pools["global"].iter().map(|(m, _)| m.clone()).collect()
        };
        // Forced: the lost stay as backends (a running pgpool never renumbers them).
        let out = force(&facts("a"), &c, &Roster::founding(&c), &order(&["c"])).expect("force");
        assert_eq!(names(&out.roster), ["a", "b", "c"]);
        let running = roster::effective(&c, &out.roster);
        assert_eq!(running.pgpool_backends("global").len(), 3);
        assert_eq!(running.servers("global").len(), 1, "only c serves");
        // A newcomer is appended; one that leaves stays.
        let mut d = c.members[0].clone();
        d.name = "d".into();
        d.id = 4;
        d.grpc = "127.0.0.1:7004".into();
        d.http = "127.0.0.1:8004".into();
        d.postgres = Some("127.0.0.1:9004".into());
        d.pgpool = Some("127.0.0.1:9104".into());
        d.pcp = Some("127.0.0.1:9204".into());
        let added = roster::with_pools(Roster::founding(&c).add(d).expect("add d"), &c, &c);
        assert_eq!(names(&added), ["a", "b", "c", "d"]);
        let before = roster::effective(&c, &added);
        let gone = roster::with_pools(
            added.remove("a", &Default::default()).expect("remove a"),
            &before,
            &c,
        );
        assert_eq!(names(&gone), ["a", "b", "c", "d"]);
    }

    #[test]
    fn a_surviving_primary_stays_and_nothing_is_promoted() {
        let c = cfg();
        let r = Roster::founding(&c);
        let out = force(&facts("c"), &c, &r, &order(&["c"])).expect("force");
        let g = &out.facts.clusters["global"];
        assert_eq!((g.primary.as_deref(), g.epoch), (Some("c"), 7));
        assert!(g.running_operation().is_none());
    }

    #[test]
    fn refusals_change_nothing() {
        let c = cfg();
        let r = Roster::founding(&c);
        let f = facts("a");
        assert_eq!(
            force(&f, &c, &r, &order(&["b"])).err(),
            Some(ForceError::NotASurvivor("c".into()))
        );
        assert_eq!(
            force(&f, &c, &r, &order(&["a", "b", "c"])).err(),
            Some(ForceError::NothingLost)
        );
        assert_eq!(
            force(&f, &c, &r, &order(&["c", "zz"])).err(),
            Some(ForceError::Roster(RosterError::Unknown("zz".into())))
        );
    }
}
