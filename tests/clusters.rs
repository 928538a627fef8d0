//! Two PostgreSQL clusters under one group, on real PostgreSQL 15 and real pgpool-II: "global"
//! on the three data members and "recovery" on two of them plus a sidecar-only member (a
//! server that never votes), each cluster with its own pgpool in each room. A fault in one
//! cluster moves nothing in the other; the sidecar-only member is promoted and rejoins;
//! `switchover --room ROOM --all` moves both, recovery first, with no acknowledged write lost;
//! role-change hooks run with the change in their environment, and a failing hook delays
//! nothing.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use pgw_cli::status::{ClusterView, GroupStatus};
use pgw_cli::writer::*;
use pgw_core::config::{
    HookConfig, HookEvent, ListenConfig, LogConfig, MemberConfig, PgClusterConfig, PgpoolConfig,
    PostgresConfig, RaftConfig, ServerConfig,
};
use pgw_core::{Config, Role};

const MEMBERS: [(&str, Role, &str, &str); 4] = [
    ("room-a", Role::Data, "127.0.0.11", "room-a"),
    ("room-b", Role::Data, "127.0.0.12", "room-b"),
    ("room-c", Role::Data, "127.0.0.13", "room-c"),
    ("rec-c", Role::Sidecar, "127.0.0.14", "room-c"),
];

fn addr(ip: &str) -> String {
    format!("{ip}:{}", free_port_on(ip))
}

fn pg(dir: &Path, member: &str, cluster: &str) -> PostgresConfig {
    PostgresConfig {
        cluster: Some(cluster.into()),
        settings: vec![
            "shared_buffers = '16MB'".into(),
            "max_connections = 40".into(),
        ],
        ..PostgresConfig::new(dir.join(member).join(format!("pg-{cluster}")).join("data"))
    }
}

/// The group: three voters, one sidecar member, two clusters, pgpools for both, three hooks.
fn two_cluster_group(hooks: &Path) -> Group {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let pass = dir.path().join("pcp.pass");
    std::fs::write(&pass, "pcp-test-secret\n").expect("pcp password");
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let members: Vec<MemberConfig> = MEMBERS
        .iter()
        .enumerate()
        .map(|(i, (name, role, ip, room))| MemberConfig {
            name: name.to_string(),
            id: i as u64 + 1,
            role: *role,
            grpc: addr(ip),
            http: addr(ip),
            priority: 100,
            postgres: (*role == Role::Data).then(|| addr(ip)),
            pgpool: (*role == Role::Data).then(|| addr(ip)),
            pcp: (*role == Role::Data).then(|| addr(ip)),
            room: Some(room.to_string()),
            spare: false,
        })
        .collect();
    let recovery_servers: Vec<ServerConfig> = ["room-a", "room-b", "rec-c"]
        .iter()
        .map(|m| {
            let ip = MEMBERS
                .iter()
                .find(|x| x.0 == *m)
                .map(|x| x.2)
                .unwrap_or("");
            ServerConfig {
                member: m.to_string(),
                postgres: Some(addr(ip)),
                pgpool: Some(addr(ip)),
                pcp: Some(addr(ip)),
            }
        })
        .collect();
    let mut clusters = pgw_core::config::defaults::clusters();
    clusters[0].bootstrap_primary = Some("room-a".into());
    clusters.push(PgClusterConfig {
        name: "recovery".into(),
        bootstrap_primary: Some("room-a".into()),
        servers: recovery_servers,
        switch_order: 1,
        ..clusters[0].clone()
    });
    let record = format!(
        "env | grep '^PGW_' | sort > {}/$PGW_MEMBER.$PGW_CLUSTER.$PGW_EPOCH.$PGW_EVENT.env",
        hooks.display()
    );
    let hook_list = vec![
        HookConfig {
            name: "record".into(),
            command: vec!["/bin/sh".into(), "-c".into(), record],
            on: vec![HookEvent::PrimaryChanged, HookEvent::ActiveRoomChanged],
            clusters: vec![],
            members: vec![],
            timeout_ms: 5000,
            retries: 0,
        },
        HookConfig {
            name: "active-room".into(),
            command: vec![
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("deploy/hooks/active-room.sh")
                    .display()
                    .to_string(),
                hooks.join("active-room").display().to_string(),
            ],
            on: vec![HookEvent::ActiveRoomChanged],
            clusters: vec![],
            members: vec!["room-a".into()],
            timeout_ms: 5000,
            retries: 0,
        },
        HookConfig {
            name: "broken".into(),
            command: vec!["/bin/false".into()],
            on: vec![HookEvent::PrimaryChanged],
            clusters: vec!["recovery".into()],
            members: vec!["room-b".into()],
            timeout_ms: 1000,
            retries: 1,
        },
    ];
    let cfgs: Vec<Config> = members
        .iter()
        .map(|m| {
            let mut postgres = Vec::new();
            if m.role == Role::Data {
                postgres.push(pg(dir.path(), &m.name, "global"));
            }
            if m.name != "room-c" {
                postgres.push(pg(dir.path(), &m.name, "recovery"));
            }
            Config {
                cluster_id: "clusters".into(),
                member: m.name.clone(),
                data_dir: dir.path().join(&m.name).join("data"),
                members: members.clone(),
                listen: ListenConfig::default(),
                timing: Default::default(),
                raft: RaftConfig::default(),
                clusters: clusters.clone(),
                active_cluster: Some("global".into()),
                log: LogConfig {
                    level: "info,openraft=warn".into(),
                },
                postgres,
                failover: Default::default(),
                pgpool: Some(PgpoolConfig {
                    manage: true,
                    bin_dir: pgw_core::config::defaults::pgpool_bin_dir(),
                    work_dir: Some(dir.path().join(&m.name).join("pgpool")),
                    os_user: "postgres".into(),
                    pcp_user: "pgwatcher".into(),
                    check_user: None,
                    pcp_password_file: pass.clone(),
                    check_interval_ms: 1000,
                    settings: vec![],
                }),
                tls: pki().tls(&m.name),
                auth: pki().auth(),
                hooks: hook_list.clone(),
                generation: 0,
                pools: Default::default(),
            }
        })
        .collect();
    for c in &cfgs {
        c.validate().expect("valid config");
    }
    Group::from_configs(dir, cfgs)
}

fn cluster<'a>(s: &'a GroupStatus, name: &str) -> &'a ClusterView {
    s.clusters
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no cluster {name} in status"))
}

/// A primary, every other server a sync replica, and every pgpool of the cluster agreeing.
fn healthy(c: &ClusterView, servers: usize) -> bool {
    let Some(p) = &c.primary else { return false };
    c.nodes.len() == servers
        && c.nodes
            .iter()
            .all(|n| (&n.member == p && n.role == "primary") || n.role == "sync_replica")
        && c.pgpool.len() == servers
        && c.pgpool
            .iter()
            .all(|pp| pp.agrees && pp.primary.as_deref() == Some(p.as_str()))
}

fn both_healthy(s: &GroupStatus) -> bool {
    healthy(cluster(s, "global"), 3) && healthy(cluster(s, "recovery"), 3)
}

async fn wait_both(g: &Group, what: &str) -> GroupStatus {
    wait_until(&g.endpoints(), Duration::from_secs(150), what, both_healthy).await
}

/// The address of `member`'s server of `cluster`.
fn pg_addr(g: &Group, member: &str, cluster: &str) -> String {
    g.members[0]
        .cfg
        .servers(cluster)
        .into_iter()
        .find(|x| x.member == member)
        .and_then(|x| x.postgres)
        .unwrap_or_else(|| panic!("{member} holds no server of {cluster}"))
}

/// The client address of `member`'s pgpool of `cluster`.
fn pool_addr(g: &Group, member: &str, cluster: &str) -> String {
    g.members[0]
        .cfg
        .servers(cluster)
        .into_iter()
        .find(|x| x.member == member)
        .and_then(|x| x.pgpool)
        .unwrap_or_else(|| panic!("{member} runs no pgpool of {cluster}"))
}

fn kill_postmaster(g: &Group, member: &str, cluster: &str) {
    let pid = g
        .postmaster_pid_of(g.index_of(member), cluster)
        .expect("postmaster pid");
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

/// The `.env` files the "record" hook wrote, parsed.
fn hook_runs(dir: &Path) -> Vec<(PathBuf, BTreeMap<String, String>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("hooks dir").flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "env") {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let env = text
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            out.push((p, env));
        }
    }
    out
}

async fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(x) = f() {
            return x;
        }
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_fail_over_apart_move_rooms_together_and_run_hooks() {
    let hooks = tempfile::tempdir().expect("hooks dir");
    let mut g = two_cluster_group(hooks.path());
    g.start_all();
    let s = wait_both(&g, "both clusters healthy").await;
    assert_eq!(cluster(&s, "global").primary.as_deref(), Some("room-a"));
    assert_eq!(cluster(&s, "recovery").primary.as_deref(), Some("room-a"));
    // The sidecar member is in the group but never votes.
    let rec = s
        .members
        .iter()
        .find(|m| m.name == "rec-c")
        .expect("rec-c in status");
    assert_eq!(rec.role, "sidecar");
    let global_epoch = cluster(&s, "global").epoch;
    for c in ["global", "recovery"] {
        create_table(&pg_addr(&g, "room-a", c))
            .await
            .expect("table");
    }

    // 1. Kill the recovery primary's postmaster: recovery fails over, global does not move.
    kill_postmaster(&g, "room-a", "recovery");
    let s = wait_until(
        &g.endpoints(),
        Duration::from_secs(60),
        "a new recovery primary",
        |s| {
            cluster(s, "recovery")
                .primary
                .as_ref()
                .is_some_and(|p| p != "room-a")
        },
    )
    .await;
    let rec_primary = cluster(&s, "recovery").primary.clone().expect("primary");
    eprintln!("recovery failed over to {rec_primary}");
    let s = wait_both(&g, "both healthy after the recovery failover").await;
    let gl = cluster(&s, "global");
    assert_eq!(gl.primary.as_deref(), Some("room-a"), "global moved");
    assert_eq!(gl.epoch, global_epoch, "global's epoch moved");
    let ep = g.members[0].grpc();
    let global_history = history(&ep, "global", 100).await;
    assert!(
        !global_history
            .iter()
            .any(|h| h.event.contains("primary := ") && h.epoch > global_epoch),
        "global history shows a change: {global_history:#?}"
    );

    // The hooks ran for that change on every member, with its environment; the broken one
    // failed (twice) and is in the history, and delayed nothing.
    let runs = wait_for(
        "the record hook on every member",
        Duration::from_secs(30),
        || {
            let r: Vec<_> = hook_runs(hooks.path())
                .into_iter()
                .filter(|(_, e)| {
                    e.get("PGW_CLUSTER").map(String::as_str) == Some("recovery")
                        && e.get("PGW_NEW_PRIMARY") == Some(&rec_primary)
                })
                .collect();
            (r.len() == MEMBERS.len()).then_some(r)
        },
    )
    .await;
    for (p, e) in &runs {
        assert_eq!(e["PGW_EVENT"], "primary_changed", "{p:?}");
        assert_eq!(e["PGW_OLD_PRIMARY"], "room-a", "{p:?}");
        let room = MEMBERS.iter().find(|m| m.0 == rec_primary).map(|m| m.3);
        assert_eq!(Some(e["PGW_ROOM"].as_str()), room, "{p:?}");
        assert_eq!(e["PGW_ACTIVE_ROOM"], "room-a", "{p:?}");
        assert!(e["PGW_EPOCH"].parse::<u64>().is_ok_and(|x| x > 1), "{p:?}");
    }
    let rec_history = wait_for(
        "hook outcomes in the history",
        Duration::from_secs(30),
        || {
            let h = futures_lite_block(history(&ep, "recovery", 200));
            let ok = h.iter().any(|x| x.event.contains("hook record on "));
            let failed = h.iter().any(|x| {
                x.event.contains("hook broken on room-b FAILED") && x.event.contains("attempt 2")
            });
            (ok && failed).then_some(h)
        },
    )
    .await;
    eprintln!(
        "recovery history: {:#?}",
        rec_history.iter().map(|h| &h.event).collect::<Vec<_>>()
    );

    // 2. The sidecar-only member is promoted (a switchover to it), then its watcher and server
    // die: recovery fails over again, and it rejoins as a sync replica when it comes back.
    if rec_primary != "rec-c" {
        let op = pgw_cli::switchover(&g.endpoints(), "recovery", Some("rec-c"))
            .await
            .expect("switchover to rec-c");
        let done = pgw_cli::wait_operation(&g.endpoints(), op, Duration::from_secs(60), true)
            .await
            .expect("operation");
        assert_eq!(done.state, "succeeded", "{done:?}");
    }
    let s = wait_both(&g, "rec-c primary of recovery").await;
    assert_eq!(cluster(&s, "recovery").primary.as_deref(), Some("rec-c"));
    let ids = ids_before_write(&pool_addr(&g, "room-b", "recovery")).await;
    assert!(
        ids.is_some(),
        "writes through room-b's recovery pgpool reach rec-c"
    );
    let rc = g.index_of("rec-c");
    g.kill9(rc);
    kill_postmaster(&g, "rec-c", "recovery");
    wait_until(
        &g.endpoints_except("rec-c"),
        Duration::from_secs(60),
        "recovery failing over from rec-c",
        |s| {
            cluster(s, "recovery")
                .primary
                .as_ref()
                .is_some_and(|p| p != "rec-c")
        },
    )
    .await;
    g.start(rc);
    let s = wait_both(&g, "rec-c rejoined as a sync replica").await;
    assert_eq!(
        cluster(&s, "recovery")
            .nodes
            .iter()
            .find(|n| n.member == "rec-c")
            .map(|n| n.role.as_str()),
        Some("sync_replica")
    );

    // 3. Move both clusters into room-b under writers through room-a's pgpools.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for (k, c) in ["global", "recovery"].iter().enumerate() {
        let primary = cluster(&s, c).primary.clone().expect("primary");
        let first = next_id(&pg_addr(&g, &primary, c)).await + 10_000_000 * (k as i64 + 1);
        let (acks, h) = spawn_writer_from(
            vec![pool_addr(&g, "room-a", c)],
            stop.clone(),
            first,
            200_000,
            Duration::from_secs(120),
        );
        writers.push((c.to_string(), acks, h));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let op = pgw_cli::switchover_room(&g.endpoints(), "", "room-b", true)
        .await
        .expect("room move accepted");
    assert_eq!(op.kind, "room_move");
    assert_eq!(op.cluster, "all");
    let done = pgw_cli::wait_operation(&g.endpoints(), op.clone(), Duration::from_secs(180), true)
        .await
        .expect("room move");
    assert_eq!(done.state, "succeeded", "{done:?}");
    eprintln!("room move {}: {}", done.id, done.detail);
    let s = wait_both(&g, "both healthy in room-b").await;
    for c in ["global", "recovery"] {
        assert_eq!(cluster(&s, c).primary.as_deref(), Some("room-b"), "{c}");
        assert_eq!(
            cluster(&s, c).primary_room.as_deref(),
            Some("room-b"),
            "{c}"
        );
    }
    assert_eq!(s.active_room.as_deref(), Some("room-b"));
    // Recovery moved first: its step's operation id is the lower one.
    let step = |h: &[pgw_proto::HistoryEntry]| {
        h.iter()
            .find(|x| x.event.contains(&format!("step of room move {}", done.id)))
            .map(|x| x.log_index)
            .expect("a step of the room move")
    };
    let rec_step = step(&history(&ep, "recovery", 200).await);
    let glob_step = step(&history(&ep, "global", 200).await);
    assert!(
        rec_step < glob_step,
        "recovery ({rec_step}) moves before global ({glob_step})"
    );
    // Writes resumed on room-b and none acknowledged was lost, in either cluster.
    let t = Instant::now();
    for (c, acks, _) in &writers {
        let new = pg_addr(&g, "room-b", c);
        wait_for(
            &format!("writes on {c}'s new primary"),
            Duration::from_secs(60),
            || {
                acks.all()
                    .iter()
                    .any(|a| a.backend == new && a.at > t)
                    .then_some(())
            },
        )
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    for (c, acks, h) in writers {
        let _ = h.await;
        let missing = missing_acks(&acks, &pg_addr(&g, "room-b", &c)).await;
        assert!(
            missing.is_empty(),
            "{c}: acknowledged ids missing: {missing:?}"
        );
        eprintln!("{c}: {} writes acknowledged, none lost", acks.all().len());
    }
    // The active room changed: the shipped hook wrote it, and the record hook saw the event.
    let room = wait_for("the active room file", Duration::from_secs(30), || {
        std::fs::read_to_string(hooks.path().join("active-room"))
            .ok()
            .filter(|r| r.trim() == "room-b")
    })
    .await;
    assert_eq!(room.trim(), "room-b");
    wait_for(
        "an active_room_changed run",
        Duration::from_secs(30),
        || {
            hook_runs(hooks.path()).into_iter().find(|(_, e)| {
                e.get("PGW_EVENT").map(String::as_str) == Some("active_room_changed")
                    && e.get("PGW_ACTIVE_ROOM").map(String::as_str) == Some("room-b")
                    && e.get("PGW_ROOM_MOVE") == Some(&done.id.to_string())
            })
        },
    )
    .await;
    // Moving back is the same command.
    let back = pgw_cli::switchover_room(&g.endpoints(), "", "room-a", true)
        .await
        .expect("room move back");
    let back = pgw_cli::wait_operation(&g.endpoints(), back, Duration::from_secs(180), true)
        .await
        .expect("room move back");
    assert_eq!(back.state, "succeeded", "{back:?}");
    let s = wait_both(&g, "both back in room-a").await;
    for c in ["global", "recovery"] {
        assert_eq!(cluster(&s, c).primary.as_deref(), Some("room-a"), "{c}");
    }
    // A room without a server of every cluster is refused, naming the cluster.
    let err = pgw_cli::switchover_room(&g.endpoints(), "", "nowhere", true)
        .await
        .expect_err("unknown room");
    assert!(err.to_string().contains("nowhere"), "{err}");
}

/// One write through `pool` (a pgpool); `Some(id)` when it was acknowledged.
/// One write through `pool`, retried for up to 20 s as an application would: right after a
/// switchover pgpool may still hand out a session it opened to the old primary.
async fn ids_before_write(pool: &str) -> Option<i64> {
    let t0 = std::time::Instant::now();
    loop {
        let id = 900_000_000 + (wall_ms() % 1_000_000) as i64;
        let r = match connect(pool).await {
            Some(c) => c
                .execute("INSERT INTO acked (id) VALUES ($1)", &[&id])
                .await
                .map_err(|e| pg_error_text(&e)),
            None => Err("no connection".into()),
        };
        match r {
            Ok(_) => return Some(id),
            Err(e) if t0.elapsed() > Duration::from_secs(20) => {
                eprintln!("write through {pool} failed for 20 s: {e}");
                return None;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Runs a future to completion from synchronous code inside the test's runtime.
fn futures_lite_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}
