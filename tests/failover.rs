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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postmaster_crash_fails_over_without_losing_acknowledged_writes() {
    let mut g = Group::with_postgres(&THREE);
    g.start_all();
    let s = wait_healthy(&g, Duration::from_secs(120)).await;
    let old = primary_of(&s).expect("primary");
    let e0 = epoch_of(&s);
    let oi = pg_index(&g, &old);
    create_table(&g.pg_addr(oi)).await;

    let servers: Vec<String> = (0..3).map(|i| g.pg_addr(i)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let (acks, writer) = spawn_writer(servers.clone(), stop.clone(), 1_000_000, Duration::from_secs(120));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!acks.all().is_empty(), "writes flow before the fault");

    let pid = g.postmaster_pid(oi).expect("postmaster pid");
    let fault = Instant::now();
    kill_pid(pid, libc::SIGKILL);

    let s2 = wait_until(&g.endpoints(), Duration::from_secs(60), "a new primary", |s| {
        primary_of(s).is_some_and(|p| p != old)
    })
    .await;
    let new = primary_of(&s2).expect("new primary");
    assert!(epoch_of(&s2) > e0, "epoch grew");
    let ni = pg_index(&g, &new);
    // Writes resume on the new primary.
    let t0 = Instant::now();
    while acks.all().iter().filter(|a| a.at > fault && a.server == g.pg_addr(ni)).count() < 20 {
        assert!(t0.elapsed() < Duration::from_secs(60), "writes did not resume on {new}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first = acks
        .all()
        .into_iter()
        .find(|a| a.at > fault && a.server == g.pg_addr(ni))
        .expect("first write after the fault");
    eprintln!("postmaster crash: first acknowledged write on {new} after {} ms", (first.at - fault).as_millis());
    stop.store(true, Ordering::Relaxed);
    let _ = writer.await;

    // Nothing acknowledged anywhere but the new primary after the fault.
    for a in acks.all().iter().filter(|a| a.at > first.at) {
        assert_eq!(a.server, g.pg_addr(ni), "write {} acknowledged by a second server", a.id);
    }
    let missing = missing_acks(&acks, &g.pg_addr(ni)).await;
    assert!(missing.is_empty(), "acknowledged ids lost: {missing:?}");

    // The old primary comes back as a replica of the new one, automatically.
    wait_until(&g.endpoints(), Duration::from_secs(90), "old primary rejoined as replica", |s| {
        node_role(s, &old).as_deref() == Some("sync_replica")
    })
    .await;
    let mut primaries = 0;
    for srv in &servers {
        if is_primary(srv).await == Some(true) {
            primaries += 1;
        }
    }
    assert_eq!(primaries, 1, "exactly one writable server");
}
