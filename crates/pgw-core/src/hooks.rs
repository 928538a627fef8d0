//! Role-change hooks: which changes of the committed facts a hook runs on. Pure: the server
//! looks at the applied facts, this module says what changed since it last looked.

use std::collections::BTreeMap;

use crate::config::HookEvent;
use crate::facts::{Facts, OperationState};

/// One change a hook may run on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub event: HookEvent,
    pub cluster: String,
    pub old_primary: Option<String>,
    pub new_primary: String,
    /// The new primary's room.
    pub room: String,
    /// The group's active room after the change (the active cluster's primary's room).
    pub active_room: Option<String>,
    pub epoch: u64,
    /// The operation that made the change (a switchover, a forced failover), if any.
    pub operation: Option<u64>,
    /// The room move it is a step of, if any.
    pub room_move: Option<u64>,
}

impl Change {
    /// The hook's environment.
    pub fn env(&self, member: &str) -> Vec<(&'static str, String)> {
        vec![
            ("PGW_EVENT", self.event.name().to_string()),
            ("PGW_CLUSTER", self.cluster.clone()),
            (
                "PGW_OLD_PRIMARY",
                self.old_primary.clone().unwrap_or_default(),
            ),
            ("PGW_NEW_PRIMARY", self.new_primary.clone()),
            ("PGW_ROOM", self.room.clone()),
            (
                "PGW_ACTIVE_ROOM",
                self.active_room.clone().unwrap_or_default(),
            ),
            ("PGW_EPOCH", self.epoch.to_string()),
            (
                "PGW_OPERATION",
                self.operation.map(|o| o.to_string()).unwrap_or_default(),
            ),
            (
                "PGW_ROOM_MOVE",
                self.room_move.map(|o| o.to_string()).unwrap_or_default(),
            ),
            ("PGW_MEMBER", member.to_string()),
        ]
    }
}

/// What the runner has seen so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seen {
    started: bool,
    /// cluster -> the last primary named
    primaries: BTreeMap<String, String>,
    active_room: Option<String>,
}

/// The changes since the last call. The first call only remembers the current state (a
/// restarted watcher does not run hooks again for a change made before it started).
pub fn changes(
    seen: &mut Seen,
    facts: &Facts,
    active_cluster: Option<&str>,
    rooms: &BTreeMap<String, String>,
) -> Vec<Change> {
    let room_of = |m: &str| rooms.get(m).cloned().unwrap_or_else(|| m.to_string());
    let active_room = active_cluster
        .and_then(|c| facts.cluster(c))
        .and_then(|f| f.primary.as_deref())
        .map(room_of);
    let mut out = Vec::new();
    for (name, f) in &facts.clusters {
        let Some(p) = &f.primary else { continue };
        let old = seen.primaries.insert(name.clone(), p.clone());
        if !seen.started || old.as_deref() == Some(p.as_str()) {
            continue;
        }
        // The operation that named it: a running one whose target it is.
        let op = f
            .operations
            .values()
            .rfind(|o| o.state == OperationState::Running && o.target.as_deref() == Some(p));
        out.push(Change {
            event: HookEvent::PrimaryChanged,
            cluster: name.clone(),
            old_primary: old,
            new_primary: p.clone(),
            room: room_of(p),
            active_room: active_room.clone(),
            epoch: f.epoch,
            operation: op.map(|o| o.id),
            room_move: op.and_then(|o| o.part_of),
        });
    }
    if seen.started && active_room.is_some() && active_room != seen.active_room {
        if let Some(c) = active_cluster {
            let f = facts.cluster(c);
            let p = f.and_then(|f| f.primary.clone()).unwrap_or_default();
            let from = out.iter().find(|x| x.cluster == c).cloned();
            out.push(Change {
                event: HookEvent::ActiveRoomChanged,
                cluster: c.to_string(),
                old_primary: from.as_ref().and_then(|x| x.old_primary.clone()),
                new_primary: p.clone(),
                room: room_of(&p),
                active_room: active_room.clone(),
                epoch: f.map(|f| f.epoch).unwrap_or(0),
                operation: from.as_ref().and_then(|x| x.operation),
                room_move: from.and_then(|x| x.room_move),
            });
        }
    }
    if active_room.is_some() {
        seen.active_room = active_room;
    }
    seen.started = true;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::{Command, Proposal};

    fn apply(f: &mut Facts, i: u64, c: Command) {
        let p = Proposal {
            command: c,
            at_ms: i,
            by: "t".into(),
            asked_by: None,
        };
        assert!(!f.apply(i, &p).is_rejected());
    }

    fn set_primary(f: &mut Facts, i: u64, cluster: &str, m: &str) {
        let epoch = f.cluster(cluster).map(|c| c.epoch).unwrap_or(0);
        apply(
            f,
            i,
            Command::SetPrimary {
                cluster: cluster.into(),
                member: m.into(),
                expected_epoch: epoch,
                reason: "t".into(),
                sync_standbys: None,
            },
        );
    }

    #[test]
    fn primary_and_active_room_changes_are_reported_once() {
        let rooms: BTreeMap<String, String> = [("a", "ra"), ("b", "rb"), ("x", "ra")]
            .iter()
            .map(|(m, r)| (m.to_string(), r.to_string()))
            .collect();
        let mut f = Facts::default();
        for c in ["global", "recovery"] {
            apply(
                &mut f,
                1,
                Command::EnsureCluster {
                    cluster: c.into(),
                    sync_quorum: 1,
                    standby: false,
                },
            );
        }
        set_primary(&mut f, 2, "global", "a");
        set_primary(&mut f, 3, "recovery", "x");
        let mut seen = Seen::default();
        // The first look only remembers.
        assert!(changes(&mut seen, &f, Some("global"), &rooms).is_empty());
        assert!(changes(&mut seen, &f, Some("global"), &rooms).is_empty());
        // Recovery moves within room ra: one primary change, the active room stays.
        set_primary(&mut f, 4, "recovery", "a");
        let c = changes(&mut seen, &f, Some("global"), &rooms);
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(c[0].cluster, "recovery");
        assert_eq!(c[0].old_primary.as_deref(), Some("x"));
        assert_eq!(c[0].new_primary, "a");
        assert_eq!(c[0].room, "ra");
        assert_eq!(c[0].active_room.as_deref(), Some("ra"));
        let env = c[0].env("b");
        assert!(env.contains(&("PGW_EPOCH", "2".to_string())), "{env:?}");
        assert!(env.contains(&("PGW_MEMBER", "b".to_string())));
        // Global moves to rb: its primary change and the active room change.
        set_primary(&mut f, 5, "global", "b");
        let c = changes(&mut seen, &f, Some("global"), &rooms);
        let kinds: Vec<_> = c.iter().map(|x| (x.event, x.cluster.as_str())).collect();
        assert_eq!(
            kinds,
            [
                (HookEvent::PrimaryChanged, "global"),
                (HookEvent::ActiveRoomChanged, "global")
            ]
        );
        assert_eq!(c[1].active_room.as_deref(), Some("rb"));
        assert_eq!(c[1].old_primary.as_deref(), Some("a"));
        // Nothing more until something changes.
        assert!(changes(&mut seen, &f, Some("global"), &rooms).is_empty());
    }
}
