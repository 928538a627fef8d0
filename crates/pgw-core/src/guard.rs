//! The sidecar's local guard: when a data member must fence its own postgres, and when it gives
//! the primary role up because its postgres died. Pure: the sidecar's observation loop and its
//! lease watchdog both call [`step`] with what they see, so each rule exists once. Times are
//! the sidecar's own monotonic clock in ms.

use crate::failover::PgRole;

/// What the guard remembers between steps (per run of the sidecar).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct GuardState {
    /// The epoch at which our postgres was last seen running as primary (a dead postmaster at
    /// another epoch is an old crash, not a new one).
    pub running_seen_epoch: Option<u64>,
    /// We fenced our postgres at this epoch.
    pub fenced_at_epoch: Option<u64>,
    /// Our postgres died (or could not be started) while primary at this epoch: it is not
    /// started as primary again until the group decides again.
    pub crashed_at_epoch: Option<u64>,
}

/// What one step sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardInput {
    pub now: u64,
    /// The committed facts name this member primary, at `epoch`.
    pub named_primary: bool,
    pub epoch: u64,
    /// The fencing deadline: last acknowledged renewal sent + `lease_ms - fence_budget_ms`.
    pub lease_deadline: u64,
    /// The local server's role as last observed (`None`: unknown, e.g. hung or refusing).
    pub role: Option<PgRole>,
    /// The postmaster process exists.
    pub postmaster_alive: bool,
    /// Only from an observation: the postmaster was found dead with its pid file left behind.
    pub died: bool,
    /// Only from an observation: since when the server has not answered at all.
    pub unresponsive_since: Option<u64>,
    /// When the observation began (for the watchdog: `now`).
    pub observed_at: u64,
    /// The actor is in the middle of an action (start, promote, restart...).
    pub busy: bool,
    /// When the actor last finished an action.
    pub busy_ended: Option<u64>,
    /// How long no answer at all counts as hung.
    pub hung_after_ms: u64,
    /// The group could hand the role on without this primary (three voters or more): it must
    /// stop at its lease deadline. With fewer voters nothing can replace it but an operator's
    /// forced recovery (`Config::automatic_failover_off`), so losing the other room does not
    /// stop it.
    pub lease_needed: bool,
}

/// Why a guard fences.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceReason {
    /// The lease was not renewed in time: the group may hand the role on.
    LeaseExpired,
    /// No answer at all for this long.
    Hung { for_ms: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardAction {
    /// Kill the local postgres now (then record `fenced_at_epoch`).
    Fence { epoch: u64, reason: FenceReason },
    /// Our postgres died while primary: release the role (reported as `crashed`).
    ReleaseCrashed { epoch: u64 },
}

/// Degraded mode where nothing can replace the primary (`lease_needed` false: fewer than three
/// voters, so the group has no majority without the primary's member): the primary stops
/// waiting for a lost standby in postgres at once, before the group records it (it cannot while
/// the other voter is lost). Elsewhere the group records the empty sync set first.
pub fn narrows_locally(lease_needed: bool, degraded: bool) -> bool {
    degraded && !lease_needed
}

/// Whether degraded mode is over for this member whatever it observes: the cluster does not
/// allow it, or the group no longer names this member primary. Nothing else ends it but a
/// returning standby ([`may_leave_degraded`]): an observation that does not show postgres
/// running as primary (no answer, hung, restarting) changes nothing, so that a primary that
/// narrowed on its own keeps saying so until the group has recorded the episode (found with
/// the short timings on the network test bed: a reset on such an observation went unrecorded,
/// status said "not degraded", and a forced recovery then lost the writes acknowledged while
/// degraded).
pub fn degraded_mode_over(allow_degraded: bool, named_primary: bool) -> bool {
    !allow_degraded || !named_primary
}

/// Whether a degraded primary may leave degraded mode now that a standby is connected again:
/// where it narrowed on its own, only once the group has recorded the episode (an empty sync
/// set), so that the returning standby is never taken for complete while commits acknowledged
/// without it are unrecorded.
pub fn may_leave_degraded(lease_needed: bool, recorded_empty: bool) -> bool {
    lease_needed || recorded_empty
}

/// One step of the guard; updates `st` and says what to do.
pub fn step(st: &mut GuardState, i: &GuardInput) -> Vec<GuardAction> {
    let mut out = Vec::new();
    if !i.named_primary {
        return out;
    }
    if i.role == Some(PgRole::Primary) {
        st.running_seen_epoch = Some(i.epoch);
    }
    let fenced = st.fenced_at_epoch == Some(i.epoch);
    // A postgres that may accept writes at this epoch: seen as primary now or earlier at this
    // epoch (a hung one is observed as unknown), or in the actor's hands (a promotion or a
    // restart finishing after the deadline). A replica named primary but not promoted yet is
    // left alone: the actor promotes only with a lease granted at this epoch.
    let may_write =
        i.role == Some(PgRole::Primary) || st.running_seen_epoch == Some(i.epoch) || i.busy;
    if i.lease_needed && i.now >= i.lease_deadline && may_write && !fenced && i.postmaster_alive {
        st.fenced_at_epoch = Some(i.epoch);
        out.push(GuardAction::Fence {
            epoch: i.epoch,
            reason: FenceReason::LeaseExpired,
        });
        return out;
    }
    if let Some(since) = i.unresponsive_since {
        let for_ms = i.now.saturating_sub(since);
        if for_ms >= i.hung_after_ms && !fenced {
            st.fenced_at_epoch = Some(i.epoch);
            out.push(GuardAction::Fence {
                epoch: i.epoch,
                reason: FenceReason::Hung { for_ms },
            });
            return out;
        }
    }
    // A death seen by an observation begun during an action is the action's (a restart's
    // stopped postmaster), not a crash.
    if i.died
        && st.running_seen_epoch == Some(i.epoch)
        && !i.busy
        && i.busy_ended.is_none_or(|e| e < i.observed_at)
        && st.crashed_at_epoch != Some(i.epoch)
        && !fenced
    {
        st.crashed_at_epoch = Some(i.epoch);
        out.push(GuardAction::ReleaseCrashed { epoch: i.epoch });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> GuardInput {
        GuardInput {
            now: 1_000,
            named_primary: true,
            epoch: 7,
            lease_deadline: 3_000,
            role: Some(PgRole::Primary),
            postmaster_alive: true,
            died: false,
            unresponsive_since: None,
            observed_at: 1_000,
            busy: false,
            busy_ended: None,
            hung_after_ms: 1_500,
            lease_needed: true,
        }
    }

    #[test]
    fn without_a_third_voter_degraded_mode_narrows_first_and_ends_once_recorded() {
        assert!(narrows_locally(false, true));
        assert!(
            !narrows_locally(true, true),
            "with a third voter the group records first"
        );
        assert!(!narrows_locally(false, false));
        assert!(
            !may_leave_degraded(false, false),
            "not before the group recorded it"
        );
        assert!(may_leave_degraded(false, true));
        assert!(may_leave_degraded(true, false));
    }

    #[test]
    fn without_a_third_voter_the_lease_never_fences_but_a_hang_does() {
        let mut st = GuardState::default();
        let late = GuardInput {
            now: 9_000,
            lease_needed: false,
            ..input()
        };
        assert!(step(&mut st, &late).is_empty(), "nothing can replace it");
        let hung = GuardInput {
            unresponsive_since: Some(7_000),
            ..late
        };
        assert!(matches!(
            step(&mut st, &hung).as_slice(),
            [GuardAction::Fence {
                reason: FenceReason::Hung { .. },
                ..
            }]
        ));
    }

    #[test]
    fn a_primary_is_fenced_at_its_deadline_once() {
        let mut st = GuardState::default();
        assert!(step(&mut st, &input()).is_empty());
        let late = GuardInput {
            now: 3_000,
            ..input()
        };
        assert_eq!(
            step(&mut st, &late),
            vec![GuardAction::Fence {
                epoch: 7,
                reason: FenceReason::LeaseExpired
            }]
        );
        assert!(step(&mut st, &late).is_empty(), "fenced once per epoch");
    }

    #[test]
    fn a_hung_primary_seen_earlier_at_this_epoch_is_fenced_at_the_deadline_too() {
        let mut st = GuardState::default();
        step(&mut st, &input());
        // Hung: role unknown. The watchdog still fences at the deadline.
        let hung = GuardInput {
            now: 3_100,
            role: None,
            ..input()
        };
        assert!(matches!(
            step(&mut st, &hung).as_slice(),
            [GuardAction::Fence {
                reason: FenceReason::LeaseExpired,
                ..
            }]
        ));
    }

    #[test]
    fn no_answer_for_the_hang_limit_fences_a_primary_but_a_refusal_does_not() {
        let mut st = GuardState::default();
        let silent = GuardInput {
            now: 2_600,
            role: None,
            unresponsive_since: Some(1_000),
            ..input()
        };
        assert!(matches!(
            step(&mut st, &silent).as_slice(),
            [GuardAction::Fence {
                reason: FenceReason::Hung { for_ms: 1_600 },
                ..
            }]
        ));
        // Refused (answers, but not to us): unknown role, no unresponsive_since.
        let mut st = GuardState::default();
        let refused = GuardInput {
            now: 2_600,
            role: None,
            ..input()
        };
        assert!(step(&mut st, &refused).is_empty());
    }

    #[test]
    fn a_replica_named_primary_is_not_fenced_before_it_was_promoted() {
        let mut st = GuardState::default();
        let replica = GuardInput {
            now: 9_000,
            role: Some(PgRole::Replica),
            ..input()
        };
        assert!(step(&mut st, &replica).is_empty());
        // In the actor's hands (promoting): it may write, so it is fenced.
        let promoting = GuardInput {
            busy: true,
            ..replica
        };
        assert!(!step(&mut st, &promoting).is_empty());
    }

    #[test]
    fn a_death_is_a_crash_only_outside_an_action() {
        let mut st = GuardState::default();
        step(&mut st, &input());
        let dead = GuardInput {
            now: 1_200,
            role: Some(PgRole::Down),
            postmaster_alive: false,
            died: true,
            observed_at: 1_150,
            ..input()
        };
        // Observed while the actor restarted it: not a crash.
        let during = GuardInput {
            busy_ended: Some(1_160),
            ..dead.clone()
        };
        assert!(step(&mut st, &during).is_empty());
        let busy = GuardInput {
            busy: true,
            ..dead.clone()
        };
        assert!(step(&mut st, &busy).is_empty());
        assert_eq!(
            step(&mut st, &dead),
            vec![GuardAction::ReleaseCrashed { epoch: 7 }]
        );
        assert!(step(&mut st, &dead).is_empty(), "released once");
        // A dead postmaster at another epoch is an old crash.
        let mut st2 = GuardState::default();
        step(&mut st2, &input());
        let other = GuardInput { epoch: 8, ..dead };
        assert!(step(&mut st2, &other).is_empty());
    }

    #[test]
    fn a_member_not_named_primary_is_left_alone() {
        let mut st = GuardState::default();
        let not = GuardInput {
            named_primary: false,
            now: 99_999,
            unresponsive_since: Some(0),
            ..input()
        };
        assert!(step(&mut st, &not).is_empty());
    }

    #[test]
    fn only_the_role_or_the_setting_ends_degraded_mode_on_its_own() {
        assert!(degraded_mode_over(false, true), "not allowed");
        assert!(degraded_mode_over(true, false), "no longer named primary");
        assert!(
            !degraded_mode_over(true, true),
            "named primary, allowed: only a returning standby ends it"
        );
        // And then only once recorded where the primary narrowed on its own.
        assert!(!may_leave_degraded(false, false));
        assert!(may_leave_degraded(false, true));
        assert!(may_leave_degraded(true, false));
    }
}
