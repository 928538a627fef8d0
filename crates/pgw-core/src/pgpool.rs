//! What every room's pgpool-II should believe, and the next PCP command that brings a pgpool's
//! belief in line. Pure: the leader feeds it the committed facts, the sidecars' reports and
//! what a pgpool answered to `pcp_node_info`; an I/O task carries out the returned command.
//!
//! pgpool's own failover is switched off (see `deploy/pgpool/pgpool.conf.template`): the Raft
//! group is the only authority on who is primary, and pgpool is told through PCP:
//!
//! 1. A node pgpool treats as primary that is not the committed primary is **detached first**,
//!    before anything else is done: from then on no new pgpool session can write to it, even
//!    while the new primary is not promoted yet (a detached old primary is the "no primary,
//!    epoch g" state of the log, mirrored in pgpool). Detaching the primary makes pgpool look
//!    for a node that is not in recovery; if the new primary is already promoted, pgpool finds it
//!    and nothing else is needed. Two exceptions, both for an old primary that can no longer
//!    acknowledge anything: one reported stopped, and any old primary in the seconds after the
//!    primary record changed (the protocol fenced it: its lease ran out or it reported its own
//!    crash, and its synchronous standbys detached). It is left to step 2, whose promote moves
//!    pgpool's writes in one request; detaching it first would make pgpool search for a
//!    primary and stall it for a second while the new one is still promoting.
//! 2. The committed primary is promoted in pgpool as soon as the decision is committed when
//!    pgpool already uses it (a replica its sidecar is promoting, `Health::Promoting`): pgpool's
//!    `pcp_promote_node` does not look at the server, so pgpool's part of the failover (about
//!    0.1 s, restarting its children) runs beside `pg_ctl promote` instead of after it, and
//!    writes routed there fail for that moment rather than wait. It is attached (when pgpool
//!    does not use it) only once its sidecar reports it running as primary at the current epoch:
//!    an attach makes pgpool search for a node not in recovery, and none would be found; for the
//!    same reason no replica is re-attached while the primary is still being promoted.
//!    Promoting marks every other node down in pgpool (and drops existing sessions).
//! 3. Unhealthy non-primaries are detached (no reads are balanced to a dead or fenced server);
//!    replicas that stream from the primary at the current epoch are (re-)attached.
//!
//! One command per round: PCP requests are asynchronous in pgpool, so the caller re-reads the
//! node list before deciding again.

use std::collections::BTreeMap;

use crate::failover::{Observation, PgRole};
use crate::ClusterFacts;

/// A backend's status as pgpool reports it (`backend_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolStatus {
    /// Slot not configured.
    Unused,
    /// Attached, no connection made yet.
    Waiting,
    /// Attached and in use.
    Up,
    /// Detached: pgpool sends nothing to it.
    Down,
}

impl PoolStatus {
    /// From pgpool's numeric `backend_status` (0 unused, 1 waiting, 2 up, 3 down, 4 quarantine).
    pub fn from_code(code: i64) -> PoolStatus {
        match code {
            1 => PoolStatus::Waiting,
            2 => PoolStatus::Up,
            // Quarantine (a watchdog state) is treated as down: pgpool does not use the node.
            3 | 4 => PoolStatus::Down,
            _ => PoolStatus::Unused,
        }
    }

    /// pgpool's numeric code for this status (round-trips through `from_code`).
    pub fn code(self) -> u32 {
        match self {
            PoolStatus::Unused => 0,
            PoolStatus::Waiting => 1,
            PoolStatus::Up => 2,
            PoolStatus::Down => 3,
        }
    }

    pub fn attached(self) -> bool {
        matches!(self, PoolStatus::Waiting | PoolStatus::Up)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PoolStatus::Unused => "unused",
            PoolStatus::Waiting => "waiting",
            PoolStatus::Up => "up",
            PoolStatus::Down => "down",
        }
    }
}

/// One backend as a pgpool sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolNode {
    pub status: PoolStatus,
    /// pgpool routes writes to this node.
    pub primary: bool,
}

/// The health of one data member's postgres as the group knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Primary running at the current epoch, or a replica streaming at the current epoch.
    Serving,
    /// Its postgres is not running (reported stopped or crashed): it cannot take writes.
    Down,
    /// Fenced, hung, running as primary without the role, or its reports stopped: pgpool
    /// must not use it.
    Failed,
    /// The committed primary, still a replica at the current epoch: its sidecar is promoting
    /// it (about 0.1 s). A pgpool that already uses it may be pointed at it now (writes fail
    /// until the promotion is done, and no other server is writable), so that pgpool's part of
    /// a failover runs beside the promotion instead of after it.
    Promoting,
    /// Not known yet, or in transition: leave pgpool's view of it alone.
    Unknown,
}

/// What pgpools should believe, backend by backend (index = pgpool backend number).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The committed primary's backend, if the cluster has one.
    pub primary: Option<usize>,
    pub health: Vec<Health>,
    /// The primary record changed moments ago (a failover or switchover is under way): the
    /// old primary is already fenced by the protocol (its lease ran out or it reported its own
    /// crash, and its synchronous standbys detached), so pgpool is left pointing at it until the
    /// new primary serves and can be promoted in one step.
    pub transition: bool,
}

/// One PCP command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PcpAction {
    Detach(usize),
    Attach(usize),
    Promote(usize),
}

impl Target {
    /// The target for one cluster. `backends[i]` is the member behind pgpool backend `i`;
    /// `reports` are the leader's latest sidecar reports with their arrival time, `now` and
    /// `fresh_ms` on the leader's clock. A member that has not reported to this leader yet is
    /// `Unknown` for two report windows after `leader_since`, then `Failed`; one whose reports
    /// stopped is `Failed`.
    pub fn compute(
        backends: &[String],
        facts: &ClusterFacts,
        reports: &BTreeMap<String, (Observation, u64)>,
        now: u64,
        fresh_ms: u64,
        leader_since: u64,
    ) -> Target {
        let primary_obs = facts
            .primary
            .as_ref()
            .and_then(|p| reports.get(p))
            .filter(|(_, at)| now.saturating_sub(*at) <= fresh_ms)
            .map(|(o, _)| o);
        let primary = facts
            .primary
            .as_ref()
            .and_then(|p| backends.iter().position(|b| b == p));
        let health = backends
            .iter()
            .map(|m| {
                let Some((o, at)) = reports.get(m) else {
                    // Silent since this leader took over (plus two report windows): gone.
                    return if now.saturating_sub(leader_since) > 2 * fresh_ms {
                        Health::Failed
                    } else {
                        Health::Unknown
                    };
                };
                if now.saturating_sub(*at) > fresh_ms {
                    return Health::Failed;
                }
                let is_primary = facts.primary.as_deref() == Some(m.as_str());
                let current = o.epoch_seen >= facts.epoch;
                match o.role {
                    PgRole::Primary if is_primary && current && !o.crashed => Health::Serving,
                    // Named primary, still a replica (its report may predate the decision: its
                    // sidecar promotes it once it has a lease at the new epoch).
                    PgRole::Replica if is_primary && !o.crashed => Health::Promoting,
                    // The committed primary not running yet: a restart in place or a promotion
                    // is under way; the decision rule deals with it.
                    _ if is_primary => Health::Unknown,
                    PgRole::Primary => Health::Failed, // fenced or a zombie: never a backend
                    // Streaming from the committed primary (it lists the member), not elsewhere.
                    PgRole::Replica
                        if current
                            && o.streaming
                            && primary_obs.is_some_and(|p| p.standbys.contains_key(m)) =>
                    {
                        Health::Serving
                    }
                    PgRole::Replica => Health::Unknown,
                    PgRole::Down | PgRole::Empty => Health::Down,
                    PgRole::Unknown => Health::Failed,
                }
            })
            .collect();
        Target {
            primary,
            health,
            transition: false,
        }
    }

    fn health(&self, i: usize) -> Health {
        self.health.get(i).copied().unwrap_or(Health::Unknown)
    }

    /// pgpool's old primary is left alone while its postgres is reported stopped (it cannot
    /// take writes) or during a transition (see `transition`): the new primary's promotion in
    /// pgpool detaches it anyway. Detaching a primary makes pgpool search for another one, which
    /// blocks pgpool for `search_primary_node_timeout` (1 s) while the new one is still
    /// promoting.
    fn hold(&self, i: usize, n: &PoolNode) -> bool {
        n.primary && self.primary != Some(i) && (self.health(i) == Health::Down || self.transition)
    }

    /// The next PCP command for a pgpool whose backends look like `view`, or `None` when it
    /// agrees with the target. See the module documentation for the order.
    pub fn next_action(&self, view: &[PoolNode]) -> Option<PcpAction> {
        // 1. No writes to anything but the committed primary.
        for (i, n) in view.iter().enumerate() {
            if n.primary && n.status.attached() && Some(i) != self.primary && !self.hold(i, n) {
                return Some(PcpAction::Detach(i));
            }
        }
        // 2. Failed servers out before anything is attached: an attach makes pgpool search the
        //    attached nodes for one not in recovery, and a live zombie must not be among them.
        for (i, n) in view.iter().enumerate() {
            let failed = matches!(self.health(i), Health::Failed | Health::Down);
            if Some(i) != self.primary && failed && n.status.attached() && !self.hold(i, n) {
                return Some(PcpAction::Detach(i));
            }
        }
        // 3. The committed primary: promoted in pgpool once it runs as primary, or while its
        //    sidecar promotes it if pgpool already uses it; attached only once it runs as
        //    primary (an attach makes pgpool search for a node not in recovery).
        if let Some(p) = self.primary {
            let h = self.health(p);
            if let Some(n) = view.get(p) {
                if h == Health::Serving && !n.status.attached() {
                    return Some(PcpAction::Attach(p));
                }
                if matches!(h, Health::Serving | Health::Promoting)
                    && n.status.attached()
                    && !n.primary
                {
                    return Some(PcpAction::Promote(p));
                }
            }
        }
        // 4. Replicas streaming from the primary back in; not while the primary is still being
        //    promoted (an attach makes pgpool search for a node not in recovery: none yet).
        if self
            .primary
            .is_some_and(|p| self.health(p) == Health::Promoting)
        {
            return None;
        }
        for (i, n) in view.iter().enumerate() {
            if Some(i) != self.primary
                && self.health(i) == Health::Serving
                && n.status == PoolStatus::Down
            {
                return Some(PcpAction::Attach(i));
            }
        }
        None
    }

    /// Whether a pgpool with this view routes exactly as the group decided.
    pub fn agrees(&self, view: &[PoolNode]) -> bool {
        self.next_action(view).is_none()
    }
}

/// The one thing a room does to its own pgpool without a leader: while its primary runs
/// narrowed on its own (degraded where nothing can replace it, so there is no group to
/// decide), every other backend that pgpool still uses and that does not answer (`answers[i]`
/// false) is detached, so that new sessions do not wait on a lost server. Never the room's own
/// backend `own`, never an attach or a promote: that stays with the leader, which attaches
/// a replica again once it serves (and it answers then, so the two never undo each other).
pub fn narrow_locally(own: usize, view: &[PoolNode], answers: &[bool]) -> Option<PcpAction> {
    view.iter().enumerate().find_map(|(i, n)| {
        (i != own && n.status.attached() && !answers.get(i).copied().unwrap_or(true))
            .then_some(PcpAction::Detach(i))
    })
}

/// The backend pgpool currently sends writes to (attached and primary), if any.
pub fn pool_primary(view: &[PoolNode]) -> Option<usize> {
    view.iter().position(|n| n.primary && n.status.attached())
}

/// One backend as `pcp_node_info` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub host: String,
    pub port: u16,
    pub status: PoolStatus,
    /// pgpool's routing role: writes go to the node with `primary`.
    pub primary: bool,
    /// What pgpool last saw the server itself report (`primary`/`standby`/`unknown`).
    pub pg_role: String,
}

impl NodeInfo {
    pub fn pool_node(&self) -> PoolNode {
        PoolNode {
            status: self.status,
            primary: self.primary,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(status: PoolStatus, primary: bool) -> PoolNode {
        PoolNode { status, primary }
    }

    /// Applies a PCP command the way pgpool 4.3 does with its failover commands disabled:
    /// detaching the primary or attaching any node makes pgpool search the attached nodes for
    /// one that is not in recovery (`really_primary`); promoting marks every other node down.
    fn pgpool_applies(view: &mut [PoolNode], a: PcpAction, really_primary: Option<usize>) {
        let search = |view: &mut [PoolNode]| {
            for n in view.iter_mut() {
                n.primary = false;
            }
            if let Some(r) = really_primary.filter(|&r| view[r].status.attached()) {
                view[r].primary = true;
            }
        };
        match a {
            PcpAction::Detach(i) => {
                view[i].status = PoolStatus::Down;
                if view[i].primary {
                    search(view);
                }
            }
            PcpAction::Attach(i) => {
                view[i].status = PoolStatus::Waiting;
                search(view);
            }
            PcpAction::Promote(i) => {
                for (j, n) in view.iter_mut().enumerate() {
                    n.primary = j == i;
                    if j != i {
                        n.status = PoolStatus::Down;
                    }
                }
            }
        }
    }

    #[test]
    fn old_primary_is_detached_before_anything_else() {
        let t = Target {
            primary: Some(1),
            health: vec![Health::Failed, Health::Unknown, Health::Serving],
            transition: false,
        };
        let stopped = Target {
            primary: Some(1),
            health: vec![Health::Down, Health::Serving, Health::Serving],
            transition: false,
        };
        let view = [
            node(PoolStatus::Up, true),
            node(PoolStatus::Up, false),
            node(PoolStatus::Up, false),
        ];
        assert_eq!(t.next_action(&view), Some(PcpAction::Detach(0)));
        // A crashed old primary is replaced by promoting the new one directly.
        assert_eq!(stopped.next_action(&view), Some(PcpAction::Promote(1)));
        // Even with no primary committed at all.
        let t = Target {
            primary: None,
            health: vec![Health::Unknown; 3],
            transition: false,
        };
        assert_eq!(t.next_action(&view), Some(PcpAction::Detach(0)));
    }

    #[test]
    fn during_a_transition_the_old_primary_waits_for_the_promote() {
        let view = [
            node(PoolStatus::Up, true),
            node(PoolStatus::Up, false),
            node(PoolStatus::Up, false),
        ];
        let mut t = Target {
            primary: Some(1),
            health: vec![Health::Failed, Health::Unknown, Health::Serving],
            transition: true,
        };
        assert_eq!(t.next_action(&view), None);
        t.health[1] = Health::Serving;
        assert_eq!(t.next_action(&view), Some(PcpAction::Promote(1)));
        // Once the transition is over, an unpromotable primary no longer protects the old one.
        t.health[1] = Health::Unknown;
        t.transition = false;
        assert_eq!(t.next_action(&view), Some(PcpAction::Detach(0)));
    }

    #[test]
    fn new_primary_is_promoted_only_when_it_serves() {
        let view = [
            node(PoolStatus::Down, false),
            node(PoolStatus::Up, false),
            node(PoolStatus::Up, false),
        ];
        let waiting = Target {
            primary: Some(1),
            health: vec![Health::Failed, Health::Unknown, Health::Serving],
            transition: false,
        };
        assert_eq!(waiting.next_action(&view), None);
        let ready = Target {
            primary: Some(1),
            health: vec![Health::Failed, Health::Serving, Health::Serving],
            transition: false,
        };
        assert_eq!(ready.next_action(&view), Some(PcpAction::Promote(1)));
    }

    #[test]
    fn an_operator_detach_is_undone_when_the_node_is_healthy() {
        let t = Target {
            primary: Some(0),
            health: vec![Health::Serving, Health::Serving, Health::Serving],
            transition: false,
        };
        let view = [
            node(PoolStatus::Up, true),
            node(PoolStatus::Down, false),
            node(PoolStatus::Up, false),
        ];
        assert_eq!(t.next_action(&view), Some(PcpAction::Attach(1)));
        let mut t2 = t.clone();
        t2.health[1] = Health::Unknown;
        assert!(t2.agrees(&view), "a node in transition is left alone");
    }

    fn health() -> impl Strategy<Value = Health> {
        prop_oneof![
            Just(Health::Serving),
            Just(Health::Down),
            Just(Health::Failed),
            Just(Health::Unknown),
            Just(Health::Promoting)
        ]
    }

    #[test]
    fn a_promoting_primary_already_in_use_is_promoted_in_pgpool_at_once() {
        // The old primary crashed (held), the new one is being promoted by its sidecar.
        let view = [
            node(PoolStatus::Up, true),
            node(PoolStatus::Up, false),
            node(PoolStatus::Up, false),
        ];
        let t = Target {
            primary: Some(1),
            health: vec![Health::Down, Health::Promoting, Health::Serving],
            transition: true,
        };
        assert_eq!(t.next_action(&view), Some(PcpAction::Promote(1)));
        // Not attached in this pgpool: it waits until it runs as primary (an attach now would
        // make pgpool search for a primary and find none).
        let detached = [
            node(PoolStatus::Up, true),
            node(PoolStatus::Down, false),
            node(PoolStatus::Up, false),
        ];
        assert_eq!(t.next_action(&detached), None);
    }
    fn status() -> impl Strategy<Value = PoolStatus> {
        prop_oneof![
            Just(PoolStatus::Waiting),
            Just(PoolStatus::Up),
            Just(PoolStatus::Down)
        ]
    }

    proptest! {
        /// From any pgpool state, following the plan converges in a few commands; the result
        /// sends writes only to the committed primary (and to it once it serves), and no
        /// command on the way ever makes a non-primary pgpool's write target.
        #[test]
        fn converges_and_never_routes_writes_elsewhere(
            n in 2usize..5,
            primary_pick in proptest::option::of(0usize..5),
            healths in proptest::collection::vec(health(), 5),
            statuses in proptest::collection::vec(status(), 5),
            flagged in proptest::option::of(0usize..5),
            transition in any::<bool>(),
        ) {
            let primary = primary_pick.filter(|&p| p < n);
            let mut t = Target { primary, health: healths[..n].to_vec(), transition };
            let mut view: Vec<PoolNode> = (0..n)
                .map(|i| node(statuses[i], flagged == Some(i)))
                .collect();
            // A promoting primary finishes its promotion: pgpool converges again from there.
            let phases = if primary.is_some_and(|p| t.health[p] == Health::Promoting) { 2 } else { 1 };
            let mut really = None;
            for phase in 0..phases {
                if phase == 1 {
                    if let Some(p) = primary {
                        t.health[p] = Health::Serving;
                    }
                }
                really = primary.filter(|&p| t.health[p] == Health::Serving);
                let mut steps = 0;
                while let Some(a) = t.next_action(&view) {
                    pgpool_applies(&mut view, a, really);
                    if let Some(w) = pool_primary(&view) {
                        // Only the committed primary, or a held old primary (fenced meanwhile).
                        prop_assert!(Some(w) == primary || t.health[w] == Health::Down || transition,
                            "writes routed to a live non-primary after {:?}", a);
                    }
                    steps += 1;
                    prop_assert!(steps <= 2 * n + 2, "no convergence: {:?}", view);
                }
            }
            if let Some(p) = really {
                prop_assert_eq!(pool_primary(&view), Some(p));
            }
            for (i, v) in view.iter().enumerate().take(n) {
                if Some(i) != primary && t.health[i] == Health::Serving {
                    prop_assert!(v.status.attached());
                }
                if Some(i) != primary && t.health[i] == Health::Failed {
                    prop_assert!(!v.status.attached() || (transition && v.primary && really.is_none()));
                }
                // A stopped old primary may stay flagged only until the new one serves.
                if Some(i) != primary && t.health[i] == Health::Down && v.status.attached() && !transition {
                    prop_assert!(v.primary && really.is_none());
                }
            }
        }
    }

    #[test]
    fn a_room_narrows_its_own_pgpool_to_what_answers_and_nothing_more() {
        use PoolStatus::*;
        let view = [node(Up, true), node(Waiting, false), node(Down, false)];
        // Everything answers: nothing to do.
        assert_eq!(narrow_locally(0, &view, &[true, true, true]), None);
        // The lost standby is detached; one already down is left alone.
        assert_eq!(
            narrow_locally(0, &view, &[true, false, false]),
            Some(PcpAction::Detach(1))
        );
        // Never the room's own backend, even when it does not answer (it is the primary).
        assert_eq!(narrow_locally(0, &view, &[false, true, true]), None);
        // Unknown (no answer recorded) counts as answering: nothing is detached on a guess.
        assert_eq!(narrow_locally(0, &view, &[true]), None);
    }

    proptest! {
        /// Whatever pgpool shows and whoever answers, the local rule only ever detaches a node
        /// other than the room's own that is attached and did not answer.
        #[test]
        fn narrowing_locally_only_detaches_silent_others(
            codes in proptest::collection::vec((0i64..5, any::<bool>(), any::<bool>()), 1..5),
            own in 0usize..5,
        ) {
            let view: Vec<PoolNode> =
                codes.iter().map(|(c, p, _)| node(PoolStatus::from_code(*c), *p)).collect();
            let answers: Vec<bool> = codes.iter().map(|(_, _, a)| *a).collect();
            match narrow_locally(own, &view, &answers) {
                None => prop_assert!(view
                    .iter()
                    .enumerate()
                    .all(|(i, n)| i == own || !n.status.attached() || answers[i])),
                Some(PcpAction::Detach(i)) => {
                    prop_assert!(i != own && view[i].status.attached() && !answers[i])
                }
                Some(other) => prop_assert!(false, "{other:?}"),
            }
        }
    }
}
