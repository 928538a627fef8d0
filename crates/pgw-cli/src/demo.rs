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
/// The demo's PostgreSQL clusters, as in the seed's platform: "global" (the active room follows
/// its primary) and "recovery" (moved first by `switchover --room ROOM --all`).
pub const CLUSTERS: [&str; 2] = ["global", "recovery"];

fn global() -> String {
    "global".into()
}

/// `DIR/demo.json`: what the demo started (see the design notes for the contract).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemoFile {
    pub cluster_id: String,
    pub endpoints: String,
    pub members: Vec<DemoMember>,
    pub postgres: Vec<DemoPostgres>,
    pub pgpool: Vec<DemoPgpool>,
    /// The demo's CA and a client certificate per operator role (`pgwctl --ca --cert --key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<DemoTls>,
    /// HAProxy in front of the servers (`deploy/haproxy/haproxy.cfg`), when it is installed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub haproxy: Option<DemoHaproxy>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemoHaproxy {
    /// host:port that sends sessions to the primary.
    pub write: String,
    /// host:port that sends sessions to the replicas.
    pub read: String,
    pub write_dsn: String,
    pub read_dsn: String,
    pub pid: u32,
    pub config: String,
    pub log: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemoTls {
    pub ca: String,
    pub read: DemoCert,
    pub operate: DemoCert,
    pub admin: DemoCert,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemoCert {
    pub cert: String,
    pub key: String,
}

impl DemoTls {
    fn of(g: &crate::certs::GroupCerts) -> DemoTls {
        let c = |r: &str| {
            let (_, cert, key) = g.clients.get(r).cloned().unwrap_or_default();
            DemoCert {
                cert: cert.display().to_string(),
                key: key.display().to_string(),
            }
        };
        DemoTls {
            ca: g.ca.display().to_string(),
            read: c("read"),
            operate: c("operate"),
            admin: c("admin"),
        }
    }

    pub fn role(&self, role: &str) -> Option<&DemoCert> {
        match role {
            "read" => Some(&self.read),
            "operate" => Some(&self.operate),
            "admin" => Some(&self.admin),
            _ => None,
        }
    }
}

/// Makes the demo's client certificate of `role` the default credentials of this process.
pub fn use_demo_credentials(dir: &Path, role: &str) -> Result<(), CliError> {
    let d = read_demo(dir)?;
    let tls = d.tls.as_ref().ok_or_else(|| {
        CliError::Usage(format!(
            "{}/demo.json has no tls section (a demo from an older pgwctl): run demo down and up again",
            dir.display()
        ))
    })?;
    let c = tls
        .role(role)
        .ok_or_else(|| CliError::Usage(format!("no role `{role}`")))?;
    let auth = crate::client::ClientAuth::from_files(
        Some(Path::new(&tls.ca)),
        Some(Path::new(&c.cert)),
        Some(Path::new(&c.key)),
        None,
    )?;
    crate::client::set_default(auth);
    Ok(())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemoPgpool {
    /// The PostgreSQL cluster this pgpool serves.
    #[serde(default = "global")]
    pub cluster: String,
    pub room: String,
    pub host: String,
    pub port: u16,
    pub pcp_port: u16,
    /// libpq connection string an application of this room writes with (through pgpool).
    pub dsn: String,
    pub work_dir: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemoPostgres {
    /// The PostgreSQL cluster this server belongs to.
    #[serde(default = "global")]
    pub cluster: String,
    pub member: String,
    pub host: String,
    pub port: u16,
    pub data_dir: String,
    /// libpq connection string an application can write with (through this server).
    pub dsn: String,
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

/// A free port on a loopback address (the kernel picks it; we release it right away),
/// never one handed out before by this process: the kernel may return a just-released
/// port again, and two listeners of one member must not share it.
fn free_port(ip: &str) -> Result<u16, CliError> {
    static ISSUED: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    for _ in 0..1000 {
        let l = TcpListener::bind((ip, 0)).map_err(io_err(Path::new(ip)))?;
        let port = l
            .local_addr()
            .map(|a| a.port())
            .map_err(io_err(Path::new(ip)))?;
        let mut issued = ISSUED.lock().unwrap_or_else(|e| e.into_inner());
        if issued.insert(port) {
            return Ok(port);
        }
    }
    Err(CliError::Io {
        path: ip.to_string(),
        message: "no fresh port after 1000 tries".into(),
    })
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

/// A random hex secret from the kernel.
fn random_secret() -> Result<String, CliError> {
    let p = Path::new("/dev/urandom");
    let mut buf = [0u8; 16];
    use std::io::Read;
    fs::File::open(p)
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(io_err(p))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes a file readable by its owner only.
fn write_private(p: &Path, text: &str) -> Result<(), CliError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = fs::remove_file(p);
    let mut f = fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(p)
        .map_err(io_err(p))?;
    f.write_all(format!("{text}\n").as_bytes())
        .map_err(io_err(p))
}

/// Resolves with the error as soon as `check` reports one (every 200 ms).
async fn watch_exits(check: &impl Fn() -> Result<(), CliError>) -> CliError {
    loop {
        if let Err(e) = check() {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The last fatal line a member wrote (`pg-watcher: ...`), or the last line of its log.
fn fatal_message(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .rev()
        .find(|l| l.starts_with("pg-watcher: "))
        .or_else(|| text.lines().rev().find(|l| !l.trim().is_empty()))
        .map(|l| l.trim_start_matches("pg-watcher: ").to_string())
        .unwrap_or_else(|| "no message".into())
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
        // pgpools outlive their watchers: stop those of an earlier demo in this directory.
        for p in &d.pgpool {
            pgw_server::pgpool::managed::stop_pgpool(Path::new(&p.work_dir));
        }
        stop_haproxy(&d);
    }
    let bin = watcher_bin()?;
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    // postgres runs as its own OS user when we are root: it must reach its directories.
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).map_err(io_err(dir))?;
    }
    let pg_bin = pgw_core::config::defaults::pg_bin_dir();
    if !pg_bin.join("initdb").exists() {
        return Err(CliError::Usage(format!(
            "PostgreSQL server binaries not found in {} (Debian: apt-get install postgresql-15)",
            pg_bin.display()
        )));
    }
    // Each room is a host of its own on loopback: 127.0.0.11, .12, .13.
    let mut members = Vec::new();
    for (i, room) in ROOMS.iter().enumerate() {
        let ip = format!("127.0.0.{}", 11 + i);
        members.push(MemberConfig {
            name: room.to_string(),
            id: i as u64 + 1,
            role: Role::Data,
            grpc: format!("{ip}:{}", free_port(&ip)?),
            http: format!("{ip}:{}", free_port(&ip)?),
            priority: 100,
            postgres: Some(format!("{ip}:{}", free_port(&ip)?)),
            pgpool: Some(format!("{ip}:{}", free_port(&ip)?)),
            pcp: Some(format!("{ip}:{}", free_port(&ip)?)),
            room: None,
            spare: false,
        });
    }
    // The recovery cluster's servers: one more server (and pgpool) per room, on the room's host.
    let mut recovery = Vec::new();
    for m in &members {
        let ip = m
            .grpc
            .rsplit_once(':')
            .map(|(h, _)| h.to_string())
            .unwrap_or_default();
        recovery.push(pgw_core::config::ServerConfig {
            member: m.name.clone(),
            postgres: Some(format!("{ip}:{}", free_port(&ip)?)),
            pgpool: Some(format!("{ip}:{}", free_port(&ip)?)),
            pcp: Some(format!("{ip}:{}", free_port(&ip)?)),
        });
    }
    let mut clusters = pgw_core::config::defaults::clusters();
    clusters[0].bootstrap_primary = Some(ROOMS[0].to_string());
    clusters.push(pgw_core::config::PgClusterConfig {
        name: CLUSTERS[1].into(),
        servers: recovery.clone(),
        switch_order: 1,
        ..clusters[0].clone()
    });
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
        tls: None,
        haproxy: None,
    };
    // A CA of the demo's own, a certificate per member (its name and its loopback address)
    // and one client certificate per operator role. A new demo makes new ones.
    let tls_dir = dir.join("tls");
    if tls_dir.exists() {
        fs::remove_dir_all(&tls_dir).map_err(io_err(&tls_dir))?;
    }
    let certs = crate::certs::GroupCerts::make(
        &tls_dir,
        &members
            .iter()
            .map(|m| {
                let host = m.grpc.rsplit_once(':').map(|(h, _)| h).unwrap_or("");
                (m.name.clone(), vec![host.to_string()])
            })
            .collect::<Vec<_>>(),
        "demo",
    )?;
    demo.tls = Some(DemoTls::of(&certs));
    // The PCP password every member uses to repoint the rooms' pgpools (private file).
    let pcp_pass = dir.join("pcp.pass");
    write_private(&pcp_pass, &random_secret()?)?;
    for m in &members {
        let mdir = dir.join(&m.name);
        let data = mdir.join("data");
        for old in [data.clone(), mdir.join("pg")] {
            if old.exists() {
                fs::remove_dir_all(&old).map_err(io_err(&old))?;
            }
        }
        fs::create_dir_all(&mdir).map_err(io_err(&mdir))?;
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&mdir, fs::Permissions::from_mode(0o755)).map_err(io_err(&mdir))?;
        }
        let pg_data = mdir.join("pg").join("data");
        let rec_data = mdir.join("pg-recovery").join("data");
        let rec = recovery
            .iter()
            .find(|x| x.member == m.name)
            .cloned()
            .ok_or_else(|| CliError::Usage(format!("no recovery server for {}", m.name)))?;
        for (cluster, addr, data) in [
            (CLUSTERS[0], m.postgres.clone(), &pg_data),
            (CLUSTERS[1], rec.postgres.clone(), &rec_data),
        ] {
            let pg_addr = addr.unwrap_or_default();
            let (host, port) = pg_addr.rsplit_once(':').unwrap_or(("127.0.0.1", "5432"));
            demo.postgres.push(DemoPostgres {
                cluster: cluster.into(),
                member: m.name.clone(),
                host: host.to_string(),
                port: port.parse().unwrap_or(5432),
                data_dir: data.display().to_string(),
                dsn: format!("host={host} port={port} user=postgres dbname=postgres"),
            });
        }
        if mdir.join("pg-recovery").exists() {
            let old = mdir.join("pg-recovery");
            fs::remove_dir_all(&old).map_err(io_err(&old))?;
        }
        let pg_entry = |cluster: &str, data: PathBuf| pgw_core::config::PostgresConfig {
            cluster: Some(cluster.into()),
            bin_dir: pg_bin.clone(),
            settings: vec!["shared_buffers = '32MB'".into()],
            ..pgw_core::config::PostgresConfig::new(data)
        };
        let cfg = Config {
            cluster_id: demo.cluster_id.clone(),
            member: m.name.clone(),
            data_dir: data,
            members: members.clone(),
            listen: ListenConfig::default(),
            timing: Default::default(),
            raft: RaftConfig::default(),
            clusters: clusters.clone(),
            active_cluster: Some(CLUSTERS[0].into()),
            log: LogConfig::default(),
            postgres: vec![
                pg_entry(CLUSTERS[0], pg_data),
                pg_entry(CLUSTERS[1], rec_data),
            ],
            failover: Default::default(),
            tls: certs.tls(&m.name),
            auth: certs.auth(),
            hooks: Vec::new(),
            generation: 0,
            pools: Default::default(),
            pgpool: Some(pgw_core::config::PgpoolConfig {
                manage: true,
                bin_dir: pgw_core::config::defaults::pgpool_bin_dir(),
                work_dir: Some(mdir.join("pgpool")),
                os_user: pgw_core::config::defaults::pg_os_user(),
                pcp_user: pgw_core::config::defaults::pcp_user(),
                check_user: None,
                pcp_password_file: pcp_pass.clone(),
                check_interval_ms: pgw_core::config::defaults::PGPOOL_CHECK_INTERVAL_MS,
                settings: vec![],
            }),
        };
        for (cluster, pa, pcp) in [
            (CLUSTERS[0], m.pgpool.clone(), m.pcp.clone()),
            (CLUSTERS[1], rec.pgpool.clone(), rec.pcp.clone()),
        ] {
            let pa = pa.unwrap_or_default();
            let (host, port) = pa.rsplit_once(':').unwrap_or(("127.0.0.1", "9999"));
            let pcp_port = pcp
                .as_deref()
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| p.parse().ok())
                .unwrap_or(0);
            demo.pgpool.push(DemoPgpool {
                cluster: cluster.into(),
                room: m.name.clone(),
                host: host.to_string(),
                port: port.parse().unwrap_or(9999),
                pcp_port,
                dsn: format!("host={host} port={port} user=postgres dbname=postgres"),
                work_dir: cfg
                    .pgpool_work_dir(cluster)
                    .unwrap_or_default()
                    .display()
                    .to_string(),
            });
        }
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
    demo.haproxy = start_haproxy(dir, &demo)?;
    write_demo(dir, &demo)?;
    crate::client::set_default(certs.client_auth("admin")?);
    let eps: Vec<String> = members.iter().map(|m| m.grpc.clone()).collect();
    // Waits, but fails at once with a member's own fatal message when one exits (pgpool
    // missing, a port taken...), instead of timing out on "no leader".
    let members = demo.members.clone();
    let exited = || -> Result<(), CliError> {
        match members.iter().find(|m| !is_watcher(m.pid)) {
            None => Ok(()),
            Some(m) => Err(CliError::Refused(format!(
                "member {} exited: {} (log: {})",
                m.name,
                fatal_message(Path::new(&m.log)),
                m.log
            ))),
        }
    };
    tokio::select! {
        r = wait_leader(&eps, None, Duration::from_secs(30)) => { r?; }
        e = watch_exits(&exited) => return Err(e),
    }
    tokio::select! {
        r = wait_healthy(&eps, Duration::from_secs(120)) => { r?; }
        e = watch_exits(&exited) => return Err(e),
    }
    Ok(demo)
}

/// Whether every PostgreSQL cluster of the demo has a primary, every other server a sync
/// replica, and every pgpool of it agreeing.
pub fn all_healthy(s: &GroupStatus) -> bool {
    CLUSTERS.iter().all(|name| {
        let Some(c) = s.clusters.iter().find(|c| c.name == *name) else {
            return false;
        };
        let Some(p) = &c.primary else { return false };
        c.nodes
            .iter()
            .any(|n| &n.member == p && n.role == "primary")
            && c.nodes.iter().filter(|n| n.role == "sync_replica").count() + 1 == ROOMS.len()
            && c.pgpool.len() == ROOMS.len()
            && c.pgpool
                .iter()
                .all(|pp| pp.agrees && pp.primary.as_ref() == Some(p))
    })
}

/// Waits until every cluster is healthy (see [`all_healthy`]).
pub async fn wait_healthy(eps: &[String], limit: Duration) -> Result<GroupStatus, CliError> {
    let t0 = Instant::now();
    loop {
        if let Ok(s) = gather(eps, Duration::from_millis(500)).await {
            if all_healthy(&s) {
                return Ok(s);
            }
        }
        if t0.elapsed() > limit {
            return Err(CliError::Timeout(format!(
                "the PostgreSQL clusters did not become healthy within {} s (see the pg-watcher.log files)",
                limit.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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
    // Then every postgres the demo's watchers started (fast shutdown).
    for pg in &d.postgres {
        if let Some(pid) = postmaster_pid(Path::new(&pg.data_dir)) {
            if signal(pid, libc::SIGINT) {
                stopped.push(format!("{} postgres of {}", pg.cluster, pg.member));
            }
        }
    }
    if stop_haproxy(&d) {
        stopped.push("haproxy".into());
    }
    // And the rooms' pgpools.
    for p in &d.pgpool {
        if pgw_server::pgpool::managed::stop_pgpool(Path::new(&p.work_dir)) {
            stopped.push(format!("{} pgpool of {}", p.cluster, p.room));
        }
    }
    let t0 = Instant::now();
    while d
        .postgres
        .iter()
        .any(|pg| postmaster_pid(Path::new(&pg.data_dir)).is_some_and(alive))
        && t0.elapsed() < Duration::from_secs(15)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(stopped)
}

/// Starts HAProxy with the shipped configuration in front of the demo's servers; `None` when
/// `haproxy` is not installed.
fn start_haproxy(dir: &Path, demo: &DemoFile) -> Result<Option<DemoHaproxy>, CliError> {
    use std::os::unix::process::CommandExt;
    if Command::new("haproxy").arg("-v").output().is_err() {
        return Ok(None);
    }
    let hdir = dir.join("haproxy");
    fs::create_dir_all(&hdir).map_err(io_err(&hdir))?;
    let write = format!("127.0.0.1:{}", free_port("127.0.0.1")?);
    let read = format!("127.0.0.1:{}", free_port("127.0.0.1")?);
    // HAProxy fronts the global cluster (the checks answer for the first cluster by default).
    let servers: Vec<crate::haproxy::Server> = demo
        .postgres
        .iter()
        .filter(|p| p.cluster == CLUSTERS[0])
        .filter_map(|p| {
            let m = demo.members.iter().find(|m| m.name == p.member)?;
            Some(crate::haproxy::Server {
                postgres: format!("{}:{}", p.host, p.port),
                http: m.http.clone(),
            })
        })
        .collect();
    let text = crate::haproxy::render(crate::haproxy::SHIPPED, &write, &read, &servers)?;
    let config = hdir.join("haproxy.cfg");
    fs::write(&config, text).map_err(io_err(&config))?;
    let log = hdir.join("haproxy.log");
    let out = fs::File::create(&log).map_err(io_err(&log))?;
    let err = out.try_clone().map_err(io_err(&log))?;
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(io_err(Path::new("haproxy")))?;
    let dsn = |a: &str| {
        let (h, p) = a.rsplit_once(':').unwrap_or((a, ""));
        format!("host={h} port={p} user=postgres dbname=postgres")
    };
    Ok(Some(DemoHaproxy {
        write_dsn: dsn(&write),
        read_dsn: dsn(&read),
        write,
        read,
        pid: child.id(),
        config: config.display().to_string(),
        log: log.display().to_string(),
    }))
}

/// Stops the demo's HAProxy if it still runs; whether it did.
fn stop_haproxy(d: &DemoFile) -> bool {
    let Some(h) = &d.haproxy else { return false };
    let ours = fs::read_to_string(format!("/proc/{}/cmdline", h.pid))
        .is_ok_and(|c| c.contains("haproxy") && c.contains(&h.config));
    ours && signal(h.pid, libc::SIGTERM)
}

fn postmaster_pid(data_dir: &Path) -> Option<u32> {
    let t = fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    t.lines().next()?.trim().parse().ok()
}

fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Faults `demo failover` can inject into the primary's room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DemoFault {
    /// kill -9 of the primary's postmaster.
    Crash,
    /// kill -9 of the primary's watcher and postgres together (the machine is gone).
    NodeLoss,
    /// SIGSTOP of the primary's postgres (a hung server).
    Hang,
}

/// Result of `demo failover`.
#[derive(Debug, Serialize)]
pub struct FailoverReport {
    pub fault: DemoFault,
    pub cluster: String,
    pub old_primary: String,
    pub new_primary: String,
    /// Fault to the first write acknowledged by the new primary.
    pub first_write_ms: u64,
    pub acknowledged_writes: usize,
    pub lost_writes: usize,
    /// Heal (restart / continue) to the old primary serving as a sync replica again.
    pub rejoined_ms: Option<u64>,
    /// The other clusters' primaries and epochs did not change (a crash or hang touches one
    /// cluster only; a node loss takes every server of the room).
    pub others_unchanged: bool,
}

/// Injects `fault` into the primary's room while a writer runs, measures the time to the first
/// acknowledged write on the new primary, checks nothing acknowledged was lost, heals the room
/// and waits for the old primary to rejoin as a replica.
pub async fn failover(
    dir: &Path,
    fault: DemoFault,
    cluster: &str,
) -> Result<FailoverReport, CliError> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let mut d = read_demo(dir)?;
    let eps: Vec<String> = d.members.iter().map(|m| m.grpc.clone()).collect();
    let before = wait_healthy(&eps, Duration::from_secs(60)).await?;
    let old = before
        .clusters
        .iter()
        .find(|c| c.name == cluster)
        .ok_or_else(|| {
            CliError::Usage(format!(
                "no cluster `{cluster}` in the demo (clusters: {})",
                CLUSTERS.join(", ")
            ))
        })?
        .primary
        .clone()
        .ok_or_else(|| CliError::Timeout("no primary".into()))?;
    let others = |s: &GroupStatus| -> Vec<(String, Option<String>, u64)> {
        s.clusters
            .iter()
            .filter(|c| c.name != cluster)
            .map(|c| (c.name.clone(), c.primary.clone(), c.epoch))
            .collect()
    };
    let others_before = others(&before);
    let pg_of = |m: &str| {
        d.postgres
            .iter()
            .find(|p| p.member == m && p.cluster == cluster)
            .cloned()
    };
    let old_pg = pg_of(&old)
        .ok_or_else(|| CliError::Usage(format!("{old} has no postgres in demo.json")))?;
    let addr = |p: &DemoPostgres| format!("{}:{}", p.host, p.port);
    let servers: Vec<String> = d
        .postgres
        .iter()
        .filter(|p| p.cluster == cluster)
        .map(addr)
        .collect();
    let old_addr = addr(&old_pg);
    crate::writer::create_table(&old_addr)
        .await
        .map_err(CliError::Refused)?;
    let first_id = crate::writer::next_id(&old_addr).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (acks, writer) = crate::writer::spawn_writer_from(
        servers,
        stop.clone(),
        first_id,
        10_000_000,
        Duration::from_secs(120),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    let oi = d
        .members
        .iter()
        .position(|m| m.name == old)
        .ok_or_else(|| CliError::Usage(format!("{old} is not in demo.json")))?;
    let pg_pid = postmaster_pid(Path::new(&old_pg.data_dir));
    let t0 = Instant::now();
    match fault {
        DemoFault::Crash => {
            if let Some(p) = pg_pid {
                signal(p, libc::SIGKILL);
            }
        }
        DemoFault::NodeLoss => {
            signal(d.members[oi].pid, libc::SIGKILL);
            if let Some(p) = pg_pid {
                for c in children(p).into_iter().chain([p]) {
                    signal(c, libc::SIGKILL);
                }
            }
        }
        DemoFault::Hang => {
            if let Some(p) = pg_pid {
                for c in children(p).into_iter().chain([p]) {
                    signal(c, libc::SIGSTOP);
                }
            }
        }
    }
    // The first write acknowledged by another server.
    let first = loop {
        if let Some(a) = acks
            .all()
            .into_iter()
            .find(|a| a.at > t0 && a.server != old_addr)
        {
            break a;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            stop.store(true, Ordering::Relaxed);
            return Err(CliError::Timeout(
                "writes did not resume within 60 s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let first_write_ms = (first.at - t0).as_millis() as u64;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let _ = writer.await;
    let new_primary = d
        .postgres
        .iter()
        .find(|p| p.cluster == cluster && addr(p) == first.server)
        .map(|p| p.member.clone())
        .unwrap_or_default();
    let lost = crate::writer::missing_acks(&acks, &first.server)
        .await
        .len();

    // Heal the room.
    match fault {
        DemoFault::Crash => {}
        DemoFault::NodeLoss => {
            let bin = watcher_bin()?;
            let m = d.members[oi].clone();
            d.members[oi].pid = spawn_member(&bin, Path::new(&m.config), Path::new(&m.log))?;
            write_demo(dir, &d)?;
        }
        DemoFault::Hang => {
            if let Some(p) = pg_pid {
                for c in children(p).into_iter().chain([p]) {
                    signal(c, libc::SIGCONT);
                }
            }
        }
    }
    let t1 = Instant::now();
    let after = wait_healthy(&eps, Duration::from_secs(90)).await.ok();
    let rejoined_ms = after.as_ref().map(|_| t1.elapsed().as_millis() as u64);
    let others_unchanged = after.as_ref().is_some_and(|a| others(a) == others_before);
    Ok(FailoverReport {
        fault,
        cluster: cluster.to_string(),
        others_unchanged,
        old_primary: old,
        new_primary,
        first_write_ms,
        acknowledged_writes: acks.all().len(),
        lost_writes: lost,
        rejoined_ms,
    })
}

/// Direct children of `pid` (a postmaster's backends and auxiliary processes).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().nth(1))
                .and_then(|x| x.parse::<u32>().ok());
            if ppid == Some(pid) {
                out.push(p);
            }
        }
    }
    out
}
