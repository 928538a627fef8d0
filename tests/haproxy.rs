//! Debian's real HAProxy in front of a group of real PostgreSQL servers, configured with the
//! shipped `deploy/haproxy/haproxy.cfg` (only addresses and ports substituted): the HTTP checks
//! steer writes to the primary and reads to replicas, and writes through HAProxy resume after
//! the primary's postmaster is killed, with no acknowledged write lost. Needs `haproxy` and the
//! PostgreSQL 15 server binaries (`.ci/run` installs them).

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use pgw_cli::writer::*;
use pgw_core::Role;

const THREE: [Role; 3] = [Role::Data, Role::Data, Role::Data];

/// The shipped config (read from `deploy/`) with the example's addresses replaced by the
/// group's.
fn render(g: &Group, write: &str, read: &str) -> String {
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/haproxy/haproxy.cfg"
    ))
    .expect("deploy/haproxy/haproxy.cfg");
    let servers: Vec<pgw_cli::haproxy::Server> = (0..g.members.len())
        .map(|i| pgw_cli::haproxy::Server {
            postgres: g.pg_addr(i),
            http: g.members[i].http(),
        })
        .collect();
    pgw_cli::haproxy::render(&shipped, write, read, &servers).expect("render the shipped config")
}

struct Haproxy(Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_sends_writes_to_the_primary_through_a_failover() {
    assert!(
        Command::new("haproxy").arg("-v").output().is_ok(),
        "haproxy is not installed (apt-get install haproxy; .ci/deps does it)"
    );
    let mut g = Group::with_postgres(&THREE);
    g.start_all();
    let s = wait_in_sync(&g, Duration::from_secs(120)).await;
    let old = primary_of(&s).expect("primary");
    let oi = g.index_of(&old);
    // The group's active room is the room of the first cluster's primary (rooms default to
    // member names).
    assert_eq!(s.active_cluster.as_deref(), Some("global"));
    assert_eq!(s.active_room.as_deref(), Some(old.as_str()));

    // The Patroni-style checks HAProxy relies on.
    for i in 0..3 {
        let http = g.members[i].http();
        let code = |p: &'static str| {
            let http = http.clone();
            async move { http_get(&http, p).await.0 }
        };
        assert_eq!(code("/read-only").await, 200, "{}", g.members[i].name());
        if i == oi {
            assert_eq!(code("/read-write").await, 200);
            assert_eq!(code("/replica").await, 503);
            assert_eq!(code("/sync").await, 503);
        } else {
            assert_eq!(code("/read-write").await, 503);
            assert_eq!(
                code("/sync").await,
                200,
                "both replicas are in the sync set"
            );
            assert_eq!(code("/async").await, 503);
            let (c, body) = http_get(&http, "/replica?lag=lots").await;
            assert_eq!(c, 400, "{body}");
            assert!(body.contains("query parameter `lag`"), "{body}");
            // The lag is known once a report's reply carried the primary's position.
            let t0 = Instant::now();
            while http_get(&http, "/replica?lag=16MB").await.0 != 200 {
                assert!(t0.elapsed() < Duration::from_secs(10), "lag never known");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let write = format!("127.0.0.1:{}", free_port());
    let read = format!("127.0.0.1:{}", free_port());
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(&cfg, render(&g, &write, &read)).expect("write haproxy.cfg");
    let check = Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(&cfg)
        .output()
        .expect("haproxy -c");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let log = std::fs::File::create(dir.path().join("haproxy.log")).expect("log");
    let _haproxy = Haproxy(
        Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn haproxy"),
    );
    let t0 = Instant::now();
    while is_primary(&write).await != Some(true) || is_primary(&read).await != Some(false) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "haproxy never routed writes to the primary and reads to a replica"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    create_table(&write)
        .await
        .expect("create table through haproxy");
    let stop = Arc::new(AtomicBool::new(false));
    let (acks, writer) = spawn_writer(
        vec![write.clone()],
        stop.clone(),
        1_000_000,
        Duration::from_secs(90),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!acks.all().is_empty(), "writes flow through haproxy");
    let old_backend = g.pg_addr(oi);
    assert!(acks.all().iter().all(|a| a.backend == old_backend));

    let fault_at = Instant::now();
    let s2 = crash_primary(&g, oi, &old).await;
    // Backends of a SIGKILLed postmaster live on for moments: a commit already waiting for its
    // synchronous standby may still be acknowledged (and is kept: see `missing` below). What
    // must never happen is an acknowledgement by the old primary of a write sent once the group
    // had named another primary.
    let named = Instant::now();
    let new = primary_of(&s2).expect("new primary");
    assert_eq!(
        s2.active_room.as_deref(),
        Some(new.as_str()),
        "the active room moved"
    );
    let table = pgw_cli::status::render_table(&s2);
    assert!(table.contains(&format!("active room: {new}")), "{table}");
    let new_backend = g.pg_addr(g.index_of(&new));
    let t1 = Instant::now();
    while !acks
        .all()
        .iter()
        .any(|a| a.at > fault_at && a.backend == new_backend)
    {
        assert!(
            t1.elapsed() < Duration::from_secs(30),
            "writes through haproxy never resumed on {new}: {:?}",
            acks.errors().last()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resumed = acks
        .all()
        .iter()
        .find(|a| a.at > fault_at && a.backend == new_backend)
        .map(|a| a.at.duration_since(fault_at))
        .unwrap_or_default();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let _ = writer.await;

    // No write sent through haproxy after the new primary was named was acknowledged by the
    // old primary, and every acknowledged write is on the new one.
    assert!(
        acks.all()
            .iter()
            .filter(|a| a.sent > named)
            .all(|a| a.backend == new_backend),
        "a write sent after the group named {new} was acknowledged by the old primary"
    );
    let missing = missing_acks(&acks, &new_backend).await;
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
    // Reads now reach the remaining replica.
    let t2 = Instant::now();
    while is_primary(&read).await != Some(false) {
        assert!(
            t2.elapsed() < Duration::from_secs(20),
            "no replica behind the read port"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "haproxy: {} writes acknowledged, first write after the crash {} ms after it, {} errors seen",
        acks.all().len(),
        resumed.as_millis(),
        acks.errors().len()
    );
}
