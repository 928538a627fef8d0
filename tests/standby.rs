//! A standby group in another region (seed 000's non-region pair; Patroni's standby cluster):
//! a second pg-watcher group whose cluster replicates asynchronously from the main group's
//! primary (its standby leader streams from there, its other servers from the standby leader),
//! follows the main group's failovers, and is promoted by `pgwctl promote-group` once the main
//! region is lost. Real watchers and real PostgreSQL 15 servers, a writer on the main group.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use pgw_cli::status::GroupStatus;
use pgw_cli::writer::*;
use pgw_core::config::StandbyOf;
use pgw_core::{Config, Role};

/// The main group (room-a, room-b, arbiter-m on 127.0.0.11-13) and the standby group in the
/// other region (dr-a, dr-b, arbiter-dr on 127.0.0.14-16), whose cluster is `standby_of` the
/// main group's. The main group lets the standby group's members read its status.
fn two_regions() -> (Group, Group) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let roles = [
        Role::Data,
        Role::Data,
        Role::Arbiter,
        Role::Data,
        Role::Data,
        Role::Arbiter,
    ];
    let names = [
        "room-a",
        "room-b",
        "arbiter-m",
        "dr-a",
        "dr-b",
        "arbiter-dr",
    ];
    let mut cfgs = pg_configs(dir.path(), "pgtest", &roles);
    let mut list = cfgs[0].members.clone();
    for (i, m) in list.iter_mut().enumerate() {
        m.name = names[i].into();
    }
    let main_eps: Vec<String> = list[..3].iter().map(|m| m.grpc.clone()).collect();
    for (i, c) in cfgs.iter_mut().enumerate() {
        let main = i < 3;
        c.cluster_id = if main { "main" } else { "dr" }.into();
        c.members = if main {
            list[..3].to_vec()
        } else {
            list[3..].to_vec()
        };
        c.member = names[i].into();
        c.data_dir = dir.path().join(names[i]).join("data");
        c.tls = pki().tls(names[i]);
        if main {
            c.auth.read.extend(names[3..].iter().map(|n| n.to_string()));
            // Two data rooms: the survivor of a failover takes writes alone (degraded).
            c.clusters[0].allow_degraded = true;
            c.clusters[0].degrade_after_ms = 1000;
        } else {
            c.clusters[0].standby_of = Some(StandbyOf {
                endpoints: main_eps.clone(),
                cluster: None,
                poll_ms: 300,
            });
        }
        c.validate().expect("valid config");
    }
    let dr: Vec<Config> = cfgs.split_off(3);
    let dir2 = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir2.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    (
        Group::from_configs(dir, cfgs),
        Group::from_configs(dir2, dr),
    )
}

fn standby_of(s: &GroupStatus) -> Option<&pgw_cli::status::StandbyView> {
    s.clusters.first().and_then(|c| c.standby.as_ref())
}

/// Waits until every id in `ids` is readable on `server`.
async fn replicated(server: &str, ids: &[i64], limit: Duration, what: &str) {
    let t0 = Instant::now();
    loop {
        let on = ids_on(server).await;
        if ids.iter().all(|i| on.contains(i)) {
            return;
        }
        assert!(t0.elapsed() < limit, "{what}: not replicated to {server}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_group_follows_the_main_group_and_is_promoted_when_the_main_region_is_lost() {
    let (mut main, mut dr) = two_regions();
    main.start_all();
    let s = wait_in_sync(&main, Duration::from_secs(120)).await;
    let p0 = primary_of(&s).expect("main primary");
    let pi = main.index_of(&p0);
    create_table(&main.pg_addr(pi)).await.expect("table");
    let servers: Vec<String> = (0..2).map(|i| main.pg_addr(i)).collect();
    let stop_writer = Arc::new(AtomicBool::new(false));
    let (acks, writer) = spawn_writer_paced(
        servers,
        stop_writer.clone(),
        1,
        200_000,
        Duration::from_secs(300),
        Duration::from_millis(10),
    );

    // The standby group: its leader streams from the main primary, its other server from it.
    dr.start_all();
    let eps = dr.endpoints();
    let s = wait_until(
        &eps,
        Duration::from_secs(120),
        "the standby group replicates from the main group",
        |s| {
            let Some(sb) = standby_of(s) else {
                return false;
            };
            let Some(leader) = primary_of(s) else {
                return false;
            };
            sb.upstream.as_deref() == Some(p0.as_str())
                && node_role(s, &leader).as_deref() == Some("standby_leader")
                && s.clusters[0]
                    .nodes
                    .iter()
                    .filter(|n| n.member != leader)
                    .all(|n| n.role == "replica")
                && s.clusters[0].nodes.len() == 2
        },
    )
    .await;
    let leader = primary_of(&s).expect("standby leader");
    let li = dr.index_of(&leader);
    let other = 1 - li;
    let (_, text) = pgwctl_admin(&eps, &["status"]);
    assert!(text.contains("STANDBY of cluster `global`"), "{text}");
    let sample: Vec<i64> = acks.all().iter().map(|a| a.id).collect();
    assert!(!sample.is_empty(), "writes flow on the main group");
    replicated(
        &dr.pg_addr(li),
        &sample,
        Duration::from_secs(30),
        "to the standby leader",
    )
    .await;
    replicated(
        &dr.pg_addr(other),
        &sample,
        Duration::from_secs(30),
        "down the cascade",
    )
    .await;
    assert_eq!(
        is_primary(&dr.pg_addr(li)).await,
        Some(false),
        "the standby leader never takes writes"
    );

    // The main group fails over: the standby group follows its new primary.
    main.kill9(pi);
    main.signal_pg(pi, libc::SIGKILL);
    let main_eps = main.endpoints_except(&p0);
    let s = wait_until(
        &main_eps,
        Duration::from_secs(60),
        "the main group's failover",
        |s| primary_of(s).is_some_and(|p| p != p0),
    )
    .await;
    let p1 = primary_of(&s).expect("new main primary");
    let after = Instant::now();
    wait_until(
        &eps,
        Duration::from_secs(60),
        "the standby group follows",
        |s| standby_of(s).is_some_and(|sb| sb.upstream.as_deref() == Some(p1.as_str())),
    )
    .await;
    let t0 = Instant::now();
    while acks.count_after(after) < 20 {
        assert!(t0.elapsed() < Duration::from_secs(30), "writes on {p1}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let later: Vec<i64> = acks
        .all()
        .iter()
        .filter(|a| a.at > after)
        .map(|a| a.id)
        .collect();
    replicated(
        &dr.pg_addr(li),
        &later,
        Duration::from_secs(60),
        "after the main failover",
    )
    .await;

    // Promotion is refused while the main group answers with a primary.
    let (code, text) = pgwctl_admin(&eps, &["promote-group"]);
    assert_ne!(code, 0);
    assert!(text.contains("the main group answers"), "{text}");

    // The main region is lost: the standby group is promoted and reports what it had.
    stop_writer.store(true, Ordering::Relaxed);
    let _ = writer.await;
    let s = wait_until(&eps, Duration::from_secs(30), "lag known", |s| {
        standby_of(s).is_some_and(|sb| sb.replayed_lsn.is_some())
    })
    .await;
    eprintln!("standby before the loss: {:?}", standby_of(&s));
    for i in 0..3 {
        main.kill9(i);
        main.signal_pg(i, libc::SIGKILL);
    }
    let (code, text) = pgwctl_admin(&eps, &["promote-group"]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("had replicated up to") && text.contains(&p1),
        "the reply names the position and the primary it followed: {text}"
    );
    let s = wait_until(
        &eps,
        Duration::from_secs(60),
        "the promoted group runs a primary and a sync replica",
        |s| {
            standby_of(s).is_none()
                && node_role(s, &leader).as_deref() == Some("primary")
                && node_role(s, dr.members[other].name()).as_deref() == Some("sync_replica")
        },
    )
    .await;
    assert_eq!(primary_of(&s).as_deref(), Some(leader.as_str()));
    // It takes writes, and holds what it had replicated.
    let new_id = next_id(&dr.pg_addr(li)).await;
    let c = connect(&dr.pg_addr(li))
        .await
        .expect("connect to the new primary");
    c.execute("INSERT INTO acked (id) VALUES ($1)", &[&new_id])
        .await
        .expect("the promoted primary takes writes");
    let on = ids_on(&dr.pg_addr(li)).await;
    assert!(on.contains(&new_id));
    assert!(later.iter().all(|i| on.contains(i)));
    let h = history(&eps[0], "global", 50).await;
    assert!(
        h.iter().any(|e| e.event.starts_with("group promoted")),
        "{:?}",
        h.iter().map(|e| &e.event).collect::<Vec<_>>()
    );
    eprintln!(
        "standby group: followed {p0} then {p1}, promoted; {} ids replicated before the loss",
        on.len()
    );
}
