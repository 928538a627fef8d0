//! Room faults on real networks: every room, the arbiter and the clients are network namespaces
//! joined by a bridge (see `tests/netbed/`), with real PostgreSQL 15, pgpool-II and watchers.
//! Each scenario runs the consistency checker (writers through every pgpool and straight to every
//! server, split-brain probe, no acknowledged write lost, every node back after healing).
//!
//! Needs root (network namespaces, nftables), as CI runs; the tests fail, not skip, without it.
//! They run one at a time (each bed runs 2-3 postgres, pgpools and watchers on 2 cores).

mod common;
mod netbed;

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{epoch_of, member_args, node_role, primary_of};
use netbed::checker::Checker;
use netbed::{Bed, Layout, Plan};
use pgw_cli::writer::{ids_on, is_primary, wall_ms};
use pgw_core::Role;
use pgw_server::sidecar::observe::parse_lsn;

static SERIAL: Mutex<()> = Mutex::new(());

/// How long a scenario lets a healthy cluster run before the fault, so the fault hits a steady
/// state (start-up's pgpool attaches make pgpool restart its PCP process a second later).
const SETTLE: Duration = Duration::from_secs(3);

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Names of the data members other than `not`.
fn other_rooms(bed: &Bed, not: usize) -> Vec<String> {
    bed.data_members()
        .into_iter()
        .filter(|i| *i != not)
        .map(|i| bed.name(i).to_string())
        .collect()
}

/// Cuts the primary's room off (with or without its clients) and waits for a write through a
/// surviving room's pgpool on another server; returns (old primary index, ms to that write).
async fn cut_primary_room(bed: &Bed, chk: &Checker, keep_clients: bool) -> (usize, u128) {
    let s = bed.wait_healthy(Duration::from_secs(120)).await;
    let old = primary_of(&s).expect("primary");
    let oi = bed.index_of(&old);
    let old_addr = bed.hosts[oi].pg_addr();
    tokio::time::sleep(SETTLE).await;
    let t0 = Instant::now();
    bed.cut_off(oi, keep_clients);
    let first = chk
        .wait_write_via(
            &other_rooms(bed, oi),
            Some(&old_addr),
            t0,
            Duration::from_secs(30),
        )
        .await;
    let ms = (first.at - t0).as_millis();
    eprintln!(
        "room {old} cut off: first write through a surviving pgpool on {} after {ms} ms",
        first.backend
    );
    (oi, ms)
}

/// Over `dur`, the primary and the epoch (as in `before`, taken before the fault) must not
/// move, and writes through `room`'s pgpool keep being acknowledged by the primary (at least one
/// in every 5 s).
async fn stays_put(
    bed: &Bed,
    chk: &Checker,
    before: &pgw_cli::status::GroupStatus,
    room: &str,
    dur: Duration,
    what: &str,
) {
    let p = primary_of(before).expect("primary");
    let e = epoch_of(before);
    let paddr = bed.hosts[bed.index_of(&p)].pg_addr();
    let t0 = Instant::now();
    let mut window = Instant::now();
    while t0.elapsed() < dur {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Some(s) = bed.status().await {
            if s.clusters.first().is_some_and(|c| c.primary.is_some()) {
                assert_eq!(
                    (primary_of(&s), epoch_of(&s)),
                    (Some(p.clone()), e),
                    "{what}: the primary or its epoch moved"
                );
            }
        }
        if window.elapsed() >= Duration::from_secs(5) {
            assert!(
                chk.first_via_pgpool(&[room.to_string()], &paddr, window)
                    .is_some(),
                "{what}: no write through {room}'s pgpool acknowledged by {p} in 5 s"
            );
            window = Instant::now();
        }
    }
}

/// A fault after which nothing may happen: on a settled cluster, `fault` hits (given the
/// primary's index); for `dur` the primary and its epoch stay and writes keep flowing through the
/// primary's room's pgpool ([`stays_put`]); `before_heal` runs (given when the fault hit); then
/// the bed heals, the checker passes, the primary is the same and no decision was recorded.
fn changes_nothing(
    layout: Layout,
    setup: impl Fn(&mut pgw_core::Config),
    what: &str,
    dur: Duration,
    fault: impl FnOnce(&Bed, usize) + Send,
    before_heal: impl FnOnce(&Bed, &Checker, Instant) + Send,
) {
    let bed = Bed::start_with(layout, setup);
    bed.run(|| async {
        let chk = Checker::start(&bed).await;
        let s = bed.wait_healthy(Duration::from_secs(60)).await;
        let p = primary_of(&s).expect("primary");
        tokio::time::sleep(SETTLE).await;
        let since = wall_ms();
        let t0 = Instant::now();
        fault(&bed, bed.index_of(&p));
        stays_put(&bed, &chk, &s, &p, dur, what).await;
        before_heal(&bed, &chk, t0);
        bed.heal();
        let r = chk.finish(&bed).await;
        r.print(what);
        r.assert_safe();
        assert_eq!(r.final_primary, p);
        assert_eq!(
            r.epoch_moves_since(since),
            0,
            "{what}: a decision was taken"
        );
    });
}

/// The primary room is cut off from the other members while its own clients still reach it:
/// its postgres must be fenced (no longer a writable primary), the others elect a new primary,
/// writes through the surviving rooms' pgpools resume on it, and nothing acknowledged is lost.
#[test]
fn primary_room_cut_off_is_fenced_and_replaced() {
    let _s = serial();
    let bed = Bed::start(Layout::ThreeRooms);
    bed.run(|| async {
        let chk = Checker::start(&bed).await;
        let (oi, _) = cut_primary_room(&bed, &chk, true).await;
        let old = bed.name(oi).to_string();
        let old_addr = bed.hosts[oi].pg_addr();
        // Fenced: the cut-off server no longer accepts writes though its clients still reach it.
        let tf = Instant::now();
        while is_primary(&old_addr).await == Some(true) {
            assert!(
                tf.elapsed() < Duration::from_secs(10),
                "{old}'s postgres is still a writable primary while its room is cut off"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Writes straight to it and through its room's pgpool get nowhere while cut off.
        let t1 = Instant::now();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let stray: Vec<_> = chk
            .acks()
            .into_iter()
            .filter(|a| a.sent > t1 && a.backend == old_addr)
            .collect();
        assert!(stray.is_empty(), "the fenced server acknowledged {stray:?}");
        bed.heal();
        let r = chk.finish(&bed).await;
        r.print("primary room cut off");
        r.assert_safe();
        assert_ne!(r.final_primary, old);
    });
}

/// The primary's room loses only its link to the arbiter: the other room still connects
/// everyone, so nothing may change.
#[test]
fn primary_room_losing_its_arbiter_link_changes_nothing() {
    let _s = serial();
    changes_nothing(
        Layout::TwoRoomsArbiter,
        |_| {},
        "primary-arbiter link cut",
        Duration::from_secs(15),
        |bed, p| bed.cut_link(p, bed.index_of("arbiter")),
        |_, _, _| {},
    );
}

/// The arbiter is isolated from everyone: the two rooms keep a majority, nothing may change.
#[test]
fn arbiter_isolated_changes_nothing() {
    let _s = serial();
    changes_nothing(
        Layout::TwoRoomsArbiter,
        |_| {},
        "arbiter isolated",
        Duration::from_secs(15),
        |bed, _| bed.cut_off(bed.index_of("arbiter"), false),
        |_, _, _| {},
    );
}

/// A replica's room is cut off entirely: writes continue on the primary, acknowledged by the
/// other sync replica; after healing the replica catches up and is a sync replica again.
#[test]
fn replica_room_cut_off_writes_continue() {
    let _s = serial();
    changes_nothing(
        Layout::ThreeRooms,
        |_| {},
        "replica room cut off",
        Duration::from_secs(12),
        |bed, p| {
            let replica = bed
                .data_members()
                .into_iter()
                .find(|i| *i != p)
                .expect("a replica");
            bed.cut_off(replica, false);
        },
        |_, _, _| {},
    );
}

/// Two successive room losses with a heal in between: first the primary's room is cut off and
/// healed; then the new primary's room loses power (everything killed) and comes back.
#[test]
fn two_successive_room_losses_with_heal_between() {
    let _s = serial();
    let bed = Bed::start(Layout::ThreeRooms);
    bed.run(|| async {
        let chk = Checker::start(&bed).await;
        let (first, _) = cut_primary_room(&bed, &chk, false).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        bed.heal();
        let s = bed.wait_healthy(Duration::from_secs(120)).await;
        assert_eq!(
            node_role(&s, bed.name(first)).as_deref(),
            Some("sync_replica"),
            "the first lost room is back as a sync replica"
        );
        let p2 = primary_of(&s).expect("primary");
        let p2i = bed.index_of(&p2);
        let p2_addr = bed.hosts[p2i].pg_addr();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let t0 = Instant::now();
        bed.kill_room(p2i);
        let w = chk
            .wait_write_via(
                &other_rooms(&bed, p2i),
                Some(&p2_addr),
                t0,
                Duration::from_secs(30),
            )
            .await;
        eprintln!(
            "room {p2} lost power: first write through a surviving pgpool on {} after {} ms",
            w.backend,
            (w.at - t0).as_millis()
        );
        bed.start_watcher(p2i);
        let r = chk.finish(&bed).await;
        r.print("two successive room losses");
        r.assert_safe();
        assert_ne!(r.final_primary, p2);
    });
}

/// A switchover is asked for and the target's room is partitioned one way (nothing reaches it,
/// its own packets still leave) right after: whatever the outcome, one primary, nothing lost.
#[test]
fn partition_during_a_switchover() {
    let _s = serial();
    let bed = Bed::start(Layout::ThreeRooms);
    bed.run(|| async {
        let chk = Checker::start(&bed).await;
        let s = bed.wait_healthy(Duration::from_secs(60)).await;
        let p = primary_of(&s).expect("primary");
        let pi = bed.index_of(&p);
        let ti = bed
            .data_members()
            .into_iter()
            .find(|i| *i != pi)
            .expect("a target");
        let target = bed.name(ti).to_string();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let op = pgw_cli::switchover(&bed.endpoints(), "global", Some(&target))
            .await
            .expect("switchover accepted");
        tokio::time::sleep(Duration::from_millis(150)).await;
        for j in 0..bed.hosts.len() {
            if j != ti {
                bed.block_one_way(j, ti);
            }
        }
        tokio::time::sleep(Duration::from_secs(8)).await;
        let during = bed.status().await;
        eprintln!(
            "switchover op {} to {target}; during the partition primary = {:?}",
            op.id,
            during.as_ref().and_then(primary_of)
        );
        bed.heal();
        let r = chk.finish(&bed).await;
        r.print("partition during a switchover");
        r.assert_safe();
    });
}

/// 100 ms ± 50 ms between every pair of members (each way) for 30 s, with the `wide-area`
/// timing profile (round trips up to ~300 ms): slower commits, but no decision taken and writes
/// keep flowing.
#[test]
fn latency_between_rooms_causes_no_failover() {
    let _s = serial();
    changes_nothing(
        Layout::ThreeRooms,
        netbed::wide_area,
        "100±50 ms latency",
        Duration::from_secs(30),
        |bed, _| bed.set_latency(Duration::from_millis(100), Duration::from_millis(50)),
        |bed, chk, t0| {
            let during = chk.acks().iter().filter(|a| a.sent > t0).count();
            let frames = bed.latency_frames();
            bed.clear_latency();
            eprintln!(
                "under latency: {during} writes acknowledged, {frames} frames delayed/forwarded"
            );
            assert!(
                frames > 1000,
                "the latency switch forwarded only {frames} frames"
            );
        },
    );
}

/// The primary's room (servers and clients) is cut off, a failover happens, the room is healed:
/// the old primary rejoins as a sync replica and its room's pgpool writes to the new primary.
#[test]
fn primary_room_healed_after_failover_rejoins_as_replica() {
    let _s = serial();
    let bed = Bed::start(Layout::ThreeRooms);
    bed.run(|| async {
        let chk = Checker::start(&bed).await;
        let (oi, _) = cut_primary_room(&bed, &chk, false).await;
        let old = bed.name(oi).to_string();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let th = Instant::now();
        bed.heal();
        let s = bed.wait_healthy(Duration::from_secs(120)).await;
        let newp = primary_of(&s).expect("primary");
        assert_ne!(newp, old);
        assert_eq!(node_role(&s, &old).as_deref(), Some("sync_replica"));
        assert_eq!(is_primary(&bed.hosts[oi].pg_addr()).await, Some(false));
        let new_addr = bed.hosts[bed.index_of(&newp)].pg_addr();
        let w = chk
            .wait_write_via(std::slice::from_ref(&old), None, th, Duration::from_secs(30))
            .await;
        assert_eq!(
            w.backend, new_addr,
            "{old}'s pgpool writes to the new primary after the heal"
        );
        eprintln!(
            "healed: {old} rejoined as sync replica; write through its pgpool on {newp} {} ms after the heal",
            (w.at - th).as_millis()
        );
        let r = chk.finish(&bed).await;
        r.print("primary room healed after a failover");
        r.assert_safe();
    });
}

/// A member lost from an older generation comes back: `pgwctl member add` under node id `id`
/// (its addresses as before), then its watcher started with that id and `--join`.
async fn rejoin(bed: &Bed, i: usize, id: u64, eps: &[String]) {
    let mut cfg = bed.hosts[i].cfg.clone();
    let me = bed.name(i).to_string();
    for m in cfg.members.iter_mut().filter(|m| m.name == me) {
        m.id = id;
    }
    let m = cfg.me().expect("me").clone();
    let spec = pgw_proto::MemberSpec {
        name: m.name.clone(),
        id,
        role: m.role.to_string(),
        grpc: m.grpc.clone(),
        http: m.http.clone(),
        room: m.room().to_string(),
        postgres: m.postgres.clone().unwrap_or_default(),
        pgpool: m.pgpool.clone().unwrap_or_default(),
        pcp: m.pcp.clone().unwrap_or_default(),
        priority: m.priority,
        spare: false,
    };
    let r = pgw_cli::member::change(
        eps,
        pgw_proto::MemberChangeRequest {
            member: Some(spec),
            old: String::new(),
            promote: String::new(),
        },
    )
    .await
    .expect("member add");
    eprintln!("{}", r.result);
    bed.start_watcher_with(i, Some(&cfg), &["--join", &eps[0]]);
}

/// Two of three rooms cut off at once, the primary's among them: the survivor decides nothing
/// alone; the operator forces a new group on it (after the lost rooms were silent longer than
/// the lease: the cut-off primary has fenced itself), writes resume through the survivor's
/// pgpool; the lost rooms lose power while cut off and come back as they were: refused, naming
/// the generation; re-added under new ids and started with `--join`, they rejoin as sync
/// replicas, every pgpool agrees, and nothing acknowledged is lost (ANY 2: the survivor held
/// every commit).
#[test]
fn two_rooms_cut_off_forced_recovery_then_they_rejoin() {
    let _s = serial();
    let bed = Bed::start_with(Layout::ThreeRooms, |c| c.clusters[0].sync_quorum = 2);
    bed.run(|| async {
        let chk = Checker::start(&bed).await;
        let s = bed.wait_healthy(Duration::from_secs(120)).await;
        let p = primary_of(&s).expect("primary");
        let pi = bed.index_of(&p);
        let si = bed
            .data_members()
            .into_iter()
            .find(|i| *i != pi)
            .expect("a replica");
        let li = bed
            .data_members()
            .into_iter()
            .find(|i| *i != pi && *i != si)
            .expect("the other replica");
        let survivor = bed.name(si).to_string();
        let old_addr = bed.hosts[pi].pg_addr();
        let e0 = epoch_of(&s);
        tokio::time::sleep(SETTLE).await;
        bed.cut_off(pi, false);
        bed.cut_off(li, false);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let eps_s = vec![bed.hosts[si].grpc()];
        let st = pgw_cli::status::gather(&eps_s, Duration::from_secs(2))
            .await
            .expect("the survivor answers");
        assert_eq!(epoch_of(&st), e0, "one room of three decides nothing");

        // The runbook, on the survivor.
        bed.kill_watcher(si);
        let (code, text) = bed.watcher_command(si, &["--force-new-group"]);
        assert_eq!(code, 0, "{text}");
        let t0 = Instant::now();
        bed.start_watcher(si);
        let w = chk
            .wait_write_via(
                std::slice::from_ref(&survivor),
                Some(&old_addr),
                t0,
                Duration::from_secs(60),
            )
            .await;
        eprintln!(
            "forced recovery: first write through {survivor}'s pgpool on {} after {} ms",
            w.backend,
            (w.at - t0).as_millis()
        );

        // The lost rooms lose power while cut off, then come back as they were: refused.
        bed.kill_room(pi);
        bed.kill_room(li);
        bed.heal();
        for i in [pi, li] {
            bed.start_watcher(i);
            assert_eq!(
                bed.watcher_exit(i, Duration::from_secs(30)),
                Some(1),
                "{} of the old generation must not start",
                bed.name(i)
            );
            let log = std::fs::read_to_string(&bed.hosts[i].log).unwrap_or_default();
            assert!(log.contains("generation 1"), "{log}");
        }

        // Back through `member add` under new ids and `--join`.
        for (i, id) in [(pi, 11u64), (li, 12u64)] {
            rejoin(&bed, i, id, &eps_s).await;
        }
        let r = chk.finish(&bed).await;
        r.print("two rooms cut off, forced recovery, rejoin");
        r.assert_safe();
        assert_eq!(r.final_primary, survivor);
        assert!(
            r.history
                .iter()
                .any(|h| h.contains("group forced to generation 1")),
            "{:?}",
            r.history
        );
    });
}

/// Two rooms without an arbiter (seed 000's active-standby, degraded mode allowed). The standby
/// room cut off: writes to the primary go on well past the lease (nothing could replace the
/// primary); healed, it is synchronous again. The primary's room cut off: nothing
/// happens on its own; once that room has lost power, one command on the standby room (which
/// refuses without `--i-know-the-others-are-down`: silence proves nothing here) and writes
/// resume there; the old room comes back refused, then rejoins through `member add` + `--join`;
/// nothing acknowledged is lost.
#[test]
fn two_rooms_without_an_arbiter_lose_the_standby_then_the_primary_room() {
    let _s = serial();
    let bed = Bed::start_with(Layout::TwoRooms, |c| {
        c.clusters[0].allow_degraded = true;
        c.clusters[0].degrade_after_ms = 1000;
    });
    bed.run(|| async {
        let chk = Checker::start(&bed).await;
        let s = bed.wait_healthy(Duration::from_secs(120)).await;
        assert!(s.automatic_failover_off.is_some());
        let p = primary_of(&s).expect("primary");
        let pi = bed.index_of(&p);
        let ri = 1 - pi;
        let standby = bed.name(ri).to_string();
        let paddr = bed.hosts[pi].pg_addr();
        tokio::time::sleep(SETTLE).await;

        // 1. The standby room is cut off: writes to the primary go on, past the lease, straight
        // and through its room's pgpool (which the primary's member narrows itself: no leader
        // can, with one voter of two).
        let tc = Instant::now();
        bed.cut_off(ri, false);
        let w = chk
            .wait_write_via(std::slice::from_ref(&p), None, tc, Duration::from_secs(30))
            .await;
        eprintln!(
            "two rooms, standby room cut off: writes through {p}'s pgpool {} ms after the cut",
            (w.at - tc).as_millis()
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
        let late = Instant::now();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            chk.acks().iter().any(|a| a.at > late && a.backend == paddr),
            "writes to {p} stopped with the standby room cut off"
        );
        assert!(
            chk.first_via_pgpool(std::slice::from_ref(&p), &paddr, late)
                .is_some(),
            "writes through {p}'s pgpool stopped with the standby room cut off"
        );
        bed.heal();
        bed.wait_healthy(Duration::from_secs(120)).await;
        // Synchronous again, with the standby holding everything acknowledged while degraded
        // (status says DEGRADED until then: forcing earlier would lose those commits).
        let s = crate::common::wait_until(
            &bed.endpoints(),
            Duration::from_secs(60),
            "no longer degraded",
            |s| netbed::healthy(s, 2) && s.clusters.first().is_some_and(|c| !c.degraded),
        )
        .await;
        let e0 = epoch_of(&s);

        // 2. The primary's room is cut off: nothing happens on its own.
        bed.cut_off(pi, false);
        tokio::time::sleep(Duration::from_secs(4)).await;
        let eps_s = vec![bed.hosts[ri].grpc()];
        let st = pgw_cli::status::gather(&eps_s, Duration::from_secs(2))
            .await
            .expect("the standby room answers");
        assert_eq!(epoch_of(&st), e0, "no automatic failover with two voters");
        // It loses power; the one command, on the standby room.
        bed.kill_room(pi);
        bed.kill_watcher(ri);
        let (code, text) = bed.watcher_command(ri, &["--force-new-group"]);
        assert_ne!(code, 0);
        assert!(text.contains("--i-know-the-others-are-down"), "{text}");
        let (code, text) =
            bed.watcher_command(ri, &["--force-new-group", "--i-know-the-others-are-down"]);
        assert_eq!(code, 0, "{text}");
        let t1 = Instant::now();
        bed.start_watcher(ri);
        let w = chk
            .wait_write_via(
                std::slice::from_ref(&standby),
                Some(&paddr),
                t1,
                Duration::from_secs(60),
            )
            .await;
        eprintln!(
            "two rooms: first write through {standby}'s pgpool after {} ms",
            (w.at - t1).as_millis()
        );

        // 3. The old primary's room comes back as it was: refused; then rejoins.
        bed.heal();
        bed.start_watcher(pi);
        assert_eq!(
            bed.watcher_exit(pi, Duration::from_secs(30)),
            Some(1),
            "the old generation's member must not start"
        );
        rejoin(&bed, pi, 11, &eps_s).await;
        let r = chk.finish(&bed).await;
        r.print("two rooms without an arbiter");
        r.assert_safe();
        assert_eq!(r.final_primary, standby);
    });
}

fn standing(s: &pgw_cli::status::GroupStatus, name: &str) -> Option<String> {
    s.members
        .iter()
        .find(|m| m.name == name)
        .map(|m| m.standing.clone())
}

/// Runs `pgwctl ARGS` on the bed's group in the client namespace; panics unless it succeeds.
async fn pgwctl_ok(bed: &Bed, args: &[String]) {
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, text) = bed.pgwctl(0, &argv).await;
    assert_eq!(code, 0, "pgwctl {}: {text}", args.join(" "));
}

/// Membership changes across the bed's network under the checker's writers: a fourth voter is
/// added (`pgwctl member add`, then its watcher with `--join`), then removed; the arbiter's host
/// dies and a new host replaces it under a new name (`pgwctl member replace`). Throughout, no
/// decision is taken (same primary, same epoch) and writes keep flowing through the primary's
/// room's pgpool. Then the replacement's vote counts: the primary's room is cut off, and the
/// other room with the new arbiter fails over. Nothing acknowledged is lost.
#[test]
fn members_added_removed_and_a_dead_arbiter_host_replaced_under_writers() {
    let _s = serial();
    let plan = Plan {
        newcomers: vec![("arbiter-d", Role::Arbiter), ("arbiter-e", Role::Arbiter)],
        standby_group: None,
    };
    // Two data rooms: the survivor of the final room loss commits alone (degraded mode).
    let bed = Bed::start_plan(Layout::TwoRoomsArbiter, plan, |c| {
        c.clusters[0].allow_degraded = true;
        c.clusters[0].degrade_after_ms = 1000;
    });
    bed.run(|| async {
        let chk = Checker::start(&bed).await;
        let s = bed.wait_healthy(Duration::from_secs(120)).await;
        let p = primary_of(&s).expect("primary");
        let paddr = bed.hosts[bed.index_of(&p)].pg_addr();
        let e0 = epoch_of(&s);
        let join = bed
            .data_members()
            .iter()
            .map(|i| bed.hosts[*i].grpc())
            .collect::<Vec<_>>()
            .join(",");
        tokio::time::sleep(SETTLE).await;
        let t0 = Instant::now();

        // 1. A fourth voter joins across the network, then leaves.
        let di = bed.index_of("arbiter-d");
        let dm = bed.hosts[di].cfg.me().expect("arbiter-d").clone();
        let mut add: Vec<String> = ["member", "add", "arbiter-d"].map(String::from).to_vec();
        add.extend(member_args(&dm));
        pgwctl_ok(&bed, &add).await;
        bed.start_watcher_with(di, None, &["--join", &join]);
        crate::common::wait_until(
            &bed.endpoints(),
            Duration::from_secs(60),
            "arbiter-d votes",
            |s| pgw_cli::member::settled(s, Some(("arbiter-d", true)), None),
        )
        .await;
        let (_, text) = bed.pgwctl(0, &["status"]).await;
        assert!(text.contains("arbiter-d"), "{text}");
        pgwctl_ok(
            &bed,
            &["member", "remove", "arbiter-d", "--wait"].map(String::from),
        )
        .await;
        bed.kill_watcher(di);
        let s = bed.status().await.expect("status");
        assert_eq!(standing(&s, "arbiter-d"), None, "{:?}", s.members);

        // 2. The arbiter's host dies; a new host replaces it under a new name.
        let ai = bed.index_of("arbiter");
        bed.kill_room(ai);
        let ei = bed.index_of("arbiter-e");
        let em = bed.hosts[ei].cfg.me().expect("arbiter-e").clone();
        let mut rep: Vec<String> = ["member", "replace", "arbiter", "arbiter-e"]
            .map(String::from)
            .to_vec();
        rep.extend(member_args(&em));
        pgwctl_ok(&bed, &rep).await;
        bed.start_watcher_with(ei, None, &["--join", &join]);
        let s = crate::common::wait_until(
            &bed.endpoints(),
            Duration::from_secs(60),
            "arbiter-e replaces arbiter",
            |s| pgw_cli::member::settled(s, Some(("arbiter-e", true)), Some("arbiter")),
        )
        .await;
        let mut voters: Vec<String> = s
            .members
            .iter()
            .filter(|m| m.standing == "voter")
            .map(|m| m.name.clone())
            .collect();
        voters.sort();
        assert_eq!(voters, vec!["arbiter-e", "room-a", "room-b"]);
        assert_eq!(
            (primary_of(&s), epoch_of(&s)),
            (Some(p.clone()), e0),
            "no decision during membership changes"
        );
        // Writes went on through the primary's room's pgpool the whole time.
        let mut t = t0;
        while t + Duration::from_secs(5) < Instant::now() {
            assert!(
                chk.first_via_pgpool(std::slice::from_ref(&p), &paddr, t)
                    .is_some_and(|a| a.at < t + Duration::from_secs(5)),
                "no write through {p}'s pgpool within 5 s of {:?} into the membership changes",
                t - t0
            );
            t += Duration::from_secs(5);
        }

        // 3. The replacement's vote counts: the primary's room is cut off and replaced.
        let (oi, ms) = cut_primary_room(&bed, &chk, false).await;
        eprintln!(
            "after the arbiter's replacement, {} was replaced in {ms} ms",
            bed.name(oi)
        );
        bed.heal();
        let r = chk.finish(&bed).await;
        r.print("membership changes, then a room cut");
        r.assert_safe();
        assert_ne!(r.final_primary, p);
        for want in [
            "member arbiter-d added",
            "member arbiter-d removed",
            "member arbiter replaced by arbiter-e",
        ] {
            assert!(
                r.history.iter().any(|h| h.contains(want)),
                "history lacks `{want}`: {:?}",
                r.history
            );
        }
    });
}

/// `SELECT <f>` on `server` as an LSN (0 when it cannot be read).
async fn lsn_of(server: &str, f: &str) -> u64 {
    let Some(c) = pgw_cli::writer::connect(server).await else {
        return 0;
    };
    match c.query_one(&format!("SELECT {f}::text"), &[]).await {
        Ok(row) => row
            .get::<_, Option<String>>(0)
            .as_deref()
            .and_then(parse_lsn)
            .unwrap_or(0),
        Err(_) => 0,
    }
}

/// Inserts one new id through `via` (a pgpool) into the table of the primary `primary`,
/// retrying for up to 20 s (a pgpool being repointed answers nobody for a moment).
async fn insert_one(via: &str, primary: &str) -> i64 {
    let id = pgw_cli::writer::next_id(primary).await;
    let t0 = Instant::now();
    loop {
        let r = match pgw_cli::writer::try_connect(via).await {
            Ok(c) => c
                .execute("INSERT INTO acked (id) VALUES ($1)", &[&id])
                .await
                .map(|_| ())
                .map_err(|e| pgw_cli::writer::pg_error_text(&e)),
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => return id,
            Err(e) if t0.elapsed() > Duration::from_secs(20) => {
                panic!("insert through {via} for 20 s: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The standby group's leader streams from `main_primary`, its other server from it.
fn standby_leader_streams_from(s: &pgw_cli::status::GroupStatus, main_primary: &str) -> bool {
    let Some(c) = s.clusters.first() else {
        return false;
    };
    let Some(leader) = &c.primary else {
        return false;
    };
    c.standby
        .as_ref()
        .is_some_and(|sb| sb.upstream.as_deref() == Some(main_primary))
        && node_role(s, leader).as_deref() == Some("standby_leader")
        && c.nodes
            .iter()
            .filter(|n| &n.member != leader)
            .all(|n| n.role == "replica")
        && c.nodes.len() == 2
}

/// A standby group in another region (seed 000's non-region pair) on the bed's network, beside
/// a three-room main group under the checker's writers. Its standby leader streams from the
/// main primary; the main primary's room is cut off, the main group fails over and the standby
/// group follows the new primary. `pgwctl promote-group` is refused while the main group
/// answers; then the main region is cut off from the standby region (its own clients still
/// reach it: it goes on), and the command promotes the standby group, naming the position it
/// had replicated: at least the main primary's WAL position from before the cut, once the
/// standby had replayed it, and every write acknowledged before that is on the new primary. The
/// promoted group takes writes through its own pgpool, stays promoted when the regions are
/// joined again, and the main group lost nothing.
#[test]
fn standby_group_follows_the_main_failover_and_is_promoted_when_the_main_region_is_cut_off() {
    let _s = serial();
    let plan = Plan {
        newcomers: Vec::new(),
        standby_group: Some(Layout::TwoRoomsArbiter),
    };
    let bed = Bed::start_plan(Layout::ThreeRooms, plan, |_| {});
    bed.run(|| async {
        let chk = Checker::start(&bed).await;
        let s = bed.wait_healthy(Duration::from_secs(120)).await;
        let p0 = primary_of(&s).expect("main primary");
        let dr = bed.group_endpoints(1);
        crate::common::wait_until(&dr, Duration::from_secs(120), "the standby group streams", |s| {
            standby_leader_streams_from(s, &p0)
        })
        .await;
        let (_, text) = bed.pgwctl(1, &["status"]).await;
        assert!(text.contains("STANDBY of cluster `global`"), "{text}");
        assert!(!text.contains("DEGRADED"), "a standby cluster commits nothing: {text}");

        // The main primary's room is cut off: the main group fails over, the standby follows.
        let (oi, _) = cut_primary_room(&bed, &chk, false).await;
        let s = crate::common::wait_until(
            &bed.endpoints(),
            Duration::from_secs(60),
            "a new main primary",
            |s| primary_of(s).is_some_and(|p| p != p0),
        )
        .await;
        let p1 = primary_of(&s).expect("new main primary");
        let t1 = Instant::now();
        let s = crate::common::wait_until(&dr, Duration::from_secs(60), "the standby group follows", |s| {
            standby_leader_streams_from(s, &p1)
        })
        .await;
        eprintln!(
            "standby group followed {p0} -> {p1} {} ms after the new primary was seen",
            t1.elapsed().as_millis()
        );
        let leader = primary_of(&s).expect("standby leader");
        let li = bed.index_of(&leader);
        bed.heal();
        bed.wait_healthy(Duration::from_secs(120)).await;
        eprintln!("{} rejoined the main group", bed.name(oi));

        // Refused while the main group answers with a primary.
        let (code, text) = bed.pgwctl(1, &["promote-group"]).await;
        assert_ne!(code, 0);
        assert!(text.contains("the main group answers"), "{text}");

        // What the standby must hold before the cut: everything acknowledged up to a WAL
        // position of the main primary it has replayed.
        let main_addr = bed.hosts[bed.index_of(&p1)].pg_addr();
        let before: Vec<i64> = chk.acks().iter().map(|a| a.id).collect();
        let mark = lsn_of(&main_addr, "pg_current_wal_lsn()").await;
        let dr_addr = bed.hosts[li].pg_addr();
        let t0 = Instant::now();
        while lsn_of(&dr_addr, "pg_last_wal_replay_lsn()").await < mark {
            assert!(t0.elapsed() < Duration::from_secs(30), "the standby leader replays {mark:X}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // The main region is cut off from the standby region.
        let main = bed.group_hosts(0);
        let standby = bed.group_hosts(1);
        bed.cut_between(&main, &standby);
        let (code, text) = bed.pgwctl(1, &["promote-group"]).await;
        assert_eq!(code, 0, "{text}");
        assert!(text.contains("had replicated up to") && text.contains(&p1), "{text}");
        let reported = text
            .split("had replicated up to ")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .and_then(parse_lsn)
            .unwrap_or_else(|| panic!("no position in {text}"));
        assert!(reported >= mark, "reported {reported:X} < {mark:X} it had replayed");
        let s = crate::common::wait_until(&dr, Duration::from_secs(60), "the promoted group runs", |s| {
            s.clusters.first().is_some_and(|c| c.standby.is_none())
                && node_role(s, &leader).as_deref() == Some("primary")
                && s.clusters[0]
                    .nodes
                    .iter()
                    .any(|n| n.member != leader && n.role == "sync_replica")
        })
        .await;
        assert_eq!(primary_of(&s).as_deref(), Some(leader.as_str()));
        let on: BTreeSet<i64> = ids_on(&dr_addr).await.into_iter().collect();
        let missing: Vec<&i64> = before.iter().filter(|i| !on.contains(i)).collect();
        assert!(missing.is_empty(), "replicated before the cut, missing after promotion: {missing:?}");
        // It takes writes through its own pgpool, once the leader has repointed it.
        crate::common::wait_until(&dr, Duration::from_secs(30), "its pgpools agree", |s| {
            s.clusters[0]
                .pgpool
                .iter()
                .all(|p| p.agrees && p.primary.as_deref() == Some(leader.as_str()))
        })
        .await;
        let pool = bed.hosts[li].pgpool_addr();
        let id = insert_one(&pool, &dr_addr).await;
        assert!(ids_on(&dr_addr).await.contains(&id));

        // The regions are joined again: the promoted group stays promoted.
        bed.heal();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(is_primary(&dr_addr).await, Some(true), "{leader} stays a primary");
        let s = pgw_cli::status::gather(&dr, Duration::from_secs(2)).await.expect("status");
        assert!(s.clusters[0].standby.is_none(), "the promoted group follows nobody");
        let r = chk.finish(&bed).await;
        r.print("standby group: follow, region cut, promotion");
        r.assert_safe();
        eprintln!(
            "standby group: followed {p0} -> {p1}; promoted at {reported:X} (replayed {mark:X} before the cut); {} of the main group's ids on it",
            on.len()
        );
    });
}
