//! `pgwctl switchover --room ROOM --all`: moving every cluster's primary into one room, one
//! cluster after another in the configured order. Each step is an ordinary zero-loss switchover
//! (an operation `part_of` the move), so every safety rule of a switchover holds; this module
//! only decides the next step from the facts and the leader's fresh reports. Pure.

use std::collections::BTreeMap;

use crate::facts::{Command, Facts, OperationKind, OperationState, RoomMove};
use crate::failover::{Candidate, Observation, PgRole};

/// What the leader knows for a room move.
pub struct MoveView<'a> {
    pub facts: &'a Facts,
    /// member -> the room it stands in
    pub rooms: &'a BTreeMap<String, String>,
    /// cluster -> its servers (the only possible targets)
    pub servers: &'a BTreeMap<String, Vec<Candidate>>,
    /// cluster -> member -> latest fresh report
    pub fresh: &'a BTreeMap<String, BTreeMap<String, Observation>>,
    /// How long this leader has seen the move running, and how long it may run.
    pub running_ms: u64,
    pub limit_ms: u64,
}

/// The next step of a room move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MoveStep {
    /// Propose `command` (about `cluster`, or the whole group when empty).
    Propose { cluster: String, command: Command },
    /// Nothing to do yet, and why.
    Wait(String),
}

fn finish(id: u64, succeeded: bool, detail: String) -> MoveStep {
    MoveStep::Propose {
        cluster: String::new(),
        command: Command::FinishRoomMove {
            id,
            succeeded,
            detail,
        },
    }
}

/// The healthy synchronous replicas of `cluster` in `room`, best first (most WAL, then
/// priority, then name): streaming, named synchronous by the primary's own report, and in the
/// recorded sync set, exactly what a switchover accepts as a target.
pub fn targets_in_room(v: &MoveView<'_>, cluster: &str, room: &str) -> Vec<String> {
    let Some(f) = v.facts.cluster(cluster) else {
        return Vec::new();
    };
    let empty = BTreeMap::new();
    let fresh = v.fresh.get(cluster).unwrap_or(&empty);
    let Some(po) = f
        .primary
        .as_ref()
        .and_then(|p| fresh.get(p))
        .filter(|o| o.role == PgRole::Primary)
    else {
        return Vec::new();
    };
    let mut best: Vec<(&Candidate, u64)> = v
        .servers
        .get(cluster)
        .map(|s| s.as_slice())
        .unwrap_or_default()
        .iter()
        .filter(|c| v.rooms.get(&c.name).map(String::as_str) == Some(room))
        .filter(|c| Some(&c.name) != f.primary.as_ref())
        .filter_map(|c| {
            let o = fresh.get(&c.name)?;
            let sync = po.standbys.get(&c.name).is_some_and(|s| s.is_synchronous());
            (o.role == PgRole::Replica && o.streaming && sync && f.sync_standbys.contains(&c.name))
                .then_some((c, o.flush_lsn))
        })
        .collect();
    best.sort_by(|a, b| {
        b.1.cmp(&a.1)
            .then(b.0.priority.cmp(&a.0.priority))
            .then(a.0.name.cmp(&b.0.name))
    });
    best.into_iter().map(|(c, _)| c.name.clone()).collect()
}

/// Decides the next step of the running room move `mv`.
pub fn next_step(mv: &RoomMove, v: &MoveView<'_>) -> MoveStep {
    let room = &mv.room;
    let mut placed = Vec::new();
    for cluster in &mv.clusters {
        let Some(f) = v.facts.cluster(cluster) else {
            return finish(
                mv.id,
                false,
                format!("cluster `{cluster}` is not registered"),
            );
        };
        let step = f.operations.values().rfind(|o| o.part_of == Some(mv.id));
        match step.map(|o| &o.state) {
            Some(OperationState::Running) => {
                if v.running_ms > v.limit_ms {
                    return finish(
                        mv.id,
                        false,
                        format!(
                            "timed out after {} s in cluster {cluster}",
                            v.limit_ms / 1000
                        ),
                    );
                }
                let o = step.map(|o| (o.id, o.target.clone().unwrap_or_default()));
                let (id, t) = o.unwrap_or_default();
                return MoveStep::Wait(format!(
                    "{cluster}: switchover {id} to {t} (room move {} to {room})",
                    mv.id
                ));
            }
            Some(OperationState::Failed) => {
                let detail = step.map(|o| o.detail.clone()).unwrap_or_default();
                return finish(
                    mv.id,
                    false,
                    format!(
                        "{cluster}: switchover failed ({detail}); clusters before it stay in {room}"
                    ),
                );
            }
            Some(OperationState::Succeeded) | None => {}
        }
        let in_room = f
            .primary
            .as_ref()
            .is_some_and(|p| v.rooms.get(p) == Some(room));
        if in_room {
            placed.push(format!(
                "{cluster} on {}",
                f.primary.as_deref().unwrap_or_default()
            ));
            continue;
        }
        if v.running_ms > v.limit_ms {
            return finish(
                mv.id,
                false,
                format!(
                    "timed out after {} s waiting to move {cluster}",
                    v.limit_ms / 1000
                ),
            );
        }
        if f.paused {
            return finish(
                mv.id,
                false,
                format!("{cluster} is paused; resume it and move again"),
            );
        }
        let has_server = v.servers.get(cluster).is_some_and(|s| {
            s.iter()
                .any(|c| v.rooms.get(&c.name).map(String::as_str) == Some(room.as_str()))
        });
        if !has_server {
            return finish(
                mv.id,
                false,
                format!("{cluster} has no server in room {room}"),
            );
        }
        if let Some(op) = f.running_operation() {
            return MoveStep::Wait(format!(
                "{cluster}: operation {} ({:?}) is running",
                op.id, op.kind
            ));
        }
        if f.primary.is_none() {
            return MoveStep::Wait(format!("{cluster} has no primary at the moment"));
        }
        let Some(target) = targets_in_room(v, cluster, room).into_iter().next() else {
            return MoveStep::Wait(format!(
                "{cluster}: no healthy synchronous replica in room {room} yet"
            ));
        };
        return MoveStep::Propose {
            cluster: cluster.clone(),
            command: Command::BeginOperation {
                cluster: cluster.clone(),
                operation: OperationKind::Switchover,
                target: Some(target),
                expected_epoch: f.epoch,
                detail: format!("step of room move {} to {room}", mv.id),
                accept_data_loss: false,
                part_of: Some(mv.id),
            },
        };
    }
    finish(
        mv.id,
        true,
        format!("every primary is in {room}: {}", placed.join(", ")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::{Operation, Proposal};
    use crate::failover::SyncState;

    fn prop(command: Command) -> Proposal {
        Proposal {
            command,
            at_ms: 1,
            by: "t".into(),
            asked_by: None,
        }
    }

    /// Two clusters: "global" on a, b, c and "recovery" on a, b, x; a and x stand in room-a.
    fn setup() -> (
        Facts,
        BTreeMap<String, String>,
        BTreeMap<String, Vec<Candidate>>,
    ) {
        let mut f = Facts::default();
        let mut i = 0;
        let mut apply = |f: &mut Facts, c: Command| {
            i += 1;
            assert!(!f.apply(i, &prop(c)).is_rejected());
        };
        for (c, p, s) in [("global", "b", ["a", "c"]), ("recovery", "b", ["a", "x"])] {
            apply(
                &mut f,
                Command::EnsureCluster {
                    cluster: c.into(),
                    sync_quorum: 1,
                    standby: false,
                },
            );
            apply(
                &mut f,
                Command::SetPrimary {
                    cluster: c.into(),
                    member: p.into(),
                    expected_epoch: 0,
                    reason: "boot".into(),
                    sync_standbys: Some(s.iter().map(|x| x.to_string()).collect()),
                },
            );
            apply(
                &mut f,
                Command::SetSyncSet {
                    cluster: c.into(),
                    standbys: s.iter().map(|x| x.to_string()).collect(),
                    quorum: 1,
                    expected_epoch: 1,
                },
            );
        }
        let rooms = [
            ("a", "room-a"),
            ("x", "room-a"),
            ("b", "room-b"),
            ("c", "room-c"),
        ]
        .iter()
        .map(|(m, r)| (m.to_string(), r.to_string()))
        .collect();
        let cand = |ns: &[&str]| {
            ns.iter()
                .map(|n| Candidate {
                    name: n.to_string(),
                    priority: 100,
                })
                .collect::<Vec<_>>()
        };
        let servers = [
            ("global".to_string(), cand(&["a", "b", "c"])),
            ("recovery".to_string(), cand(&["a", "b", "x"])),
        ]
        .into_iter()
        .collect();
        (f, rooms, servers)
    }

    fn obs(cluster: &str, m: &str, role: PgRole, lsn: u64, sync: &[&str]) -> Observation {
        Observation {
            member: m.into(),
            cluster: cluster.into(),
            role,
            timeline: 1,
            flush_lsn: lsn,
            replay_lsn: lsn,
            streaming: role == PgRole::Replica,
            receiving: role == PgRole::Replica,
            epoch_seen: 1,
            crashed: false,
            epoch: 1,
            degraded: false,
            sync_since: None,
            standbys: sync
                .iter()
                .map(|s| (s.to_string(), SyncState::Quorum))
                .collect(),
            recovered: 0,
            restarted: 0,
            incarnation: 1,
            seq: 1,
            error: None,
            replay_lag_ms: None,
        }
    }

    fn healthy() -> BTreeMap<String, BTreeMap<String, Observation>> {
        let mut fresh = BTreeMap::new();
        for (c, others) in [("global", ["a", "c"]), ("recovery", ["a", "x"])] {
            let mut m = BTreeMap::new();
            m.insert("b".to_string(), obs(c, "b", PgRole::Primary, 100, &others));
            for (k, o) in others.iter().enumerate() {
                m.insert(
                    o.to_string(),
                    obs(c, o, PgRole::Replica, 90 + k as u64, &[]),
                );
            }
            fresh.insert(c.to_string(), m);
        }
        fresh
    }

    fn begin(f: &mut Facts, clusters: &[&str]) -> u64 {
        let out = f.apply(
            100,
            &prop(Command::BeginRoomMove {
                room: "room-a".into(),
                clusters: clusters.iter().map(|c| c.to_string()).collect(),
            }),
        );
        assert!(!out.is_rejected(), "{out:?}");
        100
    }

    #[test]
    fn moves_each_cluster_in_order_then_finishes() {
        let (mut f, rooms, servers) = setup();
        let id = begin(&mut f, &["recovery", "global"]);
        let fresh = healthy();
        let view = |f: &Facts| -> MoveStep {
            let v = MoveView {
                facts: f,
                rooms: &rooms,
                servers: &servers,
                fresh: &fresh,
                running_ms: 0,
                limit_ms: 60_000,
            };
            next_step(f.running_move().expect("running"), &v)
        };
        // Recovery first: its most advanced sync replica in room-a is x (LSN 91 > a's 90).
        let MoveStep::Propose { cluster, command } = view(&f) else {
            panic!("expected a proposal: {:?}", view(&f))
        };
        assert_eq!(cluster, "recovery");
        match &command {
            Command::BeginOperation {
                target, part_of, ..
            } => {
                assert_eq!(target.as_deref(), Some("x"));
                assert_eq!(*part_of, Some(id));
            }
            other => panic!("{other:?}"),
        }
        assert!(!f.apply(101, &prop(command)).is_rejected());
        // While it runs, the move waits (global is not touched).
        assert!(matches!(view(&f), MoveStep::Wait(w) if w.contains("recovery")));
        // The switchover completes: x is primary.
        let rc = f.clusters.get_mut("recovery").expect("recovery");
        rc.primary = Some("x".into());
        if let Some(op) = rc.operations.get_mut(&101) {
            op.state = OperationState::Succeeded;
        }
        // Then global, to a (its only server in room-a).
        let MoveStep::Propose { cluster, command } = view(&f) else {
            panic!("expected a proposal")
        };
        assert_eq!(cluster, "global");
        assert!(matches!(&command, Command::BeginOperation { target: Some(t), .. } if t == "a"));
        let gc = f.clusters.get_mut("global").expect("global");
        gc.primary = Some("a".into());
        gc.operations.insert(
            102,
            Operation {
                id: 102,
                kind: OperationKind::Switchover,
                target: Some("a".into()),
                state: OperationState::Succeeded,
                detail: String::new(),
                started_ms: 0,
                finished_ms: Some(1),
                by: "t".into(),
                accept_data_loss: false,
                part_of: Some(id),
            },
        );
        match view(&f) {
            MoveStep::Propose {
                command:
                    Command::FinishRoomMove {
                        succeeded, detail, ..
                    },
                ..
            } => {
                assert!(succeeded);
                assert!(detail.contains("recovery on x") && detail.contains("global on a"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_failed_step_fails_the_move_and_unhealthy_targets_wait() {
        let (mut f, rooms, servers) = setup();
        let id = begin(&mut f, &["recovery", "global"]);
        let mut fresh = healthy();
        // x and a are not streaming: nothing to switch to in room-a yet.
        for m in ["a", "x"] {
            if let Some(o) = fresh.get_mut("recovery").and_then(|c| c.get_mut(m)) {
                o.streaming = false;
            }
        }
        let v = MoveView {
            facts: &f,
            rooms: &rooms,
            servers: &servers,
            fresh: &fresh,
            running_ms: 0,
            limit_ms: 60_000,
        };
        let mv = f.running_move().expect("running").clone();
        assert!(matches!(next_step(&mv, &v), MoveStep::Wait(w) if w.contains("no healthy")));
        // Past the limit, it fails instead of waiting forever.
        let late = MoveView {
            running_ms: 60_001,
            ..v
        };
        assert!(matches!(
            next_step(&mv, &late),
            MoveStep::Propose {
                command: Command::FinishRoomMove {
                    succeeded: false,
                    ..
                },
                ..
            }
        ));
        // A failed step fails the move.
        f.clusters
            .get_mut("recovery")
            .expect("recovery")
            .operations
            .insert(
                101,
                Operation {
                    id: 101,
                    kind: OperationKind::Switchover,
                    target: Some("x".into()),
                    state: OperationState::Failed,
                    detail: "x did not catch up".into(),
                    started_ms: 0,
                    finished_ms: Some(1),
                    by: "t".into(),
                    accept_data_loss: false,
                    part_of: Some(id),
                },
            );
        let v = MoveView {
            facts: &f,
            rooms: &rooms,
            servers: &servers,
            fresh: &fresh,
            running_ms: 0,
            limit_ms: 60_000,
        };
        match next_step(&mv, &v) {
            MoveStep::Propose {
                command:
                    Command::FinishRoomMove {
                        succeeded, detail, ..
                    },
                ..
            } => {
                assert!(!succeeded);
                assert!(detail.contains("x did not catch up"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
        // Only one move at a time; an unknown cluster is refused.
        let again = f.apply(
            200,
            &prop(Command::BeginRoomMove {
                room: "room-b".into(),
                clusters: vec!["global".into()],
            }),
        );
        assert!(again.is_rejected());
        let mut g = Facts::default();
        assert!(g
            .apply(
                1,
                &prop(Command::BeginRoomMove {
                    room: "room-b".into(),
                    clusters: vec!["nope".into()],
                }),
            )
            .is_rejected());
    }

    #[test]
    fn a_cluster_without_a_server_in_the_room_fails_at_once_and_placed_ones_are_skipped() {
        let (mut f, mut rooms, servers) = setup();
        // Global's primary b moves to room-a: nothing to do for global.
        rooms.insert("b".into(), "room-a".into());
        rooms.insert("a".into(), "room-z".into());
        rooms.insert("x".into(), "room-z".into());
        begin(&mut f, &["global", "recovery"]);
        let fresh = healthy();
        let v = MoveView {
            facts: &f,
            rooms: &rooms,
            servers: &servers,
            fresh: &fresh,
            running_ms: 0,
            limit_ms: 60_000,
        };
        let mv = f.running_move().expect("running").clone();
        // Both primaries are b, now in room-a: done at once.
        assert!(matches!(
            next_step(&mv, &v),
            MoveStep::Propose {
                command: Command::FinishRoomMove {
                    succeeded: true,
                    ..
                },
                ..
            }
        ));
        let mut rooms2 = rooms.clone();
        rooms2.insert("b".into(), "room-b".into());
        let v2 = MoveView {
            rooms: &rooms2,
            ..v
        };
        match next_step(&mv, &v2) {
            MoveStep::Propose {
                command:
                    Command::FinishRoomMove {
                        succeeded: false,
                        detail,
                        ..
                    },
                ..
            } => assert!(detail.contains("no server in room room-a"), "{detail}"),
            other => panic!("{other:?}"),
        }
    }
}
