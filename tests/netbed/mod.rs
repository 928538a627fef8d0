//! Network test bed: every room, the arbiter and the clients are hosts of their own, each a
//! network namespace joined by a veth pair to a bridge that lives in a namespace of its own.
//!
//! ```text
//!   ns <p>-room-a        ns <p>-room-b        ns <p>-room-c / <p>-arbiter     ns <p>-client
//!   watcher+pg+pgpool    watcher+pg+pgpool    watcher(+pg+pgpool)             the test's writers
//!   eth0 10.99.0.11      eth0 10.99.0.12      eth0 10.99.0.13                 eth0 10.99.0.100
//!        |                    |                    |                               |
//!   -----h0-------------------h1-------------------h2---------------------------hc-----
//!                       ns <p>-sw: bridge br0 + nftables (bridge family) for cuts
//! ```
//!
//! Faults: a room (or the arbiter) cut off from the other members, with or without its own
//! clients; the link between two hosts cut both ways or one way; latency and jitter between
//! members; kill, pause and restart of any process; a whole room restarted. The kernel here has no
//! `sch_netem`, so latency is added by a small userspace switch (`switch.rs`) that takes the
//! bridge's place while latency is on. Nothing is routed out of the namespaces: they have no
//! default route and no link to the root namespace, so every packet stays inside the bed.
//!
//! Everything (processes, namespaces) is torn down when the `Bed` is dropped, also when a test
//! panics; namespaces left by a test process that was killed are removed by the next bed.
//! Needs root (namespaces, nftables): `Bed::start` says so and panics otherwise; CI runs as root.

#![allow(dead_code)]

pub mod checker;
pub mod switch;

use std::collections::BTreeSet;
use std::fs;
use std::future::Future;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgw_cli::status::{gather, GroupStatus};
use pgw_core::config::{ListenConfig, LogConfig, MemberConfig, PgpoolConfig, RaftConfig};
use pgw_core::{Config, Role};

use crate::common::WATCHER;

pub const SUBNET: &str = "10.99.0.0/24";
pub const CLIENT_IP: &str = "10.99.0.100";
const GRPC_PORT: u16 = 7400;
const HTTP_PORT: u16 = 7401;
const PG_PORT: u16 = 25432;
const PGPOOL_PORT: u16 = 29999;
const PCP_PORT: u16 = 29898;
const NS_PREFIX: &str = "pgwt-";

static BEDS: AtomicUsize = AtomicUsize::new(0);

/// The two production layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    ThreeRooms,
    TwoRoomsArbiter,
    TwoRooms,
}

impl Layout {
    pub fn roles(self) -> Vec<Role> {
        match self {
            Layout::ThreeRooms => vec![Role::Data, Role::Data, Role::Data],
            Layout::TwoRoomsArbiter => vec![Role::Data, Role::Data, Role::Arbiter],
            Layout::TwoRooms => vec![Role::Data, Role::Data],
        }
    }
}

/// What a bed holds besides one group of its layout.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Hosts on the bed's network that are not members at bootstrap (name, role): each has a
    /// config file naming itself (the first member's, with its own entry added) and is started
    /// by the test, with `--join`, after `pgwctl member add`. Node id: host index + 1.
    pub newcomers: Vec<(&'static str, Role)>,
    /// A second group in another region (members `dr-a`, `dr-b`, `arbiter-dr` or `dr-c`,
    /// cluster id `netbed-dr`) whose cluster is `standby_of` the first group's; the first group
    /// lets its members read its status.
    pub standby_group: Option<Layout>,
}

/// One member: a host (namespace) with its watcher, and for data members postgres + pgpool.
pub struct Host {
    /// 0: the bed's group; 1: the standby group of [`Plan::standby_group`].
    pub group: usize,
    /// Not a member at bootstrap (see [`Plan::newcomers`]): not started with the bed.
    pub newcomer: bool,
    pub ns: String,
    pub ip: String,
    pub port: String,
    pub cfg: Config,
    pub cfg_path: PathBuf,
    pub log: PathBuf,
}

impl Host {
    pub fn name(&self) -> &str {
        &self.cfg.member
    }
    pub fn is_data(&self) -> bool {
        !self.cfg.postgres.is_empty()
    }
    pub fn grpc(&self) -> String {
        format!("{}:{GRPC_PORT}", self.ip)
    }
    pub fn pg_addr(&self) -> String {
        format!("{}:{PG_PORT}", self.ip)
    }
    pub fn pgpool_addr(&self) -> String {
        format!("{}:{PGPOOL_PORT}", self.ip)
    }
    pub fn pgpool_dir(&self) -> Option<PathBuf> {
        self.is_data()
            .then(|| self.cfg.pgpool_work_dir("global"))
            .flatten()
    }
}

/// Who may talk to whom: directed (from, to) host pairs whose frames the switch drops.
/// Host index `hosts.len()` is the client namespace.
pub type Blocked = Arc<Mutex<BTreeSet<(usize, usize)>>>;

pub struct Bed {
    pub dir: tempfile::TempDir,
    pub layout: Layout,
    pub prefix: String,
    pub sw_ns: String,
    pub client_ns: String,
    pub hosts: Vec<Host>,
    children: Mutex<Vec<Option<Child>>>,
    blocked: Blocked,
    latency: Mutex<Option<switch::DelaySwitch>>,
    namespaces: Vec<String>,
    /// Set for a bed started from the shipped examples: the watchers run as this OS user, from
    /// this copy of the binary, on the config files as written (never re-rendered).
    shipped: Option<(String, PathBuf)>,
}

/// Runs `ip ARGS`; panics with its stderr when it fails (test set-up must not half-succeed).
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip`: {e} (install iproute2)"));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Runs `nft -f -` inside namespace `ns` with `script` on stdin.
fn nft(ns: &str, script: &str) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run nft: {e} (install nftables)"));
    child
        .stdin
        .take()
        .expect("nft stdin")
        .write_all(script.as_bytes())
        .expect("write nft script");
    let out = child.wait_with_output().expect("nft");
    assert!(
        out.status.success(),
        "nft in {ns}: {}\nscript:\n{script}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Removes namespaces left behind by bed processes that no longer exist.
fn remove_stale_namespaces() {
    let Ok(rd) = fs::read_dir("/run/netns") else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            kill_namespace_processes(&name);
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

/// SIGKILLs every process living in namespace `ns` (what a killed test left: watchers, their
/// postgres, pgpool, a pg_basebackup...): deleting a namespace does not stop them.
fn kill_namespace_processes(ns: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, libc::SIGCONT);
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// Moves the calling thread into network namespace `ns`.
pub fn enter_ns(ns: &str) {
    let f = fs::File::open(format!("/run/netns/{ns}"))
        .unwrap_or_else(|e| panic!("open namespace {ns}: {e}"));
    use std::os::fd::AsRawFd;
    // SAFETY: setns(2) on a valid namespace fd; it only changes this thread's network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns({ns}): {}", std::io::Error::last_os_error());
}

impl Bed {
    /// Builds the namespaces, the bridge and the configs, and starts every member.
    pub fn start(layout: Layout) -> Bed {
        Self::start_with(layout, |_| {})
    }

    /// [`Bed::start`] with every member's config changed by `f` first.
    pub fn start_with(layout: Layout, f: impl Fn(&mut Config)) -> Bed {
        Self::start_plan(layout, Plan::default(), f)
    }

    /// A bed of `layout` with the extra hosts of `plan`; `f` changes every config first (the
    /// standby group's and the newcomers' too).
    pub fn start_plan(layout: Layout, plan: Plan, f: impl Fn(&mut Config)) -> Bed {
        let (prefix, dir) = Self::prepare();
        let names = layout_names(layout, "room-", "arbiter");
        let mut cfgs = configs(dir.path(), "netbed", &names, 0);
        let mut groups = vec![0; cfgs.len()];
        let mut newcomers = vec![false; cfgs.len()];
        if let Some(dr) = plan.standby_group {
            let names = layout_names(dr, "dr-", "arbiter-dr");
            let main_eps: Vec<String> = cfgs[0].members.iter().map(|m| m.grpc.clone()).collect();
            for c in cfgs.iter_mut() {
                c.auth.read.extend(names.iter().map(|(n, _)| n.clone()));
            }
            let mut more = configs(dir.path(), "netbed-dr", &names, cfgs.len());
            for c in more.iter_mut() {
                c.clusters[0].standby_of = Some(pgw_core::config::StandbyOf {
                    endpoints: main_eps.clone(),
                    cluster: None,
                    poll_ms: 300,
                });
            }
            groups.extend(more.iter().map(|_| 1));
            newcomers.extend(more.iter().map(|_| false));
            cfgs.extend(more);
        }
        for (name, role) in &plan.newcomers {
            // The group's bootstrap list plus itself (the group's list replaces it on joining).
            let mut members = cfgs[0].members.clone();
            members.push(member_entry(name, *role, cfgs.len()));
            let c = member_config(dir.path(), "netbed", name, *role, members);
            groups.push(0);
            newcomers.push(true);
            cfgs.push(c);
        }
        cfgs.iter_mut().for_each(f);
        for c in &cfgs {
            c.validate()
                .unwrap_or_else(|e| panic!("{}: invalid bed config: {e}", c.member));
        }
        Self::start_from(layout, prefix, dir, cfgs, None, groups, newcomers)
    }

    fn prepare() -> (String, tempfile::TempDir) {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "the network fault tests need root (network namespaces, veth, nftables); run them as root, as CI does"
        );
        remove_stale_namespaces();
        let n = BEDS.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("{NS_PREFIX}{}-{n}", std::process::id());
        let dir = tempfile::tempdir().expect("tempdir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        (prefix, dir)
    }

    /// A bed running a layout of `deploy/` as shipped: the example files with only addresses,
    /// ports (never 5432) and paths substituted, certificates made by `deploy/tls/make-certs.sh`,
    /// the password file and PCP password written the way the README says, every watcher run
    /// as the OS user `postgres` as the systemd unit runs it. Returns the bed and the
    /// directory holding the operators' certificates (`ops.crt`...).
    pub fn start_shipped(layout: Layout) -> (Bed, PathBuf) {
        let (prefix, dir) = Self::prepare();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let src = root.join("deploy").join(match layout {
            Layout::ThreeRooms => "three-rooms",
            Layout::TwoRoomsArbiter => "two-rooms-arbiter",
            Layout::TwoRooms => "two-rooms",
        });
        let mut texts = std::collections::BTreeMap::new();
        for e in fs::read_dir(&src).expect("deploy dir") {
            let p = e.expect("entry").path();
            if p.extension().is_some_and(|x| x == "toml") {
                let t = fs::read_to_string(&p).expect("example");
                let c = Config::from_toml(&t, &p.display().to_string()).expect("example parses");
                texts.insert(c.member.clone(), t);
            }
        }
        let first = texts.values().next().expect("examples");
        let members = Config::from_toml(first, "example").expect("parses").members;
        let old_ip = |m: &MemberConfig| {
            m.grpc
                .rsplit_once(':')
                .map(|(h, _)| h.to_string())
                .unwrap_or_default()
        };
        let pki = dir.path().join("pki");
        let mut args: Vec<String> = vec![pki.display().to_string()];
        for (i, m) in members.iter().enumerate() {
            args.push(format!("{}=10.99.0.{}", m.name, 11 + i));
        }
        args.extend([
            "--".to_string(),
            "monitoring".into(),
            "ops".into(),
            "dba".into(),
        ]);
        let out = Command::new("bash")
            .arg(root.join("deploy/tls/make-certs.sh"))
            .args(&args)
            .env("PGWCTL", crate::common::PGWCTL)
            .output()
            .expect("make-certs.sh");
        assert!(
            out.status.success(),
            "make-certs.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pg = pgw_server::sidecar::pgctl::lookup_user("postgres").expect("OS user postgres");
        let bin = dir.path().join("bin");
        fs::create_dir_all(&bin).expect("mkdir bin");
        let watcher = bin.join("pg-watcher");
        fs::copy(WATCHER, &watcher).expect("copy the watcher binary");
        let mut cfgs = Vec::new();
        for (i, m) in members.iter().enumerate() {
            let host = dir.path().join(&m.name);
            let etc = host.join("etc");
            fs::create_dir_all(etc.join("tls")).expect("mkdir etc");
            let mut t = texts[&m.name].clone();
            for (j, o) in members.iter().enumerate() {
                t = t.replace(
                    &format!("\"{}:", old_ip(o)),
                    &format!("\"10.99.0.{}:", 11 + j),
                );
            }
            for (from, to) in [
                (":5432\"", ":25432\""),
                (":9999\"", ":29999\""),
                (":9898\"", ":29898\""),
            ] {
                t = t.replace(from, to);
            }
            let h = host.display().to_string();
            t = t
                .replace("/var/lib/pg-watcher-pgpool", &format!("{h}/pgpool"))
                .replace("/var/lib/pg-watcher", &format!("{h}/data"))
                .replace("/var/lib/postgresql/15/pgw", &format!("{h}/pg/data"))
                .replace("/etc/pg-watcher/", &format!("{h}/etc/"));
            assert!(
                !t.contains("10.1.0.") && !t.contains("10.2.0.") && !t.contains("10.3.0."),
                "{t}"
            );
            for f in [
                "ca.crt".to_string(),
                format!("{}.crt", m.name),
                format!("{}.key", m.name),
            ] {
                if pki.join(&f).exists() {
                    fs::copy(pki.join(&f), etc.join("tls").join(&f)).expect("copy certificate");
                }
            }
            // The README's password file: one line per role, mode 0600, owned by postgres.
            fs::write(
                etc.join("pgpass"),
                "*:*:*:replicator:Shipped-Repl-pw\n*:*:*:rewinder:Shipped-Rewind-pw\n*:*:*:pgpool:Shipped-Pool-pw\n",
            )
            .expect("pgpass");
            fs::write(etc.join("pcp.pass"), "Shipped-pcp-pw\n").expect("pcp.pass");
            let path = host.join("pg-watcher.toml");
            fs::write(&path, &t).expect("config");
            let _ = Command::new("chown")
                .args(["-R", &format!("{}:{}", pg.uid, pg.gid)])
                .arg(&host)
                .status();
            for f in [
                etc.join("pgpass"),
                etc.join("pcp.pass"),
                etc.join("tls").join(format!("{}.key", m.name)),
            ] {
                if f.exists() {
                    fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).expect("chmod 600");
                }
            }
            fs::set_permissions(&host, fs::Permissions::from_mode(0o700)).expect("chmod host");
            let _ = i;
            cfgs.push(Config::load(&path).expect("the substituted example is valid"));
        }
        let bed = Self::start_from(
            layout,
            prefix,
            dir,
            cfgs,
            Some(("postgres".into(), watcher)),
            vec![0; members.len()],
            vec![false; members.len()],
        );
        let ops = bed.dir.path().join("pki");
        (bed, ops)
    }

    fn start_from(
        layout: Layout,
        prefix: String,
        dir: tempfile::TempDir,
        cfgs: Vec<Config>,
        shipped: Option<(String, PathBuf)>,
        groups: Vec<usize>,
        newcomers: Vec<bool>,
    ) -> Bed {
        let sw_ns = format!("{prefix}-sw");
        let client_ns = format!("{prefix}-client");
        let hosts: Vec<Host> = cfgs
            .into_iter()
            .enumerate()
            .map(|(i, cfg)| {
                let base = dir.path().join(&cfg.member);
                Host {
                    group: groups[i],
                    newcomer: newcomers[i],
                    ns: format!("{prefix}-{}", cfg.member),
                    ip: format!("10.99.0.{}", 11 + i),
                    port: format!("h{i}"),
                    cfg_path: base.join("pg-watcher.toml"),
                    log: base.join("pg-watcher.log"),
                    cfg,
                }
            })
            .collect();
        let mut namespaces = vec![sw_ns.clone(), client_ns.clone()];
        namespaces.extend(hosts.iter().map(|h| h.ns.clone()));
        let children = Mutex::new(hosts.iter().map(|_| None).collect());
        let bed = Bed {
            dir,
            layout,
            prefix,
            sw_ns,
            client_ns,
            hosts,
            children,
            blocked: Arc::new(Mutex::new(BTreeSet::new())),
            latency: Mutex::new(None),
            namespaces,
            shipped,
        };
        bed.build_network();
        for i in 0..bed.hosts.len() {
            if !bed.hosts[i].newcomer {
                bed.start_watcher(i);
            }
        }
        bed
    }

    fn build_network(&self) {
        for ns in &self.namespaces {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let sw = self.sw_ns.as_str();
        ip(&[
            "-n",
            sw,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "stp_state",
            "0",
        ]);
        ip(&["-n", sw, "link", "set", "br0", "up"]);
        let mut ends: Vec<(String, String, String)> = self
            .hosts
            .iter()
            .map(|h| (h.ns.clone(), h.port.clone(), h.ip.clone()))
            .collect();
        ends.push((self.client_ns.clone(), "hc".into(), CLIENT_IP.into()));
        for (ns, port, addr) in &ends {
            ip(&[
                "-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ]);
            ip(&["-n", sw, "link", "set", port, "master", "br0", "up"]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
        }
        nft(
            sw,
            "table bridge pgwfault {\n  chain cuts {\n    type filter hook forward priority 0; policy accept;\n  }\n}\n",
        );
    }

    /// The switch port name of host `i` (`hosts.len()` = the client namespace).
    fn port_of(&self, i: usize) -> String {
        if i == self.hosts.len() {
            "hc".into()
        } else {
            self.hosts[i].port.clone()
        }
    }

    /// The index of the client namespace in `block`/`unblock`.
    pub fn client(&self) -> usize {
        self.hosts.len()
    }

    pub fn index_of(&self, name: &str) -> usize {
        self.hosts
            .iter()
            .position(|h| h.name() == name)
            .unwrap_or_else(|| panic!("no member {name}"))
    }

    pub fn name(&self, i: usize) -> &str {
        self.hosts[i].name()
    }

    /// The bed's group's data members at bootstrap (the ones the checker writes through).
    pub fn data_members(&self) -> Vec<usize> {
        (0..self.hosts.len())
            .filter(|i| {
                let h = &self.hosts[*i];
                h.is_data() && h.group == 0 && !h.newcomer
            })
            .collect()
    }

    /// gRPC endpoints of the bed's group (newcomers included: one not started refuses at
    /// once, and `gather` takes the member list from the first that answers).
    pub fn endpoints(&self) -> Vec<String> {
        self.group_endpoints(0)
    }

    /// The hosts of group `g` (0: the bed's, 1: the standby group).
    pub fn group_hosts(&self, g: usize) -> Vec<usize> {
        (0..self.hosts.len())
            .filter(|i| self.hosts[*i].group == g)
            .collect()
    }

    pub fn group_endpoints(&self, g: usize) -> Vec<String> {
        self.group_hosts(g)
            .into_iter()
            .map(|i| self.hosts[i].grpc())
            .collect()
    }

    /// Runs `pgwctl` (admin credentials, `--endpoints` of group `g`) in the client namespace;
    /// its exit code and output.
    pub async fn pgwctl(&self, g: usize, args: &[&str]) -> (i32, String) {
        let out = tokio::process::Command::new("ip")
            .args(["netns", "exec", &self.client_ns])
            .arg(crate::common::PGWCTL)
            .args(crate::common::pki().pgwctl_args("admin"))
            .arg("--endpoints")
            .arg(self.group_endpoints(g).join(","))
            .args(args)
            .output()
            .await
            .expect("run pgwctl in the client namespace");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("pgwctl {}: {text}", args.join(" "));
        (out.status.code().unwrap_or(-1), text)
    }

    /// The member whose postgres listens on `addr` (`ip:port`).
    pub fn member_at(&self, addr: &str) -> Option<String> {
        self.hosts
            .iter()
            .find(|h| h.is_data() && h.pg_addr() == addr)
            .map(|h| h.name().to_string())
    }

    fn apply_rules(&self) {
        let set = self.blocked.lock().expect("blocked").clone();
        let mut s = String::from("flush chain bridge pgwfault cuts\n");
        for (a, b) in &set {
            s.push_str(&format!(
                "add rule bridge pgwfault cuts iifname \"{}\" oifname \"{}\" drop\n",
                self.port_of(*a),
                self.port_of(*b)
            ));
        }
        nft(&self.sw_ns, &s);
    }

    /// Drops every frame from `a` to `b` (one way).
    pub fn block_one_way(&self, a: usize, b: usize) {
        self.blocked.lock().expect("blocked").insert((a, b));
        self.apply_rules();
    }

    /// Cuts the link between `a` and `b` (both ways).
    pub fn cut_link(&self, a: usize, b: usize) {
        {
            let mut g = self.blocked.lock().expect("blocked");
            g.insert((a, b));
            g.insert((b, a));
        }
        self.apply_rules();
    }

    /// Cuts host `i` off from every other member; with `keep_clients` the client namespace can
    /// still reach it (its own room's applications).
    pub fn cut_off(&self, i: usize, keep_clients: bool) {
        {
            let mut g = self.blocked.lock().expect("blocked");
            for j in 0..=self.hosts.len() {
                if j == i || (keep_clients && j == self.client()) {
                    continue;
                }
                g.insert((i, j));
                g.insert((j, i));
            }
        }
        self.apply_rules();
    }

    /// Cuts every link between a host of `a` and a host of `b` (both ways; the client namespace
    /// is [`Bed::client`]).
    pub fn cut_between(&self, a: &[usize], b: &[usize]) {
        {
            let mut g = self.blocked.lock().expect("blocked");
            for x in a {
                for y in b {
                    g.insert((*x, *y));
                    g.insert((*y, *x));
                }
            }
        }
        self.apply_rules();
    }

    /// Removes every cut.
    pub fn heal(&self) {
        self.blocked.lock().expect("blocked").clear();
        self.apply_rules();
    }

    /// Latency between members (not towards clients): `delay ± jitter` each way, per packet,
    /// like `tc netem delay D J` on every member's link, but without reordering a link's packets.
    pub fn set_latency(&self, delay: Duration, jitter: Duration) {
        self.set_latency_on(delay, jitter, false)
    }

    /// [`Bed::set_latency`], with `clients` also on the client links.
    pub fn set_latency_on(&self, delay: Duration, jitter: Duration, clients: bool) {
        self.clear_latency();
        let ports: Vec<String> = (0..=self.hosts.len()).map(|i| self.port_of(i)).collect();
        let members = self.hosts.len();
        // The switch starts before the ports leave the bridge, and the ports rejoin the bridge
        // before the switch stops: for a moment frames are duplicated (harmless), never lost.
        let sw = switch::DelaySwitch::start(
            &self.sw_ns,
            &ports,
            Arc::new(move |from: usize, to: usize| {
                if clients || (from < members && to < members) {
                    Some((delay, jitter))
                } else {
                    None
                }
            }),
            self.blocked.clone(),
        )
        .unwrap_or_else(|e| panic!("latency switch: {e}"));
        for p in &ports {
            ip(&["-n", &self.sw_ns, "link", "set", p, "nomaster"]);
        }
        *self.latency.lock().expect("latency") = Some(sw);
    }

    /// Takes the latency switch out and puts the bridge back.
    pub fn clear_latency(&self) {
        let sw = self.latency.lock().expect("latency").take();
        if let Some(sw) = sw {
            for i in 0..=self.hosts.len() {
                ip(&[
                    "-n",
                    &self.sw_ns,
                    "link",
                    "set",
                    &self.port_of(i),
                    "master",
                    "br0",
                ]);
            }
            sw.stop();
        }
    }

    /// Frames forwarded and delayed by the latency switch so far.
    pub fn latency_frames(&self) -> u64 {
        self.latency
            .lock()
            .expect("latency")
            .as_ref()
            .map(|s| s.frames())
            .unwrap_or(0)
    }

    /// Frames the latency switch could not send, and the last error.
    pub fn latency_send_errors(&self) -> (u64, String) {
        self.latency
            .lock()
            .expect("latency")
            .as_ref()
            .map(|s| s.send_errors())
            .unwrap_or_default()
    }

    // ----- processes -----

    pub fn start_watcher(&self, i: usize) {
        self.start_watcher_with(i, None, &[]);
    }

    /// Starts member `i`'s watcher in its namespace with `cfg` written as its file (default:
    /// the bed's) and `extra` arguments (`--join ADDR`).
    pub fn start_watcher_with(&self, i: usize, cfg: Option<&Config>, extra: &[&str]) {
        let h = &self.hosts[i];
        let mut g = self.children.lock().expect("children");
        assert!(g[i].is_none(), "{} already running", h.name());
        if self.shipped.is_none() {
            fs::create_dir_all(h.cfg_path.parent().expect("parent")).expect("mkdir");
            let text = cfg.unwrap_or(&h.cfg).to_toml().expect("toml");
            fs::write(&h.cfg_path, text).expect("write config");
        }
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&h.log)
            .expect("log file");
        let err = out.try_clone().expect("dup");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &h.ns]);
        match &self.shipped {
            // As the unit runs it: `User=postgres` (setpriv execs, so the pid is the watcher's).
            Some((user, bin)) => {
                cmd.args([
                    "setpriv",
                    &format!("--reuid={user}"),
                    &format!("--regid={user}"),
                    "--init-groups",
                    "--",
                ]);
                cmd.arg(bin);
            }
            None => {
                cmd.arg(WATCHER);
            }
        }
        let child = cmd
            .arg("--config")
            .arg(&h.cfg_path)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn pg-watcher in its namespace");
        g[i] = Some(child);
    }

    /// Runs `pg-watcher --config FILE ARGS` for member `i` in its namespace (an offline
    /// command such as `--force-new-group`) and returns its exit code and output.
    pub fn watcher_command(&self, i: usize, args: &[&str]) -> (i32, String) {
        let h = &self.hosts[i];
        let out = Command::new("ip")
            .args(["netns", "exec", &h.ns])
            .arg(WATCHER)
            .arg("--config")
            .arg(&h.cfg_path)
            .args(args)
            .output()
            .expect("run pg-watcher in its namespace");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{}: pg-watcher {}: {text}", h.name(), args.join(" "));
        (out.status.code().unwrap_or(-1), text)
    }

    /// Waits (bounded) for member `i`'s watcher to exit; its exit code (`None`: still running).
    pub fn watcher_exit(&self, i: usize, limit: Duration) -> Option<i32> {
        let t0 = Instant::now();
        loop {
            {
                let mut g = self.children.lock().expect("children");
                if let Some(c) = g[i].as_mut() {
                    if let Ok(Some(st)) = c.try_wait() {
                        g[i] = None;
                        return st.code();
                    }
                } else {
                    return None;
                }
            }
            if t0.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL of member `i`'s watcher (its postgres and pgpool keep running).
    pub fn kill_watcher(&self, i: usize) {
        let c = self.children.lock().expect("children")[i].take();
        if let Some(mut c) = c {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn watcher_pid(&self, i: usize) -> Option<i32> {
        self.children.lock().expect("children")[i]
            .as_ref()
            .map(|c| c.id() as i32)
    }

    pub fn postmaster_pid(&self, i: usize) -> Option<i32> {
        let d = &self.hosts[i].cfg.postgres.first()?.data_dir;
        let t = fs::read_to_string(d.join("postmaster.pid")).ok()?;
        t.lines().next()?.trim().parse().ok()
    }

    pub fn pgpool_pid(&self, i: usize) -> Option<i32> {
        pgw_server::pgpool::managed::pgpool_pid(&self.hosts[i].pgpool_dir()?)
    }

    /// Sends `sig` to member `i`'s postmaster and all its children.
    pub fn signal_postgres(&self, i: usize, sig: i32) {
        let Some(pm) = self.postmaster_pid(i) else {
            return;
        };
        let mut pids = vec![pm];
        pids.extend(pgw_server::sidecar::pgctl::children_of(pm));
        for pid in pids {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(pid, sig);
            }
        }
    }

    pub fn signal_watcher(&self, i: usize, sig: i32) {
        if let Some(pid) = self.watcher_pid(i) {
            // SAFETY: as above.
            unsafe {
                libc::kill(pid, sig);
            }
        }
    }

    /// Sends `sig` to member `i`'s pgpool process group.
    pub fn signal_pgpool(&self, i: usize, sig: i32) {
        if let Some(pid) = self.pgpool_pid(i) {
            // SAFETY: as above.
            unsafe {
                libc::kill(-pid, sig);
            }
        }
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) everything of room `i`.
    pub fn pause_room(&self, i: usize, paused: bool) {
        let sig = if paused { libc::SIGSTOP } else { libc::SIGCONT };
        self.signal_watcher(i, sig);
        self.signal_postgres(i, sig);
        self.signal_pgpool(i, sig);
    }

    /// Kills everything of room `i` at once (watcher, postgres, pgpool), like a power loss.
    pub fn kill_room(&self, i: usize) {
        self.kill_watcher(i);
        self.signal_postgres(i, libc::SIGCONT);
        self.signal_postgres(i, libc::SIGKILL);
        if let Some(d) = self.hosts[i].pgpool_dir() {
            self.signal_pgpool(i, libc::SIGCONT);
            self.signal_pgpool(i, libc::SIGKILL);
            // The pid file outlives the process; the watcher's next start checks it.
            let _ = d;
        }
        // Wait (bounded) until the postmaster is really gone, so a restart finds its port free.
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            let alive = self
                .postmaster_pid(i)
                .is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
            if !alive {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A whole room restarted: everything killed, then the watcher started again (it brings up
    /// its postgres and pgpool).
    pub fn restart_room(&self, i: usize) {
        self.kill_room(i);
        self.start_watcher(i);
    }

    /// Runs `f`'s future on a runtime whose threads all live in the client namespace, so every
    /// connection the test makes (status, writers, probes) crosses the bed's network.
    pub fn run<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = T>,
        T: Send,
    {
        let ns = self.client_ns.clone();
        std::thread::scope(|s| {
            let h = s.spawn(move || {
                enter_ns(&ns);
                let ns2 = ns.clone();
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .on_thread_start(move || enter_ns(&ns2))
                    .build()
                    .expect("runtime");
                rt.block_on(f())
            });
            match h.join() {
                Ok(v) => v,
                Err(p) => std::panic::resume_unwind(p),
            }
        })
    }

    pub fn dump_logs(&self) {
        let keep = std::env::temp_dir().join("pgw-failed").join(&self.prefix);
        for h in &self.hosts {
            crate::common::keep_logs(
                &keep,
                h.name(),
                &h.log,
                h.cfg.postgres.first().map(|pg| pg.data_dir.as_path()),
                h.pgpool_dir().as_deref(),
            );
        }
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("PGW_KEEP_LOGS").is_some() {
            self.dump_logs();
        }
        if let Ok(mut g) = self.latency.lock() {
            if let Some(sw) = g.take() {
                sw.stop();
            }
        }
        for i in 0..self.hosts.len() {
            self.kill_watcher(i);
            self.signal_postgres(i, libc::SIGCONT);
            self.signal_postgres(i, libc::SIGKILL);
            if let Some(d) = self.hosts[i].pgpool_dir() {
                self.signal_pgpool(i, libc::SIGCONT);
                pgw_server::pgpool::managed::stop_pgpool(&d);
            }
        }
        for ns in &self.namespaces {
            kill_namespace_processes(ns);
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// (name, role) of each member of `layout`: data members `<room>a`, `<room>b`...; the arbiter
/// `arbiter`.
fn layout_names(layout: Layout, room: &str, arbiter: &str) -> Vec<(String, Role)> {
    layout
        .roles()
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let n = match r {
                Role::Arbiter => arbiter.to_string(),
                _ => format!("{room}{}", (b'a' + i as u8) as char),
            };
            (n, r)
        })
        .collect()
}

/// The member entry of host `i`: on 10.99.0.(11+i) in its own namespace, node id i + 1, fixed
/// ports (each namespace has its own).
fn member_entry(name: &str, role: Role, i: usize) -> MemberConfig {
    let ip = format!("10.99.0.{}", 11 + i);
    let data = role == Role::Data;
    MemberConfig {
        name: name.to_string(),
        id: i as u64 + 1,
        role,
        grpc: format!("{ip}:{GRPC_PORT}"),
        http: format!("{ip}:{HTTP_PORT}"),
        priority: 100,
        postgres: data.then(|| format!("{ip}:{PG_PORT}")),
        pgpool: data.then(|| format!("{ip}:{PGPOOL_PORT}")),
        pcp: data.then(|| format!("{ip}:{PCP_PORT}")),
        room: None,
        spare: false,
    }
}

/// Member configs of one group (`names`, hosts `first..`), postgres reachable from the bed's
/// subnet only.
fn configs(dir: &Path, cluster_id: &str, names: &[(String, Role)], first: usize) -> Vec<Config> {
    let members: Vec<MemberConfig> = names
        .iter()
        .enumerate()
        .map(|(i, (n, r))| member_entry(n, *r, first + i))
        .collect();
    members
        .iter()
        .map(|m| member_config(dir, cluster_id, &m.name, m.role, members.clone()))
        .collect()
}

fn member_config(
    dir: &Path,
    cluster_id: &str,
    name: &str,
    role: Role,
    members: Vec<MemberConfig>,
) -> Config {
    let pass = dir.join("pcp.pass");
    if !pass.exists() {
        fs::write(&pass, "pcp-test-secret\n").expect("write pcp password");
        fs::set_permissions(&pass, fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let data = role == Role::Data;
    Config {
        cluster_id: cluster_id.to_string(),
        member: name.to_string(),
        data_dir: dir.join(name).join("data"),
        members,
        listen: ListenConfig::default(),
        timing: Default::default(),
        raft: RaftConfig::default(),
        clusters: pgw_core::config::defaults::clusters(),
        active_cluster: None,
        log: LogConfig {
            level: "info,openraft=warn".into(),
        },
        postgres: data
            .then(|| pgw_core::config::PostgresConfig {
                hba: vec![
                    "local all all trust".into(),
                    "host all all 127.0.0.0/8 trust".into(),
                    format!("host all all {SUBNET} trust"),
                    format!("host replication all {SUBNET} trust"),
                ],
                settings: vec![
                    "shared_buffers = '16MB'".into(),
                    "max_connections = 40".into(),
                ],
                ..pgw_core::config::PostgresConfig::new(dir.join(name).join("pg").join("data"))
            })
            .into_iter()
            .collect(),
        failover: Default::default(),
        tls: crate::common::pki().tls(name),
        auth: crate::common::pki().auth(),
        hooks: Vec::new(),
        generation: 0,
        pools: Default::default(),
        pgpool: Some(PgpoolConfig {
            manage: data,
            bin_dir: pgw_core::config::defaults::pgpool_bin_dir(),
            work_dir: data.then(|| dir.join(name).join("pgpool")),
            os_user: "postgres".into(),
            pcp_user: "pgwatcher".into(),
            check_user: None,
            pcp_password_file: pass,
            check_interval_ms: 1000,
            settings: vec![],
        }),
    }
}

/// Switches a config to the `wide-area` timing profile (all its timings).
pub fn wide_area(c: &mut Config) {
    let p = pgw_core::config::TimingProfile::WideArea;
    c.timing = p;
    c.raft = pgw_core::config::RaftConfig::for_profile(p);
    c.failover = pgw_core::config::FailoverConfig::for_profile(p);
}

// ----- status helpers (run inside `Bed::run`) -----

/// A healthy cluster: a primary, every other data member a sync replica, every member answering
/// with a Raft role, every room's pgpool writing to the primary.
pub fn healthy(s: &GroupStatus, data_members: usize) -> bool {
    let Some(c) = s.clusters.first() else {
        return false;
    };
    let Some(p) = &c.primary else { return false };
    s.leader.is_some()
        && s.members.iter().all(|m| m.raft != "unreachable")
        && c.nodes
            .iter()
            .any(|n| &n.member == p && n.role == "primary")
        && c.nodes.iter().filter(|n| n.role == "sync_replica").count() == data_members - 1
        && c.pgpool.len() == data_members
        && c.pgpool
            .iter()
            .all(|pp| pp.agrees && pp.primary.as_ref() == Some(p))
}

impl Bed {
    /// Waits (bounded) until the cluster is healthy; returns the status.
    pub async fn wait_healthy(&self, limit: Duration) -> GroupStatus {
        let n = self.data_members().len();
        crate::common::wait_until(&self.endpoints(), limit, "a healthy cluster", |s| {
            healthy(s, n)
        })
        .await
    }

    pub async fn status(&self) -> Option<GroupStatus> {
        gather(&self.endpoints(), Duration::from_millis(800))
            .await
            .ok()
    }
}

/// A seed for the switch's jitter (printed nowhere: jitter only shapes timing, never an outcome
/// the checks depend on).
pub fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}
