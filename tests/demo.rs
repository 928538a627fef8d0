//! The README's first command, as an operator runs it: `pgwctl demo up`, writes through the
//! demo's HAProxy, `pgwctl demo failover`, writes through HAProxy reaching the new primary,
//! `pgwctl demo down` stopping everything it started. Needs PostgreSQL 15, pgpool-II and
//! haproxy (`.ci/deps` installs them).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::PGWCTL;
use pgw_cli::demo::DemoFile;
use pgw_cli::writer::is_primary;

fn pgwctl(args: &[&str]) -> (bool, String) {
    let out = Command::new(PGWCTL)
        .args(args)
        .output()
        .expect("pgwctl ran");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Which server a session through `addr` reached (host:port as the server sees itself).
async fn server_behind(addr: &str) -> Option<String> {
    let c = pgw_cli::writer::connect(addr).await?;
    let row = c
        .query_one(
            "SELECT host(inet_server_addr()) || ':' || inet_server_port()",
            &[],
        )
        .await
        .ok()?;
    row.try_get(0).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_up_failover_down_with_haproxy() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("demo");
    let d = dir.display().to_string();
    let (ok, out) = pgwctl(&["demo", "up", "--dir", &d]);
    assert!(ok, "demo up:\n{out}");
    assert!(out.contains("haproxy, writes"), "{out}");
    let demo: DemoFile =
        serde_json::from_str(&std::fs::read_to_string(dir.join("demo.json")).expect("demo.json"))
            .expect("demo.json parses");
    let h = demo.haproxy.clone().expect("demo.json names haproxy");

    let t0 = Instant::now();
    while is_primary(&h.write).await != Some(true) || is_primary(&h.read).await != Some(false) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "haproxy never routed by role"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before = server_behind(&h.write)
        .await
        .expect("a server behind haproxy");

    let (ok, out) = pgwctl(&["demo", "failover", "--dir", &d]);
    assert!(ok, "demo failover:\n{out}");
    assert!(out.contains(", lost: 0"), "{out}");
    let t1 = Instant::now();
    loop {
        if let Some(now) = server_behind(&h.write).await {
            if now != before && is_primary(&h.write).await == Some(true) {
                break;
            }
        }
        assert!(
            t1.elapsed() < Duration::from_secs(20),
            "haproxy's write port never reached the new primary"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let (ok, out) = pgwctl(&["demo", "down", "--dir", &d]);
    assert!(ok, "demo down:\n{out}");
    assert!(out.contains("haproxy"), "{out}");
    let t2 = Instant::now();
    while demo.members.iter().any(|m| alive(m.pid)) || alive(h.pid) {
        assert!(
            t2.elapsed() < Duration::from_secs(20),
            "demo down left processes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
