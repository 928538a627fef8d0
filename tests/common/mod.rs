//! Test harness: real `pg-watcher` processes on loopback, started and killed by the test.
//! Everything a group starts is killed when the `Group` is dropped, even if the test fails.

#![allow(dead_code)]

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pgw_cli::status::{gather, GroupStatus};
use pgw_core::config::{ListenConfig, LogConfig, MemberConfig, RaftConfig};
use pgw_core::{Config, Role};

pub const WATCHER: &str = env!("CARGO_BIN_EXE_pg-watcher");
pub const PGWCTL: &str = env!("CARGO_BIN_EXE_pgwctl");

/// The certificates of every group this test process starts: one CA, a certificate per member
/// name (valid for every address the harnesses use: 127.0.0.1, 127.0.0.11-20 and the network
/// bed's 10.99.0.11-20) and one client certificate per operator role (`test-read`,
/// `test-operate`, `test-admin`). Made once per process; the `admin` client is the default
/// credential of the pgwctl library calls the tests make.
pub struct Pki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    authority: pgw_cli::certs::Authority,
    issued: std::sync::Mutex<std::collections::BTreeMap<String, (PathBuf, PathBuf)>>,
    /// The CA and the role certificates (no member certificates: see [`Pki::member`]).
    pub group: pgw_cli::certs::GroupCerts,
}

pub fn pki() -> &'static Pki {
    static PKI: std::sync::OnceLock<Pki> = std::sync::OnceLock::new();
    PKI.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("pgw-pki-")
            .tempdir()
            .expect("pki dir")
            .keep();
        // postgres (another OS user) never reads these; the watchers run as us.
        let g = pgw_cli::certs::GroupCerts::make(&dir, &[], "test").expect("test certificates");
        let authority = pgw_cli::certs::Authority::open(&dir).expect("open test CA");
        pgw_cli::client::set_default(g.client_auth("admin").expect("admin credentials"));
        Pki {
            ca: g.ca.clone(),
            dir,
            authority,
            issued: Default::default(),
            group: g,
        }
    })
}

impl Pki {
    /// The certificate and key of member `name` (issued on first use).
    pub fn member(&self, name: &str) -> (PathBuf, PathBuf) {
        let mut issued = self.issued.lock().expect("pki lock");
        if let Some(x) = issued.get(name) {
            return x.clone();
        }
        let mut hosts = vec!["127.0.0.1".to_string()];
        for i in 11..=20 {
            hosts.push(format!("127.0.0.{i}"));
            hosts.push(format!("10.99.0.{i}"));
        }
        let x = self
            .authority
            .member(name, &hosts, 30)
            .expect("member certificate");
        issued.insert(name.to_string(), x.clone());
        x
    }

    /// A fresh certificate of member `name` valid `days`, written into `dir` (for reload tests).
    pub fn member_into(&self, dir: &Path, name: &str, days: u32) -> (PathBuf, PathBuf) {
        let hosts: Vec<String> = vec!["127.0.0.1".into()];
        self.authority
            .member_into(dir, name, &hosts, days)
            .expect("member certificate")
    }

    /// The `[tls]` section of member `name`.
    pub fn tls(&self, name: &str) -> pgw_core::config::TlsConfig {
        let (cert, key) = self.member(name);
        pgw_core::config::TlsConfig::new(self.ca.clone(), cert, key)
    }

    /// The `[auth]` section: the three role certificates.
    pub fn auth(&self) -> pgw_core::config::AuthConfig {
        self.group.auth()
    }

    /// Client credentials of `role` (read | operate | admin).
    pub fn client(&self, role: &str) -> pgw_cli::client::ClientAuth {
        self.group.client_auth(role).expect("client credentials")
    }

    /// A member's own certificate as client credentials (for calls only members may make).
    pub fn member_auth(&self, name: &str) -> pgw_cli::client::ClientAuth {
        let (c, k) = self.member(name);
        pgw_cli::client::ClientAuth::from_files(Some(&self.ca), Some(&c), Some(&k), None)
            .expect("member credentials")
    }

    /// `pgwctl` arguments for `role`.
    pub fn pgwctl_args(&self, role: &str) -> Vec<String> {
        let (_, c, k) = &self.group.clients[role];
        vec![
            "--ca".into(),
            self.ca.display().to_string(),
            "--cert".into(),
            c.display().to_string(),
            "--key".into(),
            k.display().to_string(),
        ]
    }
}

pub fn free_port() -> u16 {
    free_port_on("127.0.0.1")
}

pub struct Member {
    pub cfg: Config,
    pub cfg_path: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
}

impl Member {
    pub fn name(&self) -> &str {
        &self.cfg.member
    }
    pub fn grpc(&self) -> String {
        self.cfg.me().map(|m| m.grpc.clone()).unwrap_or_default()
    }
    pub fn http(&self) -> String {
        self.cfg.me().map(|m| m.http.clone()).unwrap_or_default()
    }
}

pub struct Group {
    pub dir: tempfile::TempDir,
    pub members: Vec<Member>,
}

/// Member configs for `roles`, with fresh loopback ports and data dirs under `dir`.
pub fn configs(dir: &Path, cluster_id: &str, roles: &[Role]) -> Vec<Config> {
    make_configs(dir, cluster_id, roles, false)
}

/// Configs for a group that manages PostgreSQL: member i lives on 127.0.0.(11+i), like a host of
/// its own, with gRPC, HTTP and postgres ports there.
pub fn pg_configs(dir: &Path, cluster_id: &str, roles: &[Role]) -> Vec<Config> {
    make_configs(dir, cluster_id, roles, true)
}

fn make_configs(dir: &Path, cluster_id: &str, roles: &[Role], with_pg: bool) -> Vec<Config> {
    let members: Vec<MemberConfig> = roles
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let ip = if with_pg {
                format!("127.0.0.{}", 11 + i)
            } else {
                "127.0.0.1".to_string()
            };
            MemberConfig {
                name: match r {
                    Role::Data => format!("room-{}", (b'a' + i as u8) as char),
                    Role::Arbiter => "arbiter".to_string(),
                    Role::Sidecar => format!("sidecar-{}", (b'a' + i as u8) as char),
                },
                id: i as u64 + 1,
                role: *r,
                grpc: format!("{ip}:{}", free_port_on(&ip)),
                http: format!("{ip}:{}", free_port_on(&ip)),
                priority: 100,
                postgres: (with_pg && *r == Role::Data)
                    .then(|| format!("{ip}:{}", free_port_on(&ip))),
                pgpool: None,
                pcp: None,
                room: None,
                spare: false,
            }
        })
        .collect();
    members
        .iter()
        .map(|m| Config {
            cluster_id: cluster_id.to_string(),
            member: m.name.clone(),
            data_dir: dir.join(&m.name).join("data"),
            members: members.clone(),
            listen: ListenConfig::default(),
            timing: Default::default(),
            raft: RaftConfig::default(),
            clusters: pgw_core::config::defaults::clusters(),
            active_cluster: None,
            log: LogConfig {
                level: "info,openraft=warn".into(),
            },
            postgres: (with_pg && m.role == Role::Data)
                .then(|| pgw_core::config::PostgresConfig {
                    settings: vec![
                        "shared_buffers = '16MB'".into(),
                        "max_connections = 40".into(),
                    ],
                    ..pgw_core::config::PostgresConfig::new(
                        dir.join(&m.name).join("pg").join("data"),
                    )
                })
                .into_iter()
                .collect(),
            failover: Default::default(),
            pgpool: None,
            tls: pki().tls(&m.name),
            auth: pki().auth(),
            hooks: Vec::new(),
            generation: 0,
            pools: Default::default(),
        })
        .collect()
}

/// Writes `cfg` to `path` and starts a daemon on it, logging to `log`.
pub fn spawn(cfg: &Config, path: &Path, log: &Path) -> Child {
    fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    fs::write(path, cfg.to_toml().expect("toml")).expect("write config");
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    let err = out.try_clone().expect("dup");
    Command::new(WATCHER)
        .arg("--config")
        .arg(path)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn pg-watcher")
}

/// A free TCP port on `ip` (a loopback address), never one this process handed out
/// before: the kernel may return a just-released port again, and two servers of one
/// member were once given the same port (postgres answered by the HTTP listener).
pub fn free_port_on(ip: &str) -> u16 {
    static ISSUED: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    for _ in 0..1000 {
        let l = TcpListener::bind((ip, 0)).expect("bind an ephemeral loopback port");
        let port = l.local_addr().expect("local addr").port();
        let mut issued = ISSUED.lock().unwrap_or_else(|e| e.into_inner());
        if issued.insert(port) {
            return port;
        }
    }
    panic!("no fresh port on {ip} after 1000 tries");
}

impl Group {
    /// A group whose data members manage real PostgreSQL servers.
    pub fn with_postgres(roles: &[Role]) -> Group {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        // postgres (another OS user) must be able to reach its directories.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        let cfgs = pg_configs(dir.path(), "pgtest", roles);
        Group::from_configs(dir, cfgs)
    }

    /// Like `with_postgres`, and every data member's watcher runs its room's pgpool-II (on the
    /// member's own loopback address), repointed by the leader through PCP.
    pub fn with_pgpool(roles: &[Role]) -> Group {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        let mut cfgs = pg_configs(dir.path(), "pgtest", roles);
        let pass = dir.path().join("pcp.pass");
        fs::write(&pass, "pcp-test-secret\n").expect("write pcp password");
        fs::set_permissions(&pass, fs::Permissions::from_mode(0o600)).expect("chmod");
        let mut members = cfgs[0].members.clone();
        for m in members.iter_mut().filter(|m| m.role == Role::Data) {
            let ip = m
                .grpc
                .rsplit_once(':')
                .map(|x| x.0.to_string())
                .unwrap_or_default();
            m.pgpool = Some(format!("{ip}:{}", free_port_on(&ip)));
            m.pcp = Some(format!("{ip}:{}", free_port_on(&ip)));
        }
        for c in &mut cfgs {
            c.members = members.clone();
            c.pgpool = Some(pgw_core::config::PgpoolConfig {
                manage: true,
                bin_dir: pgw_core::config::defaults::pgpool_bin_dir(),
                work_dir: Some(dir.path().join(&c.member).join("pgpool")),
                os_user: "postgres".into(),
                pcp_user: "pgwatcher".into(),
                check_user: None,
                pcp_password_file: pass.clone(),
                check_interval_ms: 1000,
                settings: vec![],
            });
        }
        Group::from_configs(dir, cfgs)
    }

    /// The pgpool work directory of member `i`.
    pub fn pgpool_dir(&self, i: usize) -> Option<PathBuf> {
        let m = self.members[i].cfg.me()?;
        m.pgpool.as_ref()?;
        self.members[i].cfg.pgpool_work_dir("global")
    }

    /// The client address of member `i`'s pgpool.
    pub fn pgpool_addr(&self, i: usize) -> String {
        self.members[i]
            .cfg
            .me()
            .and_then(|m| m.pgpool.clone())
            .unwrap_or_default()
    }

    /// The pid of member `i`'s pgpool.
    pub fn pgpool_pid(&self, i: usize) -> Option<i32> {
        pgw_server::pgpool::managed::pgpool_pid(&self.pgpool_dir(i)?)
    }

    /// A group of members (not started yet) with their files under `dir`.
    pub fn from_configs(dir: tempfile::TempDir, cfgs: Vec<Config>) -> Group {
        let members = cfgs
            .into_iter()
            .map(|cfg| {
                let base = dir.path().join(&cfg.member);
                Member {
                    cfg_path: base.join("pg-watcher.toml"),
                    log: base.join("pg-watcher.log"),
                    cfg,
                    child: None,
                }
            })
            .collect();
        Group { dir, members }
    }

    /// Lets the cluster run without synchronous standbys after `after_ms` (allow_degraded).
    pub fn allow_degraded(&mut self, after_ms: u64) {
        for m in &mut self.members {
            for c in &mut m.cfg.clusters {
                c.allow_degraded = true;
                c.degrade_after_ms = after_ms;
            }
        }
    }

    /// The postgres address of a data member.
    pub fn pg_addr(&self, i: usize) -> String {
        self.members[i]
            .cfg
            .me()
            .and_then(|m| m.postgres.clone())
            .unwrap_or_default()
    }

    /// The postmaster pid of a data member, from its pid file.
    pub fn postmaster_pid(&self, i: usize) -> Option<i32> {
        let d = &self.members[i].cfg.postgres.first()?.data_dir;
        let t = fs::read_to_string(d.join("postmaster.pid")).ok()?;
        t.lines().next()?.trim().parse().ok()
    }

    /// The postmaster pid of member `i`'s server of `cluster`, from its pid file.
    pub fn postmaster_pid_of(&self, i: usize, cluster: &str) -> Option<i32> {
        let d = &self.members[i].cfg.postgres_for(cluster)?.data_dir;
        let t = fs::read_to_string(d.join("postmaster.pid")).ok()?;
        t.lines().next()?.trim().parse().ok()
    }

    /// The postmasters of member `i` (every server it runs) and all their children.
    pub fn pg_pids(&self, i: usize) -> Vec<i32> {
        let mut out = Vec::new();
        for c in self.members[i].cfg.local_clusters() {
            if let Some(pm) = self.postmaster_pid_of(i, &c) {
                out.push(pm);
                out.extend(pgw_server::sidecar::pgctl::children_of(pm));
            }
        }
        out
    }

    /// Sends `sig` to the postmaster of member `i` and all its children.
    pub fn signal_pg(&self, i: usize, sig: i32) {
        for pid in self.pg_pids(i) {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(pid, sig);
            }
        }
    }

    /// Sends `sig` to the watcher process of member `i`.
    pub fn signal_watcher(&self, i: usize, sig: i32) {
        if let Some(c) = &self.members[i].child {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    pub fn new(roles: &[Role]) -> Group {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfgs = configs(dir.path(), "itest", roles);
        Group::from_configs(dir, cfgs)
    }

    pub fn start_all(&mut self) {
        for i in 0..self.members.len() {
            self.start(i);
        }
    }

    pub fn start(&mut self, i: usize) {
        let m = &mut self.members[i];
        assert!(m.child.is_none(), "{} already running", m.name());
        m.child = Some(spawn(&m.cfg, &m.cfg_path, &m.log));
    }

    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            c.kill().expect("SIGKILL");
            let _ = c.wait();
        }
    }

    pub fn terminate(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            // SAFETY: kill(2) on our own child has no memory-safety preconditions.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn index_of(&self, name: &str) -> usize {
        self.members
            .iter()
            .position(|m| m.name() == name)
            .unwrap_or_else(|| panic!("no member {name}"))
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.grpc()).collect()
    }

    pub fn endpoints_except(&self, name: &str) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| m.name() != name)
            .map(|m| m.grpc())
            .collect()
    }

    pub fn log_text(&self, i: usize) -> String {
        fs::read_to_string(&self.members[i].log).unwrap_or_default()
    }

    pub fn dump_logs(&self) {
        // Keep the whole logs (watcher and postgres) of a failed test for inspection.
        let keep = std::env::temp_dir().join("pgw-failed").join(
            self.dir
                .path()
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default(),
        );
        for (i, m) in self.members.iter().enumerate() {
            keep_logs(
                &keep,
                m.name(),
                &m.log,
                m.cfg.postgres.first().map(|pg| pg.data_dir.as_path()),
                self.pgpool_dir(i).as_deref(),
            );
        }
    }
}

/// Copies one member's logs (watcher, postgres, pgpool) into `keep` and prints the tail of its
/// pg-watcher lines: what a failed test leaves for inspection.
pub fn keep_logs(
    keep: &Path,
    name: &str,
    log: &Path,
    pg_data_dir: Option<&Path>,
    pgpool_dir: Option<&Path>,
) {
    let _ = fs::create_dir_all(keep);
    let _ = fs::copy(log, keep.join(format!("{name}.log")));
    if let Some(d) = pg_data_dir {
        let mut run = d.to_path_buf().into_os_string();
        run.push(".run/postgres.log");
        let _ = fs::copy(
            PathBuf::from(run),
            keep.join(format!("{name}.postgres.log")),
        );
    }
    if let Some(d) = pgpool_dir {
        let _ = fs::copy(
            d.join("pgpool.log"),
            keep.join(format!("{name}.pgpool.log")),
        );
    }
    let text = fs::read_to_string(log).unwrap_or_default();
    let useful: Vec<&str> = text.lines().filter(|l| l.contains("pgw_server")).collect();
    eprintln!(
        "===== log of {name} (pg-watcher lines; all logs kept in {}) =====\n{}",
        keep.display(),
        tail(&useful.join("\n"), 40)
    );
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Drop for Group {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("PGW_KEEP_LOGS").is_some() {
            self.dump_logs();
        }
        for i in 0..self.members.len() {
            self.kill9(i);
        }
        // Stop every postgres and pgpool the group started (the watchers are gone).
        for i in 0..self.members.len() {
            self.signal_pg(i, libc::SIGCONT);
            self.signal_pg(i, libc::SIGKILL);
            let cfg = &self.members[i].cfg;
            for d in cfg
                .managed_pgpools()
                .iter()
                .filter_map(|c| cfg.pgpool_work_dir(c))
            {
                if let Some(pid) = pgw_server::pgpool::managed::pgpool_pid(&d) {
                    // SAFETY: kill(2) has no memory-safety preconditions.
                    unsafe {
                        libc::kill(-pid, libc::SIGCONT);
                    }
                }
                pgw_server::pgpool::managed::stop_pgpool(&d);
            }
        }
    }
}

/// The first PostgreSQL cluster's primary.
pub fn primary_of(s: &GroupStatus) -> Option<String> {
    s.clusters.first().and_then(|c| c.primary.clone())
}

/// The first PostgreSQL cluster's epoch.
pub fn epoch_of(s: &GroupStatus) -> u64 {
    s.clusters.first().map(|c| c.epoch).unwrap_or(0)
}

/// How status names `member` in the first PostgreSQL cluster.
pub fn node_role(s: &GroupStatus, member: &str) -> Option<String> {
    s.clusters
        .first()?
        .nodes
        .iter()
        .find(|n| n.member == member)
        .map(|n| n.role.clone())
}

/// Polls until a leader is known (other than `not`), within `limit`.
/// Waits until there is a primary and every other data member is a sync replica.
pub async fn wait_in_sync(g: &Group, limit: Duration) -> GroupStatus {
    let names: Vec<String> = g
        .members
        .iter()
        .filter(|m| m.cfg.me().is_some_and(|x| x.role == Role::Data))
        .map(|m| m.name().to_string())
        .collect();
    wait_until(
        &g.endpoints(),
        limit,
        "a primary and all replicas in sync",
        |s| {
            let Some(p) = primary_of(s) else { return false };
            node_role(s, &p).as_deref() == Some("primary")
                && names
                    .iter()
                    .filter(|n| **n != p)
                    .all(|n| node_role(s, n).as_deref() == Some("sync_replica"))
        },
    )
    .await
}

/// `kill -9` of member `oi`'s postmaster (the primary `old`), then waits for another primary.
pub async fn crash_primary(g: &Group, oi: usize, old: &str) -> GroupStatus {
    let pid = g.postmaster_pid(oi).expect("postmaster pid");
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    wait_until(
        &g.endpoints(),
        Duration::from_secs(60),
        "a new primary",
        |s| primary_of(s).is_some_and(|p| p != old),
    )
    .await
}

pub async fn wait_leader(eps: &[String], not: Option<&str>, limit: Duration) -> GroupStatus {
    let t0 = Instant::now();
    loop {
        if let Ok(s) = gather(eps, Duration::from_millis(500)).await {
            if let Some(l) = &s.leader {
                if not != Some(l.as_str()) {
                    return s;
                }
            }
        }
        assert!(
            t0.elapsed() < limit,
            "no leader (other than {not:?}) within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `check` on the gathered status until it returns true, within `limit`.
pub async fn wait_until(
    eps: &[String],
    limit: Duration,
    what: &str,
    check: impl Fn(&GroupStatus) -> bool,
) -> GroupStatus {
    let t0 = Instant::now();
    let mut last = None;
    loop {
        if let Ok(s) = gather(eps, Duration::from_millis(500)).await {
            if check(&s) {
                return s;
            }
            last = Some(s);
        }
        assert!(
            t0.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}; last status: {last:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for a child to exit on its own; returns its exit code.
pub fn wait_exit(child: &mut Child, limit: Duration) -> Option<i32> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if let Ok(Some(st)) = child.try_wait() {
            return st.code();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// A plain HTTP/1.1 GET on loopback; returns (status code, whole response).
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    let s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect http");
    http_exchange(s, addr, "GET", path).await
}

/// One HTTP/1.1 request over `s` (plain or TLS): (status code, whole answer).
pub async fn http_exchange<S>(mut s: S, addr: &str, method: &str, path: &str) -> (u16, String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send");
    let mut buf = Vec::new();
    // A TLS peer may close without close_notify: what arrived counts (no answer: code 0).
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).to_string();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

/// The history of `cluster` (all when empty) as member `ep` has it.
pub async fn history(ep: &str, cluster: &str, limit: u32) -> Vec<pgw_proto::HistoryEntry> {
    pgw_cli::status::connect(ep, Duration::from_secs(2))
        .await
        .expect("connect")
        .history(pgw_proto::HistoryRequest {
            cluster: cluster.into(),
            limit,
        })
        .await
        .expect("history")
        .into_inner()
        .entries
}

/// `pgwctl --endpoints EPS ARGS` as an operator runs it (admin certificate), printing what it
/// said: (exit code, stdout and stderr).
pub fn pgwctl_admin(eps: &[String], args: &[&str]) -> (i32, String) {
    let out = Command::new(PGWCTL)
        .args(pki().pgwctl_args("admin"))
        .arg("--endpoints")
        .arg(eps.join(","))
        .args(args)
        .output()
        .expect("run pgwctl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("pgwctl {}: {text}", args.join(" "));
    (out.status.code().unwrap_or(-1), text)
}

/// `pgwctl member add|replace` arguments naming member `m`: `--id` (first, after it its value),
/// `--role`, `--grpc`, `--http`, `--room`, and `--postgres`, `--pgpool`, `--pcp` where it has them.
pub fn member_args(m: &MemberConfig) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "--id".into(),
        m.id.to_string(),
        "--role".into(),
        m.role.to_string(),
        "--grpc".into(),
        m.grpc.clone(),
        "--http".into(),
        m.http.clone(),
        "--room".into(),
        m.room().to_string(),
    ];
    for (flag, v) in [
        ("--postgres", &m.postgres),
        ("--pgpool", &m.pgpool),
        ("--pcp", &m.pcp),
    ] {
        if let Some(v) = v {
            a.extend([flag.to_string(), v.clone()]);
        }
    }
    a
}
