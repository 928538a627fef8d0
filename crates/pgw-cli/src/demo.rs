//! `pgwctl demo up|down|failover`: a local three-room sandbox on loopback.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pgw_core::config::{ListenConfig, LogConfig, MemberConfig, RaftConfig};
use pgw_core::{Config, Role};
use serde::{Deserialize, Serialize};

use crate::status::{gather, GroupStatus};
use crate::CliError;

pub const DEFAULT_DIR: &str = "/tmp/pg-watcher-demo";
const ROOMS: [&str; 3] = ["room-a", "room-b", "room-c"];

/// `DIR/demo.json`: what the demo started (see the design notes for the contract).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemoFile {
    pub cluster_id: String,
    pub endpoints: String,
    pub members: Vec<DemoMember>,
    pub postgres: Vec<serde_json::Value>,
    pub pgpool: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemoMember {
    pub name: String,
    pub grpc: String,
    pub http: String,
    pub pid: u32,
    pub config: String,
    pub log: String,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CliError + '_ {
    move |e| CliError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// A free loopback port (the kernel picks it; we release it right away).
fn free_port() -> Result<u16, CliError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(io_err(Path::new("127.0.0.1:0")))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(io_err(Path::new("127.0.0.1:0")))
}

/// The `pg-watcher` binary: `$PGW_WATCHER_BIN`, else next to this `pgwctl`.
pub fn watcher_bin() -> Result<PathBuf, CliError> {
    if let Ok(p) = std::env::var("PGW_WATCHER_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(io_err(Path::new("current_exe")))?;
    let p = exe
        .parent()
        .map(|d| d.join("pg-watcher"))
        .unwrap_or_else(|| PathBuf::from("pg-watcher"));
    if p.exists() {
        Ok(p)
    } else {
        Err(CliError::Usage(format!(
            "cannot find the pg-watcher binary at {}; build it (cargo build --release) or set PGW_WATCHER_BIN",
            p.display()
        )))
    }
}

/// True when `pid` is alive and is a pg-watcher process (guards against recycled pids).
pub fn is_watcher(pid: u32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("pg-watcher"))
        .unwrap_or(false)
        && !fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true)
}

pub fn signal(pid: u32, sig: i32) -> bool {
    let Ok(p) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(p, sig) == 0 }
}

fn spawn_member(bin: &Path, config: &Path, log: &Path) -> Result<u32, CliError> {
    use std::os::unix::process::CommandExt;
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io_err(log))?;
    let err = out.try_clone().map_err(io_err(log))?;
    let child = Command::new(bin)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(io_err(bin))?;
    Ok(child.id())
}

fn read_demo(dir: &Path) -> Result<DemoFile, CliError> {
    let p = dir.join("demo.json");
    let text = fs::read_to_string(&p).map_err(io_err(&p))?;
    serde_json::from_str(&text).map_err(|e| CliError::Io {
        path: p.display().to_string(),
        message: format!("not a demo.json: {e}"),
    })
}

fn write_demo(dir: &Path, d: &DemoFile) -> Result<(), CliError> {
    let p = dir.join("demo.json");
    let text = serde_json::to_string_pretty(d).map_err(|e| CliError::Io {
        path: p.display().to_string(),
        message: e.to_string(),
    })?;
    let tmp = dir.join("demo.json.tmp");
    fs::write(&tmp, text + "\n").map_err(io_err(&tmp))?;
    fs::rename(&tmp, &p).map_err(io_err(&p))
}

/// Polls until some member reports itself leader (and, if `not`, a different one).
pub async fn wait_leader(
    endpoints: &[String],
    not: Option<&str>,
    limit: Duration,
) -> Result<GroupStatus, CliError> {
    let t0 = Instant::now();
    loop {
        if let Ok(s) = gather(endpoints, Duration::from_millis(500)).await {
            if let Some(l) = &s.leader {
                if not != Some(l.as_str()) {
                    return Ok(s);
                }
            }
        }
        if t0.elapsed() > limit {
            return Err(CliError::Timeout(format!(
                "no leader elected within {} s",
                limit.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn up(dir: &Path) -> Result<DemoFile, CliError> {
    if let Ok(d) = read_demo(dir) {
        if d.members.iter().any(|m| is_watcher(m.pid)) {
            return Err(CliError::Usage(format!(
                "a demo is already running in {}; run `pgwctl demo down --dir {}` first",
                dir.display(),
                dir.display()
            )));
        }
    }
    let bin = watcher_bin()?;
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut members = Vec::new();
    for (i, room) in ROOMS.iter().enumerate() {
        members.push(MemberConfig {
            name: room.to_string(),
            id: i as u64 + 1,
            role: Role::Data,
            grpc: format!("127.0.0.1:{}", free_port()?),
            http: format!("127.0.0.1:{}", free_port()?),
            priority: 100,
            postgres: None,
        });
    }
    let mut demo = DemoFile {
        cluster_id: "demo".into(),
        endpoints: members
            .iter()
            .map(|m| m.grpc.clone())
            .collect::<Vec<_>>()
            .join(","),
        members: Vec::new(),
        postgres: Vec::new(),
        pgpool: Vec::new(),
    };
    for m in &members {
        let mdir = dir.join(&m.name);
        let data = mdir.join("data");
        if data.exists() {
            fs::remove_dir_all(&data).map_err(io_err(&data))?;
        }
        fs::create_dir_all(&mdir).map_err(io_err(&mdir))?;
        let cfg = Config {
            cluster_id: demo.cluster_id.clone(),
            member: m.name.clone(),
            data_dir: data,
            members: members.clone(),
            listen: ListenConfig::default(),
            raft: RaftConfig::default(),
            clusters: pgw_core::config::defaults::clusters(),
            log: LogConfig::default(),
            postgres: None,
            failover: Default::default(),
        };
        cfg.validate()?;
        let cpath = mdir.join("pg-watcher.toml");
        fs::write(&cpath, cfg.to_toml()?).map_err(io_err(&cpath))?;
        let log = mdir.join("pg-watcher.log");
        let pid = spawn_member(&bin, &cpath, &log)?;
        demo.members.push(DemoMember {
            name: m.name.clone(),
            grpc: m.grpc.clone(),
            http: m.http.clone(),
            pid,
            config: cpath.display().to_string(),
            log: log.display().to_string(),
        });
    }
    write_demo(dir, &demo)?;
    let eps: Vec<String> = members.iter().map(|m| m.grpc.clone()).collect();
    wait_leader(&eps, None, Duration::from_secs(30)).await?;
    Ok(demo)
}

pub fn down(dir: &Path) -> Result<Vec<String>, CliError> {
    let d = read_demo(dir)?;
    let mut stopped = Vec::new();
    for m in &d.members {
        if is_watcher(m.pid) && signal(m.pid, libc::SIGTERM) {
            stopped.push(m.name.clone());
        }
    }
    let t0 = Instant::now();
    while d.members.iter().any(|m| is_watcher(m.pid)) && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for m in &d.members {
        if is_watcher(m.pid) {
            signal(m.pid, libc::SIGKILL);
        }
    }
    Ok(stopped)
}

/// Result of `demo failover`.
#[derive(Debug, Serialize)]
pub struct FailoverReport {
    pub killed: String,
    pub new_leader: String,
    pub elected_ms: u64,
    pub committed_ms: u64,
    pub rejoined_ms: u64,
}

/// Kills the Raft leader with SIGKILL, waits for a new leader to commit a decision, then
/// restarts the killed member and waits for it to catch up.
pub async fn failover(dir: &Path) -> Result<FailoverReport, CliError> {
    let mut d = read_demo(dir)?;
    let eps: Vec<String> = d.members.iter().map(|m| m.grpc.clone()).collect();
    let before = wait_leader(&eps, None, Duration::from_secs(10)).await?;
    let old = before.leader.clone().unwrap_or_default();
    let idx = d
        .members
        .iter()
        .position(|m| m.name == old)
        .ok_or_else(|| CliError::Usage(format!("leader `{old}` is not in demo.json")))?;
    let pid = d.members[idx].pid;
    if !is_watcher(pid) {
        return Err(CliError::Usage(format!(
            "pid {pid} of {old} is not a running pg-watcher"
        )));
    }
    let t0 = Instant::now();
    signal(pid, libc::SIGKILL);
    let others: Vec<String> = d
        .members
        .iter()
        .filter(|m| m.name != old)
        .map(|m| m.grpc.clone())
        .collect();
    let after = wait_leader(&others, Some(&old), Duration::from_secs(30)).await?;
    let elected_ms = t0.elapsed().as_millis() as u64;
    let new_leader = after.leader.clone().unwrap_or_default();
    let cluster = after
        .clusters
        .first()
        .map(|c| c.name.clone())
        .unwrap_or_else(|| "global".into());
    // A decision committed by the new leader (a no-op resume).
    let mut committed = false;
    while t0.elapsed() < Duration::from_secs(30) {
        if crate::set_paused(&others, &cluster, false, "demo failover probe")
            .await
            .is_ok()
        {
            committed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if !committed {
        return Err(CliError::Timeout(
            "new leader did not commit within 30 s".into(),
        ));
    }
    let committed_ms = t0.elapsed().as_millis() as u64;
    // Restart the killed member and wait until it has caught up.
    let m = d.members[idx].clone();
    let bin = watcher_bin()?;
    let new_pid = spawn_member(&bin, Path::new(&m.config), Path::new(&m.log))?;
    d.members[idx].pid = new_pid;
    write_demo(dir, &d)?;
    let t1 = Instant::now();
    let mut rejoined_ms = 0;
    while t1.elapsed() < Duration::from_secs(30) {
        if let Ok(s) = gather(&eps, Duration::from_millis(500)).await {
            let leader_applied = s
                .members
                .iter()
                .find(|x| Some(&x.name) == s.leader.as_ref())
                .and_then(|x| x.last_applied);
            let mine = s.members.iter().find(|x| x.name == old);
            if let (Some(la), Some(me)) = (leader_applied, mine) {
                if me.raft == "follower" && me.last_applied >= Some(la) {
                    rejoined_ms = t1.elapsed().as_millis() as u64;
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(FailoverReport {
        killed: old,
        new_leader,
        elected_ms,
        committed_ms,
        rejoined_ms,
    })
}
