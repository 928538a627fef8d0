//! Recovery after losing the majority: `pg-watcher --force-new-group` on a surviving member,
//! on real watchers and real PostgreSQL 15 servers with a writer going; the lost members are
//! refused when they come back as they were and rejoin through `pgwctl member add` and
//! `--join`. Also the two-room layout without an arbiter (seed 000's active-standby).

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use pgw_cli::status::GroupStatus;
use pgw_cli::writer::*;
use pgw_core::{Config, Role};

/// `pg-watcher --config FILE --force-new-group EXTRA...` as an operator runs it.
fn force(g: &Group, i: usize, extra: &[&str]) -> (i32, String) {
    let out = Command::new(WATCHER)
        .arg("--config")
        .arg(&g.members[i].cfg_path)
        .arg("--force-new-group")
        .args(extra)
        .output()
        .expect("run pg-watcher --force-new-group");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("pg-watcher --force-new-group {}: {text}", extra.join(" "));
    (out.status.code().unwrap_or(-1), text)
}

/// Member `i` starts again with `--join` (its file rewritten: node id `id`).
fn rejoin(g: &mut Group, i: usize, id: u64, join: &[String]) {
    let name = g.members[i].name().to_string();
    for m in g.members[i].cfg.members.iter_mut() {
        if m.name == name {
            m.id = id;
        }
    }
    let m = &mut g.members[i];
    std::fs::write(&m.cfg_path, m.cfg.to_toml().expect("toml")).expect("write config");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&m.log)
        .expect("log");
    let child: Child = Command::new(WATCHER)
        .arg("--config")
        .arg(&m.cfg_path)
        .arg("--join")
        .arg(join.join(","))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup"))
        .stderr(log)
        .spawn()
        .expect("spawn pg-watcher --join");
    m.child = Some(child);
}

fn add_args(cfg: &Config, id: u64) -> Vec<String> {
    let mut m = cfg.me().expect("me").clone();
    m.id = id;
    let mut a: Vec<String> = vec!["member".into(), "add".into(), m.name.clone()];
    a.extend(member_args(&m));
    a
}

/// The writer every scenario runs: ids from 1, through whichever of `servers` takes them.
fn writer_on(servers: Vec<String>, stop: &Arc<AtomicBool>) -> (Acks, tokio::task::JoinHandle<()>) {
    spawn_writer_paced(
        servers,
        stop.clone(),
        1,
        200_000,
        Duration::from_secs(300),
        Duration::from_millis(5),
    )
}

/// Waits (at most 30 s) for 20 writes acknowledged after `since`; `what` names the failure.
async fn writes_resume(acks: &Acks, since: Instant, what: &str) {
    let t0 = Instant::now();
    while acks.count_after(since) < 20 {
        assert!(t0.elapsed() < Duration::from_secs(30), "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn voters(s: &GroupStatus) -> Vec<String> {
    let mut v: Vec<String> = s
        .members
        .iter()
        .filter(|m| m.standing == "voter")
        .map(|m| m.name.clone())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_of_three_lost_forced_recovery_on_the_survivor_then_the_lost_rejoin() {
    // Every room runs its pgpool-II: the survivor's must be repointed too.
    let mut g = Group::with_pgpool(&[Role::Data, Role::Data, Role::Data]);
    g.start_all();
    let s = wait_in_sync(&g, Duration::from_secs(120)).await;
    let primary = primary_of(&s).expect("primary");
    let e0 = epoch_of(&s);
    let pi = g.index_of(&primary);
    // The survivor is a replica: the primary is among the lost.
    let si = (0..3).find(|i| *i != pi).expect("a replica");
    let li = (0..3)
        .find(|i| *i != pi && *i != si)
        .expect("the other replica");
    let survivor = g.members[si].name().to_string();
    create_table(&g.pg_addr(pi)).await.expect("table");
    let servers: Vec<String> = (0..3).map(|i| g.pg_addr(i)).collect();
    let stop_writer = Arc::new(AtomicBool::new(false));
    let (acks, writer) = writer_on(servers, &stop_writer);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!acks.all().is_empty(), "writes flow before the loss");

    // Two rooms are lost at once: watcher and postgres.
    for i in [pi, li] {
        g.kill9(i);
        g.signal_pg(i, libc::SIGKILL);
    }
    // The survivor alone decides nothing (it has no majority).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let eps_s = vec![g.members[si].grpc()];
    let s = pgw_cli::status::gather(&eps_s, Duration::from_secs(2))
        .await
        .expect("status of the survivor");
    assert_eq!(epoch_of(&s), e0, "no decision without a majority");

    // Refusals change nothing: the member still runs...
    let (code, text) = force(&g, si, &["--i-know-the-others-are-down"]);
    assert_ne!(code, 0);
    assert!(
        text.contains("stop this member's pg-watcher first"),
        "{text}"
    );
    g.kill9(si);
    // ...a survivor name the group does not know...
    let (code, text) = force(&g, si, &["--survivors", &format!("{survivor},zz")]);
    assert_ne!(code, 0);
    assert!(text.contains("no member `zz`"), "{text}");
    // ...a lost member that answers is not lost.
    let lost_grpc = g.members[li].grpc();
    let answering = std::net::TcpListener::bind(&lost_grpc).expect("bind the lost member's port");
    let (code, text) = force(&g, si, &[]);
    assert_ne!(code, 0);
    assert!(
        text.contains("answered") && text.contains("not lost"),
        "{text}"
    );
    drop(answering);
    let data = g.members[si].cfg.data_dir.clone();
    assert!(
        !data.join("forced.pgw").exists() && !data.join("roster.pgw").exists(),
        "nothing stored when refused"
    );

    // The one command: it waits out the lease (the others stay silent), then forces.
    let (code, text) = force(&g, si, &[]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("forced generation 1"), "{text}");
    assert!(
        text.contains(&format!("the primary {primary} was lost")),
        "{text}"
    );
    let recovered = Instant::now();
    g.start(si);
    let s = wait_until(
        &eps_s,
        Duration::from_secs(60),
        "the survivor is the primary of generation 1",
        |s| {
            primary_of(s).as_deref() == Some(survivor.as_str())
                && node_role(s, &survivor).as_deref() == Some("primary")
        },
    )
    .await;
    assert!(epoch_of(&s) > e0);
    assert_eq!(s.generation, 1);
    assert_eq!(voters(&s), vec![survivor.clone()]);
    writes_resume(&acks, recovered, "writes resume on the survivor").await;
    // The survivor's room pgpool (its backend list unchanged: the lost stay, detached) sends
    // writes to the new primary.
    let pool = g.pgpool_addr(si);
    let t0 = Instant::now();
    loop {
        let id = next_id(&g.pg_addr(si)).await + 1_000_000;
        let ok = match connect(&pool).await {
            Some(c) => c
                .execute("INSERT INTO acked (id) VALUES ($1)", &[&id])
                .await
                .is_ok(),
            None => false,
        };
        if ok && ids_on(&g.pg_addr(si)).await.contains(&id) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "writes through {survivor}'s pgpool never reached the new primary"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let h = history(&eps_s[0], "global", 50).await;
    let events: Vec<&str> = h.iter().map(|e| e.event.as_str()).collect();
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("group forced to generation 1 by")),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| e.contains("forced recovery")
            && e.contains("data loss accepted")
            && e.contains("are lost")),
        "the promotion names the WAL position kept: {events:?}"
    );

    // A lost member that comes back as it was is refused by generation, records it, and
    // never serves as primary meanwhile.
    g.start(li);
    let li_data = g.members[li].cfg.data_dir.clone();
    let t0 = Instant::now();
    while !li_data.join("superseded.pgw").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the returning member learns it was superseded"
        );
        assert_ne!(
            is_primary(&g.pg_addr(li)).await,
            Some(true),
            "a superseded member's postgres never runs as primary"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    g.kill9(li);
    let log = g.log_text(li);
    assert!(log.contains("generation 1"), "{log}");
    // Started again unchanged, it stops at once, naming the generation.
    g.start(li);
    let code = g.members[li]
        .child
        .as_mut()
        .map(|c| wait_exit(c, Duration::from_secs(20)));
    g.members[li].child = None;
    assert_eq!(code, Some(Some(1)), "a superseded member does not start");
    assert!(g.log_text(li).contains("recovered without it"));

    // Back through `member add` under new ids, then --join: they rejoin as replicas (the old
    // primary's postgres rewound or rebuilt) and vote again.
    for (i, id) in [(li, 12u64), (pi, 11u64)] {
        let args = add_args(&g.members[i].cfg, id);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, text) = pgwctl_admin(&eps_s, &argv);
        assert_eq!(code, 0, "{text}");
        rejoin(&mut g, i, id, &eps_s);
    }
    let all = g.endpoints();
    let s = wait_until(
        &all,
        Duration::from_secs(150),
        "the lost members vote again and replicate",
        |s| {
            voters(s).len() == 3
                && [pi, li]
                    .iter()
                    .all(|i| node_role(s, g.members[*i].name()).as_deref() == Some("sync_replica"))
        },
    )
    .await;
    assert_eq!(primary_of(&s).as_deref(), Some(survivor.as_str()));
    stop_writer.store(true, Ordering::Relaxed);
    let _ = writer.await;
    // Everything acknowledged since the recovery is on the primary (before it, the lost
    // primary's last commits may be gone: that is what forcing accepts).
    let on = ids_on(&g.pg_addr(si)).await;
    let lost: Vec<i64> = acks
        .all()
        .iter()
        .filter(|a| a.sent > recovered && !on.contains(&a.id))
        .map(|a| a.id)
        .collect();
    assert!(
        lost.is_empty(),
        "acknowledged after the recovery, lost: {lost:?}"
    );
    eprintln!(
        "recovery: {} writes acknowledged since the forced recovery, none lost; both lost members rejoined",
        acks.count_after(recovered)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rooms_without_an_arbiter_lose_the_standby_then_the_primary_room() {
    let mut g = Group::with_postgres(&[Role::Data, Role::Data]);
    // The operator allowed degraded mode: the primary stops waiting for a lost standby.
    g.allow_degraded(1000);
    g.start_all();
    let s = wait_in_sync(&g, Duration::from_secs(120)).await;
    assert!(s.automatic_failover_off.is_some(), "status says so plainly");
    let (_, text) = pgwctl_admin(&g.endpoints(), &["status"]);
    assert!(text.contains("AUTOMATIC FAILOVER OFF"), "{text}");
    let primary = primary_of(&s).expect("primary");
    let pi = g.index_of(&primary);
    let ri = 1 - pi;
    let standby = g.members[ri].name().to_string();
    create_table(&g.pg_addr(pi)).await.expect("table");
    let servers: Vec<String> = (0..2).map(|i| g.pg_addr(i)).collect();
    let stop_writer = Arc::new(AtomicBool::new(false));
    let (acks, writer) = writer_on(servers, &stop_writer);

    // 1. The standby room is lost: writes go on (degraded), also well past the lease.
    let fault = Instant::now();
    g.kill9(ri);
    g.signal_pg(ri, libc::SIGKILL);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let late = Instant::now();
    writes_resume(&acks, late, "writes stopped after losing the standby room").await;
    eprintln!(
        "two rooms: {} writes acknowledged with the standby room lost",
        acks.count_after(fault)
    );
    assert_eq!(is_primary(&g.pg_addr(pi)).await, Some(true));

    // It comes back and is synchronous again.
    g.start(ri);
    let s = wait_in_sync(&g, Duration::from_secs(120)).await;
    assert_eq!(primary_of(&s).as_deref(), Some(primary.as_str()));
    let e0 = epoch_of(&s);

    // 2. The primary room is lost: nothing happens on its own...
    g.kill9(pi);
    g.signal_pg(pi, libc::SIGKILL);
    let eps_s = vec![g.members[ri].grpc()];
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = pgw_cli::status::gather(&eps_s, Duration::from_secs(2))
        .await
        .expect("status of the standby room");
    assert_eq!(epoch_of(&s), e0, "no automatic failover with two voters");
    // ...and silence proves nothing in this layout: the operator must say the room is down.
    g.kill9(ri);
    let (code, text) = force(&g, ri, &[]);
    assert_ne!(code, 0);
    assert!(text.contains("--i-know-the-others-are-down"), "{text}");
    // The one command, on the standby room.
    let (code, text) = force(&g, ri, &["--i-know-the-others-are-down"]);
    assert_eq!(code, 0, "{text}");
    let recovered = Instant::now();
    g.start(ri);
    wait_until(
        &eps_s,
        Duration::from_secs(60),
        "the standby room's server is primary",
        |s| {
            primary_of(s).as_deref() == Some(standby.as_str())
                && node_role(s, &standby).as_deref() == Some("primary")
        },
    )
    .await;
    writes_resume(&acks, recovered, "writes resume in the standby room").await;
    stop_writer.store(true, Ordering::Relaxed);
    let _ = writer.await;
    // The standby was synchronous when the primary room was lost: nothing acknowledged is lost.
    let lost = missing_acks(&acks, &g.pg_addr(ri)).await;
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    eprintln!(
        "two rooms: {} writes acknowledged, none lost, after the primary room was lost and recovered by one command",
        acks.all().len()
    );
}

/// Seed 003's "3+2+1": the main room (MAZ) holds three votes (its data member and two
/// arbiters), the standby room (SAZ) two (its data member and an arbiter) and a cold spare
/// that receives the log without voting. Names, rooms and the spare are set on every config.
fn three_two_one() -> Group {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let roles = [
        Role::Data,
        Role::Data,
        Role::Arbiter,
        Role::Arbiter,
        Role::Arbiter,
        Role::Arbiter,
    ];
    let names = ["room-a", "room-b", "maz-1", "maz-2", "saz-1", "saz-spare"];
    let rooms = ["maz", "saz", "maz", "maz", "saz", "saz"];
    let mut cfgs = pg_configs(dir.path(), "pgtest", &roles);
    let mut list = cfgs[0].members.clone();
    for (i, m) in list.iter_mut().enumerate() {
        m.name = names[i].into();
        m.room = Some(rooms[i].into());
        m.spare = names[i] == "saz-spare";
    }
    for (i, c) in cfgs.iter_mut().enumerate() {
        c.members = list.clone();
        c.member = names[i].into();
        c.data_dir = dir.path().join(names[i]).join("data");
        c.tls = pki().tls(names[i]);
        for cl in c.clusters.iter_mut() {
            cl.bootstrap_primary = Some("room-a".into());
        }
    }
    Group::from_configs(dir, cfgs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_two_one_loses_the_main_room_and_the_cold_spare_restores_a_majority() {
    let mut g = three_two_one();
    g.start_all();
    let s = wait_in_sync(&g, Duration::from_secs(120)).await;
    assert_eq!(primary_of(&s).as_deref(), Some("room-a"));
    // The spare receives the log but does not vote.
    let s = wait_until(
        &g.endpoints(),
        Duration::from_secs(60),
        "five voters and a non-voting spare",
        |s| {
            voters(s).len() == 5
                && s.members
                    .iter()
                    .any(|m| m.name == "saz-spare" && m.standing == "non_voter")
        },
    )
    .await;
    assert!(s.automatic_failover_off.is_none());
    create_table(&g.pg_addr(0)).await.expect("table");
    let servers: Vec<String> = (0..2).map(|i| g.pg_addr(i)).collect();
    let stop_writer = Arc::new(AtomicBool::new(false));
    let (acks, writer) = writer_on(servers, &stop_writer);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!acks.all().is_empty(), "writes flow");

    // The main room is lost: three of five votes.
    for i in [0, 2, 3] {
        g.kill9(i);
    }
    g.signal_pg(0, libc::SIGKILL);
    let saz: Vec<usize> = vec![1, 4, 5];
    let saz_eps: Vec<String> = saz.iter().map(|i| g.members[*i].grpc()).collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = pgw_cli::status::gather(&saz_eps, Duration::from_secs(2))
        .await
        .expect("status of the standby room");
    assert_eq!(
        primary_of(&s).as_deref(),
        Some("room-a"),
        "two of five votes decide nothing"
    );

    // The runbook: stop the standby room's watchers, force on one of them naming the spare
    // among the survivors (it votes from now on), start it, start the others with --join.
    for i in &saz {
        g.kill9(*i);
    }
    let (code, text) = force(&g, 1, &["--survivors", "room-b,saz-1,saz-spare"]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("--join"),
        "the next steps name --join: {text}"
    );
    let recovered = Instant::now();
    g.start(1);
    let b_ep = vec![g.members[1].grpc()];
    rejoin(&mut g, 4, 5, &b_ep);
    rejoin(&mut g, 5, 6, &b_ep);
    let s = wait_until(
        &saz_eps,
        Duration::from_secs(90),
        "room-b primary, three voters in the standby room",
        |s| {
            primary_of(s).as_deref() == Some("room-b")
                && node_role(s, "room-b").as_deref() == Some("primary")
                && voters(s) == ["room-b", "saz-1", "saz-spare"]
        },
    )
    .await;
    assert_eq!(s.generation, 1);
    writes_resume(&acks, recovered, "writes resume in the standby room").await;
    stop_writer.store(true, Ordering::Relaxed);
    let _ = writer.await;
    // room-b was the synchronous standby: nothing acknowledged is lost.
    let lost = missing_acks(&acks, &g.pg_addr(1)).await;
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    eprintln!(
        "3+2+1: {} writes acknowledged, none lost; the standby room runs on with the spare's vote",
        acks.all().len()
    );
}
