//! The README's first command, as an operator runs it: `pgwctl demo up` (two PostgreSQL
//! clusters, "global" and "recovery", on three rooms), writes through the demo's HAProxy,
//! `pgwctl demo failover`, writes through HAProxy reaching the new primary, `pgwctl demo
//! failover --cluster recovery` moving nothing in global, the README's FAQ commands run on the
//! demo, `pgwctl demo down` stopping everything it started. Needs PostgreSQL 15, pgpool-II and
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

/// Runs `pgwctl demo down` when the test ends, passed or not: a failed assertion must not
/// leave the demo's watchers, servers and pgpools running on the machine.
struct DownOnDrop(String);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Keep every log of the failed run (watchers, servers, pgpools, haproxy).
            let keep = std::env::temp_dir().join("pgw-failed").join("demo");
            keep_logs_under(std::path::Path::new(&self.0), &keep);
            eprintln!("demo logs kept in {}", keep.display());
        }
        let _ = pgwctl(&["demo", "down", "--dir", &self.0]);
    }
}

/// Copies every `*.log` file under `dir` into `keep`, named by its path.
fn keep_logs_under(dir: &std::path::Path, keep: &std::path::Path) {
    let _ = std::fs::create_dir_all(keep);
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|x| x == "log") {
                let name = p
                    .strip_prefix(dir)
                    .map(|r| r.display().to_string().replace('/', "_"))
                    .unwrap_or_default();
                let _ = std::fs::copy(&p, keep.join(name));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_up_failover_down_with_haproxy() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("demo");
    let d = dir.display().to_string();
    let _down = DownOnDrop(d.clone());
    let (ok, out) = pgwctl(&["demo", "up", "--dir", &d]);
    assert!(ok, "demo up:\n{out}");
    assert!(out.contains("haproxy, writes"), "{out}");
    let demo: DemoFile =
        serde_json::from_str(&std::fs::read_to_string(dir.join("demo.json")).expect("demo.json"))
            .expect("demo.json parses");
    let h = demo.haproxy.clone().expect("demo.json names haproxy");
    for c in ["global", "recovery"] {
        assert_eq!(
            demo.postgres.iter().filter(|p| p.cluster == c).count(),
            3,
            "{c}: postgres[] in demo.json"
        );
        assert_eq!(
            demo.pgpool.iter().filter(|p| p.cluster == c).count(),
            3,
            "{c}: pgpool[] in demo.json"
        );
    }

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

    // A fault in the recovery cluster moves nothing in global.
    let (ok, out) = pgwctl(&[
        "demo",
        "failover",
        "--dir",
        &d,
        "--cluster",
        "recovery",
        "--fault",
        "crash",
    ]);
    assert!(ok, "demo failover --cluster recovery:\n{out}");
    assert!(out.contains(", lost: 0"), "{out}");
    assert!(out.contains("other clusters' primaries unchanged"), "{out}");

    // The README's FAQ commands, on the demo, as an operator types them.
    let tls = demo.tls.clone().expect("demo credentials");
    let base = [
        "--endpoints",
        demo.endpoints.as_str(),
        "--ca",
        tls.ca.as_str(),
        "--cert",
        tls.admin.cert.as_str(),
        "--key",
        tls.admin.key.as_str(),
    ];
    let run = |extra: &[&str]| {
        let mut args: Vec<&str> = base.to_vec();
        args.extend_from_slice(extra);
        let (ok, out) = pgwctl(&args);
        assert!(ok, "pgwctl {}:\n{out}", extra.join(" "));
        out
    };
    let out = run(&["status"]);
    for w in ["global", "recovery", "active room"] {
        assert!(out.contains(w), "status names {w}:\n{out}");
    }
    let out = run(&["switchover", "--room", "room-b", "--all"]);
    assert!(
        out.contains("room_move") && out.contains("succeeded"),
        "{out}"
    );
    let out = run(&["status", "--format", "json"]);
    let st: serde_json::Value = serde_json::from_str(&out).expect("status json");
    assert_eq!(st["active_room"], "room-b", "{out}");
    let out = run(&["switchover", "--room", "room-a", "--all"]);
    assert!(out.contains("succeeded"), "{out}");
    let out = run(&["history", "recovery", "--limit", "100"]);
    assert!(out.contains("room move"), "{out}");
    // The pgpools follow the last switchover within seconds: doctor is clean once they have.
    let t3 = Instant::now();
    let out = loop {
        let mut args: Vec<&str> = base.to_vec();
        args.push("doctor");
        let (ok, out) = pgwctl(&args);
        if ok {
            break out;
        }
        assert!(
            t3.elapsed() < Duration::from_secs(30),
            "pgwctl doctor found problems:\n{out}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        out.contains("cluster recovery"),
        "doctor covers both clusters:\n{out}"
    );

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
