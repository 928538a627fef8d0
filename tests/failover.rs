//! Automatic failover against real PostgreSQL 15 servers managed by real watchers.
//! Needs the PostgreSQL 15 server binaries (`.ci/run` installs them).

mod common;
mod pgwriter;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use pgw_cli::status::GroupStatus;
use pgw_core::Role;
use pgwriter::*;

const THREE: [Role; 3] = [Role::Data, Role::Data, Role::Data];

fn primary_of(s: &GroupStatus) -> Option<String> {
    s.clusters.first().and_then(|c| c.primary.clone())
}

fn epoch_of(s: &GroupStatus) -> u64 {
    s.clusters.first().map(|c| c.epoch).unwrap_or(0)
}

fn node_role(s: &GroupStatus, member: &str) -> Option<String> {
    s.clusters
        .first()?
        .nodes
        .iter()
        .find(|n| n.member == member)
        .map(|n| n.role.clone())
}

/// Waits until there is a primary and every other data member is a sync replica.
async fn wait_healthy(g: &Group, limit: Duration) -> GroupStatus {
    let names: Vec<String> = g
        .members
        .iter()
        .filter(|m| m.cfg.me().is_some_and(|x| x.role == Role::Data))
        .map(|m| m.name().to_string())
        .collect();
    wait_until(&g.endpoints(), limit, "a primary and all replicas in sync", |s| {
        let Some(p) = primary_of(s) else { return false };
        node_role(s, &p).as_deref() == Some("primary")
            && names
                .iter()
                .filter(|n| **n != p)
                .all(|n| node_role(s, n).as_deref() == Some("sync_replica"))
    })
    .await
}

fn pg_index(g: &Group, name: &str) -> usize {
    g.index_of(name)
}

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
    let mut g = Group::with_postgres(&THREE);
    g.start_all();
    let s = wait_healthy(&g, Duration::from_secs(120)).await;
    let old = primary_of(&s).expect("primary");
    let e0 = epoch_of(&s);
    let oi = g.index_of(&old);
    create_table(&g.pg_addr(oi)).await;

    let servers: Vec<String> = (0..3).map(|i| g.pg_addr(i)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let (acks, writer) = spawn_writer(servers.clone(), stop.clone(), 1_000_000, Duration::from_secs(150));
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
    while acks.all().iter().filter(|a| a.at > fault_at && a.server == new_addr).count() < 20 {
        assert!(t0.elapsed() < Duration::from_secs(60), "writes did not resume on {new}");
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
        assert_eq!(a.server, new_addr, "write {} acknowledged by {} after the new primary took over", a.id, a.server);
    }
    // And before it, only the old primary did.
    for a in all.iter().filter(|a| a.at < first.at) {
        assert_eq!(a.server, g.pg_addr(oi), "write {} acknowledged by {} before the failover", a.id, a.server);
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
    wait_until(&g.endpoints(), Duration::from_secs(90), "old primary rejoined as replica", |s| {
        node_role(s, &old).as_deref() == Some("sync_replica") && primary_of(s).as_deref() == Some(new.as_str())
    })
    .await;
    let mut primaries = Vec::new();
    for srv in &servers {
        if is_primary(srv).await == Some(true) {
            primaries.push(srv.clone());
        }
    }
    assert_eq!(primaries, vec![new_addr.clone()], "exactly one writable server");
    // The rejoined old primary catches up with every acknowledged id too (ANY 1 acks may have
    // come from the other replica, so give replay a moment).
    let t1 = Instant::now();
    loop {
        let missing = missing_acks(&acks, &g.pg_addr(oi)).await;
        if missing.is_empty() {
            break;
        }
        assert!(t1.elapsed() < Duration::from_secs(20), "rejoined replica lacks {missing:?}");
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
