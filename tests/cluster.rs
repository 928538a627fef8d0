//! Multi-process tests: three real `pg-watcher` daemons on loopback.

mod common;

use std::time::Duration;

use common::*;
use pgw_cli::set_paused;
use pgw_core::Role;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const THREE: [Role; 3] = [Role::Data, Role::Data, Role::Data];
const LIMIT: Duration = Duration::from_secs(30);

async fn health(addr: &str, service: &str) -> i32 {
    let ch = pgw_cli::client::channel_as(addr, Duration::from_secs(2), &pki().client("read"))
        .await
        .expect("connect");
    let r = HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .expect("health check");
    r.into_inner().status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill9_failover_state_survives_and_member_catches_up() {
    let mut g = Group::new(&THREE);
    g.start_all();
    let eps = g.endpoints();
    let s = wait_leader(&eps, None, LIMIT).await;
    let old = s.leader.clone().expect("leader");

    // A decision committed before the fault.
    let r = set_paused(&eps, "global", true, "before kill")
        .await
        .expect("pause commits");
    assert!(r.result.contains("applied"), "{r:?}");

    // Health endpoints: the watcher serves; no primary yet, so the cluster does not.
    assert_eq!(health(&eps[0], "").await, ServingStatus::Serving as i32);
    assert_eq!(
        health(&eps[0], "global").await,
        ServingStatus::NotServing as i32
    );
    let (code, body) = http_get(&g.members[0].http(), "/health").await;
    assert_eq!(code, 200, "{body}");
    let (code, _) = http_get(&g.members[0].http(), "/primary").await;
    assert_eq!(code, 503, "no primary exists yet");
    let (code, body) = http_get(&g.members[0].http(), "/metrics").await;
    assert_eq!(code, 200);
    assert!(body.contains("pgwatcher_raft_term"), "{body}");

    let li = g.index_of(&old);
    g.kill9(li);
    let others = g.endpoints_except(&old);
    // A member that was deposed at startup can still call itself leader of an older term for
    // a moment: wait for a leader of a newer term than the killed one's.
    let s2 = wait_until(&others, LIMIT, "a new leader in a later term", |x| {
        x.leader.as_ref().is_some_and(|l| *l != old) && x.term > s.term
    })
    .await;
    let new = s2.leader.clone().expect("new leader");
    assert_ne!(new, old);
    assert!(s2.term > s.term, "term grew");
    let paused = s2
        .clusters
        .iter()
        .find(|c| c.name == "global")
        .map(|c| c.paused);
    assert_eq!(
        paused,
        Some(true),
        "the committed decision survived the leader's death"
    );

    // The new leader commits decisions with one member down.
    let r = set_paused(&others, "global", false, "after kill")
        .await
        .expect("resume commits");
    assert!(r.result.contains("applied"), "{r:?}");

    // The killed member restarts from its disk and catches up.
    g.start(li);
    let s3 = wait_until(&eps, LIMIT, "restarted member to catch up", |s| {
        let leader_applied = s
            .members
            .iter()
            .find(|m| Some(&m.name) == s.leader.as_ref())
            .and_then(|m| m.last_applied);
        s.members
            .iter()
            .all(|m| m.raft == "leader" || m.raft == "follower")
            && s.members
                .iter()
                .all(|m| m.last_applied.is_some() && m.last_applied == leader_applied)
    })
    .await;
    assert_eq!(s3.members.iter().filter(|m| m.raft == "leader").count(), 1);
    // Its own view has the decision made while it was dead.
    let own = pgw_cli::status::member_status(&g.members[li].grpc(), Duration::from_secs(2))
        .await
        .expect("status of restarted member");
    let global = own
        .clusters
        .iter()
        .find(|c| c.name == "global")
        .expect("global");
    assert!(!global.paused, "restarted member applied the resume");
    let log = g.log_text(li);
    assert!(
        log.matches("initialised the group").count() <= 1,
        "a restarted member must not re-initialise:\n{log}"
    );
    assert!(log.contains("recovered from disk"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatching_config_is_refused_and_group_unharmed() {
    let mut g = Group::new(&THREE);
    g.start_all();
    let eps = g.endpoints();
    let s = wait_leader(&eps, None, LIMIT).await;
    let leader = s.leader.clone().expect("leader");
    // Take a follower down, then try to bring it back with bad configs.
    let fi = (0..3)
        .find(|i| g.members[*i].name() != leader)
        .expect("a follower");
    g.terminate(fi);

    // 1. Its own data dir, but another cluster id: refused by the identity file.
    let mut bad = g.members[fi].cfg.clone();
    bad.cluster_id = "someone-else".into();
    let dir = g.dir.path().join("bad1");
    let mut child = spawn(&bad, &dir.join("c.toml"), &dir.join("log"));
    let code = wait_exit(&mut child, Duration::from_secs(20));
    assert!(
        matches!(code, Some(c) if c != 0),
        "must exit non-zero, got {code:?}"
    );
    let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
    assert!(
        log.contains("identity.pgw") && log.contains("cluster_id"),
        "{log}"
    );

    // 2. A fresh data dir and another cluster id: refused by the peers' answer.
    let mut bad = g.members[fi].cfg.clone();
    bad.cluster_id = "someone-else".into();
    bad.data_dir = g.dir.path().join("bad2").join("data");
    let dir = g.dir.path().join("bad2");
    let mut child = spawn(&bad, &dir.join("c.toml"), &dir.join("log"));
    let code = wait_exit(&mut child, Duration::from_secs(20));
    assert!(
        matches!(code, Some(c) if c != 0),
        "must exit non-zero, got {code:?}"
    );
    let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
    assert!(
        log.contains("cluster id") && log.contains("someone-else"),
        "{log}"
    );

    // 3. A fresh data dir and a different member list (an extra arbiter).
    let mut bad = g.members[fi].cfg.clone();
    bad.members.push(pgw_core::MemberConfig {
        name: "extra".into(),
        id: 9,
        role: Role::Arbiter,
        grpc: format!("127.0.0.1:{}", free_port()),
        http: format!("127.0.0.1:{}", free_port()),
        priority: 1,
        postgres: None,
        pgpool: None,
        pcp: None,
        room: None,
        spare: false,
    });
    bad.data_dir = g.dir.path().join("bad3").join("data");
    let dir = g.dir.path().join("bad3");
    let mut child = spawn(&bad, &dir.join("c.toml"), &dir.join("log"));
    let code = wait_exit(&mut child, Duration::from_secs(20));
    assert!(
        matches!(code, Some(c) if c != 0),
        "must exit non-zero, got {code:?}"
    );
    let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
    assert!(log.contains("member list"), "{log}");

    // 4. A malformed config is refused before anything starts, naming the field.
    let mut bad = g.members[fi].cfg.clone();
    bad.raft.election_timeout_max_ms = 1;
    let dir = g.dir.path().join("bad4");
    let mut child = spawn(&bad, &dir.join("c.toml"), &dir.join("log"));
    let code = wait_exit(&mut child, Duration::from_secs(20));
    assert_eq!(code, Some(2));
    let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
    assert!(log.contains("raft.election_timeout_max_ms"), "{log}");

    // The group is unharmed: same leader, same term, and it still commits.
    let s2 = wait_leader(&eps, None, LIMIT).await;
    assert_eq!(s2.leader.as_deref(), Some(leader.as_str()));
    assert_eq!(s2.term, s.term, "no election was provoked");
    let r = set_paused(&eps, "global", true, "after refusals")
        .await
        .expect("commits");
    assert!(r.result.contains("applied"));

    // The real member comes back fine.
    g.start(fi);
    wait_until(&eps, LIMIT, "all members back", |s| {
        s.members
            .iter()
            .all(|m| m.raft == "leader" || m.raft == "follower")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rooms_plus_arbiter_survive_a_data_member_loss_and_full_restart() {
    let mut g = Group::new(&[Role::Data, Role::Data, Role::Arbiter]);
    g.start_all();
    let eps = g.endpoints();
    let s = wait_leader(&eps, None, LIMIT).await;
    let arb = s
        .members
        .iter()
        .find(|m| m.name == "arbiter")
        .expect("arbiter");
    assert_eq!(arb.role, "arbiter");
    set_paused(&eps, "global", true, "x")
        .await
        .expect("commits");

    // Lose one data member: the other data member and the arbiter still form a majority.
    g.kill9(0);
    let others = g.endpoints_except("room-a");
    wait_leader(&others, Some("room-a"), LIMIT).await;
    let r = set_paused(&others, "global", false, "y")
        .await
        .expect("commits with 2 of 3");
    assert!(r.result.contains("applied"));

    // Full restart of every member: state and term survive.
    g.start(0);
    for i in 0..3 {
        g.terminate(i);
    }
    g.start_all();
    let s2 = wait_leader(&eps, None, LIMIT).await;
    // openraft resumes a leader whose committed vote is on disk in the same term, so the term
    // need not grow; it must never go back.
    assert!(
        s2.term >= s.term,
        "term {} after restart, {} before",
        s2.term,
        s.term
    );
    let c = s2
        .clusters
        .iter()
        .find(|c| c.name == "global")
        .expect("global");
    assert!(!c.paused, "last decision survived a full restart");
    for i in 0..3 {
        let log = g.log_text(i);
        assert!(
            log.matches("initialised the group").count() <= 1,
            "initialised at most once:\n{log}"
        );
    }
}

/// `pgwctl demo up` fails fast, with the member's own fatal message, when a member exits (here a
/// stand-in for the pg-watcher binary that stops the way the real one does without pgpool:
/// CI's machine has pgpool, so the real failure cannot be produced there).
#[test]
fn demo_up_fails_fast_with_the_members_own_message() {
    let dir = tempfile::tempdir().expect("tmp");
    let fake = dir.path().join("fake-pg-watcher.sh");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'pg-watcher: pgpool: /usr/sbin/pgpool not found (install pgpool2)' >&2\nexit 1\n",
    )
    .expect("script");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let demo = dir.path().join("demo");
    let t0 = std::time::Instant::now();
    let out = std::process::Command::new(PGWCTL)
        .args(["demo", "up", "--dir", &demo.display().to_string()])
        .env("PGW_WATCHER_BIN", &fake)
        .output()
        .expect("pgwctl demo up");
    let took = t0.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("exited") && err.contains("/usr/sbin/pgpool not found"),
        "{err}"
    );
    assert!(took < Duration::from_secs(20), "took {took:?}: {err}");
    let _ = std::process::Command::new(PGWCTL)
        .args(["demo", "down", "--dir", &demo.display().to_string()])
        .output();
}
