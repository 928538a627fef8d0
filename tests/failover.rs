//! Automatic failover against real PostgreSQL 15 servers managed by real watchers.
//! Needs the PostgreSQL 15 server binaries (`.ci/run` installs them).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use pgw_cli::status::GroupStatus;
use pgw_cli::writer::*;
use pgw_core::Role;

const THREE: [Role; 3] = [Role::Data, Role::Data, Role::Data];

/// These tests run real clusters with second-scale timings; on a 2-core machine they run one
/// at a time so that one test's load does not look like a fault to another.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn kill_pid(pid: i32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// The faults a primary can suffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// kill -9 of the postmaster.
    PostmasterCrash,
    /// kill -9 of the watcher and of postgres together.
    NodeLoss,
    /// SIGSTOP of every postgres process (a hung server).
    HungPostgres,
    /// SIGSTOP of the watcher (a hung watcher; its postgres keeps running).
    HungWatcher,
}

/// Runs one fault against the primary with a writer going, and checks invariants 1 and 2:
/// writes resume on exactly one new primary, nothing is acknowledged by two servers at once,
/// and every acknowledged id is on the new primary. Then checks that the old primary rejoins.
async fn primary_fault(fault: Fault) {
    let _serial = SERIAL.lock().await;
    let mut g = Group::with_postgres(&THREE);
    g.start_all();
    let s = wait_in_sync(&g, Duration::from_secs(120)).await;
    let old = primary_of(&s).expect("primary");
    let e0 = epoch_of(&s);
    let oi = g.index_of(&old);
    create_table(&g.pg_addr(oi)).await.expect("table");
    // HAProxy-style checks answer for the local server.
    if fault == Fault::PostmasterCrash {
        let ri = (0..3).find(|i| *i != oi).expect("a replica");
        assert_eq!(http_get(&g.members[oi].http(), "/primary").await.0, 200);
        assert_eq!(http_get(&g.members[oi].http(), "/replica").await.0, 503);
        assert_eq!(http_get(&g.members[ri].http(), "/primary").await.0, 503);
        assert_eq!(http_get(&g.members[ri].http(), "/replica").await.0, 200);
    }

    let servers: Vec<String> = (0..3).map(|i| g.pg_addr(i)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let (acks, writer) = spawn_writer(
        servers.clone(),
        stop.clone(),
        1_000_000,
        Duration::from_secs(150),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!acks.all().is_empty(), "writes flow before the fault");

    let fault_at = Instant::now();
    match fault {
        Fault::PostmasterCrash => {
            let pid = g.postmaster_pid(oi).expect("postmaster pid");
            kill_pid(pid, libc::SIGKILL);
        }
        Fault::NodeLoss => {
            g.kill9(oi);
            g.signal_pg(oi, libc::SIGKILL);
        }
        Fault::HungPostgres => g.signal_pg(oi, libc::SIGSTOP),
        Fault::HungWatcher => g.signal_watcher(oi, libc::SIGSTOP),
    }
    let eps = if fault == Fault::NodeLoss {
        g.endpoints_except(&old)
    } else {
        g.endpoints()
    };
    let s2 = wait_until(&eps, Duration::from_secs(60), "a new primary", |s| {
        primary_of(s).is_some_and(|p| p != old)
    })
    .await;
    let new = primary_of(&s2).expect("new primary");
    assert!(epoch_of(&s2) > e0, "epoch grew");
    let ni = g.index_of(&new);
    let new_addr = g.pg_addr(ni);
    let t0 = Instant::now();
    while acks
        .all()
        .iter()
        .filter(|a| a.at > fault_at && a.server == new_addr)
        .count()
        < 20
    {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "writes did not resume on {new}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first = acks
        .all()
        .into_iter()
        .find(|a| a.at > fault_at && a.server == new_addr)
        .expect("first write after the fault");
    eprintln!(
        "{fault:?}: {old} -> {new}, first acknowledged write on the new primary after {} ms",
        (first.at - fault_at).as_millis()
    );
    stop.store(true, Ordering::Relaxed);
    let _ = writer.await;

    // One writer at a time: after the new primary's first ack, nobody else acknowledged.
    let all = acks.all();
    for a in all.iter().filter(|a| a.at >= first.at) {
        assert_eq!(
            a.server, new_addr,
            "write {} acknowledged by {} after the new primary took over",
            a.id, a.server
        );
    }
    // And before it, only the old primary did.
    for a in all.iter().filter(|a| a.at < first.at) {
        assert_eq!(
            a.server,
            g.pg_addr(oi),
            "write {} acknowledged by {} before the failover",
            a.id,
            a.server
        );
    }
    let missing = missing_acks(&acks, &new_addr).await;
    assert!(missing.is_empty(), "acknowledged ids lost: {missing:?}");

    // Heal and check the old primary rejoins as a replica on its own.
    match fault {
        Fault::NodeLoss => g.start(oi),
        Fault::HungPostgres => g.signal_pg(oi, libc::SIGCONT),
        Fault::HungWatcher => g.signal_watcher(oi, libc::SIGCONT),
        Fault::PostmasterCrash => {}
    }
    wait_until(
        &g.endpoints(),
        Duration::from_secs(90),
        "old primary rejoined as replica",
        |s| {
            node_role(s, &old).as_deref() == Some("sync_replica")
                && primary_of(s).as_deref() == Some(new.as_str())
        },
    )
    .await;
    let mut primaries = Vec::new();
    for srv in &servers {
        if is_primary(srv).await == Some(true) {
            primaries.push(srv.clone());
        }
    }
    assert_eq!(
        primaries,
        vec![new_addr.clone()],
        "exactly one writable server"
    );
    // The rejoined old primary catches up with every acknowledged id too (ANY 1 acks may have
    // come from the other replica, so give replay a moment).
    let t1 = Instant::now();
    loop {
        let missing = missing_acks(&acks, &g.pg_addr(oi)).await;
        if missing.is_empty() {
            break;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(20),
            "rejoined replica lacks {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postmaster_crash_fails_over_without_losing_acknowledged_writes() {
    primary_fault(Fault::PostmasterCrash).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_loss_fails_over_without_losing_acknowledged_writes() {
    primary_fault(Fault::NodeLoss).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_postgres_is_fenced_and_fails_over() {
    primary_fault(Fault::HungPostgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_watcher_cannot_keep_a_writable_primary() {
    primary_fault(Fault::HungWatcher).await;
}

/// Acks after `t` on `server`.
fn acks_on_after(acks: &Acks, server: &str, t: Instant) -> usize {
    acks.all()
        .iter()
        .filter(|a| a.at > t && a.server == server)
        .count()
}

async fn wait_acks(
    acks: &Acks,
    server: &str,
    after: Instant,
    n: usize,
    limit: Duration,
    what: &str,
) {
    let t0 = Instant::now();
    while acks_on_after(acks, server, after) < n {
        assert!(
            t0.elapsed() < limit,
            "{what}: fewer than {n} writes acknowledged by {server}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_losses_writes_continue_then_wait_then_resume() {
    let _serial = SERIAL.lock().await;
    let mut g = Group::with_postgres(&THREE);
    g.start_all();
    let s = wait_in_sync(&g, Duration::from_secs(120)).await;
    let p = primary_of(&s).expect("primary");
    let e0 = epoch_of(&s);
    let pi = g.index_of(&p);
    let paddr = g.pg_addr(pi);
    create_table(&paddr).await.expect("table");
    let replicas: Vec<usize> = (0..3).filter(|i| *i != pi).collect();
    let (r1, r2) = (replicas[0], replicas[1]);
    let servers: Vec<String> = (0..3).map(|i| g.pg_addr(i)).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let (acks, writer) = spawn_writer(
        servers.clone(),
        stop.clone(),
        1_000_000,
        Duration::from_secs(170),
    );
    wait_acks(
        &acks,
        &paddr,
        Instant::now() - Duration::from_secs(60),
        10,
        Duration::from_secs(20),
        "before",
    )
    .await;

    // One sync replica's postgres hangs: ANY 1 is still met by the other, writes continue.
    g.signal_pg(r1, libc::SIGSTOP);
    let t1 = Instant::now();
    wait_acks(
        &acks,
        &paddr,
        t1,
        50,
        Duration::from_secs(30),
        "one replica hung",
    )
    .await;

    // Both hang: commits wait (strict synchronous mode); nothing is acknowledged.
    g.signal_pg(r2, libc::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(3)).await; // in-flight commits settle
    let t2 = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        acks.count_after(t2),
        0,
        "a commit was acknowledged with no sync standby"
    );

    // One comes back: writes resume on the same primary; no failover happened.
    g.signal_pg(r1, libc::SIGCONT);
    wait_acks(
        &acks,
        &paddr,
        t2,
        20,
        Duration::from_secs(60),
        "after a replica returned",
    )
    .await;
    g.signal_pg(r2, libc::SIGCONT);
    let s2 = wait_in_sync(&g, Duration::from_secs(60)).await;
    assert_eq!(primary_of(&s2).as_deref(), Some(p.as_str()));
    assert_eq!(epoch_of(&s2), e0);

    // Both replica *nodes* lost: no majority, so the primary fences itself when its lease
    // runs out. When one node returns, the group restarts the last primary in place (it holds
    // every acknowledged commit; no replica can be proven complete) and writes resume.
    g.kill9(r1);
    g.signal_pg(r1, libc::SIGKILL);
    g.kill9(r2);
    g.signal_pg(r2, libc::SIGKILL);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        is_primary(&paddr).await,
        None,
        "the primary without a majority must be fenced"
    );
    let t3 = Instant::now();
    g.start(r1);
    let t0 = Instant::now();
    while acks.count_after(t3) < 20 {
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "writes did not resume after a node returned"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = writer.await;
    let s3 = wait_until(
        &g.endpoints_except(g.members[r2].name()),
        Duration::from_secs(10),
        "status",
        |s| primary_of(s).is_some(),
    )
    .await;
    let now_primary = primary_of(&s3).expect("primary");
    let missing = missing_acks(&acks, &g.pg_addr(g.index_of(&now_primary))).await;
    assert!(missing.is_empty(), "acknowledged ids lost: {missing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_restart_keeps_primary_and_epoch_and_pause_stops_automation() {
    let _serial = SERIAL.lock().await;
    let mut g = Group::with_postgres(&THREE);
    g.start_all();
    let s = wait_in_sync(&g, Duration::from_secs(120)).await;
    let p = primary_of(&s).expect("primary");
    let e0 = epoch_of(&s);
    let pi = g.index_of(&p);
    create_table(&g.pg_addr(pi)).await.expect("table");

    // Stop every watcher and every postgres, then start the watchers again.
    for i in 0..3 {
        g.terminate(i);
    }
    for i in 0..3 {
        g.signal_pg(i, libc::SIGINT); // fast shutdown
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    g.start_all();
    let s2 = wait_in_sync(&g, Duration::from_secs(120)).await;
    assert_eq!(
        primary_of(&s2).as_deref(),
        Some(p.as_str()),
        "same primary after a full restart"
    );
    assert_eq!(epoch_of(&s2), e0, "same epoch after a full restart");
    let stop = Arc::new(AtomicBool::new(false));
    let (acks, writer) = spawn_writer(
        vec![g.pg_addr(pi)],
        stop.clone(),
        50,
        Duration::from_secs(30),
    );
    let _ = writer.await;
    assert_eq!(acks.all().len(), 50, "writes work after the restart");
    drop(stop);

    // Paused: a crashed primary is left alone.
    pgw_cli::set_paused(&g.endpoints(), "global", true, "test")
        .await
        .expect("pause");
    let pid = g.postmaster_pid(pi).expect("pid");
    kill_pid(pid, libc::SIGKILL);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let s3 = wait_until(&g.endpoints(), Duration::from_secs(10), "status", |_| true).await;
    assert_eq!(
        primary_of(&s3).as_deref(),
        Some(p.as_str()),
        "no failover while paused"
    );
    assert_eq!(epoch_of(&s3), e0);
    assert!(s3.clusters[0].paused);

    // Resumed: automation acts on the crash.
    pgw_cli::set_paused(&g.endpoints(), "global", false, "test")
        .await
        .expect("resume");
    let s4 = wait_until(
        &g.endpoints(),
        Duration::from_secs(60),
        "failover after resume",
        |s| primary_of(s).is_some_and(|x| x != p),
    )
    .await;
    assert!(epoch_of(&s4) > e0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_both_ways_and_forced_failover_rules() {
    let _serial = SERIAL.lock().await;
    let mut g = Group::with_postgres(&THREE);
    g.start_all();
    let eps = g.endpoints();
    let s = wait_in_sync(&g, Duration::from_secs(120)).await;
    let a = primary_of(&s).expect("primary");
    let e0 = epoch_of(&s);
    let ai = g.index_of(&a);
    create_table(&g.pg_addr(ai)).await.expect("table");
    let servers: Vec<String> = (0..3).map(|i| g.pg_addr(i)).collect();
    let b = g
        .members
        .iter()
        .map(|m| m.name().to_string())
        .find(|n| *n != a)
        .expect("b");
    let bi = g.index_of(&b);

    let stop = Arc::new(AtomicBool::new(false));
    let (acks, writer) = spawn_writer(
        servers.clone(),
        stop.clone(),
        1_000_000,
        Duration::from_secs(170),
    );
    wait_acks(
        &acks,
        &g.pg_addr(ai),
        Instant::now() - Duration::from_secs(60),
        10,
        Duration::from_secs(20),
        "before",
    )
    .await;

    // A forced failover while the primary is healthy is refused.
    let err = pgw_cli::failover(&eps, "global", &b, false)
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("healthy primary"), "{err}");
    // A switchover to a non-member is refused and changes nothing.
    let err = pgw_cli::switchover(&eps, "global", Some("nobody"))
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("not a server of cluster"), "{err}");

    // Switchover a -> b.
    let t1 = Instant::now();
    let op = pgw_cli::switchover(&eps, "global", Some(&b))
        .await
        .expect("switchover starts");
    let done = pgw_cli::wait_operation(&eps, op, Duration::from_secs(60), true)
        .await
        .expect("finishes");
    assert_eq!(done.state, "succeeded", "{done:?}");
    let s1 = wait_in_sync(&g, Duration::from_secs(60)).await;
    assert_eq!(primary_of(&s1).as_deref(), Some(b.as_str()));
    assert!(epoch_of(&s1) > e0);
    wait_acks(
        &acks,
        &g.pg_addr(bi),
        t1,
        20,
        Duration::from_secs(30),
        "after switchover to b",
    )
    .await;
    eprintln!("switchover {a} -> {b} took {} ms", t1.elapsed().as_millis());

    // And back b -> a.
    let t2 = Instant::now();
    let op = pgw_cli::switchover(&eps, "global", Some(&a))
        .await
        .expect("switchover starts");
    let done = pgw_cli::wait_operation(&eps, op, Duration::from_secs(60), true)
        .await
        .expect("finishes");
    assert_eq!(done.state, "succeeded", "{done:?}");
    let s2 = wait_in_sync(&g, Duration::from_secs(60)).await;
    assert_eq!(primary_of(&s2).as_deref(), Some(a.as_str()));
    wait_acks(
        &acks,
        &g.pg_addr(ai),
        t2,
        20,
        Duration::from_secs(30),
        "after switchover back",
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let _ = writer.await;

    // Zero loss, and one writer at a time: acks are grouped a..., b..., a... with no overlap.
    let all = acks.all();
    let mut runs: Vec<String> = Vec::new();
    for x in &all {
        if runs.last() != Some(&x.server) {
            runs.push(x.server.clone());
        }
    }
    assert_eq!(
        runs,
        vec![g.pg_addr(ai), g.pg_addr(bi), g.pg_addr(ai)],
        "acknowledgements interleaved between servers"
    );
    let missing = missing_acks(&acks, &g.pg_addr(ai)).await;
    assert!(missing.is_empty(), "acknowledged ids lost: {missing:?}");

    // Forced failover rules: automation paused, the primary crashes and one replica hangs, so
    // no replica can be proven to hold every acknowledged commit.
    pgw_cli::set_paused(&eps, "global", true, "test")
        .await
        .expect("pause");
    let ci = (0..3).find(|i| *i != ai && *i != bi).expect("c");
    g.signal_pg(ci, libc::SIGSTOP);
    kill_pid(g.postmaster_pid(ai).expect("pid"), libc::SIGKILL);
    wait_until(
        &eps,
        Duration::from_secs(20),
        "the crash to be reported",
        |s| node_role(s, &a).as_deref() != Some("primary"),
    )
    .await;
    let op = pgw_cli::failover(&eps, "global", &b, false)
        .await
        .expect("starts");
    let done = pgw_cli::wait_operation(&eps, op, Duration::from_secs(60), true)
        .await
        .expect("finishes");
    assert_eq!(done.state, "failed", "{done:?}");
    assert!(done.detail.contains("accept-data-loss"), "{done:?}");
    let sx = wait_until(&eps, Duration::from_secs(10), "status", |_| true).await;
    assert!(
        primary_of(&sx).is_none(),
        "nothing promoted after a refusal"
    );
    // Accepting data loss is the admin role's alone: an operate client is refused by name.
    let e = pgw_cli::client::connect_as(&eps[0], Duration::from_secs(2), &pki().client("operate"))
        .await
        .expect("operate client")
        .failover(pgw_proto::FailoverRequest {
            cluster: "global".into(),
            target: b.clone(),
            accept_data_loss: true,
        })
        .await
        .expect_err("operate may not force");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("needs the `admin` role"), "{e:?}");
    // With explicit acceptance, by an admin (the harness's default credential), it goes ahead.
    let op = pgw_cli::failover(&eps, "global", &b, true)
        .await
        .expect("starts");
    let done = pgw_cli::wait_operation(&eps, op, Duration::from_secs(60), true)
        .await
        .expect("finishes");
    assert_eq!(done.state, "succeeded", "{done:?}");
    let s3 = wait_until(&eps, Duration::from_secs(30), "b primary", |s| {
        primary_of(s).as_deref() == Some(b.as_str())
    })
    .await;
    assert!(s3.clusters[0].paused, "still paused");
    // The history names who asked for it.
    let h = history(&eps[0], "global", 20).await;
    assert!(
        h.iter()
            .any(|e| e.event.contains("forced failover") && e.event.contains("asked by test-admin")),
        "{h:?}"
    );
    g.signal_pg(ci, libc::SIGCONT);
    assert_eq!(is_primary(&g.pg_addr(bi)).await, Some(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn degraded_mode_is_explicit_and_visible() {
    let _serial = SERIAL.lock().await;
    let mut g = Group::with_postgres(&THREE);
    g.allow_degraded(2000);
    g.start_all();
    let eps = g.endpoints();
    let s = wait_in_sync(&g, Duration::from_secs(120)).await;
    let p = primary_of(&s).expect("primary");
    let e0 = epoch_of(&s);
    let pi = g.index_of(&p);
    let paddr = g.pg_addr(pi);
    create_table(&paddr).await.expect("table");
    assert!(!s.clusters[0].degraded);
    let stop = Arc::new(AtomicBool::new(false));
    let (acks, writer) = spawn_writer(
        vec![paddr.clone()],
        stop.clone(),
        1_000_000,
        Duration::from_secs(120),
    );
    wait_acks(
        &acks,
        &paddr,
        Instant::now() - Duration::from_secs(60),
        10,
        Duration::from_secs(20),
        "before",
    )
    .await;

    // Both standbys hang: after the configured delay the primary stops waiting for them.
    for i in (0..3).filter(|i| *i != pi) {
        g.signal_pg(i, libc::SIGSTOP);
    }
    let t1 = Instant::now();
    wait_acks(
        &acks,
        &paddr,
        t1 + Duration::from_secs(1),
        20,
        Duration::from_secs(30),
        "degraded writes",
    )
    .await;
    let sd = wait_until(&eps, Duration::from_secs(20), "degraded shown", |s| {
        s.clusters[0].degraded
    })
    .await;
    assert!(
        sd.clusters[0].sync_standbys.is_empty(),
        "the empty sync set is recorded in Raft"
    );
    assert_eq!(primary_of(&sd).as_deref(), Some(p.as_str()), "no failover");

    // Standbys return: synchronous again, with the full sync set.
    for i in (0..3).filter(|i| *i != pi) {
        g.signal_pg(i, libc::SIGCONT);
    }
    let s2 = wait_in_sync(&g, Duration::from_secs(60)).await;
    let s2 = if s2.clusters[0].degraded {
        wait_until(&eps, Duration::from_secs(20), "not degraded", |s| {
            !s.clusters[0].degraded
        })
        .await
    } else {
        s2
    };
    assert_eq!(s2.clusters[0].sync_standbys.len(), 2);
    assert_eq!(epoch_of(&s2), e0);
    stop.store(true, Ordering::Relaxed);
    let _ = writer.await;
    let missing = missing_acks(&acks, &paddr).await;
    assert!(missing.is_empty(), "acknowledged ids lost: {missing:?}");
}

/// A refused login is not a hang: the primary's server reaches `max_connections` and its
/// watcher's session is terminated, so the watcher must log in again and is refused ("too many
/// clients", SQLSTATE 53300). The primary keeps running and keeps its role and epoch; status
/// says why the watcher cannot see it; once a slot frees, all is as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_refuses_its_watcher_is_not_fenced() {
    let _serial = SERIAL.lock().await;
    let mut g = Group::with_postgres(&THREE);
    g.start_all();
    let eps = g.endpoints();
    let s = wait_in_sync(&g, Duration::from_secs(120)).await;
    let p = primary_of(&s).expect("primary");
    let e0 = epoch_of(&s);
    let pi = g.index_of(&p);
    let pm = g.postmaster_pid(pi).expect("postmaster");
    // Take every connection slot (superuser: the reserved ones too).
    let mut held = Vec::new();
    for _ in 0..100 {
        match try_connect(&g.pg_addr(pi)).await {
            Ok(c) => held.push(c),
            Err(e) => {
                assert!(e.contains("too many clients"), "{e}");
                break;
            }
        }
    }
    assert!(!held.is_empty() && held.len() < 100, "{} held", held.len());
    // End the watcher's own session: it must log in again, and cannot. (It may win the race
    // for the freed slot: then end it again, and take the slot first.)
    let mut s2 = None;
    for _ in 0..20 {
        held[0]
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name = 'pg-watcher'",
                &[],
            )
            .await
            .expect("terminate the watcher's session");
        while let Ok(c) = try_connect(&g.pg_addr(pi)).await {
            held.push(c);
        }
        let refused = |s: &GroupStatus| {
            s.clusters[0]
                .nodes
                .iter()
                .any(|n| n.member == p && n.error.as_deref().is_some_and(|e| e.contains("53300")))
        };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(2) && s2.is_none() {
            if let Ok(st) = pgw_cli::status::gather(&eps, Duration::from_secs(2)).await {
                if refused(&st) {
                    s2 = Some(st);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if s2.is_some() {
            break;
        }
    }
    let s2 = s2.expect("the refusal shown in status");
    // Well past the hang limit (1.5 s) and the lease: nothing moves, nothing is fenced.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let s3 = wait_until(&eps, Duration::from_secs(5), "status", |_| true).await;
    assert_eq!(primary_of(&s3).as_deref(), Some(p.as_str()), "{s3:?}");
    assert_eq!(epoch_of(&s3), e0, "no failover");
    assert_eq!(g.postmaster_pid(pi), Some(pm), "the primary kept running");
    assert!(pgw_server::sidecar::pgctl::pid_alive(pm));
    let table = pgw_cli::status::render_table(&s2);
    assert!(table.contains("refuses the watcher"), "{table}");
    // A slot frees: the watcher is back in, the error clears, the cluster is healthy.
    drop(held);
    let s4 = wait_in_sync(&g, Duration::from_secs(30)).await;
    assert!(s4.clusters[0].nodes.iter().all(|n| n.error.is_none()));
    assert_eq!(epoch_of(&s4), e0);
    let log = g.log_text(pi);
    assert!(log.contains("postgres refuses the watcher"), "{log}");
}

/// The longest time between two consecutive acknowledged writes in `acks` (ms).
fn longest_gap_ms(acks: &Acks) -> u128 {
    longest_gap(acks).map(|(_, ms)| ms).unwrap_or(0)
}

/// The longest gap between two consecutive acknowledged writes: (when it began, ms).
fn longest_gap(acks: &Acks) -> Option<(Instant, u128)> {
    let mut all = acks.all();
    all.sort_by_key(|a| a.at);
    all.windows(2)
        .map(|w| (w[0].at, (w[1].at - w[0].at).as_millis()))
        .max_by_key(|x| x.1)
}

/// A rolling restart of pg-watcher (a package upgrade: SIGTERM, started again a second later)
/// on the primary's member is not a failover, whether that member leads the Raft group or not:
/// the primary stays where it is at the same epoch, writes keep flowing, nothing acknowledged
/// is lost. Prints the longest write gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_the_primarys_watcher_is_not_a_failover() {
    let _serial = SERIAL.lock().await;
    let mut g = Group::with_postgres(&THREE);
    g.start_all();
    let s = wait_in_sync(&g, Duration::from_secs(120)).await;
    // Make the primary's member the Raft leader too (the harder case: the group must elect a
    // new leader, which knows nothing of the last grant, while the primary's watcher is away).
    let leader = s.leader.clone().expect("leader");
    if primary_of(&s).as_deref() != Some(leader.as_str()) {
        pgw_cli::switchover(&g.endpoints(), "global", Some(&leader))
            .await
            .expect("switchover to the leader's room");
        wait_until(&g.endpoints(), Duration::from_secs(60), "switchover", |s| {
            primary_of(s).as_deref() == Some(leader.as_str())
        })
        .await;
    }
    let s = wait_in_sync(&g, Duration::from_secs(60)).await;
    let p = primary_of(&s).expect("primary");
    let e0 = epoch_of(&s);
    let pi = g.index_of(&p);
    let paddr = g.pg_addr(pi);
    let pm = g.postmaster_pid(pi).expect("postmaster");
    create_table(&paddr).await.expect("table");
    let stop = Arc::new(AtomicBool::new(false));
    let (acks, writer) = spawn_writer_paced(
        vec![paddr.clone()],
        stop.clone(),
        1,
        200_000,
        Duration::from_secs(120),
        Duration::from_millis(2),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    for round in 0..3 {
        let st = wait_in_sync(&g, Duration::from_secs(30)).await;
        let led = st.leader.as_deref() == Some(p.as_str());
        let before = acks.all().len();
        g.terminate(pi);
        // Down for 0.3 s, like `systemctl restart`: back inside the fence point (800 ms after
        // the last renewal with the metro profile; 2 s with wide-area).
        tokio::time::sleep(Duration::from_millis(300)).await;
        g.start(pi);
        // Back: reporting again, still primary at the same epoch.
        let st = wait_in_sync(&g, Duration::from_secs(30)).await;
        assert_eq!(primary_of(&st).as_deref(), Some(p.as_str()), "{st:?}");
        assert_eq!(epoch_of(&st), e0, "round {round}: no failover");
        // Past the lease, in case a late decision were pending.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let st = wait_in_sync(&g, Duration::from_secs(30)).await;
        assert_eq!(
            epoch_of(&st),
            e0,
            "round {round}: no failover after the lease"
        );
        assert_eq!(g.postmaster_pid(pi), Some(pm), "postgres was not restarted");
        assert!(acks.all().len() > before + 100, "writes flowed");
        eprintln!("watcher restart {round} (leader: {led}): primary {p} kept epoch {e0}");
    }
    stop.store(true, Ordering::Relaxed);
    let _ = writer.await;
    let missing = missing_acks(&acks, &paddr).await;
    assert!(missing.is_empty(), "acknowledged ids lost: {missing:?}");
    // Each restarted watcher kept its predecessor's fencing deadline (lease.pgw).
    let log = g.log_text(pi);
    let kept: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("a previous run renewed the primary lease"))
        .collect();
    assert_eq!(kept.len(), 3, "{log}");
    for l in kept {
        eprintln!("{}", l.rsplit("INFO").next().unwrap_or(l).trim());
    }
    let h = history(&g.endpoints()[0], "global", 64).await;
    eprintln!(
        "watcher restarts: {} writes, longest write gap {} ms, {} history records",
        acks.all().len(),
        longest_gap_ms(&acks),
        h.len()
    );
}

/// Runs `pgwctl` as an operator with the `operate` role; (success, stdout + stderr).
async fn pgwctl(g: &Group, args: &[&str]) -> (bool, String) {
    let mut cmd = tokio::process::Command::new(PGWCTL);
    cmd.args(pki().pgwctl_args("operate"))
        .arg("--endpoints")
        .arg(g.endpoints().join(","))
        .args(args);
    let out = tokio::time::timeout(Duration::from_secs(200), cmd.output())
        .await
        .expect("pgwctl finished")
        .expect("pgwctl ran");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `pgwctl restart` as documented: a replica restarts in place and rejoins; the primary is
/// refused without a choice, restarts in place keeping its role and epoch (writes pause, none
/// is lost), or switches over first. Prints the write gap of the in-place restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_postgres_restarts_of_a_replica_and_of_the_primary() {
    let _serial = SERIAL.lock().await;
    let mut g = Group::with_postgres(&THREE);
    g.start_all();
    let s = wait_in_sync(&g, Duration::from_secs(120)).await;
    let p = primary_of(&s).expect("primary");
    let e0 = epoch_of(&s);
    let pi = g.index_of(&p);
    let paddr = g.pg_addr(pi);
    create_table(&paddr).await.expect("table");
    let stop = Arc::new(AtomicBool::new(false));
    let (acks, writer) = spawn_writer_paced(
        vec![paddr.clone()],
        stop.clone(),
        1,
        200_000,
        Duration::from_secs(150),
        Duration::from_millis(2),
    );

    // A replica.
    let ri = (0..3).find(|i| *i != pi).expect("a replica");
    let r = g.members[ri].name().to_string();
    let rpm = g.postmaster_pid(ri).expect("replica postmaster");
    let (ok, out) = pgwctl(&g, &["restart", &r]).await;
    assert!(ok && out.contains("succeeded"), "{out}");
    assert_ne!(g.postmaster_pid(ri), Some(rpm), "the replica was restarted");
    let s1 = wait_in_sync(&g, Duration::from_secs(30)).await;
    assert_eq!((primary_of(&s1), epoch_of(&s1)), (Some(p.clone()), e0));

    // The primary: a choice is required.
    let (ok, out) = pgwctl(&g, &["restart", &p]).await;
    assert!(
        !ok && out.contains("--in-place") && out.contains("--switchover"),
        "{out}"
    );

    // In place: same primary, same epoch, a new postmaster, writes resume.
    let pm = g.postmaster_pid(pi).expect("postmaster");
    let before = acks.all().len();
    let t0 = Instant::now();
    let (ok, out) = pgwctl(&g, &["restart", &p, "--in-place"]).await;
    assert!(ok && out.contains("restarted in place"), "{out}");
    let took = t0.elapsed();
    assert_ne!(g.postmaster_pid(pi), Some(pm), "the primary was restarted");
    let s2 = wait_in_sync(&g, Duration::from_secs(30)).await;
    assert_eq!(primary_of(&s2).as_deref(), Some(p.as_str()));
    assert_eq!(epoch_of(&s2), e0, "an in-place restart is no failover");
    let t1 = Instant::now();
    while acks.all().len() < before + 200 {
        assert!(
            t1.elapsed() < Duration::from_secs(30),
            "writes did not resume"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s3 = wait_in_sync(&g, Duration::from_secs(30)).await;
    assert_eq!(epoch_of(&s3), e0, "nor a failover after it");
    stop.store(true, Ordering::Relaxed);
    let _ = writer.await;
    let missing = missing_acks(&acks, &paddr).await;
    assert!(missing.is_empty(), "acknowledged ids lost: {missing:?}");
    let gap = longest_gap(&acks).expect("writes");
    eprintln!(
        "in-place restart of the primary: pgwctl took {} ms; longest write gap {} ms, starting {} ms after the restart was asked",
        took.as_millis(),
        gap.1,
        gap.0.saturating_duration_since(t0).as_millis()
    );
    for e in acks.errors().iter().filter(|e| e.at >= t0).take(5) {
        eprintln!(
            "  write error at +{} ms: {}",
            (e.at - t0).as_millis(),
            e.message
        );
    }

    // With a switchover first: the primary moves, then the old one restarts as a replica.
    let (ok, out) = pgwctl(&g, &["restart", &p, "--switchover"]).await;
    assert!(ok && out.contains("restarted and streaming"), "{out}");
    let s4 = wait_in_sync(&g, Duration::from_secs(30)).await;
    assert!(primary_of(&s4).is_some_and(|x| x != p), "{s4:?}");
    let h = history(&g.endpoints()[0], "global", 64).await;
    assert!(
        h.iter()
            .any(|e| e.event.contains("restart") && e.event.contains("asked by test-operate")),
        "{h:?}"
    );
}

async fn show(addr: &str, setting: &str) -> String {
    let c = try_connect(addr).await.expect("client");
    c.query_one(&format!("SHOW {setting}"), &[])
        .await
        .expect("SHOW")
        .get::<_, String>(0)
}

/// `pgwctl reload` as documented: every member re-reads its file; changed [postgres] settings
/// reach every server without a restart, those postgres takes only at a restart are named; a
/// file that changes anything else (or an owned setting) is refused, naming the field, and
/// changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgwctl_reload_applies_postgres_settings_everywhere_and_refuses_the_rest() {
    let _serial = SERIAL.lock().await;
    let mut g = Group::with_postgres(&THREE);
    g.start_all();
    let s = wait_in_sync(&g, Duration::from_secs(120)).await;
    let e0 = epoch_of(&s);
    let write = |g: &Group, i: usize, cfg: &pgw_core::Config| {
        std::fs::write(&g.members[i].cfg_path, cfg.to_toml().expect("toml")).expect("write");
    };
    for i in 0..3 {
        let mut c = g.members[i].cfg.clone();
        if let Some(p) = c.postgres.first_mut() {
            p.settings.push("work_mem = '7MB'".into());
            p.settings.push("max_locks_per_transaction = 80".into());
        }
        write(&g, i, &c);
    }
    let (ok, out) = pgwctl(&g, &["reload"]).await;
    assert!(ok, "{out}");
    for i in 0..3 {
        let name = g.members[i].name().to_string();
        assert!(
            out.contains(&format!("{name}: reloaded (postgres settings changed)")),
            "{out}"
        );
        assert!(
            out.contains("max_locks_per_transaction (pgwctl restart "),
            "{out}"
        );
        assert_eq!(show(&g.pg_addr(i), "work_mem").await, "7MB");
    }
    eprintln!("{out}");

    // Anything else changed in a file: refused by that member, naming the field; nothing of
    // that file applied.
    let mut c = g.members[1].cfg.clone();
    c.raft.heartbeat_ms += 50;
    if let Some(p) = c.postgres.first_mut() {
        p.settings.push("work_mem = '9MB'".into());
    }
    write(&g, 1, &c);
    let (ok, out) = pgwctl(&g, &["reload"]).await;
    assert!(!ok && out.contains("raft.heartbeat_ms"), "{out}");
    assert_eq!(show(&g.pg_addr(1), "work_mem").await, "7MB");
    // An owned setting: refused, naming the line.
    let mut c = g.members[1].cfg.clone();
    if let Some(p) = c.postgres.first_mut() {
        p.settings.push("synchronous_commit = local".into());
    }
    write(&g, 1, &c);
    let (ok, out) = pgwctl(&g, &["reload"]).await;
    assert!(!ok && out.contains("postgres.settings["), "{out}");
    assert_eq!(show(&g.pg_addr(1), "synchronous_commit").await, "on");
    let s2 = wait_in_sync(&g, Duration::from_secs(30)).await;
    assert_eq!(epoch_of(&s2), e0, "a reload moves nothing");
}
