//! Raft figures on loopback, with real daemons: commit latency of one decision, time from
//! `kill -9` of the leader to a new leader committing, RSS and idle CPU of one daemon.
//!
//! `cargo bench --bench raft -- [--runs N] [--decisions N] [--idle-secs N]`
//! Prints a table, then one JSON object as the last line. Not a pass/fail test.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use pgw_cli::set_paused;
use pgw_core::Role;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} takes a number, got `{v}`"))
        })
        .unwrap_or(default)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn proc_stat(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit(')').next()?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((utime + stime, rss_kb))
}

async fn commit_until_ok(eps: &[String], paused: bool, limit: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if set_paused(eps, "global", paused, "bench").await.is_ok() {
            return Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runs = arg("--runs", 20) as usize;
    let decisions = arg("--decisions", 500) as usize;
    let idle_secs = arg("--idle-secs", 10);

    let mut g = Group::new(&[Role::Data, Role::Data, Role::Data]);
    g.start_all();
    let eps = g.endpoints();
    let s = wait_leader(&eps, None, Duration::from_secs(30)).await;
    let leader = s.leader.clone().expect("leader");
    let leader_ep = g.members[g.index_of(&leader)].grpc();

    // 1. Commit latency, measured by the client against the leader (one gRPC round trip plus
    //    replication to a majority, fsync on each, and apply).
    commit_until_ok(
        std::slice::from_ref(&leader_ep),
        true,
        Duration::from_secs(10),
    )
    .await;
    let mut lat = Vec::with_capacity(decisions);
    for i in 0..decisions {
        let t0 = Instant::now();
        set_paused(
            std::slice::from_ref(&leader_ep),
            "global",
            i % 2 == 0,
            "bench",
        )
        .await
        .expect("decision commits");
        lat.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    // The same over one long-lived (mutual TLS) connection: the commit without the handshake.
    let mut c = pgw_cli::status::connect(&leader_ep, Duration::from_secs(2))
        .await
        .expect("connect to the leader");
    let mut lat_conn = Vec::with_capacity(decisions);
    for i in 0..decisions {
        let t0 = Instant::now();
        c.set_paused(pgw_proto::SetPausedRequest {
            cluster: "global".into(),
            paused: i % 2 == 1,
            reason: "bench".into(),
        })
        .await
        .expect("decision commits");
        lat_conn.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    lat_conn.sort_by(|a, b| a.total_cmp(b));

    // 2. Idle RSS and CPU of one follower.
    let follower = g
        .members
        .iter()
        .find(|m| m.name() != leader)
        .expect("follower");
    let fpid = follower.child.as_ref().map(|c| c.id()).expect("pid");
    let ticks = 100.0; // USER_HZ on Linux
    let (c0, _) = proc_stat(fpid).expect("proc stat");
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let (c1, rss_kb) = proc_stat(fpid).expect("proc stat");
    let idle_cpu_pct = (c1 - c0) as f64 / ticks / idle_secs as f64 * 100.0;
    let lpid = g.members[g.index_of(&leader)]
        .child
        .as_ref()
        .map(|c| c.id())
        .expect("pid");
    let (_, leader_rss_kb) = proc_stat(lpid).expect("proc stat");

    // 3. kill -9 the leader: time until a new leader has committed a decision.
    let mut fo = Vec::with_capacity(runs);
    for run in 0..runs {
        let s = wait_leader(&eps, None, Duration::from_secs(30)).await;
        let old = s.leader.clone().expect("leader");
        let oi = g.index_of(&old);
        let others = g.endpoints_except(&old);
        let t0 = Instant::now();
        g.kill9(oi);
        let took = commit_until_ok(&others, run % 2 == 0, Duration::from_secs(30))
            .await
            .map(|_| t0.elapsed())
            .expect("new leader commits within 30 s");
        fo.push(took.as_secs_f64() * 1000.0);
        g.start(oi);
        wait_until(&eps, Duration::from_secs(30), "member rejoined", |s| {
            let la = s
                .members
                .iter()
                .find(|m| Some(&m.name) == s.leader.as_ref())
                .and_then(|m| m.last_applied);
            s.members
                .iter()
                .all(|m| m.last_applied.is_some() && m.last_applied == la)
        })
        .await;
        eprintln!(
            "run {:>2}: killed {old}, new leader committed after {:.0} ms",
            run + 1,
            fo[run]
        );
    }
    fo.sort_by(|a, b| a.total_cmp(b));

    println!();
    println!("pg-watcher Raft figures (3 members on loopback, default timings)");
    println!("{:<44} {:>10}", "figure", "value");
    println!(
        "{:<44} {:>10.2}",
        "commit latency p50, new connection (ms)",
        pct(&lat, 0.5)
    );
    println!(
        "{:<44} {:>10.2}",
        "commit latency p50, one connection (ms)",
        pct(&lat_conn, 0.5)
    );
    println!(
        "{:<44} {:>10.2}",
        "commit latency p99, one connection (ms)",
        pct(&lat_conn, 0.99)
    );
    println!(
        "{:<44} {:>10.2}",
        "commit latency p99, new connection (ms)",
        pct(&lat, 0.99)
    );
    println!(
        "{:<44} {:>10.0}",
        "kill -9 leader -> new leader commits min (ms)",
        fo.first().copied().unwrap_or(f64::NAN)
    );
    println!(
        "{:<44} {:>10.0}",
        "kill -9 leader -> new leader commits median (ms)",
        pct(&fo, 0.5)
    );
    println!(
        "{:<44} {:>10.0}",
        "kill -9 leader -> new leader commits max (ms)",
        fo.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "{:<44} {:>10.1}",
        "follower RSS (MiB)",
        rss_kb as f64 / 1024.0
    );
    println!(
        "{:<44} {:>10.1}",
        "leader RSS (MiB)",
        leader_rss_kb as f64 / 1024.0
    );
    println!(
        "{:<44} {:>10.2}",
        "follower idle CPU (% of one core)", idle_cpu_pct
    );
    let json = serde_json::json!({
        "commit_latency_ms": {"n": lat.len(), "p50": pct(&lat, 0.5), "p99": pct(&lat, 0.99)},
        "commit_latency_one_connection_ms": {"n": lat_conn.len(), "p50": pct(&lat_conn, 0.5), "p99": pct(&lat_conn, 0.99)},
        "leader_kill9_to_commit_ms": {
            "runs": fo.len(),
            "min": fo.first(),
            "median": pct(&fo, 0.5),
            "max": fo.last(),
        },
        "rss_mib": {"follower": rss_kb as f64 / 1024.0, "leader": leader_rss_kb as f64 / 1024.0},
        "idle_cpu_percent": idle_cpu_pct,
    });
    println!("{json}");
}
