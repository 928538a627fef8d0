//! Storage: openraft's own storage suite on our store, plus durability across `kill -9`,
//! reopen, corruption and foreign-directory checks.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, EntryPayload, LogId, RaftLogReader, RaftSnapshotBuilder, Vote};
use pgw_core::{Command as Cmd, Config, Proposal};
use pgw_server::raft::store::{self, LogStore, StateMachineStore, StoreError};
use pgw_server::raft::types::{Entry, StorageError, TypeConfig};

fn config_for(dir: &Path, member: &str) -> Config {
    let text = format!(
        r#"
cluster_id = "t"
member = "{member}"
data_dir = "{}"
[[members]]
name = "a"
id = 1
role = "data"
grpc = "127.0.0.1:1"
http = "127.0.0.1:2"
[[members]]
name = "b"
id = 2
role = "data"
grpc = "127.0.0.1:3"
http = "127.0.0.1:4"
[[members]]
name = "c"
id = 3
role = "arbiter"
grpc = "127.0.0.1:5"
http = "127.0.0.1:6"
[tls]
ca = "/nonexistent/ca.crt"
cert = "/nonexistent/a.crt"
key = "/nonexistent/a.key"
"#,
        dir.display()
    );
    let c = Config::from_toml(&text, "test").expect("parses");
    c.validate().expect("valid");
    c
}

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config_for(&dir.path().join("data"), "a");
        let (log, sm) = store::open(&cfg).expect("opens");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    if let Err(e) = Suite::test_all(Builder) {
        panic!("openraft storage suite: {e}");
    }
}

fn entry(term: u64, index: u64) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
        payload: EntryPayload::Normal(Proposal {
            command: Cmd::SetPaused {
                cluster: "global".into(),
                paused: index.is_multiple_of(2),
                reason: format!("entry {index}"),
            },
            at_ms: index,
            by: "test".into(),
            asked_by: None,
        }),
    }
}

/// Not a test on its own: when `PGW_CHILD_DIR` is set, this is the child process of
/// `acknowledged_entries_survive_kill_9`. It appends entries one by one and prints the index of
/// each only after `append_durable` returned, until it is killed.
#[tokio::test]
async fn child_writer_process() {
    let Ok(dir) = std::env::var("PGW_CHILD_DIR") else {
        return;
    };
    let cfg = config_for(Path::new(&dir), "a");
    let (mut log, _sm) = store::open(&cfg).expect("child opens store");
    log.save_vote(&Vote::new(1, 1)).await.expect("vote");
    println!("vote");
    for i in 1..=100_000u64 {
        log.append_durable([entry(1, i)]).expect("append");
        println!("ack {i}");
    }
}

#[tokio::test]
async fn acknowledged_entries_survive_kill_9() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let exe = std::env::current_exe().expect("test binary");
    let out_path = tmp.path().join("acks.txt");
    let out = std::fs::File::create(&out_path).expect("acks file");
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "child_writer_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("PGW_CHILD_DIR", &data)
        .stdout(out)
        .spawn()
        .expect("spawn child");
    // Let it write for a while, then kill it mid-stream.
    let mut acked = 0;
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(25)).await;
        let text = std::fs::read_to_string(&out_path).unwrap_or_default();
        acked = text.lines().filter(|l| l.starts_with("ack ")).count();
        if acked >= 50 {
            break;
        }
    }
    child.kill().expect("SIGKILL child");
    let _ = child.wait();
    let text = std::fs::read_to_string(&out_path).expect("acks");
    let last_ack: u64 = text
        .lines()
        .filter_map(|l| l.strip_prefix("ack "))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .expect("the child acknowledged something");
    assert!(acked > 0);
    let cfg = config_for(&data, "a");
    let (mut log, _sm) = store::open(&cfg).expect("reopen after kill");
    assert_eq!(log.read_vote().await.expect("vote"), Some(Vote::new(1, 1)));
    let st = log.get_log_state().await.expect("state");
    let last = st.last_log_id.expect("has entries").index;
    assert!(
        last >= last_ack,
        "acknowledged {last_ack} but only {last} on disk"
    );
    let entries = log.try_get_log_entries(1..=last).await.expect("read back");
    assert_eq!(entries.len() as u64, last, "no gaps");
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.log_id.index, i as u64 + 1);
    }
}

#[tokio::test]
async fn state_survives_reopen_via_snapshot_and_log() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = config_for(&tmp.path().join("d"), "a");
    {
        let (mut log, mut sm) = store::open(&cfg).expect("open");
        let ensure = Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
            payload: EntryPayload::Normal(Proposal {
                command: Cmd::EnsureCluster {
                    cluster: "global".into(),
                    sync_quorum: 1,
                    standby: false,
                },
                at_ms: 0,
                by: "t".into(),
                asked_by: None,
            }),
        };
        let entries = vec![ensure, entry(1, 2), entry(1, 3)];
        log.append_durable(entries.clone()).expect("append");
        log.save_committed(Some(entries[2].log_id))
            .await
            .expect("commit");
        sm.apply(entries).await.expect("apply");
        let mut b = sm.get_snapshot_builder().await;
        b.build_snapshot().await.expect("snapshot");
    }
    let (mut log, mut sm) = store::open(&cfg).expect("reopen");
    let (applied, _) = sm.applied_state().await.expect("applied");
    assert_eq!(applied.map(|l| l.index), Some(3));
    assert_eq!(
        log.read_committed().await.expect("c").map(|l| l.index),
        Some(3)
    );
    let facts = sm.applied().facts;
    let g = facts
        .cluster("global")
        .expect("cluster restored from snapshot");
    assert!(!g.paused, "entry 3 resumed it");
    assert_eq!(g.history.len(), 3, "registered, paused, resumed");
    assert!(sm.get_current_snapshot().await.expect("snap").is_some());
}

fn open_err(cfg: &Config) -> StoreError {
    match store::open(cfg) {
        Ok(_) => panic!("expected the data directory to be refused"),
        Err(e) => e,
    }
}

#[test]
fn foreign_or_mismatching_directories_are_refused_by_name() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("d");
    let cfg = config_for(&dir, "a");
    drop(store::open(&cfg).expect("first open"));

    // Another member's config pointed at this directory.
    let e = open_err(&config_for(&dir, "b")).to_string();
    assert!(e.contains("identity.pgw") && e.contains("member"), "{e}");

    // Another cluster id.
    let mut other = cfg.clone();
    other.cluster_id = "other".into();
    let e = open_err(&other).to_string();
    assert!(e.contains("cluster_id"), "{e}");

    // A stray file.
    std::fs::write(dir.join("notes.txt"), "hello").expect("write");
    let e = open_err(&cfg).to_string();
    assert!(e.contains("notes.txt"), "{e}");
    std::fs::remove_file(dir.join("notes.txt")).expect("rm");

    // A deleted database is not silently recreated.
    std::fs::rename(dir.join(store::DB_FILE), tmp.path().join("moved")).expect("mv");
    let e = open_err(&cfg).to_string();
    assert!(e.contains("raft.redb") && e.contains("missing"), "{e}");
    std::fs::rename(tmp.path().join("moved"), dir.join(store::DB_FILE)).expect("mv back");

    // A corrupted identity file.
    let id = dir.join(store::IDENTITY_FILE);
    let mut bytes = std::fs::read(&id).expect("read");
    let n = bytes.len() - 2;
    bytes[n] ^= 0x55;
    std::fs::write(&id, bytes).expect("write");
    let e = open_err(&cfg).to_string();
    assert!(e.contains("identity.pgw") && e.contains("checksum"), "{e}");
}

#[test]
fn corrupted_database_is_refused_by_name() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("d");
    let cfg = config_for(&dir, "a");
    drop(store::open(&cfg).expect("first open"));
    std::fs::write(dir.join(store::DB_FILE), vec![0xA5u8; 8192]).expect("garbage");
    let e = open_err(&cfg).to_string();
    assert!(e.contains("raft.redb"), "{e}");
}
