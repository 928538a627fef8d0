//! Membership held by the group: `pgwctl member add | remove | replace` and `pg-watcher
//! --join`, on real watchers and real PostgreSQL 15 servers with a writer going.

mod common;

use std::process::{Child, Command, Stdio};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use pgw_cli::status::{gather, GroupStatus};
use pgw_cli::writer::*;
use pgw_core::{Config, MemberConfig, Role};

/// Two data rooms and an arbiter: the layout whose arbiter host a real operator replaces.
const LAYOUT: [Role; 3] = [Role::Data, Role::Data, Role::Arbiter];

/// The config file of a new member `name` (id `id`, `role` arbiter or data) on loopback
/// address `ip`: a copy of an existing member's file naming itself, with its own entry added
/// to the member list (the group's list replaces the rest when it joins). A data member gets its
/// own server directory and address; an arbiter runs none.
fn newcomer(
    base: &Config,
    dir: &std::path::Path,
    name: &str,
    id: u64,
    ip: &str,
    role: Role,
) -> Config {
    let data = role == Role::Data;
    // A data member of a group whose rooms run pgpool runs one too.
    let pooled = data && base.pgpool.as_ref().is_some_and(|p| p.manage);
    let me = MemberConfig {
        name: name.into(),
        id,
        role,
        grpc: format!("{ip}:{}", free_port_on(ip)),
        http: format!("{ip}:{}", free_port_on(ip)),
        priority: 100,
        postgres: data.then(|| format!("{ip}:{}", free_port_on(ip))),
        pgpool: pooled.then(|| format!("{ip}:{}", free_port_on(ip))),
        pcp: pooled.then(|| format!("{ip}:{}", free_port_on(ip))),
        room: (!data).then(|| format!("room-{name}")),
        spare: false,
    };
    let mut c = base.clone();
    c.member = name.into();
    c.members.push(me);
    c.data_dir = dir.join(name).join("data");
    if let Some(p) = c.pgpool.as_mut() {
        p.manage = pooled;
        p.work_dir = pooled.then(|| dir.join(name).join("pgpool"));
    }
    if data {
        for p in c.postgres.iter_mut() {
            p.data_dir = dir.join(name).join("pg").join("data");
        }
    } else {
        c.postgres = Vec::new();
    }
    c.tls = pki().tls(name);
    c
}

/// Waits until `n` writes were acknowledged after `since` (within `limit`), stops the writer
/// and checks that every acknowledged id is on `server`. Returns how many were acknowledged.
async fn writes_go_on_none_lost(
    acks: &Acks,
    stop: &AtomicBool,
    writer: tokio::task::JoinHandle<()>,
    since: Instant,
    n: usize,
    limit: Duration,
    server: &str,
) -> usize {
    let t0 = Instant::now();
    while acks.count_after(since) < n {
        assert!(
            t0.elapsed() < limit,
            "fewer than {n} writes acknowledged by {server} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = writer.await;
    let lost = missing_acks(acks, server).await;
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    acks.all().len()
}

/// Starts `cfg` with `--join` as a member of `g` (killed with the group, logs dumped on failure).
fn join_member(g: &mut Group, cfg: &Config, join: &[String]) -> usize {
    let dir = g.dir.path().to_path_buf();
    let child = spawn_joining(cfg, &dir, join);
    let base = dir.join(&cfg.member);
    g.members.push(Member {
        cfg: cfg.clone(),
        cfg_path: base.join("pg-watcher.toml"),
        log: base.join("pg-watcher.log"),
        child: Some(child),
    });
    g.members.len() - 1
}

fn spawn_joining(cfg: &Config, dir: &std::path::Path, join: &[String]) -> Child {
    let base = dir.join(&cfg.member);
    std::fs::create_dir_all(&base).expect("mkdir");
    let path = base.join("pg-watcher.toml");
    std::fs::write(&path, cfg.to_toml().expect("toml")).expect("write config");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(base.join("pg-watcher.log"))
        .expect("log");
    Command::new(WATCHER)
        .arg("--config")
        .arg(&path)
        .arg("--join")
        .arg(join.join(","))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup"))
        .stderr(log)
        .spawn()
        .expect("spawn pg-watcher --join")
}

fn standing(s: &GroupStatus, name: &str) -> Option<String> {
    s.members
        .iter()
        .find(|m| m.name == name)
        .map(|m| m.standing.clone())
}

fn voters(s: &GroupStatus) -> Vec<String> {
    s.members
        .iter()
        .filter(|m| m.standing == "voter")
        .map(|m| m.name.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_added_removed_and_a_dead_arbiter_replaced_under_a_writer() {
    let mut g = Group::with_postgres(&LAYOUT);
    // With two data rooms, the survivor of a room loss commits alone only in degraded mode.
    g.allow_degraded(1000);
    g.start_all();
    let s = wait_in_sync(&g, Duration::from_secs(120)).await;
    let primary = primary_of(&s).expect("primary");
    let e0 = epoch_of(&s);
    let pi = g.index_of(&primary);
    create_table(&g.pg_addr(pi)).await.expect("table");
    let servers: Vec<String> = (0..2).map(|i| g.pg_addr(i)).collect();
    let stop_writer = Arc::new(AtomicBool::new(false));
    let (acks, writer) = spawn_writer_paced(
        servers,
        stop_writer.clone(),
        1,
        200_000,
        Duration::from_secs(240),
        Duration::from_millis(5),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!acks.all().is_empty(), "writes flow before any change");
    let eps = g.endpoints();
    let dir = g.dir.path().to_path_buf();
    let arbiter = g.members[2].cfg.clone();

    // A member the group does not list cannot join.
    let d = newcomer(&arbiter, &dir, "arbiter-d", 4, "127.0.0.14", Role::Arbiter);
    let dm = d.me().expect("d").clone();
    let mut early = spawn_joining(&d, &dir, &eps);
    assert_eq!(
        wait_exit(&mut early, Duration::from_secs(20)),
        Some(1),
        "a member not added first is refused"
    );
    assert!(
        !d.data_dir.join("roster.pgw").exists(),
        "nothing stored when refused"
    );
    // Bad input changes nothing: a node id in use.
    let mut bad = member_args(&dm);
    bad[1] = "1".into();
    let mut args = vec!["member", "add", "arbiter-d"];
    args.extend(bad.iter().map(String::as_str));
    let (code, text) = pgwctl_admin(&eps, &args);
    assert_ne!(code, 0);
    assert!(text.contains("node id 1 is already used"), "{text}");

    // Membership takes the admin role: an operator with `operate` is refused.
    let add = member_args(&dm);
    let out = Command::new(PGWCTL)
        .args(pki().pgwctl_args("operate"))
        .arg("--endpoints")
        .arg(eps.join(","))
        .args(["member", "add", "arbiter-d"])
        .args(&add)
        .output()
        .expect("run pgwctl");
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "operate may not change members");
    assert!(text.contains("admin"), "{text}");

    // 1. Add as a cold spare: it joins and receives the log as a non-voter...
    let mut args = vec!["member", "add", "arbiter-d", "--spare"];
    args.extend(add.iter().map(String::as_str));
    let (code, text) = pgwctl_admin(&eps, &args);
    assert_eq!(code, 0, "{text}");
    let mut spare = d.clone();
    for m in spare.members.iter_mut().filter(|m| m.name == "arbiter-d") {
        m.spare = true;
    }
    let di = join_member(&mut g, &spare, &eps);
    wait_until(
        &eps,
        Duration::from_secs(60),
        "arbiter-d a non-voter",
        |s| standing(s, "arbiter-d").as_deref() == Some("non_voter"),
    )
    .await;
    let (code, text) = pgwctl_admin(&eps, &["member", "promote", "room-a"]);
    assert_ne!(code, 0);
    assert!(text.contains("is not a spare"), "{text}");
    // ...then votes once promoted (four voters).
    let (code, text) = pgwctl_admin(&eps, &["member", "promote", "arbiter-d", "--wait"]);
    assert_eq!(code, 0, "{text}");
    let s = wait_until(&eps, Duration::from_secs(60), "arbiter-d votes", |s| {
        pgw_cli::member::settled(s, Some(("arbiter-d", true)), None)
    })
    .await;
    assert_eq!(voters(&s).len(), 4, "{:?}", s.members);
    assert!(
        d.data_dir.join("roster.pgw").exists(),
        "joined member stored the list"
    );

    // 2. Remove it again (the command waits until Raft has dropped it).
    let (code, text) = pgwctl_admin(&eps, &["member", "remove", "arbiter-d", "--wait"]);
    assert_eq!(code, 0, "{text}");
    let s = gather(&eps, Duration::from_secs(2)).await.expect("status");
    assert_eq!(standing(&s, "arbiter-d"), None);
    assert_eq!(voters(&s).len(), 3);
    g.kill9(di);

    // Removing the primary's member is refused, naming what to do.
    let (code, text) = pgwctl_admin(&eps, &["member", "remove", &primary]);
    assert_ne!(code, 0);
    assert!(text.contains("switch it over first"), "{text}");

    // 3. The arbiter's host dies; a new host replaces it under a new name.
    g.kill9(2);
    let e = newcomer(&arbiter, &dir, "arbiter-e", 5, "127.0.0.15", Role::Arbiter);
    let em = e.me().expect("e").clone();
    let rep = member_args(&em);
    let mut args = vec!["member", "replace", "arbiter", "arbiter-e"];
    args.extend(rep.iter().map(String::as_str));
    let eps2: Vec<String> = g.endpoints_except("arbiter");
    let (code, text) = pgwctl_admin(&eps2, &args);
    assert_eq!(code, 0, "{text}");
    join_member(&mut g, &e, &eps2);
    let s = wait_until(
        &eps2,
        Duration::from_secs(60),
        "arbiter-e replaces arbiter",
        |s| pgw_cli::member::settled(s, Some(("arbiter-e", true)), Some("arbiter")),
    )
    .await;
    let mut v = voters(&s);
    v.sort();
    assert_eq!(v, vec!["arbiter-e", "room-a", "room-b"]);
    assert_eq!(epoch_of(&s), e0, "no failover during membership changes");
    assert_eq!(primary_of(&s).as_deref(), Some(primary.as_str()));

    // 4. The new arbiter's vote counts: the primary's whole node dies, the other data room and
    // arbiter-e elect and fail over.
    let other = (0..2).find(|i| *i != pi).expect("other data member");
    let eps3: Vec<String> = vec![g.members[other].grpc(), em.grpc.clone()];
    let fault = Instant::now();
    g.kill9(pi);
    g.signal_pg(pi, libc::SIGKILL);
    let s = wait_until(
        &eps3,
        Duration::from_secs(60),
        "failover with arbiter-e",
        |s| primary_of(s).is_some_and(|p| p != primary),
    )
    .await;
    let new = primary_of(&s).expect("new primary");
    let ni = g.index_of(&new);
    let n = writes_go_on_none_lost(
        &acks,
        &stop_writer,
        writer,
        fault,
        10,
        Duration::from_secs(60),
        &g.pg_addr(ni),
    )
    .await;
    eprintln!(
        "membership: {n} writes acknowledged, none lost; failover with the replacement arbiter"
    );

    // The history names every change.
    let h = history(&eps3[0], "global", 100).await;
    let events: Vec<&str> = h.iter().map(|e| e.event.as_str()).collect();
    for want in [
        "member arbiter-d added",
        "spare member arbiter-d promoted",
        "member arbiter-d removed",
        "member arbiter replaced by arbiter-e",
    ] {
        assert!(
            events.iter().any(|e| e.starts_with(want)),
            "history lacks `{want}`: {events:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_member_added_at_run_time_replicates_takes_over_and_leaves() {
    let mut g = Group::with_pgpool(&LAYOUT);
    g.start_all();
    let s = wait_in_sync(&g, Duration::from_secs(120)).await;
    let primary = primary_of(&s).expect("primary");
    let pi = g.index_of(&primary);
    create_table(&g.pg_addr(pi)).await.expect("table");
    let eps = g.endpoints();
    let d = newcomer(
        &g.members[0].cfg,
        g.dir.path(),
        "room-d",
        4,
        "127.0.0.14",
        Role::Data,
    );
    let dm = d.me().expect("room-d").clone();
    let mut args: Vec<String> = ["member", "add", "room-d"].map(String::from).to_vec();
    args.extend(member_args(&dm));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, text) = pgwctl_admin(&eps, &argv);
    assert_eq!(code, 0, "{text}");
    let di = join_member(&mut g, &d, &eps);

    let mut servers: Vec<String> = (0..2).map(|i| g.pg_addr(i)).collect();
    servers.push(g.pg_addr(di));
    let stop_writer = Arc::new(AtomicBool::new(false));
    let (acks, writer) = spawn_writer_paced(
        servers,
        stop_writer.clone(),
        1,
        200_000,
        Duration::from_secs(240),
        Duration::from_millis(5),
    );
    // It clones the primary, streams, votes, and is a synchronous standby candidate.
    let s = wait_until(
        &g.endpoints(),
        Duration::from_secs(120),
        "room-d votes and replicates",
        |s| {
            pgw_cli::member::settled(s, Some(("room-d", true)), None)
                && node_role(s, "room-d").as_deref() == Some("sync_replica")
        },
    )
    .await;
    let e0 = epoch_of(&s);
    // The running pgpools took it in as a backend (no restart: reloaded), and so does its own.
    let pid_a = g.pgpool_pid(0);
    let pools_agree = |s: &GroupStatus, primary: &str| {
        s.clusters.first().is_some_and(|c| {
            c.pgpool.len() == 3
                && c.pgpool.iter().all(|p| {
                    p.agrees
                        && p.primary.as_deref() == Some(primary)
                        && p.nodes.len() == 3
                        && p.nodes.iter().all(|n| n.status != "down")
                })
        })
    };
    wait_until(
        &g.endpoints(),
        Duration::from_secs(60),
        "every pgpool uses room-d",
        |s| pools_agree(s, &primary),
    )
    .await;
    assert_eq!(g.pgpool_pid(0), pid_a, "room-a's pgpool was not restarted");
    // It can take over: a switchover to it, with nothing acknowledged lost.
    let op = pgw_cli::switchover(&g.endpoints(), "global", Some("room-d"))
        .await
        .expect("switchover to room-d");
    let done = pgw_cli::wait_operation(&g.endpoints(), op, Duration::from_secs(90), true)
        .await
        .expect("operation");
    assert_eq!(done.state, "succeeded", "{done:?}");
    let s = wait_in_sync(&g, Duration::from_secs(120)).await;
    assert_eq!(primary_of(&s).as_deref(), Some("room-d"));
    assert!(epoch_of(&s) > e0);
    // Every room's pgpool writes to it, room-a's included.
    wait_until(
        &g.endpoints(),
        Duration::from_secs(60),
        "every pgpool writes to room-d",
        |s| pools_agree(s, "room-d"),
    )
    .await;
    let via_a = connect(&g.pgpool_addr(0))
        .await
        .expect("connect through room-a's pgpool");
    // An INSERT goes to the primary (a SELECT may be balanced to any server); the id is one
    // the writer never uses.
    let port: i32 = via_a
        .query_one(
            "INSERT INTO acked (id) VALUES (-1) RETURNING inet_server_port()",
            &[],
        )
        .await
        .expect("a write through room-a's pgpool")
        .get(0);
    assert_eq!(
        Some(port.to_string()),
        dm.postgres
            .as_deref()
            .and_then(|a| a.rsplit_once(':'))
            .map(|x| x.1.to_string()),
        "room-a's pgpool sends writes to room-d (servers: {:?})",
        (0..g.members.len())
            .map(|i| g.pg_addr(i))
            .collect::<Vec<_>>()
    );
    // Back, then it leaves the group.
    let op = pgw_cli::switchover(&g.endpoints(), "global", Some(&primary))
        .await
        .expect("switchover back");
    let done = pgw_cli::wait_operation(&g.endpoints(), op, Duration::from_secs(90), true)
        .await
        .expect("operation");
    assert_eq!(done.state, "succeeded", "{done:?}");
    let (code, text) = pgwctl_admin(&eps, &["member", "remove", "room-d", "--wait"]);
    assert_eq!(code, 0, "{text}");
    g.kill9(di);
    g.signal_pg(di, libc::SIGKILL);
    let n = writes_go_on_none_lost(
        &acks,
        &stop_writer,
        writer,
        Instant::now(),
        20,
        Duration::from_secs(30),
        &g.pg_addr(pi),
    )
    .await;
    let s = gather(&g.endpoints_except("room-d"), Duration::from_secs(2))
        .await
        .expect("status");
    assert_eq!(standing(&s, "room-d"), None);
    eprintln!(
        "data member: {n} writes acknowledged across add, switchover to it and back, remove; none lost"
    );
}
