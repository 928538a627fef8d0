//! Failover benchmark against real PostgreSQL servers managed by real watchers on loopback.
//!
//! `cargo bench --bench failover -- [--runs N] [--fault crash|node-loss|room-cut|leader-and-primary]
//! [--profile metro|wide-area]`
//!
//! `crash`, `node-loss` and `leader-and-primary` run on loopback; `room-cut` runs on the
//! network test bed of `tests/netbed` (each room a network namespace; the primary's room is cut
//! off from everyone with nftables, then healed). Needs root for `room-cut`.
//! `leader-and-primary`: the primary is first switched over to the Raft leader's member (the
//! case where losing the primary's node would also cost an election), then that node is lost
//! like in `node-loss`; the table says in how many runs the member still led at the fault
//! (leadership placement moves it away once the switchover settled).
//! `--profile` picks the timing profile of every member (default here: metro; the config's
//! default is wide-area).
//!
//! For each fault kind, N runs on one three-room cluster (postgres + pgpool + watcher per room):
//! a writer goes straight to the servers and one through each room's pgpool, the fault hits the
//! primary, and we measure the time from the fault to the first write acknowledged by the new
//! primary through a surviving room's pgpool, the acknowledged writes missing from it afterwards, the
//! writes acknowledged by the old primary after the new one took over (split-brain windows),
//! and epoch changes beyond the two a failover needs (spurious decisions). The room is healed
//! and the cluster is back to full health before the next run. Prints a table, then one JSON
//! object as the last line. Not a pass/fail test.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/netbed/mod.rs"]
mod netbed;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use pgw_cli::status::GroupStatus;
use pgw_cli::writer::*;
use pgw_core::Role;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Crash,
    NodeLoss,
    RoomCut,
    LeaderAndPrimary,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Crash => "crash",
            Fault::NodeLoss => "node-loss",
            Fault::RoomCut => "room-cut",
            Fault::LeaderAndPrimary => "leader-and-primary",
        }
    }
}

/// Applies the timing profile chosen with `--profile` to a member's config.
fn set_profile(c: &mut pgw_core::Config, p: pgw_core::config::TimingProfile) {
    c.timing = p;
    c.raft = pgw_core::config::RaftConfig::for_profile(p);
    c.failover = pgw_core::config::FailoverConfig::for_profile(p);
}

fn profile() -> pgw_core::config::TimingProfile {
    let a: Vec<String> = std::env::args().collect();
    match a
        .iter()
        .position(|x| x == "--profile")
        .and_then(|i| a.get(i + 1))
        .map(String::as_str)
    {
        None | Some("metro") => pgw_core::config::TimingProfile::Metro,
        Some("wide-area") => pgw_core::config::TimingProfile::WideArea,
        Some(other) => panic!("unknown --profile `{other}`: metro or wide-area"),
    }
}

fn args() -> (usize, Vec<Fault>) {
    let a: Vec<String> = std::env::args().collect();
    let get = |n: &str| {
        a.iter()
            .position(|x| x == n)
            .and_then(|i| a.get(i + 1))
            .cloned()
    };
    let runs = get("--runs")
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("--runs takes a number, got `{v}`"))
        })
        .unwrap_or(10);
    let faults = match get("--fault").as_deref() {
        None => vec![
            Fault::Crash,
            Fault::NodeLoss,
            Fault::RoomCut,
            Fault::LeaderAndPrimary,
        ],
        Some("crash") => vec![Fault::Crash],
        Some("node-loss") => vec![Fault::NodeLoss],
        Some("room-cut") => vec![Fault::RoomCut],
        Some("leader-and-primary") => vec![Fault::LeaderAndPrimary],
        Some(other) => {
            panic!("unknown --fault `{other}`; this version measures: crash, node-loss, room-cut, leader-and-primary")
        }
    };
    (runs, faults)
}

async fn healthy(g: &Group) -> GroupStatus {
    wait_until(
        &g.endpoints(),
        Duration::from_secs(120),
        "healthy cluster",
        |s| {
            let Some(c) = s.clusters.first() else {
                return false;
            };
            let Some(p) = &c.primary else { return false };
            c.nodes
                .iter()
                .any(|n| &n.member == p && n.role == "primary")
                && c.nodes.iter().filter(|n| n.role == "sync_replica").count() == 2
                && c.pgpool.len() == 3
                && c.pgpool
                    .iter()
                    .all(|pp| pp.agrees && pp.primary.as_ref() == Some(p))
        },
    )
    .await
}

/// After the first healthy status: bootstrap detaches the servers still being cloned from every
/// pgpool and attaches them again, and pgpool's main process sleeps a second after each such
/// event (restarting its PCP process), so its queue takes several seconds to drain. The runs
/// measure failovers of a running group, not of one still settling from its bootstrap.
const WARM_UP: Duration = Duration::from_secs(12);

#[derive(Default)]
struct Stats {
    rto_ms: Vec<f64>,
    lost: usize,
    split_brain: usize,
    spurious: u64,
    /// Per surviving room's pgpool: promotion committed -> first write through it on the new primary.
    after_commit_ms: Vec<f64>,
    /// Per pgpool: fault -> first error seen by the session that was open at the fault.
    session_error_ms: Vec<f64>,
    /// `leader-and-primary`: runs in which the lost member still led the group at the fault.
    led_at_fault: usize,
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    s[((s.len() as f64 - 1.0) * p).round() as usize]
}

/// Wall-clock ms at which `member` was last made primary (after log index `after`).
async fn promoted_at_ms(g: &Group, member: &str, after: u64) -> Option<u64> {
    for ep in g.endpoints() {
        let Ok(mut c) = pgw_cli::status::connect(&ep, Duration::from_secs(1)).await else {
            continue;
        };
        let Ok(h) = c
            .history(pgw_proto::HistoryRequest {
                cluster: String::new(),
                limit: 50,
            })
            .await
        else {
            continue;
        };
        return h
            .into_inner()
            .entries
            .iter()
            .filter(|e| {
                e.log_index > after && e.event.starts_with(&format!("primary := {member} "))
            })
            .map(|e| e.at_ms)
            .next_back();
    }
    None
}

/// The primary's room cut off from every other host (its clients too) on the network test bed;
/// healed after the surviving rooms write again, and back to full health before the next run.
fn run_room_cut(runs: usize) -> Stats {
    use netbed::checker::Checker;
    let p = profile();
    let bed = netbed::Bed::start_with(netbed::Layout::ThreeRooms, |c| set_profile(c, p));
    bed.run(|| async {
        let mut st = Stats::default();
        bed.wait_healthy(Duration::from_secs(180)).await;
        tokio::time::sleep(WARM_UP).await;
        for run in 0..runs {
            let chk = Checker::start(&bed).await;
            let s = bed.wait_healthy(Duration::from_secs(180)).await;
            let old = primary_of(&s).expect("primary");
            let oi = bed.index_of(&old);
            let old_addr = bed.hosts[oi].pg_addr();
            tokio::time::sleep(Duration::from_secs(3)).await;
            let since = pgw_cli::writer::wall_ms();
            let t0 = Instant::now();
            bed.cut_off(oi, false);
            let others: Vec<String> = bed
                .data_members()
                .into_iter()
                .filter(|i| *i != oi)
                .map(|i| bed.name(i).to_string())
                .collect();
            let first = chk
                .wait_write_via(&others, Some(&old_addr), t0, Duration::from_secs(60))
                .await;
            let rto = (first.at - t0).as_secs_f64() * 1000.0;
            tokio::time::sleep(Duration::from_secs(2)).await;
            // Promotion committed -> first write through each surviving room's pgpool.
            let committed = netbed::checker::history(&bed)
                .await
                .iter()
                .filter(|e| {
                    e.at_ms >= since
                        && e.event
                            .starts_with(&format!("primary := {} ", bed.member_at(&first.backend).unwrap_or_default()))
                })
                .map(|e| e.at_ms)
                .next_back();
            if let Some(c) = committed {
                for room in &others {
                    if let Some(a) =
                        chk.first_via_pgpool(std::slice::from_ref(room), &first.backend, t0)
                    {
                        st.after_commit_ms.push(a.wall_ms as f64 - c as f64);
                    }
                }
            }
            bed.heal();
            let r = chk.finish(&bed).await;
            // A failover takes two decisions (release, promote); more means a spurious one.
            let spurious = (r.epoch_moves_since(since) as u64).saturating_sub(2);
            eprintln!(
                "room-cut run {:>2}: {old} -> {}: first write through a surviving pgpool after {rto:.0} ms, lost {}, split-brain windows {}",
                run + 1,
                r.final_primary,
                r.lost.len(),
                r.split_brain_windows
            );
            st.rto_ms.push(rto);
            st.lost += r.lost.len();
            st.split_brain += r.split_brain_windows;
            st.spurious += spurious;
        }
        st
    })
}

async fn run_fault(fault: Fault, runs: usize) -> Stats {
    if fault == Fault::RoomCut {
        return tokio::task::block_in_place(|| run_room_cut(runs));
    }
    let mut g = Group::with_pgpool(&[Role::Data, Role::Data, Role::Data]);
    let p = profile();
    for m in g.members.iter_mut() {
        set_profile(&mut m.cfg, p);
    }
    g.start_all();
    let s = healthy(&g).await;
    tokio::time::sleep(WARM_UP).await;
    let p = primary_of(&s).expect("primary");
    create_table(&g.pg_addr(g.index_of(&p)))
        .await
        .expect("table");
    let mut st = Stats::default();
    for run in 0..runs {
        let mut s = healthy(&g).await;
        if fault == Fault::LeaderAndPrimary {
            s = primary_to_leader(&g, s).await;
        }
        let old = primary_of(&s).expect("primary");
        let e0 = epoch_of(&s);
        let idx0 = s
            .members
            .iter()
            .filter_map(|m| m.last_applied)
            .max()
            .unwrap_or(0);
        let oi = g.index_of(&old);
        let old_addr = g.pg_addr(oi);
        let first_id = next_id(&old_addr).await;
        let stop = Arc::new(AtomicBool::new(false));
        // One writer straight to the servers, one through each room's pgpool.
        let mut writers = Vec::new();
        let direct: Vec<String> = (0..3).map(|i| g.pg_addr(i)).collect();
        writers.push((
            String::new(),
            spawn_writer_from(
                direct,
                stop.clone(),
                first_id,
                1_000_000,
                Duration::from_secs(120),
            ),
        ));
        for i in 0..3 {
            let pool = g.pgpool_addr(i);
            let w = spawn_writer_from(
                vec![pool.clone()],
                stop.clone(),
                first_id + (i as i64 + 1) * 1_000_000,
                1_000_000,
                Duration::from_secs(120),
            );
            writers.push((g.members[i].name().to_string(), w));
        }
        // Writes flow, and pgpool is past the second its main process sleeps after each
        // failover or failback (the previous run's re-attaches): a fault right after one waits
        // for it (see the README's breakdown).
        tokio::time::sleep(Duration::from_millis(3000)).await;
        let t0 = Instant::now();
        match fault {
            Fault::Crash => {
                if let Some(pid) = g.postmaster_pid(oi) {
                    // SAFETY: kill(2) has no memory-safety preconditions.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
            Fault::NodeLoss | Fault::LeaderAndPrimary => {
                if fault == Fault::LeaderAndPrimary {
                    let now = pgw_cli::status::gather(&g.endpoints(), Duration::from_millis(500))
                        .await
                        .ok();
                    if now.and_then(|s| s.leader).as_deref() == Some(old.as_str()) {
                        st.led_at_fault += 1;
                    }
                }
                // The whole node: watcher, postgres and the room's pgpool.
                g.kill9(oi);
                g.signal_pg(oi, libc::SIGKILL);
                if let Some(pid) = g.pgpool_pid(oi) {
                    // SAFETY: as above.
                    unsafe {
                        libc::kill(-pid, libc::SIGKILL);
                    }
                }
            }
            Fault::RoomCut => unreachable!("room-cut runs on the network bed (run_room_cut)"),
        }
        let surviving: Vec<&(String, (Acks, tokio::task::JoinHandle<()>))> = writers
            .iter()
            .filter(|(room, _)| !room.is_empty() && *room != old)
            .collect();
        // RTO: the first write acknowledged by another server through a surviving room's pgpool.
        let first = loop {
            let hit = surviving
                .iter()
                .filter_map(|(_, (a, _))| {
                    a.all()
                        .into_iter()
                        .find(|x| x.at > t0 && x.backend != old_addr)
                })
                .min_by_key(|x| x.at);
            if let Some(a) = hit {
                break a;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "run {run}: writes through the surviving pgpools did not resume"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let rto = (first.at - t0).as_secs_f64() * 1000.0;
        let new_addr = first.backend.clone();
        // Let every surviving pgpool's writer get through too (bounded).
        let tw = Instant::now();
        while tw.elapsed() < Duration::from_secs(20)
            && !surviving
                .iter()
                .all(|(_, (a, _))| a.all().iter().any(|x| x.at > t0 && x.backend == new_addr))
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::Relaxed);
        let new_name = (0..3)
            .find(|i| g.pg_addr(*i) == new_addr)
            .map(|i| g.members[i].name().to_string())
            .unwrap_or_default();
        let committed = promoted_at_ms(&g, &new_name, idx0).await;
        let mut lost = 0;
        let mut split = 0;
        for (room, (acks, h)) in writers {
            let _ = h.await;
            lost += missing_acks(&acks, &new_addr).await.len();
            let all = acks.all();
            if let Some(fa) = all.iter().find(|x| x.at > t0 && x.backend == new_addr) {
                split += all
                    .iter()
                    .filter(|x| x.at >= fa.at && x.backend != new_addr)
                    .count();
                if !room.is_empty() && room != old {
                    if let Some(c) = committed {
                        let ms = fa.wall_ms as f64 - c as f64;
                        st.after_commit_ms.push(ms);
                        eprintln!("  {room}'s pgpool: first write on {new_addr} {ms:.0} ms after the promotion was committed");
                    }
                }
            }
            if !room.is_empty() && room != old {
                if let Some(e) = acks.errors().iter().find(|e| e.at > t0) {
                    st.session_error_ms.push((e.at - t0).as_secs_f64() * 1000.0);
                }
            }
        }
        if matches!(fault, Fault::NodeLoss | Fault::LeaderAndPrimary) {
            g.start(oi);
        }
        let s2 = healthy(&g).await;
        // A failover takes exactly two decisions (release, promote); more means a spurious one.
        let spurious = epoch_of(&s2).saturating_sub(e0).saturating_sub(2);
        eprintln!(
            "{} run {:>2}: {old} -> {new_name}: first write through a surviving pgpool after {rto:.0} ms, lost {lost}, split-brain acks {split}",
            fault.name(),
            run + 1,
        );
        st.rto_ms.push(rto);
        st.lost += lost;
        st.split_brain += usize::from(split > 0);
        st.spurious += spurious;
    }
    st
}

/// Switches the primary over to the Raft leader's member (unless it is there already), waits
/// until healthy, then gives leadership placement the time it takes to move the leader away
/// (up to 10 s). Returns the status just before the fault.
async fn primary_to_leader(g: &Group, s: GroupStatus) -> GroupStatus {
    let leader = s.leader.clone().expect("a leader");
    if primary_of(&s).as_deref() != Some(leader.as_str()) {
        let op = pgw_cli::switchover(&g.endpoints(), "global", Some(&leader))
            .await
            .expect("switchover to the leader's member");
        let done = pgw_cli::wait_operation(&g.endpoints(), op, Duration::from_secs(60), true)
            .await
            .expect("operation");
        assert_eq!(done.state, "succeeded", "{done:?}");
    }
    let mut s = healthy(g).await;
    let t0 = Instant::now();
    while s.leader == primary_of(&s) && t0.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        s = healthy(g).await;
    }
    eprintln!(
        "leader-and-primary: primary {} was put on the leader's member; leader {} {} ms later",
        primary_of(&s).unwrap_or_default(),
        s.leader.clone().unwrap_or_default(),
        t0.elapsed().as_millis()
    );
    s
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let (runs, faults) = args();
    let mut results = BTreeMap::new();
    for f in faults {
        results.insert(f.name(), run_fault(f, runs).await);
    }
    println!();
    println!("pg-watcher failover (3 rooms, {} timing profile; crash, node-loss and leader-and-primary on loopback, room-cut on network namespaces): fault -> first write on the new primary through a surviving room's pgpool", profile().as_str());
    println!(
        "{:<10} {:>5} {:>9} {:>9} {:>9} {:>9} {:>6} {:>12} {:>9}",
        "fault", "runs", "min ms", "p50 ms", "p95 ms", "max ms", "lost", "split-brain", "spurious"
    );
    let mut json = serde_json::Map::new();
    for (name, st) in &results {
        let min = st.rto_ms.iter().copied().fold(f64::INFINITY, f64::min);
        let max = st.rto_ms.iter().copied().fold(0.0, f64::max);
        println!(
            "{:<10} {:>5} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>6} {:>12} {:>9}",
            name,
            st.rto_ms.len(),
            min,
            pct(&st.rto_ms, 0.5),
            pct(&st.rto_ms, 0.95),
            max,
            st.lost,
            st.split_brain,
            st.spurious
        );
        json.insert(
            name.to_string(),
            serde_json::json!({
                "runs": st.rto_ms.len(),
                "rto_ms": {"min": min, "p50": pct(&st.rto_ms, 0.5), "p95": pct(&st.rto_ms, 0.95), "max": max},
                "lost_writes": st.lost,
                "split_brain_windows": st.split_brain,
                "spurious_failovers": st.spurious,
                "profile": profile().as_str(),
                "led_at_fault": st.led_at_fault,
            }),
        );
    }
    if let Some(st) = results.get("leader-and-primary") {
        println!(
            "leader-and-primary: the lost member still led the group at the fault in {} of {} runs",
            st.led_at_fault,
            st.rto_ms.len()
        );
    }
    println!();
    println!("pgpool repointing: promotion committed -> first write through each surviving room's pgpool; fault -> first error in a session open at the fault");
    println!(
        "{:<10} {:>8} {:>16} {:>16} {:>8} {:>16}",
        "fault", "samples", "commit->pgpool p50", "p95", "samples", "session error p50"
    );
    for (name, st) in &results {
        println!(
            "{:<10} {:>8} {:>16.0} {:>16.0} {:>8} {:>16.0}",
            name,
            st.after_commit_ms.len(),
            pct(&st.after_commit_ms, 0.5),
            pct(&st.after_commit_ms, 0.95),
            st.session_error_ms.len(),
            pct(&st.session_error_ms, 0.5)
        );
        if let Some(serde_json::Value::Object(o)) = json.get_mut(*name) {
            o.insert(
                "pgpool_after_commit_ms".into(),
                serde_json::json!({"samples": st.after_commit_ms.len(), "p50": pct(&st.after_commit_ms, 0.5), "p95": pct(&st.after_commit_ms, 0.95)}),
            );
            o.insert(
                "session_error_ms".into(),
                serde_json::json!({"samples": st.session_error_ms.len(), "p50": pct(&st.session_error_ms, 0.5)}),
            );
        }
    }
    println!("{}", serde_json::Value::Object(json));
}
