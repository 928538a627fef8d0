//! Durable Raft storage.
//!
//! Layout of a data directory (nothing else is allowed in it):
//! - `identity.pgw`: framed JSON naming the cluster id, member, node id and member-list
//!   fingerprint this directory belongs to. Written once, before anything else.
//! - `raft.redb`: vote, committed log id, purge point and log entries in a redb database
//!   (pure Rust, ACID; every commit is fsynced before we acknowledge). Each value carries its
//!   own CRC32 so a damaged record is reported rather than applied.
//! - `snapshot.pgw`: the latest state-machine snapshot, framed and written crash-safely.
//! - `lease.pgw`: when this member last renewed a primary lease (`sidecar::lease_record`).
//! - `forced.pgw`: only between the two steps of `pg-watcher --force-new-group`: the new
//!   generation's identity, roster and snapshot in one file (the commit point), carried into
//!   the files above (the log is dropped) by [`finish_forced`], which every open runs first.
//! - `roster.pgw`: the group's member list as last applied here, once it differs from the
//!   founding list of the config files (`pgw_core::roster`); read at start before anything
//!   talks to a peer, and written by `--join` with the list the group gave.
//!
//! The state machine itself lives in memory and is rebuilt at start from the snapshot plus the
//! committed log (openraft re-applies committed entries at start because we persist
//! `committed`).

// openraft's trait methods return `StorageError`, which is large; our helpers return the same
// type so errors pass through unchanged.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, StorageIOError,
};
use pgw_core::roster::Roster;
use pgw_core::{Config, Facts, Outcome};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::durable::{self, Kind};
use crate::raft::types::{
    Entry, LogId, NodeId, SnapshotMeta, StorageError, StoredMembership, TypeConfig, Vote,
};

const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("logs");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";

pub const IDENTITY_FILE: &str = "identity.pgw";
pub const ROSTER_FILE: &str = "roster.pgw";
pub const LEASE_FILE: &str = "lease.pgw";
pub const FORCED_FILE: &str = "forced.pgw";
pub const SUPERSEDED_FILE: &str = "superseded.pgw";

/// The lease record of a cluster: `lease.pgw` for the first cluster, `lease-<cluster>.pgw` for
/// the others (a member may run servers of several clusters).
pub fn lease_file(cluster: Option<&str>) -> String {
    match cluster {
        None => LEASE_FILE.to_string(),
        Some(c) => format!("lease-{c}.pgw"),
    }
}

fn is_cluster_lease(name: &str) -> bool {
    name.strip_prefix("lease-")
        .and_then(|n| n.strip_suffix(".pgw"))
        .is_some_and(|c| !c.is_empty() && !c.contains('/'))
}
pub const DB_FILE: &str = "raft.redb";
pub const SNAPSHOT_FILE: &str = "snapshot.pgw";

/// Why a data directory cannot be used. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("data directory {dir} contains a file pg-watcher did not write: {file}; refusing to start (move it away, or point data_dir at an empty directory)")]
    Foreign { dir: PathBuf, file: String },
    #[error("{file} belongs to another member: it records {field} `{stored}` but the config says `{configured}`; refusing to start")]
    Mismatch {
        file: PathBuf,
        field: &'static str,
        stored: String,
        configured: String,
    },
    #[error("{file} is missing although {identity} says the directory was initialised; refusing to start rather than silently resetting Raft state")]
    Missing { file: PathBuf, identity: PathBuf },
    #[error(transparent)]
    Durable(#[from] durable::DurableError),
    #[error("{file}: {message}")]
    Db { file: PathBuf, message: String },
    #[error("{file}: {message}")]
    Decode { file: PathBuf, message: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Identity {
    cluster_id: String,
    member: String,
    node_id: u64,
    fingerprint: String,
    members: String,
    /// False between writing the identity and creating the database (a crash there is safe).
    db_created: bool,
    /// The group generation this directory belongs to (grows with `--force-new-group`).
    #[serde(default)]
    generation: u64,
}

/// The roster stored in `dir`, if the group's member list ever changed (or was learnt by
/// `--join`).
pub fn read_roster(dir: &Path) -> Result<Option<Roster>, StoreError> {
    let path = dir.join(ROSTER_FILE);
    match durable::read(&path, Kind::Roster)? {
        Some(bytes) => Ok(Some(
            serde_json::from_slice(&bytes).map_err(|e| decode_err(&path, e))?,
        )),
        None => Ok(None),
    }
}

/// Stores `r` as this member's roster, crash-safely (before it is acted on).
pub fn write_roster(dir: &Path, r: &Roster) -> Result<(), StoreError> {
    std::fs::create_dir_all(dir).map_err(|source| durable::DurableError::Io {
        file: dir.to_path_buf(),
        source,
    })?;
    let path = dir.join(ROSTER_FILE);
    let bytes = serde_json::to_vec(r).map_err(|e| decode_err(&path, e))?;
    durable::write_atomic(&path, Kind::Roster, &bytes)?;
    Ok(())
}

fn decode_err(file: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Decode {
        file: file.to_path_buf(),
        message: e.to_string(),
    }
}

/// Opens (or creates) the data directory for `cfg`, a group that never changed its member
/// list (see [`open_with`]).
pub fn open(cfg: &Config) -> Result<(LogStore, StateMachineStore), StoreError> {
    open_with(cfg, cfg, None)
}

/// Opens (or creates) the data directory for `cfg` (the running config: the file's settings
/// with the roster's member list when there is one), checking it belongs to this member.
/// `file` is the config as read from disk: the state machine derives each cluster's servers
/// from it and the group's roster as the roster changes.
pub fn open_with(
    cfg: &Config,
    file: &Config,
    roster: Option<&Roster>,
) -> Result<(LogStore, StateMachineStore), StoreError> {
    let dir = cfg.data_dir.clone();
    let me = cfg.me().ok_or_else(|| StoreError::Decode {
        file: dir.clone(),
        message: format!("member `{}` not in config", cfg.member),
    })?;
    std::fs::create_dir_all(&dir).map_err(|source| durable::DurableError::Io {
        file: dir.clone(),
        source,
    })?;
    // Only our own files may be here. Leftover temporaries of an interrupted write are removed.
    let entries = std::fs::read_dir(&dir).map_err(|source| durable::DurableError::Io {
        file: dir.clone(),
        source,
    })?;
    for e in entries {
        let e = e.map_err(|source| durable::DurableError::Io {
            file: dir.clone(),
            source,
        })?;
        let name = e.file_name().to_string_lossy().to_string();
        match name.as_str() {
            IDENTITY_FILE | DB_FILE | SNAPSHOT_FILE | LEASE_FILE | ROSTER_FILE | FORCED_FILE
            | SUPERSEDED_FILE => {}
            n if is_cluster_lease(n) => {}
            n if n == format!("{IDENTITY_FILE}.tmp")
                || n == format!("{SNAPSHOT_FILE}.tmp")
                || n == format!("{LEASE_FILE}.tmp")
                || n == format!("{ROSTER_FILE}.tmp")
                || n == format!("{FORCED_FILE}.tmp")
                || n == format!("{SUPERSEDED_FILE}.tmp")
                || n.strip_suffix(".tmp").is_some_and(is_cluster_lease) =>
            {
                std::fs::remove_file(e.path()).map_err(|source| durable::DurableError::Io {
                    file: e.path(),
                    source,
                })?;
            }
            _ => return Err(StoreError::Foreign { dir, file: name }),
        }
    }
    // Callers finish a forced generation before reading the roster; this only makes sure.
    finish_forced(&dir)?;
    let id_path = dir.join(IDENTITY_FILE);
    let db_path = dir.join(DB_FILE);
    let wanted = Identity {
        cluster_id: cfg.cluster_id.clone(),
        member: me.name.clone(),
        node_id: me.id,
        fingerprint: roster
            .map(|r| r.group.clone())
            .unwrap_or_else(|| cfg.members_fingerprint()),
        members: cfg.members_canonical(),
        db_created: true,
        generation: roster.map(|r| r.generation).unwrap_or(0),
    };
    let stored: Option<Identity> = match durable::read(&id_path, Kind::Identity)? {
        Some(bytes) => Some(serde_json::from_slice(&bytes).map_err(|e| decode_err(&id_path, e))?),
        None => None,
    };
    let write_identity = |id: &Identity| -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(id).map_err(|e| decode_err(&id_path, e))?;
        durable::write_atomic(&id_path, Kind::Identity, &bytes)?;
        Ok(())
    };
    match &stored {
        None => {
            if db_path.exists() || dir.join(SNAPSHOT_FILE).exists() {
                return Err(StoreError::Missing {
                    file: id_path.clone(),
                    identity: id_path.clone(),
                });
            }
            write_identity(&Identity {
                db_created: false,
                ..wanted.clone()
            })?;
        }
        Some(s) => {
            // Once the group holds its member list (roster.pgw), the file's list only
            // bootstrapped it: the group's digest and generation must match instead.
            let list = if roster.is_some() {
                ("group", s.fingerprint.clone(), wanted.fingerprint.clone())
            } else {
                ("member list", s.members.clone(), wanted.members.clone())
            };
            let checks: [(&'static str, String, String); 5] = [
                (
                    "cluster_id",
                    s.cluster_id.clone(),
                    wanted.cluster_id.clone(),
                ),
                ("member", s.member.clone(), wanted.member.clone()),
                ("node id", s.node_id.to_string(), wanted.node_id.to_string()),
                list,
                (
                    "group generation",
                    s.generation.to_string(),
                    wanted.generation.to_string(),
                ),
            ];
            for (field, st, conf) in checks {
                if st != conf {
                    return Err(StoreError::Mismatch {
                        file: id_path.clone(),
                        field,
                        stored: st,
                        configured: conf,
                    });
                }
            }
            if s.db_created && !db_path.exists() {
                return Err(StoreError::Missing {
                    file: db_path.clone(),
                    identity: id_path.clone(),
                });
            }
        }
    }
    let db = open_db(&db_path)?;
    if !stored.as_ref().is_some_and(|s| s.db_created) {
        write_identity(&wanted)?;
    }
    let log = LogStore {
        db: Arc::new(db),
        file: db_path,
    };
    let founding = match roster {
        Some(r) => r.founding_config(file),
        None => file.clone(),
    };
    let sm = StateMachineStore::open(dir.join(SNAPSHOT_FILE), founding)?;
    Ok((log, sm))
}

/// A member left out of a forced recovery: a peer named a newer generation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Superseded {
    pub generation: u64,
    pub ours: u64,
    pub seen_from: String,
}

impl Superseded {
    pub fn message(&self) -> String {
        format!(
            "this member belongs to group generation {}, but `{}` is at generation {}: the group was recovered without it (pg-watcher --force-new-group). It no longer votes or leads; a primary here fences itself. It rejoins only through `pgwctl member add` (under a new id) and `pg-watcher --join`",
            self.ours, self.seen_from, self.generation
        )
    }
}

/// Records that this member was superseded (a start is refused from then on).
pub fn write_superseded(dir: &Path, s: &Superseded) -> Result<(), StoreError> {
    let path = dir.join(SUPERSEDED_FILE);
    let bytes = serde_json::to_vec(s).map_err(|e| decode_err(&path, e))?;
    durable::write_atomic(&path, Kind::Superseded, &bytes)?;
    Ok(())
}

/// Whether this member was superseded.
pub fn read_superseded(dir: &Path) -> Result<Option<Superseded>, StoreError> {
    let path = dir.join(SUPERSEDED_FILE);
    match durable::read(&path, Kind::Superseded)? {
        Some(b) => Ok(Some(
            serde_json::from_slice(&b).map_err(|e| decode_err(&path, e))?,
        )),
        None => Ok(None),
    }
}

/// Clears this member's Raft state of an older generation before it joins a newer one
/// (`pg-watcher --join`, after `pgwctl member add`): identity, log, snapshot, member list and
/// the superseded mark go; the lease records stay (they fence a primary here).
pub fn reset_for_generation(dir: &Path) -> Result<(), StoreError> {
    for f in [
        IDENTITY_FILE,
        DB_FILE,
        SNAPSHOT_FILE,
        ROSTER_FILE,
        SUPERSEDED_FILE,
    ] {
        let p = dir.join(f);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(durable::DurableError::Io { file: p, source }.into()),
        }
    }
    durable::sync_dir(dir)?;
    Ok(())
}

/// The group generation and node id this directory's identity records, if initialised.
pub fn stored_generation(dir: &Path) -> Result<Option<(u64, u64)>, StoreError> {
    let path = dir.join(IDENTITY_FILE);
    match durable::read(&path, Kind::Identity)? {
        Some(b) => {
            let id: Identity = serde_json::from_slice(&b).map_err(|e| decode_err(&path, e))?;
            Ok(Some((id.generation, id.node_id)))
        }
        None => Ok(None),
    }
}

/// What `--force-new-group` leaves for [`finish_forced`]: everything a new generation starts
/// with, in one file.
#[derive(Debug, Serialize, Deserialize)]
struct ForcedState {
    identity: Identity,
    roster: Roster,
    snapshot: SnapshotFile,
}

/// Starts a new generation in `cfg`'s data directory (`pg-watcher --force-new-group`, with
/// the member stopped): this member alone votes at first (it elects itself and the leader adds
/// the other survivors of `roster` as they join), `facts` are its applied state, at log index
/// `index`. Written as one file first (the commit point), then carried into the directory's
/// files by [`finish_forced`]; the old log is dropped.
pub fn commit_forced(
    cfg: &Config,
    roster: &Roster,
    facts: Facts,
    index: u64,
) -> Result<(), StoreError> {
    let dir = &cfg.data_dir;
    let me = cfg.me().ok_or_else(|| StoreError::Decode {
        file: dir.clone(),
        message: format!("member `{}` is not in the new member list", cfg.member),
    })?;
    let log_id = LogId::new(openraft::CommittedLeaderId::new(0, me.id), index);
    let voters: std::collections::BTreeSet<u64> = [me.id].into_iter().collect();
    let nodes: BTreeMap<u64, openraft::BasicNode> = [(
        me.id,
        openraft::BasicNode {
            addr: me.grpc.clone(),
        },
    )]
    .into_iter()
    .collect();
    let membership = openraft::Membership::new(vec![voters], nodes);
    let state = ForcedState {
        identity: Identity {
            cluster_id: cfg.cluster_id.clone(),
            member: me.name.clone(),
            node_id: me.id,
            fingerprint: roster.group.clone(),
            members: cfg.members_canonical(),
            db_created: false,
            generation: roster.generation,
        },
        roster: roster.clone(),
        snapshot: SnapshotFile {
            meta: SnapshotMeta {
                last_log_id: Some(log_id),
                last_membership: StoredMembership::new(Some(log_id), membership),
                snapshot_id: format!("forced-generation-{}-{index}", roster.generation),
            },
            facts,
        },
    };
    let path = dir.join(FORCED_FILE);
    let bytes = serde_json::to_vec(&state).map_err(|e| decode_err(&path, e))?;
    durable::write_atomic(&path, Kind::Forced, &bytes)?;
    finish_forced(dir)?;
    Ok(())
}

/// Carries a forced new generation (`forced.pgw`) into the directory's files: the snapshot,
/// the roster, no log, then the identity; removes `forced.pgw` last. Every step may be
/// repeated, so a crash anywhere is finished by the next call. Returns whether there was one.
/// Files get the directory's owner (the command may run as root for a service user).
pub fn finish_forced(dir: &Path) -> Result<bool, StoreError> {
    let path = dir.join(FORCED_FILE);
    let Some(bytes) = durable::read(&path, Kind::Forced)? else {
        return Ok(false);
    };
    let st: ForcedState = serde_json::from_slice(&bytes).map_err(|e| decode_err(&path, e))?;
    let snap_path = dir.join(SNAPSHOT_FILE);
    let snap = serde_json::to_vec(&st.snapshot).map_err(|e| decode_err(&snap_path, e))?;
    durable::write_atomic(&snap_path, Kind::Snapshot, &snap)?;
    let db = dir.join(DB_FILE);
    match std::fs::remove_file(&db) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(durable::DurableError::Io { file: db, source }.into()),
    }
    write_roster(dir, &st.roster)?;
    let id_path = dir.join(IDENTITY_FILE);
    let id = serde_json::to_vec(&st.identity).map_err(|e| decode_err(&id_path, e))?;
    durable::write_atomic(&id_path, Kind::Identity, &id)?;
    own_like_dir(dir)?;
    std::fs::remove_file(&path).map_err(|source| durable::DurableError::Io {
        file: path.clone(),
        source,
    })?;
    durable::sync_dir(dir)?;
    Ok(true)
}

/// Gives every file in `dir` the directory's owner and group (when they differ).
fn own_like_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::MetadataExt;
    let io = |file: &Path| {
        let file = file.to_path_buf();
        move |source| durable::DurableError::Io { file, source }
    };
    let d = std::fs::metadata(dir).map_err(io(dir))?;
    for e in std::fs::read_dir(dir).map_err(io(dir))? {
        let p = e.map_err(io(dir))?.path();
        let m = std::fs::symlink_metadata(&p).map_err(io(&p))?;
        if m.is_file() && (m.uid() != d.uid() || m.gid() != d.gid()) {
            std::os::unix::fs::chown(&p, Some(d.uid()), Some(d.gid())).map_err(io(&p))?;
        }
    }
    Ok(())
}

/// This member's last applied state: the snapshot with every entry of the local log after it
/// applied (committed or not: an entry this member holds may have been committed by the group
/// it can no longer ask, so a forced recovery keeps it), and the last log index.
pub async fn last_state(
    log: &mut LogStore,
    sm: &mut StateMachineStore,
) -> Result<(Facts, u64), StorageError> {
    let (applied, _) = sm.applied_state().await?;
    let from = applied.map(|l| l.index + 1).unwrap_or(0);
    let entries = log.entries(from..)?;
    let last = entries
        .last()
        .map(|e| e.log_id.index)
        .or(applied.map(|l| l.index))
        .unwrap_or(0);
    sm.apply(entries).await?;
    Ok((sm.applied().facts, last))
}

fn open_db(path: &Path) -> Result<Database, StoreError> {
    let db_err = |m: String| StoreError::Db {
        file: path.to_path_buf(),
        message: m,
    };
    let db =
        Database::create(path).map_err(|e| db_err(format!("cannot open Raft database: {e}")))?;
    // Create the tables so readers never see "table does not exist".
    let tx = db.begin_write().map_err(|e| db_err(e.to_string()))?;
    tx.open_table(LOGS).map_err(|e| db_err(e.to_string()))?;
    tx.open_table(META).map_err(|e| db_err(e.to_string()))?;
    tx.commit().map_err(|e| db_err(e.to_string()))?;
    Ok(db)
}

/// A record value: CRC32 (LE) followed by JSON.
fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, serde_json::Error> {
    let json = serde_json::to_vec(v)?;
    let mut out = Vec::with_capacity(json.len() + 4);
    out.extend_from_slice(&crc32fast::hash(&json).to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, String> {
    if bytes.len() < 4 {
        return Err("record shorter than its checksum".into());
    }
    let crc = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if crc32fast::hash(&bytes[4..]) != crc {
        return Err("record checksum mismatch".into());
    }
    serde_json::from_slice(&bytes[4..]).map_err(|e| e.to_string())
}

fn sio(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    file: &Path,
    e: impl std::fmt::Display,
) -> StorageError {
    StorageIOError::new(
        subject,
        verb,
        AnyError::error(format!("{}: {e}", file.display())),
    )
    .into()
}

/// The Raft log, vote and commit point, in `raft.redb`.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    file: PathBuf,
}

impl LogStore {
    fn read_meta<T: for<'de> Deserialize<'de>>(
        &self,
        key: &str,
        subject: ErrorSubject<NodeId>,
    ) -> Result<Option<T>, StorageError> {
        let f = &self.file;
        let tx = self
            .db
            .begin_read()
            .map_err(|e| sio(subject.clone(), ErrorVerb::Read, f, e))?;
        let t = tx
            .open_table(META)
            .map_err(|e| sio(subject.clone(), ErrorVerb::Read, f, e))?;
        let v = t
            .get(key)
            .map_err(|e| sio(subject.clone(), ErrorVerb::Read, f, e))?;
        match v {
            None => Ok(None),
            Some(g) => decode(g.value())
                .map(Some)
                .map_err(|e| sio(subject, ErrorVerb::Read, f, format!("key `{key}`: {e}"))),
        }
    }

    fn write_meta<T: Serialize>(
        &self,
        key: &str,
        v: &T,
        subject: ErrorSubject<NodeId>,
    ) -> Result<(), StorageError> {
        let f = &self.file;
        let w = |e: &dyn std::fmt::Display| sio(subject.clone(), ErrorVerb::Write, f, e);
        let bytes = encode(v).map_err(|e| w(&e))?;
        let tx = self.db.begin_write().map_err(|e| w(&e))?;
        {
            let mut t = tx.open_table(META).map_err(|e| w(&e))?;
            t.insert(key, bytes.as_slice()).map_err(|e| w(&e))?;
        }
        tx.commit().map_err(|e| w(&e))?;
        Ok(())
    }

    /// Entries in `range`, verified and decoded.
    fn entries<RB: RangeBounds<u64>>(&self, range: RB) -> Result<Vec<Entry>, StorageError> {
        let f = &self.file;
        let r = |e: &dyn std::fmt::Display| sio(ErrorSubject::Logs, ErrorVerb::Read, f, e);
        let tx = self.db.begin_read().map_err(|e| r(&e))?;
        let t = tx.open_table(LOGS).map_err(|e| r(&e))?;
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(e) => Bound::Included(*e),
            Bound::Excluded(e) => Bound::Excluded(*e),
            Bound::Unbounded => Bound::Unbounded,
        };
        let iter = t
            .range::<u64>((Bound::Included(start), end))
            .map_err(|e| r(&e))?;
        let mut out = Vec::new();
        for item in iter {
            let (k, v) = item.map_err(|e| r(&e))?;
            let idx = k.value();
            let entry: Entry = decode(v.value()).map_err(|e| {
                sio(
                    ErrorSubject::LogIndex(idx),
                    ErrorVerb::Read,
                    f,
                    format!("log entry {idx}: {e}"),
                )
            })?;
            out.push(entry);
        }
        Ok(out)
    }

    fn last_entry_id(&self) -> Result<Option<LogId>, StorageError> {
        let f = &self.file;
        let r = |e: &dyn std::fmt::Display| sio(ErrorSubject::Logs, ErrorVerb::Read, f, e);
        let tx = self.db.begin_read().map_err(|e| r(&e))?;
        let t = tx.open_table(LOGS).map_err(|e| r(&e))?;
        let last = t.last().map_err(|e| r(&e))?;
        let result = match last {
            None => Ok(None),
            Some((k, v)) => {
                let e: Entry =
                    decode(v.value()).map_err(|e| r(&format!("log entry {}: {e}", k.value())))?;
                Ok(Some(e.log_id))
            }
        };
        result
    }

    /// Removes entries with index in `range` (one fsynced transaction), optionally also
    /// recording the purge point in the same transaction.
    fn remove_range(
        &self,
        from: Bound<u64>,
        to: Bound<u64>,
        purged: Option<&LogId>,
    ) -> Result<(), StorageError> {
        let f = &self.file;
        let w = |e: &dyn std::fmt::Display| sio(ErrorSubject::Logs, ErrorVerb::Delete, f, e);
        let tx = self.db.begin_write().map_err(|e| w(&e))?;
        {
            if let Some(p) = purged {
                let bytes = encode(p).map_err(|e| w(&e))?;
                let mut m = tx.open_table(META).map_err(|e| w(&e))?;
                m.insert(KEY_PURGED, bytes.as_slice()).map_err(|e| w(&e))?;
            }
            let mut t = tx.open_table(LOGS).map_err(|e| w(&e))?;
            t.retain_in::<u64, _>((from, to), |_, _| false)
                .map_err(|e| w(&e))?;
        }
        tx.commit().map_err(|e| w(&e))?;
        Ok(())
    }

    /// Appends entries in one transaction and returns only once it is fsynced (redb's default
    /// durability): only then may the flush be reported to openraft.
    pub fn append_durable<I: IntoIterator<Item = Entry>>(
        &self,
        entries: I,
    ) -> Result<(), StorageError> {
        let f = &self.file;
        let w = |e: &dyn std::fmt::Display| sio(ErrorSubject::Logs, ErrorVerb::Write, f, e);
        let tx = self.db.begin_write().map_err(|e| w(&e))?;
        {
            let mut t = tx.open_table(LOGS).map_err(|e| w(&e))?;
            for entry in entries {
                let bytes = encode(&entry).map_err(|e| w(&e))?;
                t.insert(entry.log_id.index, bytes.as_slice())
                    .map_err(|e| w(&e))?;
            }
        }
        tx.commit().map_err(|e| w(&e))?;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.entries(range)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self.read_meta(KEY_PURGED, ErrorSubject::Logs)?;
        let last = self.last_entry_id()?.or(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.write_meta(KEY_VOTE, vote, ErrorSubject::Vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.read_meta(KEY_VOTE, ErrorSubject::Vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.write_meta(KEY_COMMITTED, &committed, ErrorSubject::Store)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self
            .read_meta::<Option<LogId>>(KEY_COMMITTED, ErrorSubject::Store)?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let result = self.append_durable(entries);
        match &result {
            Ok(()) => callback.log_io_completed(Ok(())),
            Err(e) => callback.log_io_completed(Err(std::io::Error::other(e.to_string()))),
        }
        result
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.remove_range(Bound::Included(log_id.index), Bound::Unbounded, None)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.remove_range(
            Bound::Unbounded,
            Bound::Included(log_id.index),
            Some(&log_id),
        )
    }
}

/// What a snapshot file holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta,
    facts: Facts,
}

/// The applied state, shared with the admin API for reads.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    pub last_applied: Option<LogId>,
    pub last_membership: StoredMembership,
    pub facts: Facts,
}

struct SmInner {
    state: RwLock<Applied>,
    current: Mutex<Option<(SnapshotMeta, Vec<u8>)>>,
    file: PathBuf,
    snapshot_seq: Mutex<u64>,
    /// The config file: with the applied roster it gives each cluster's servers (a command
    /// naming anyone else is rejected at apply).
    file_config: Config,
    /// Servers by cluster for the roster version in the key (0: the founding list).
    servers: Mutex<(u64, Servers)>,
}

type Servers = BTreeMap<String, std::collections::BTreeSet<String>>;

fn servers_of(cfg: &Config) -> Servers {
    cfg.clusters
        .iter()
        .map(|c| (c.name.clone(), cfg.server_names(&c.name)))
        .collect()
}

/// The replicated state machine (in memory) with its durable snapshot.
#[derive(Clone)]
pub struct StateMachineStore {
    inner: Arc<SmInner>,
}

fn lock_poisoned(file: &Path) -> StorageError {
    sio(
        ErrorSubject::StateMachine,
        ErrorVerb::Read,
        file,
        "state lock poisoned",
    )
}

impl StateMachineStore {
    fn open(file: PathBuf, config: Config) -> Result<Self, StoreError> {
        let mut applied = Applied::default();
        let mut current = None;
        if let Some(bytes) = durable::read(&file, Kind::Snapshot)? {
            let snap: SnapshotFile =
                serde_json::from_slice(&bytes).map_err(|e| decode_err(&file, e))?;
            applied = Applied {
                last_applied: snap.meta.last_log_id,
                last_membership: snap.meta.last_membership.clone(),
                facts: snap.facts.clone(),
            };
            current = Some((snap.meta, bytes));
        }
        Ok(Self {
            inner: Arc::new(SmInner {
                state: RwLock::new(applied),
                current: Mutex::new(current),
                file,
                snapshot_seq: Mutex::new(0),
                servers: Mutex::new((0, servers_of(&config))),
                file_config: config,
            }),
        })
    }

    /// Each cluster's servers under the roster in `facts` (the founding list without one).
    fn servers(&self, facts: &Facts) -> Result<Servers, StorageError> {
        let mut cache = self
            .inner
            .servers
            .lock()
            .map_err(|_| lock_poisoned(&self.inner.file))?;
        let version = facts.roster.as_ref().map(|r| r.version).unwrap_or(0);
        if cache.0 != version {
            let cfg = match &facts.roster {
                Some(r) => pgw_core::roster::effective(&self.inner.file_config, r),
                // file_config carries the founding list
                None => self.inner.file_config.clone(),
            };
            *cache = (version, servers_of(&cfg));
        }
        Ok(cache.1.clone())
    }

    /// A consistent copy of the applied state.
    pub fn applied(&self) -> Applied {
        match self.inner.state.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn persist(&self, snap: &SnapshotFile) -> Result<Vec<u8>, StorageError> {
        let f = &self.inner.file;
        let sig = Some(snap.meta.signature());
        let bytes = serde_json::to_vec(snap)
            .map_err(|e| sio(ErrorSubject::Snapshot(sig.clone()), ErrorVerb::Write, f, e))?;
        durable::write_atomic(f, Kind::Snapshot, &bytes)
            .map_err(|e| sio(ErrorSubject::Snapshot(sig), ErrorVerb::Write, f, e))?;
        Ok(bytes)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (applied, seq) = {
            let st = self
                .inner
                .state
                .read()
                .map_err(|_| lock_poisoned(&self.inner.file))?;
            let mut seq = self
                .inner
                .snapshot_seq
                .lock()
                .map_err(|_| lock_poisoned(&self.inner.file))?;
            *seq += 1;
            (st.clone(), *seq)
        };
        let snapshot_id = match &applied.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, seq),
            None => format!("none-{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id: applied.last_applied,
            last_membership: applied.last_membership.clone(),
            snapshot_id,
        };
        let file = SnapshotFile {
            meta: meta.clone(),
            facts: applied.facts,
        };
        let bytes = self.persist(&file)?;
        let mut cur = self
            .inner
            .current
            .lock()
            .map_err(|_| lock_poisoned(&self.inner.file))?;
        *cur = Some((meta.clone(), bytes.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let st = self
            .inner
            .state
            .read()
            .map_err(|_| lock_poisoned(&self.inner.file))?;
        Ok((st.last_applied, st.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcome>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut st = self
            .inner
            .state
            .write()
            .map_err(|_| lock_poisoned(&self.inner.file))?;
        let mut out = Vec::new();
        for entry in entries {
            st.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => out.push(Outcome::Unchanged { epoch: 0 }),
                EntryPayload::Normal(p) => {
                    let servers = self.servers(&st.facts)?;
                    let o = st.facts.apply_checked(entry.log_id.index, &p, &servers);
                    out.push(o);
                }
                EntryPayload::Membership(m) => {
                    st.last_membership = StoredMembership::new(Some(entry.log_id), m);
                    out.push(Outcome::Unchanged { epoch: 0 });
                }
            }
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let f = self.inner.file.clone();
        let bytes = snapshot.into_inner();
        let received: SnapshotFile = serde_json::from_slice(&bytes).map_err(|e| {
            sio(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Read,
                &f,
                e,
            )
        })?;
        let file = SnapshotFile {
            meta: meta.clone(),
            facts: received.facts,
        };
        let bytes = self.persist(&file)?;
        {
            let mut st = self.inner.state.write().map_err(|_| lock_poisoned(&f))?;
            *st = Applied {
                last_applied: meta.last_log_id,
                last_membership: meta.last_membership.clone(),
                facts: file.facts.clone(),
            };
        }
        let mut cur = self.inner.current.lock().map_err(|_| lock_poisoned(&f))?;
        *cur = Some((meta.clone(), bytes));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let cur = self
            .inner
            .current
            .lock()
            .map_err(|_| lock_poisoned(&self.inner.file))?;
        Ok(cur.as_ref().map(|(meta, bytes)| Snapshot {
            meta: meta.clone(),
            snapshot: Box::new(Cursor::new(bytes.clone())),
        }))
    }
}

/// Whether `bytes` are a snapshot this store can install (checked before the last chunk
/// reaches openraft: a snapshot it cannot read would otherwise stop the member as a storage
/// error).
pub fn check_snapshot(bytes: &[u8]) -> Result<(), String> {
    serde_json::from_slice::<SnapshotFile>(bytes)
        .map(|_| ())
        .map_err(|e| format!("not a pg-watcher snapshot: {e}"))
}

/// Member names by node id, for status output.
pub fn names_by_id(cfg: &Config) -> BTreeMap<u64, String> {
    cfg.members.iter().map(|m| (m.id, m.name.clone())).collect()
}
