//! The attacks of issue 10, tried against real daemons: callers that are not who they claim
//! to be, operators above their role, forged Raft traffic, report floods, a full disk.
//! Each refused call must change nothing (same leader, term, history and epoch; the daemon
//! still running under the same pid).

mod common;

use std::time::{Duration, Instant};

use common::*;
use openraft::{SnapshotMeta, StoredMembership, Vote};
use pgw_cli::client::{channel_as, connect_as, ClientAuth};
use pgw_core::Role;
use pgw_proto::raft_client::RaftClient;
use pgw_proto::{
    FailoverRequest, Identity, RaftRequest, ReportRequest, SetPausedRequest, StatusRequest,
    SwitchoverRequest,
};
use pgw_server::raft::types::TypeConfig;

const THREE: [Role; 3] = [Role::Data, Role::Data, Role::Data];
const LIMIT: Duration = Duration::from_secs(30);
const T: Duration = Duration::from_secs(3);

/// What must not change when a refused caller tries something.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    leader: Option<String>,
    term: u64,
    history: Vec<String>,
    epoch: u64,
    paused: bool,
}

async fn snapshot(eps: &[String]) -> Snapshot {
    let s = wait_leader(eps, None, LIMIT).await;
    let h = history(&eps[0], "", 1000)
        .await
        .into_iter()
        .map(|e| format!("{} {}", e.log_index, e.event))
        .collect();
    Snapshot {
        leader: s.leader.clone(),
        term: s.term,
        history: h,
        epoch: epoch_of(&s),
        paused: s.clusters.first().is_some_and(|c| c.paused),
    }
}

/// A request to pause automation of the `global` cluster, giving `reason`.
fn pause(reason: &str) -> SetPausedRequest {
    SetPausedRequest {
        cluster: "global".into(),
        paused: true,
        reason: reason.into(),
    }
}

fn member_auth(name: &str) -> ClientAuth {
    pki().member_auth(name)
}

fn identity(g: &Group, as_member: &str) -> Identity {
    let cfg = &g.members[0].cfg;
    let m = cfg
        .members
        .iter()
        .find(|m| m.name == as_member)
        .expect("member");
    Identity {
        cluster_id: cfg.cluster_id.clone(),
        fingerprint: cfg.members_fingerprint(),
        from: m.id,
        from_name: m.name.clone(),
        generation: 0,
    }
}

fn pids(g: &Group) -> Vec<Option<u32>> {
    g.members
        .iter()
        .map(|m| m.child.as_ref().map(|c| c.id()))
        .collect()
}

fn all_running(g: &mut Group) {
    for m in &mut g.members {
        let c = m.child.as_mut().expect("started");
        assert!(
            c.try_wait().expect("wait").is_none(),
            "{} exited: {}",
            m.cfg.member,
            std::fs::read_to_string(&m.log).unwrap_or_default()
        );
    }
}

async fn raft_client(addr: &str, auth: &ClientAuth) -> RaftClient<tonic::transport::Channel> {
    RaftClient::new(channel_as(addr, T, auth).await.expect("channel"))
}

fn append(term: u64, leader: u64) -> Vec<u8> {
    let r = openraft::raft::AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(term, leader),
        prev_log_id: None,
        entries: vec![],
        leader_commit: None,
    };
    serde_json::to_vec(&r).expect("json")
}

fn snapshot_chunk(term: u64, leader: u64, offset: u64) -> Vec<u8> {
    let r = openraft::raft::InstallSnapshotRequest::<TypeConfig> {
        vote: Vote::new_committed(term, leader),
        meta: SnapshotMeta {
            last_log_id: None,
            last_membership: StoredMembership::default(),
            snapshot_id: "forged".into(),
        },
        offset,
        data: vec![0x7b; 64],
        done: false,
    };
    serde_json::to_vec(&r).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impostors_and_unauthorised_callers_are_refused_and_change_nothing() {
    let mut g = Group::new(&THREE);
    g.start_all();
    let eps = g.endpoints();
    wait_leader(&eps, None, LIMIT).await;
    pgw_cli::set_paused(&eps, "global", false, "baseline")
        .await
        .expect("a decision with the admin certificate");
    let before = snapshot(&eps).await;
    let pids0 = pids(&g);
    let target = eps[0].clone();

    // 1. Plaintext: the TLS handshake fails; no handler ever runs.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{target}"))
        .expect("endpoint")
        .connect_timeout(T)
        .timeout(T)
        .connect()
        .await;
    if let Ok(ch) = plain {
        let r = pgw_proto::admin_client::AdminClient::new(ch)
            .set_paused(pause("plaintext"))
            .await;
        assert!(r.is_err(), "a plaintext call was answered: {r:?}");
    }

    // 2. A certificate from another CA, even with an allowed name: refused at the handshake.
    let other = tempfile::tempdir().expect("dir");
    let rogue = pgw_cli::certs::Authority::create(other.path(), "rogue CA", 30).expect("ca");
    let (c, k) = rogue.client("test-admin", 30).expect("client");
    // It trusts our CA (so it can verify the member), but its own certificate is the rogue's.
    let auth = ClientAuth::from_files(Some(&pki().ca), Some(&c), Some(&k), None).expect("creds");
    match connect_as(&target, T, &auth).await {
        Err(_) => {}
        Ok(mut c) => {
            let r = c.set_paused(pause("rogue")).await;
            assert!(r.is_err(), "a rogue certificate was accepted: {r:?}");
        }
    }
    // A member of the rogue CA cannot speak Raft either.
    let (mc, mk) = rogue
        .member("room-b", &["127.0.0.1".into()], 30)
        .expect("m");
    let rogue_member =
        ClientAuth::from_files(Some(&pki().ca), Some(&mc), Some(&mk), None).expect("creds");
    if let Ok(ch) = channel_as(&target, T, &rogue_member).await {
        let r = RaftClient::new(ch)
            .append_entries(RaftRequest {
                identity: Some(identity(&g, "room-b")),
                payload: append(before.term + 100, 2),
            })
            .await;
        assert!(r.is_err(), "rogue member's AppendEntries answered: {r:?}");
    }

    // 3. A real member's certificate claiming to be another member.
    let a = member_auth("room-a");
    let b_id = identity(&g, "room-b");
    let target_b = g.members[1].grpc();
    let mut raft = raft_client(&target_b, &a).await;
    let r = raft
        .append_entries(RaftRequest {
            identity: Some(identity(&g, "room-c")),
            payload: append(before.term + 100, 3),
        })
        .await
        .expect_err("impersonation refused");
    assert_eq!(r.code(), tonic::Code::PermissionDenied, "{r:?}");
    assert!(r.message().contains("only speak for itself"), "{r:?}");
    // Its own identity, but a vote for another member (a leader id it does not hold).
    let r = raft
        .append_entries(RaftRequest {
            identity: Some(identity(&g, "room-a")),
            payload: append(before.term + 100, b_id.from),
        })
        .await
        .expect_err("foreign vote refused");
    assert_eq!(r.code(), tonic::Code::PermissionDenied, "{r:?}");
    // A report for another member.
    let mut admin_a = connect_as(&target_b, T, &a).await.expect("connect");
    let obs = serde_json::json!({
        "member": "room-c", "cluster": "global", "role": "down", "timeline": 1,
        "flush_lsn": 0, "replay_lsn": 0, "streaming": false, "epoch_seen": 0,
        "crashed": true, "standbys": {}
    });
    let r = admin_a
        .report(ReportRequest {
            identity: Some(identity(&g, "room-a")),
            observation: serde_json::to_vec(&obs).expect("json"),
            ..Default::default()
        })
        .await
        .expect_err("report for another member refused");
    assert_eq!(r.code(), tonic::Code::PermissionDenied, "{r:?}");
    // A member certificate cannot act as an operator.
    let r = admin_a
        .set_paused(pause("member as operator"))
        .await
        .expect_err("member refused as operator");
    assert_eq!(r.code(), tonic::Code::PermissionDenied, "{r:?}");

    // A relayed report without its member's signature (or with another member's) is refused.
    let mut relay = tonic::Request::new(ReportRequest {
        identity: Some(identity(&g, "room-a")),
        observation: serde_json::to_vec(&obs).expect("json"),
        ..Default::default()
    });
    relay.metadata_mut().insert(
        "x-pgw-forwarded",
        tonic::metadata::MetadataValue::from_static("1"),
    );
    let r = admin_a
        .report(relay)
        .await
        .expect_err("unsigned relay refused");
    assert_eq!(r.code(), tonic::Code::PermissionDenied, "{r:?}");
    assert!(r.message().contains("relayed by `room-a` refused"), "{r:?}");
    // A member naming an operator when forwarding gets that operator's own role at most.
    for (op, role, code) in [
        ("nobody", "admin", tonic::Code::Unauthenticated),
        ("test-read", "admin", tonic::Code::PermissionDenied),
    ] {
        let mut fwd = tonic::Request::new(pause("forged forward"));
        let md = fwd.metadata_mut();
        md.insert(
            "x-pgw-forwarded",
            tonic::metadata::MetadataValue::from_static("1"),
        );
        md.insert("x-pgw-caller", op.parse().expect("ascii"));
        md.insert("x-pgw-role", role.parse().expect("ascii"));
        let e = admin_a
            .set_paused(fwd)
            .await
            .expect_err("forged forward refused");
        assert_eq!(e.code(), code, "{op}: {e:?}");
    }
    // Terms near u64::MAX (they would overflow openraft's next election) and unreadable
    // snapshots (they would stop the member as a storage error): refused up front.
    let e = raft
        .append_entries(RaftRequest {
            identity: Some(identity(&g, "room-a")),
            payload: append(u64::MAX / 2 + 7, 1),
        })
        .await
        .expect_err("huge term refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let garbage = openraft::raft::InstallSnapshotRequest::<TypeConfig> {
        vote: Vote::new_committed(before.term, 1),
        meta: SnapshotMeta {
            last_log_id: None,
            last_membership: StoredMembership::default(),
            snapshot_id: "garbage".into(),
        },
        offset: 0,
        data: b"this is not a snapshot".to_vec(),
        done: true,
    };
    let e = raft
        .install_snapshot(RaftRequest {
            identity: Some(identity(&g, "room-a")),
            payload: serde_json::to_vec(&garbage).expect("json"),
        })
        .await
        .expect_err("unreadable snapshot refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

    // 4. Roles: read cannot operate, operate cannot force.
    let mut read = connect_as(&target, T, &pki().client("read"))
        .await
        .expect("read");
    read.status(StatusRequest {}).await.expect("read may read");
    for r in [
        read.set_paused(pause("read")).await.map(|_| ()),
        read.switchover(SwitchoverRequest {
            cluster: "global".into(),
            target: String::new(),
            room: String::new(),
            all: false,
        })
        .await
        .map(|_| ()),
    ] {
        let e = r.expect_err("read refused");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("needs the `operate` role"), "{e:?}");
        assert!(e.message().contains("`test-read` has `read`"), "{e:?}");
    }
    let mut operate = connect_as(&target, T, &pki().client("operate"))
        .await
        .expect("operate");
    for c in [&mut read, &mut operate] {
        let e = c
            .failover(FailoverRequest {
                cluster: "global".into(),
                target: "room-b".into(),
                accept_data_loss: true,
            })
            .await
            .expect_err("force refused");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("needs the `admin` role"), "{e:?}");
    }

    // 5. Forged Raft traffic from a non-member (an operator's admin certificate).
    let mut forged = raft_client(&target, &pki().client("admin")).await;
    for payload in [
        append(before.term + 1000, 2),
        snapshot_chunk(before.term + 1000, 2, 1 << 62),
    ] {
        let e = forged
            .append_entries(RaftRequest {
                identity: Some(b_id.clone()),
                payload: payload.clone(),
            })
            .await
            .expect_err("non-member refused");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        let e = forged
            .install_snapshot(RaftRequest {
                identity: Some(b_id.clone()),
                payload,
            })
            .await
            .expect_err("non-member refused");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    }
    // A snapshot for another cluster, and chunks out of order, even from a member: refused.
    let mut other_cluster = identity(&g, "room-a");
    other_cluster.cluster_id = "another-cluster".into();
    let e = raft
        .install_snapshot(RaftRequest {
            identity: Some(other_cluster),
            payload: snapshot_chunk(1, 1, 0),
        })
        .await
        .expect_err("other cluster refused");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    let e = raft
        .install_snapshot(RaftRequest {
            identity: Some(identity(&g, "room-a")),
            payload: snapshot_chunk(before.term, 1, 1 << 62),
        })
        .await
        .expect_err("far offset refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    // Garbage where JSON is expected.
    let e = raft
        .vote(RaftRequest {
            identity: Some(identity(&g, "room-a")),
            payload: vec![0xff; 100],
        })
        .await
        .expect_err("garbage refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

    // 6. The pgwctl CLI names the role a caller lacks.
    let out = std::process::Command::new(PGWCTL)
        .args(pki().pgwctl_args("read"))
        .args(["--endpoints", &eps.join(","), "pause", "global"])
        .output()
        .expect("pgwctl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("permission denied: SetPaused needs the `operate` role"),
        "{err}"
    );
    assert!(!err.contains("status:") && !err.contains("Code"), "{err}");

    // Nothing changed, nobody died.
    all_running(&mut g);
    assert_eq!(pids(&g), pids0);
    let after = snapshot(&eps).await;
    assert_eq!(after, before, "a refused caller changed something");

    // An operator with the right role: recorded by name.
    let r = pgw_cli::client::connect_as(&target, T, &pki().client("operate"))
        .await
        .expect("operate")
        .set_paused(pause("maintenance"))
        .await
        .expect("operate may pause");
    assert!(r.into_inner().result.contains("applied"));
    let out = std::process::Command::new(PGWCTL)
        .args(pki().pgwctl_args("read"))
        .args(["--endpoints", &eps.join(","), "history", "global"])
        .output()
        .expect("pgwctl history");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("paused") && l.contains("asked by test-operate")),
        "{text}"
    );
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_reports_for_made_up_members_leave_the_leaders_memory_flat() {
    let mut g = Group::new(&THREE);
    g.start_all();
    let eps = g.endpoints();
    let s = wait_leader(&eps, None, LIMIT).await;
    let leader = s.leader.clone().expect("leader");
    let li = g.index_of(&leader);
    let sender = g
        .members
        .iter()
        .find(|m| m.name() != leader)
        .expect("other");
    let sender_name = sender.name().to_string();
    let pid = g.members[li].child.as_ref().expect("running").id();
    let auth = member_auth(&sender_name);
    let ch = channel_as(&g.members[li].grpc(), T, &auth)
        .await
        .expect("channel");
    let ident = identity(&g, &sender_name);
    let send = |i: u32, relayed: bool| {
        let mut c = pgw_proto::admin_client::AdminClient::new(ch.clone());
        let ident = ident.clone();
        async move {
            let obs = serde_json::json!({
                "member": format!("made-up-{i}"), "cluster": format!("cluster-{}", i % 7),
                "role": "primary", "timeline": 1, "flush_lsn": i, "replay_lsn": 0,
                "streaming": false, "epoch_seen": 0, "crashed": false,
                "standbys": {"x": "sync"}
            });
            let mut req = tonic::Request::new(ReportRequest {
                identity: Some(ident),
                observation: serde_json::to_vec(&obs).expect("json"),
                ..Default::default()
            });
            if relayed {
                req.metadata_mut().insert(
                    "x-pgw-forwarded",
                    tonic::metadata::MetadataValue::from_static("1"),
                );
            }
            c.report(req).await
        }
    };
    // Warm up (connections, allocator), then measure.
    for i in 0..200 {
        let _ = send(i, true).await;
    }
    let rss0 = rss_kib(pid);
    let t0 = Instant::now();
    let mut refused = 0u32;
    let total = 10_000u32;
    let mut i = 0;
    while i < total {
        let batch: Vec<_> = (i..(i + 50).min(total))
            .map(|k| send(k, k % 2 == 0))
            .collect();
        for r in futures_util::future::join_all(batch).await {
            if r.is_err() {
                refused += 1;
            }
        }
        i += 50;
        assert!(t0.elapsed() < Duration::from_secs(240), "flood too slow");
    }
    let rss1 = rss_kib(pid);
    assert_eq!(refused, total, "every made-up report must be refused");
    assert!(
        rss1 <= rss0 + 4096,
        "leader memory grew from {rss0} KiB to {rss1} KiB"
    );
    let (_, metrics) = http_get(&g.members[li].http(), "/metrics").await;
    let dropped: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("pgwatcher_reports_dropped_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        dropped >= f64::from(total / 2),
        "dropped counter {dropped}\n{metrics}"
    );
    eprintln!(
        "10,000 made-up reports in {:?}: leader RSS {rss0} KiB -> {rss1} KiB, {dropped} counted as dropped",
        t0.elapsed()
    );
    all_running(&mut g);
    // The real members' reports still count (the group still works).
    pgw_cli::set_paused(&eps, "global", true, "after the flood")
        .await
        .expect("commits");
}

/// Mounts a small tmpfs for the test and unmounts it when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mkdir");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("mount");
        assert!(
            ok.success(),
            "mounting a tmpfs needs root (CI runs as root)"
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the filesystem of `dir` with `dir/filler` until it is full.
fn fill(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let p = dir.join("filler");
    let mut f = std::fs::File::create(&p).expect("filler");
    let block = vec![0u8; 4096];
    while f.write_all(&block).is_ok() {}
    let _ = f.sync_all();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_the_member_naming_its_store_and_a_restart_loses_nothing() {
    let mut g = Group::new(&THREE);
    // room-c keeps its Raft store on a small filesystem of its own.
    let ci = 2;
    let fs_dir = g.dir.path().join("small-fs");
    let _mnt = Tmpfs::mount(&fs_dir, "8m");
    g.members[ci].cfg.data_dir = fs_dir.join("data");
    g.start_all();
    let eps = g.endpoints();
    wait_leader(&eps, None, LIMIT).await;
    let mut acked: Vec<u64> = Vec::new();
    for k in 0..5 {
        let r = pgw_cli::set_paused(&eps, "global", k % 2 == 0, &format!("before-{k}"))
            .await
            .expect("commits");
        assert!(r.result.contains("applied"), "{r:?}");
        acked.push(r.log_index);
    }
    let filler = fill(&fs_dir);
    // Keep deciding (the group has a majority without room-c) until room-c stops.
    let t0 = Instant::now();
    let mut stopped = None;
    let mut k = 0u32;
    while stopped.is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "room-c kept running on a full disk: {}",
            g.log_text(ci)
        );
        let pad = "x".repeat(2000);
        // Only decisions that changed something leave a history entry.
        if let Ok(r) = pgw_cli::set_paused(
            &eps,
            "global",
            k.is_multiple_of(2),
            &format!("full-{k}-{pad}"),
        )
        .await
        {
            if r.result.contains("applied") {
                acked.push(r.log_index);
            }
        }
        k += 1;
        let c = g.members[ci].child.as_mut().expect("running");
        if let Some(st) = c.try_wait().expect("wait") {
            stopped = Some((st, Instant::now()));
        }
    }
    let (status, at) = stopped.expect("stopped");
    let stop_after = at.duration_since(t0);
    assert!(!status.success(), "must exit non-zero, got {status:?}");
    let log = g.log_text(ci);
    assert!(
        log.contains("raft.redb") && log.contains("storage failed"),
        "the exit must name the store: {log}"
    );
    g.members[ci].child = None;
    wait_leader(&eps, Some("room-c"), LIMIT).await;
    // A few more decisions while it is down.
    for k in 0..3 {
        let r = pgw_cli::set_paused(&eps, "global", k % 2 == 0, &format!("while-down-{k}"))
            .await
            .expect("commits without room-c");
        if r.result.contains("applied") {
            acked.push(r.log_index);
        }
    }
    // Space freed: it restarts from its store and catches up, with every acknowledged entry.
    std::fs::remove_file(&filler).expect("free space");
    g.start(ci);
    let me = [g.members[ci].grpc()];
    let last = *acked.iter().max().expect("acked");
    let t1 = Instant::now();
    loop {
        if let Ok(s) = pgw_cli::status::member_status(&me[0], T).await {
            if s.last_applied >= last {
                break;
            }
        }
        assert!(
            t1.elapsed() < LIMIT,
            "room-c did not catch up: {}",
            g.log_text(ci)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let indexes =
        |h: Vec<pgw_proto::HistoryEntry>| -> Vec<u64> { h.iter().map(|e| e.log_index).collect() };
    let h = indexes(history(&me[0], "global", 100_000).await);
    // Its history is the group's, entry for entry.
    let h0 = indexes(history(&eps[0], "global", 100_000).await);
    assert_eq!(h, h0, "room-c's history differs from room-a's");
    // The history keeps the latest 256 entries: every acknowledged decision in that window
    // must be there.
    let oldest = h.first().copied().unwrap_or(0);
    let missing: Vec<u64> = acked
        .iter()
        .filter(|i| **i >= oldest && !h.contains(i))
        .copied()
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged decisions missing on room-c: {missing:?} (history {h:?})"
    );
    assert!(acked.iter().any(|i| *i >= oldest && h.contains(i)));
    eprintln!(
        "room-c stopped {:?} after its disk filled, after {k} decisions on a full disk",
        stop_after
    );
}

/// A request over HTTPS, trusting the test CA.
async fn https_request(addr: &str, method: &str, path: &str) -> (u16, String) {
    let mut cfg = pgw_server::tls::client_config(&pki().ca, None).expect("client config");
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
    let s = pgw_server::tls::connect(tcp, host, std::sync::Arc::new(cfg))
        .await
        .expect("TLS handshake with the member's certificate");
    http_exchange(s, addr, method, path).await
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(f64::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_without_restart_tokens_grant_roles_and_http_is_read_only() {
    let mut g = Group::new(&THREE);
    // room-a: its own copy of its certificate (replaced below), HTTPS on its HTTP port.
    let own = g.dir.path().join("room-a-tls");
    std::fs::create_dir_all(&own).expect("mkdir");
    let (cert, key) = pki().member_into(&own, "room-a", 20);
    g.members[0].cfg.tls.cert = cert.clone();
    g.members[0].cfg.tls.key = key.clone();
    g.members[0].cfg.tls.http = true;
    // An operate token, on every member (any member may take the call).
    let token_path = g.dir.path().join("operate.token");
    std::fs::write(&token_path, "s3cret-operate-token-0123456789\n").expect("token");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token_path, std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
    }
    for m in &mut g.members {
        m.cfg.auth.operate_token_file = Some(token_path.clone());
    }
    g.start_all();
    let eps = g.endpoints();
    wait_leader(&eps, None, LIMIT).await;
    let a_http = g.members[0].http();
    let a_grpc = g.members[0].grpc();

    // HTTP: HTTPS on room-a, plain on room-b; GET answers, anything else is refused.
    let (code, body) = https_request(&a_http, "GET", "/health").await;
    assert_eq!(code, 200, "{body}");
    let (code, _) = https_request(&a_http, "POST", "/health").await;
    assert_eq!(code, 405);
    let (code, _) = http_get(&g.members[1].http(), "/health").await;
    assert_eq!(code, 200);
    let (_, metrics) = https_request(&a_http, "GET", "/metrics").await;
    let expiry0 = metric(&metrics, "pgwatcher_tls_cert_expiry_timestamp_seconds").expect("expiry");

    // Tokens: no certificate, the operate token: may pause, is recorded, may not force.
    let token_auth = ClientAuth::from_files(Some(&pki().ca), None, None, Some(&token_path))
        .expect("token creds");
    let mut c = connect_as(&eps[1], T, &token_auth).await.expect("connect");
    let r = c
        .set_paused(pause("by token"))
        .await
        .expect("the operate token may pause");
    assert!(r.into_inner().result.contains("applied"));
    let e = c
        .failover(FailoverRequest {
            cluster: "global".into(),
            target: "room-b".into(),
            accept_data_loss: true,
        })
        .await
        .expect_err("operate token may not force");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let bad = g.dir.path().join("bad.token");
    std::fs::write(&bad, "not-the-token-at-all-0000").expect("write");
    let bad_auth = ClientAuth::from_files(Some(&pki().ca), None, None, Some(&bad)).expect("c");
    let e = connect_as(&eps[1], T, &bad_auth)
        .await
        .expect("connect")
        .status(StatusRequest {})
        .await
        .expect_err("a wrong token is refused");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    // A token never makes a member.
    let e = RaftClient::new(channel_as(&eps[1], T, &token_auth).await.expect("ch"))
        .vote(RaftRequest {
            identity: Some(identity(&g, "room-a")),
            payload: vec![],
        })
        .await
        .expect_err("token refused for Raft");
    assert!(
        matches!(
            e.code(),
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
        ),
        "{e:?}"
    );
    // The same through the CLI: --token-file with --ca; the credentials from PGW_* variables;
    // and a client config file.
    let out = std::process::Command::new(PGWCTL)
        .args(["--ca", &pki().ca.display().to_string()])
        .args(["--token-file", &token_path.display().to_string()])
        .args(["--endpoints", &eps.join(","), "resume", "global"])
        .output()
        .expect("pgwctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, rc, rk) = &pki().group.clients["read"];
    let out = std::process::Command::new(PGWCTL)
        .env("PGW_CA", &pki().ca)
        .env("PGW_CERT", rc)
        .env("PGW_KEY", rk)
        .env("PGW_ENDPOINTS", eps.join(","))
        .args(["status", "--format", "json"])
        .output()
        .expect("pgwctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"leader\""));
    let client_cfg = g.dir.path().join("pgwctl.toml");
    std::fs::write(
        &client_cfg,
        format!(
            "endpoints = [{}]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            eps.iter()
                .map(|e| format!("{e:?}"))
                .collect::<Vec<_>>()
                .join(", "),
            pki().ca,
            rc,
            rk
        ),
    )
    .expect("client config");
    let out = std::process::Command::new(PGWCTL)
        .args([
            "--client-config",
            &client_cfg.display().to_string(),
            "pause",
            "global",
        ])
        .output()
        .expect("pgwctl");
    assert!(!out.status.success(), "read may not pause");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs the `operate` role"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let h = history(&eps[0], "global", 10).await;
    assert!(
        h.iter().any(|e| e.event.contains("asked by token:operate")),
        "{h:?}"
    );

    // Reload: a new certificate (10 days) replaces the files; SIGHUP; served without restart.
    let pid = g.members[0].child.as_ref().expect("running").id();
    pki().member_into(&own, "room-a", 10);
    let new_expiry = pgw_server::tls::load_certs("c", &cert)
        .ok()
        .and_then(|c| pgw_server::x509::parse(c[0].as_ref()))
        .and_then(|i| i.not_after)
        .expect("new expiry") as f64;
    assert!(new_expiry < expiry0);
    g.signal_watcher(0, libc::SIGHUP);
    let t0 = Instant::now();
    loop {
        let (_, m) = https_request(&a_http, "GET", "/metrics").await;
        if metric(&m, "pgwatcher_tls_cert_expiry_timestamp_seconds") == Some(new_expiry) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "not reloaded: {m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pgw_cli::status::member_status(&a_grpc, T)
        .await
        .expect("room-a serves with its new certificate");
    // A broken key is refused; the previous certificates stay in use.
    std::fs::write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n",
    )
    .expect("break key");
    g.signal_watcher(0, libc::SIGHUP);
    let t0 = Instant::now();
    loop {
        let (_, m) = https_request(&a_http, "GET", "/metrics").await;
        if metric(&m, "pgwatcher_tls_reload_failures_total").unwrap_or(0.0) >= 1.0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "failure not counted: {m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pgw_cli::status::member_status(&a_grpc, T)
        .await
        .expect("still serving with the previous certificate");
    assert_eq!(g.members[0].child.as_ref().map(|c| c.id()), Some(pid));
    all_running(&mut g);
}
