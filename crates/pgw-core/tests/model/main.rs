//! The model checker: the group's real pure rules (`Arbiter`, `decide`, `guard::step`,
//! `plan_local`, `Facts::apply`) over every interleaving of bounded runs (see `system.rs` for
//! what is modelled, `explore.rs` for the search).
//!
//! Each exploration starts from situations reached from the steady state by scripted steps of
//! the same transition relation (so each start is reachable; a step not enabled is skipped):
//! the scripts lead into the corners where a rule matters (a lease about to run out, a write
//! held by one standby only, a decision in flight), and from there every interleaving of every
//! transition is explored up to the depth bound.
//!
//! `cargo test -p pgw-core --test model -- --nocapture` runs what CI runs and prints the
//! figures. Deeper: `PGW_MODEL_DEPTH=8 PGW_MODEL_FAULTS=2 cargo test -p pgw-core --test model
//! three_rooms -- --nocapture` (minutes to hours; each level multiplies the states by ~4).

mod explore;
mod system;

use explore::{explore, Report};
use system::{Bounds, Layout, Mutation, System};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn bounds() -> Bounds {
    Bounds {
        max_t: env("PGW_MODEL_TICKS", 8),
        faults: env("PGW_MODEL_FAULTS", 1) as u8,
        drops: env("PGW_MODEL_DROPS", 1) as u8,
        writes: env("PGW_MODEL_WRITES", 1) as u8,
    }
}

fn steps(s: &[&[&str]]) -> Vec<String> {
    s.iter()
        .flat_map(|x| x.iter())
        .map(|x| x.to_string())
        .collect()
}

const WRITE_HELD_BY_C: &[&str] = &["a client writes #1 on a", "c replicates one record"];
/// Room a cut off; b and c report once; a second later, before b and c report again.
const A_CUT_OFF_FOR_A_SECOND: &[&str] = &[
    "room a is cut off",
    "b is elected",
    "time passes",
    "b's sidecar runs a round; its report arrives",
    "c's sidecar runs a round; its report arrives",
    "time passes",
];
/// a's postmaster crashed; the group has cleared it.
const A_CRASHED_AND_CLEARED: &[&str] = &[
    "a's postmaster crashes",
    "a's sidecar runs a round; its report arrives",
    "the leader",
    "ClearPrimary",
];
/// The leader clears the silent a as soon as its rule lets it.
const CLEAR_WHEN_ALLOWED: &[&str] = &["the leader", "ClearPrimary"];
/// a's watcher restarts while cut off; as the leader clears a, the network heals and a's new
/// run reports and acts before the decision commits.
const RESTARTED_WATCHER_REPORTS_WHILE_CLEARED: &[&str] = &[
    "time passes",
    "a's watcher process dies",
    "a's watcher restarts",
    "the leader",
    "the network heals",
    "a's sidecar runs a round; its lease is renewed",
    "a's sidecar runs a round",
    "ClearPrimary",
];

fn situations() -> Vec<Vec<String>> {
    vec![
        Vec::new(),
        steps(&[WRITE_HELD_BY_C]),
        steps(&[WRITE_HELD_BY_C, A_CRASHED_AND_CLEARED]),
        steps(&[A_CUT_OFF_FOR_A_SECOND]),
        steps(&[A_CUT_OFF_FOR_A_SECOND, CLEAR_WHEN_ALLOWED]),
        steps(&[
            A_CUT_OFF_FOR_A_SECOND,
            RESTARTED_WATCHER_REPORTS_WHILE_CLEARED,
        ]),
    ]
}

fn run(layout: Layout, mutation: Mutation, situations: Vec<Vec<String>>, depth: usize) -> Report {
    let mut sys = System::new(layout, mutation, bounds());
    sys.situations = situations;
    let r = explore(
        &sys,
        depth,
        std::env::var_os("PGW_MODEL_NO_LIVENESS").is_none(),
    );
    println!(
        "{layout:?}, mutation {mutation:?}, {:?}: {} starts, {} distinct states, {} transitions, depth {}, liveness checked from {} states, {:.1?}",
        sys.bounds,
        sys.situations.len() * 8,
        r.states,
        r.transitions,
        r.depth,
        r.liveness_checked,
        r.elapsed
    );
    if let Some(f) = &r.found {
        println!("{}", f.render());
    }
    r
}

fn depth() -> usize {
    env("PGW_MODEL_DEPTH", 5) as usize
}

#[test]
fn three_rooms_hold_every_property() {
    let r = run(Layout::ThreeRooms, Mutation::None, situations(), depth());
    assert!(
        r.found.is_none(),
        "{}",
        r.found.map(|f| f.render()).unwrap_or_default()
    );
}

#[test]
fn two_rooms_and_an_arbiter_hold_every_property() {
    let r = run(
        Layout::TwoRoomsAndArbiter,
        Mutation::None,
        situations(),
        depth(),
    );
    assert!(
        r.found.is_none(),
        "{}",
        r.found.map(|f| f.render()).unwrap_or_default()
    );
}

/// Runs a weakened rule; the checker must find the counterexample and print its trace.
/// Iterative deepening: the first depth with a counterexample gives a shortest one.
fn must_fail(mutation: Mutation, situation: Vec<String>, depth: usize, property: &str) {
    let found = (1..=depth)
        .find_map(|d| run(Layout::ThreeRooms, mutation, vec![situation.clone()], d).found)
        .unwrap_or_else(|| panic!("{mutation:?}: the checker found no counterexample"));
    let text = found.render();
    assert!(
        found.property.contains(property),
        "{mutation:?}: expected a violation of `{property}`, got:\n{text}"
    );
    assert!(found.trace.len() > 1 && text.contains("start: "), "{text}");
}

#[test]
fn a_candidate_rule_with_one_report_fewer_is_caught() {
    must_fail(
        Mutation::CandidateOneReportFewer,
        steps(&[WRITE_HELD_BY_C, A_CRASHED_AND_CLEARED]),
        5,
        "no acknowledged write lost",
    );
}

#[test]
fn a_lease_without_the_drift_factor_is_caught() {
    must_fail(
        Mutation::LeaseWithoutDrift,
        steps(&[A_CUT_OFF_FOR_A_SECOND, CLEAR_WHEN_ALLOWED]),
        6,
        "the lease",
    );
}

#[test]
fn a_grant_while_a_move_is_in_flight_is_caught() {
    must_fail(
        Mutation::GrantWhileMoving,
        steps(&[
            A_CUT_OFF_FOR_A_SECOND,
            RESTARTED_WATCHER_REPORTS_WHILE_CLEARED,
        ]),
        7,
        "the lease",
    );
}
