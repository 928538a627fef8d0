//! Controls the local PostgreSQL through its own tools (`initdb`, `pg_ctl`, `pg_basebackup`,
//! `pg_rewind`) and one managed include file, `pgw.conf`, that holds every setting the watcher
//! owns (addresses, replication, `primary_conninfo`, `synchronous_standby_names`). Nothing here
//! decides anything: the reconcile loop calls these in the order the plan says.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use pgw_core::config::PostgresConfig;

/// An error from a postgres tool or file, with the command's output.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("{what}: {message}")]
    Tool { what: String, message: String },
    #[error("{path}: {message}")]
    File { path: String, message: String },
}

impl From<crate::secrets::SecretError> for PgError {
    fn from(e: crate::secrets::SecretError) -> PgError {
        PgError::Tool {
            what: e.what,
            message: e.message,
        }
    }
}

fn ferr(path: &Path, e: impl std::fmt::Display) -> PgError {
    PgError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// A client and the task driving its connection (aborted by the caller when done).
struct LocalSession(tokio_postgres::Client, tokio::task::JoinHandle<()>);

/// The OS identity postgres runs as (only switched to when we are root).
#[derive(Debug, Clone, Copy)]
pub struct OsUser {
    pub uid: u32,
    pub gid: u32,
}

/// The /etc/passwd line (its fields) of the first user `hit` accepts.
fn passwd_entry(hit: impl Fn(&[&str]) -> bool) -> Option<Vec<String>> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 6 && hit(&f)).then(|| f.iter().map(|x| x.to_string()).collect())
    })
}

/// The home directory of an OS user, by name or uid (its `HOME`: libpq looks for client
/// certificates and keys there, and fails on one it cannot read, as root's is to others).
pub fn home_of(name: Option<&str>, uid: u32) -> Option<PathBuf> {
    let f = passwd_entry(|f| match name {
        Some(n) => f[0] == n,
        None => f[2].parse::<u32>().ok() == Some(uid),
    })?;
    Some(PathBuf::from(&f[5]))
}

/// Looks a user up in /etc/passwd.
pub fn lookup_user(name: &str) -> Option<OsUser> {
    let f = passwd_entry(|f| f[0] == name)?;
    Some(OsUser {
        uid: f[2].parse().ok()?,
        gid: f[3].parse().ok()?,
    })
}

pub(crate) fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Where a server is reachable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgAddr {
    pub host: String,
    pub port: u16,
}

impl PgAddr {
    pub fn parse(s: &str) -> Option<PgAddr> {
        let (h, p) = s.rsplit_once(':')?;
        Some(PgAddr {
            host: h.trim_start_matches('[').trim_end_matches(']').to_string(),
            port: p.parse().ok()?,
        })
    }
}

/// Handle on the local server.
#[derive(Debug, Clone)]
pub struct PgCtl {
    pub cfg: PostgresConfig,
    pub member: String,
    pub addr: PgAddr,
    pub os_user: Option<OsUser>,
    /// `HOME` for the tools and the server: that of the user they run as.
    home: Option<PathBuf>,
    /// `[postgres] settings` and `hba` as last (re)loaded: (settings, hba).
    live: std::sync::Arc<std::sync::RwLock<(Vec<String>, Vec<String>)>>,
    /// A standby cluster: the servers it clones, rewinds and streams from are themselves in
    /// recovery (the standby leader, the main group's primary while it is being promoted).
    cascading: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Settings the watcher owns, rendered into `pgw.conf`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Managed {
    /// Upstream to follow, if a standby.
    pub primary_conninfo: Option<String>,
    /// `ANY k (a, b)` or empty.
    pub synchronous_standby_names: String,
}

impl PgCtl {
    pub fn new(cfg: PostgresConfig, member: &str, addr: PgAddr) -> Result<PgCtl, PgError> {
        let os_user = if running_as_root() {
            Some(lookup_user(&cfg.os_user).ok_or_else(|| PgError::Tool {
                what: "postgres.os_user".into(),
                message: format!(
                    "no OS user `{}` (postgres refuses to run as root)",
                    cfg.os_user
                ),
            })?)
        } else {
            None
        };
        // The tools and the server get the HOME of the user they run as, whatever ours is.
        let home = match os_user {
            Some(_) => home_of(Some(&cfg.os_user), 0),
            // SAFETY: geteuid has no preconditions.
            None => home_of(None, unsafe { libc::geteuid() }),
        };
        if let Some(p) = &cfg.passfile {
            check_passfile(p, &cfg, os_user)?;
        }
        let live = std::sync::Arc::new(std::sync::RwLock::new((
            cfg.settings.clone(),
            cfg.hba.clone(),
        )));
        Ok(PgCtl {
            cfg,
            member: member.to_string(),
            addr,
            os_user,
            home,
            live,
            cascading: Default::default(),
        })
    }

    pub fn data(&self) -> &Path {
        &self.cfg.data_dir
    }

    /// Unix socket directory and logs live beside the data directory.
    pub fn run_dir(&self) -> PathBuf {
        let mut p = self.cfg.data_dir.clone().into_os_string();
        p.push(".run");
        PathBuf::from(p)
    }

    fn log_file(&self) -> PathBuf {
        self.run_dir().join("postgres.log")
    }

    pub fn has_cluster(&self) -> bool {
        self.data().join("PG_VERSION").exists()
    }

    /// libpq conninfo to reach `addr` as `role` (replication, clone, rewind): TLS as
    /// `[postgres] sslmode`, the password from `passfile` (never in the string itself).
    pub fn conninfo(&self, addr: &PgAddr, application_name: &str, role: &str) -> String {
        let mut s = format!(
            "host={} port={} user={} dbname=postgres application_name={} connect_timeout=2 sslmode={}",
            quote(&addr.host),
            addr.port,
            quote(role),
            quote(application_name),
            self.cfg.sslmode
        );
        if let Some(p) = &self.cfg.sslrootcert {
            s.push_str(&format!(" sslrootcert={}", quote(&p.to_string_lossy())));
        }
        if let Some(p) = &self.cfg.passfile {
            s.push_str(&format!(" passfile={}", quote(&p.to_string_lossy())));
        }
        s
    }

    /// The watcher's own session: the superuser over the local socket, which no `hba` host
    /// rule, TLS setting or network fault can refuse, and which uses the reserved superuser
    /// slots when `max_connections` is reached. The password (if the `local` hba line asks for
    /// one) comes from `passfile`.
    pub fn local_config(&self) -> Result<tokio_postgres::Config, PgError> {
        let socket = self.run_dir();
        let mut c = tokio_postgres::Config::new();
        c.host_path(&socket)
            .port(self.addr.port)
            .user(&self.cfg.user)
            .dbname("postgres")
            .application_name("pg-watcher")
            .connect_timeout(Duration::from_secs(1));
        if let Some(pw) = self.password_for(&socket.to_string_lossy(), &self.cfg.user)? {
            c.password(pw);
        }
        Ok(c)
    }

    /// The passfile's password for a connection to this server's local socket as `user`.
    fn password_for(&self, host: &str, user: &str) -> Result<Option<String>, PgError> {
        let Some(p) = &self.cfg.passfile else {
            return Ok(None);
        };
        let entries = crate::secrets::read_passfile(p)?;
        Ok(
            pgw_core::pgpass::lookup(&entries, host, self.addr.port, "postgres", user)
                .or_else(|| {
                    pgw_core::pgpass::lookup(
                        &entries,
                        "localhost",
                        self.addr.port,
                        "postgres",
                        user,
                    )
                })
                .map(str::to_string),
        )
    }

    fn chown(&self, p: &Path) -> Result<(), PgError> {
        if let Some(u) = self.os_user {
            std::os::unix::fs::chown(p, Some(u.uid), Some(u.gid)).map_err(|e| ferr(p, e))?;
        }
        Ok(())
    }

    /// Makes sure the parent and run directories exist and belong to the postgres user.
    pub fn prepare_dirs(&self) -> Result<(), PgError> {
        let run = self.run_dir();
        std::fs::create_dir_all(&run).map_err(|e| ferr(&run, e))?;
        self.chown(&run)?;
        if let Some(parent) = self.data().parent() {
            std::fs::create_dir_all(parent).map_err(|e| ferr(parent, e))?;
        }
        // initdb and pg_basebackup accept an existing empty directory; creating it ourselves
        // means postgres needs no write access to its parent.
        if !self.data().exists() {
            std::fs::create_dir(self.data()).map_err(|e| ferr(self.data(), e))?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(self.data(), std::fs::Permissions::from_mode(0o700))
                .map_err(|e| ferr(self.data(), e))?;
            self.chown(self.data())?;
        }
        Ok(())
    }

    async fn run(&self, tool: &str, args: &[&str], limit: Duration) -> Result<String, PgError> {
        let bin = self.cfg.bin_dir.join(tool);
        let mut cmd = tokio::process::Command::new(&bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("PGCONNECT_TIMEOUT", "3")
            .kill_on_drop(true)
            .current_dir(self.run_dir());
        if let Some(u) = self.os_user {
            cmd.uid(u.uid).gid(u.gid);
        }
        if let Some(h) = &self.home {
            cmd.env("HOME", h);
        }
        let what = format!("{} {}", bin.display(), args.join(" "));
        let text_of = |b: &[u8]| String::from_utf8_lossy(b).to_string();
        let child = cmd.spawn().map_err(|e| PgError::Tool {
            what: what.clone(),
            message: e.to_string(),
        })?;
        let out = match tokio::time::timeout(limit, child.wait_with_output()).await {
            Ok(r) => r.map_err(|e| PgError::Tool {
                what: what.clone(),
                message: e.to_string(),
            })?,
            Err(_) => {
                return Err(PgError::Tool {
                    what,
                    message: format!("did not finish within {} s", limit.as_secs()),
                })
            }
        };
        let text = format!("{}{}", text_of(&out.stdout), text_of(&out.stderr));
        if out.status.success() {
            Ok(text)
        } else {
            Err(PgError::Tool {
                what,
                message: format!("{}: {}", out.status, text.trim()),
            })
        }
    }

    fn write_file(&self, path: &Path, text: &str) -> Result<(), PgError> {
        let tmp = path.with_extension("pgwtmp");
        std::fs::write(&tmp, text).map_err(|e| ferr(&tmp, e))?;
        self.chown(&tmp)?;
        std::fs::rename(&tmp, path).map_err(|e| ferr(path, e))
    }

    /// Renders `pgw.conf`. Returns true when it changed.
    pub fn write_managed(&self, m: &Managed) -> Result<bool, PgError> {
        let mut s =
            String::from("# Managed by pg-watcher: rewritten on every role change. Do not edit.\n");
        s.push_str(&format!("listen_addresses = '{}'\n", self.addr.host));
        s.push_str(&format!("port = {}\n", self.addr.port));
        s.push_str(&format!(
            "unix_socket_directories = '{}'\n",
            self.run_dir().display()
        ));
        s.push_str("wal_level = replica\nhot_standby = on\nwal_log_hints = on\n");
        s.push_str("max_wal_senders = 10\nmax_replication_slots = 10\nwal_keep_size = '256MB'\n");
        s.push_str("synchronous_commit = on\nrecovery_target_timeline = 'latest'\n");
        s.push_str("wal_receiver_status_interval = '1s'\nwal_sender_timeout = '10s'\nwal_receiver_timeout = '10s'\n");
        // Standbys reconnect within half a second of their primary coming back (the default,
        // 5 s, is how long synchronous commits would wait after a planned primary restart).
        s.push_str("wal_retrieve_retry_interval = '500ms'\n");
        s.push_str(&format!("cluster_name = '{}'\n", self.member));
        for line in &self.live_settings().0 {
            s.push_str(line.trim());
            s.push('\n');
        }
        s.push_str(&format!(
            "primary_conninfo = '{}'\n",
            m.primary_conninfo
                .as_deref()
                .unwrap_or("")
                .replace('\'', "''")
        ));
        s.push_str(&format!(
            "synchronous_standby_names = '{}'\n",
            m.synchronous_standby_names.replace('\'', "''")
        ));
        let path = self.data().join("pgw.conf");
        let old = std::fs::read_to_string(&path).unwrap_or_default();
        if old == s {
            return Ok(false);
        }
        self.write_file(&path, &s)?;
        Ok(true)
    }

    /// (settings, hba) as last (re)loaded.
    fn live_settings(&self) -> (Vec<String>, Vec<String>) {
        match self.live.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Takes reloaded `[postgres] settings` and `hba` (written by the next `write_managed` and
    /// `write_hba`).
    pub fn set_live(&self, settings: Vec<String>, hba: Vec<String>) {
        match self.live.write() {
            Ok(mut g) => *g = (settings, hba),
            Err(p) => *p.into_inner() = (settings, hba),
        }
    }

    /// Writes `pg_hba.conf` from `[postgres] hba`. Returns true when it changed.
    pub fn write_hba(&self) -> Result<bool, PgError> {
        let hba = self.data().join("pg_hba.conf");
        let mut h = String::from("# Written by pg-watcher from [postgres] hba\n");
        for l in &self.live_settings().1 {
            h.push_str(l.trim());
            h.push('\n');
        }
        if std::fs::read_to_string(&hba).is_ok_and(|old| old == h) {
            return Ok(false);
        }
        self.write_file(&hba, &h)?;
        Ok(true)
    }

    /// A session of the watcher's own (see [`PgCtl::local_config`]); the error is the server's
    /// refusal or the client-side reason.
    async fn local_session(&self) -> Result<LocalSession, String> {
        let (client, conn) = self
            .local_config()
            .map_err(|e| e.to_string())?
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| super::observe::refusal(&e))?;
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(LocalSession(client, task))
    }

    /// Settings the running server has read but applies only after a restart.
    pub async fn pending_restart(&self) -> Result<Vec<String>, PgError> {
        let err = |m: String| PgError::Tool {
            what: "reading pg_settings.pending_restart".into(),
            message: m,
        };
        let LocalSession(client, task) = self.local_session().await.map_err(err)?;
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            client.query(
                "SELECT name FROM pg_settings WHERE pending_restart ORDER BY 1",
                &[],
            ),
        )
        .await;
        drop(client);
        task.abort();
        let rows = r
            .map_err(|_| err("no answer within 5 s".into()))?
            .map_err(|e| err(super::observe::refusal(&e)))?;
        Ok(rows
            .iter()
            .filter_map(|r| r.try_get::<_, String>(0).ok())
            .collect())
    }

    /// Makes `postgresql.conf` include `pgw.conf` (once) and writes `pg_hba.conf`.
    fn install_base_config(&self) -> Result<(), PgError> {
        let conf = self.data().join("postgresql.conf");
        let text = std::fs::read_to_string(&conf).map_err(|e| ferr(&conf, e))?;
        if !text.contains("include_if_exists = 'pgw.conf'") {
            let t = format!("{text}\n# pg-watcher\ninclude_if_exists = 'pgw.conf'\n");
            self.write_file(&conf, &t)?;
        }
        self.write_hba()?;
        // postgresql.auto.conf must not override what we own.
        let auto = self.data().join("postgresql.auto.conf");
        if auto.exists() {
            self.write_file(
                &auto,
                "# pg-watcher owns replication settings; see pgw.conf\n",
            )?;
        }
        Ok(())
    }

    /// `initdb` with data checksums, then our configuration. The superuser gets its password
    /// from `passfile` when the file has one for it (handed to initdb in a file only the
    /// postgres user can read, removed at once).
    pub async fn initdb(&self) -> Result<(), PgError> {
        self.prepare_dirs()?;
        let d = self.data().display().to_string();
        let pw = match &self.cfg.passfile {
            Some(p) => {
                pgw_core::pgpass::role_password(&crate::secrets::read_passfile(p)?, &self.cfg.user)
                    .map(str::to_string)
            }
            None => None,
        };
        let pwfile = self.run_dir().join("initdb.pw");
        let mut args = vec![
            "-D",
            &d,
            "-U",
            &self.cfg.user,
            "--data-checksums",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
        ];
        let pwarg = format!("--pwfile={}", pwfile.display());
        if let Some(pw) = &pw {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&pwfile)
                .map_err(|e| ferr(&pwfile, e))?;
            std::io::Write::write_all(&mut f, format!("{pw}\n").as_bytes())
                .map_err(|e| ferr(&pwfile, e))?;
            self.chown(&pwfile)?;
            args.push(&pwarg);
        }
        let r = self.run("initdb", &args, Duration::from_secs(120)).await;
        let _ = std::fs::remove_file(&pwfile);
        r?;
        self.install_base_config()
    }

    /// Marks the data directory as a standby (`standby.signal`) or not.
    pub fn set_standby(&self, standby: bool) -> Result<(), PgError> {
        let sig = self.data().join("standby.signal");
        if standby {
            self.write_file(&sig, "")
        } else {
            match std::fs::remove_file(&sig) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(ferr(&sig, e)),
            }
        }
    }

    pub fn is_standby_dir(&self) -> bool {
        self.data().join("standby.signal").exists()
    }

    pub async fn start(&self) -> Result<(), PgError> {
        self.prepare_dirs()?;
        self.clear_dead_lock_file().await?;
        let d = self.data().display().to_string();
        let log = self.log_file().display().to_string();
        self.run(
            "pg_ctl",
            &["start", "-D", &d, "-w", "-t", "60", "-l", &log],
            Duration::from_secs(90),
        )
        .await
        .map(|_| ())
    }

    /// `pg_ctl restart -m fast`: a planned restart in place (sessions end, settings that need
    /// a restart take effect).
    pub async fn restart(&self) -> Result<(), PgError> {
        let d = self.data().display().to_string();
        let log = self.log_file().display().to_string();
        self.run(
            "pg_ctl",
            &[
                "restart", "-D", &d, "-m", "fast", "-w", "-t", "90", "-l", &log,
            ],
            Duration::from_secs(120),
        )
        .await
        .map(|_| ())
    }

    /// `pg_ctl stop`; `immediate` skips the shutdown checkpoint (used for fencing).
    pub async fn stop(&self, immediate: bool) -> Result<(), PgError> {
        let d = self.data().display().to_string();
        let mode = if immediate { "immediate" } else { "fast" };
        match self
            .run(
                "pg_ctl",
                &["stop", "-D", &d, "-m", mode, "-w", "-t", "30"],
                Duration::from_secs(40),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if !self.postmaster_pid().is_some_and(pid_alive) => {
                tracing::debug!("pg_ctl stop: {e} (server not running)");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    pub async fn promote(&self) -> Result<(), PgError> {
        let d = self.data().display().to_string();
        self.run(
            "pg_ctl",
            &["promote", "-D", &d, "-w", "-t", "60"],
            Duration::from_secs(70),
        )
        .await
        .map(|_| ())
    }

    pub async fn reload(&self) -> Result<(), PgError> {
        let d = self.data().display().to_string();
        self.run("pg_ctl", &["reload", "-D", &d], Duration::from_secs(10))
            .await
            .map(|_| ())
    }

    /// Clones the data directory from `source` (the data directory must be absent).
    pub async fn basebackup(&self, source: &PgAddr) -> Result<(), PgError> {
        self.prepare_dirs()?;
        let d = self.data().display().to_string();
        let ci = self.conninfo(source, &self.member, self.cfg.replication_role());
        self.run(
            "pg_basebackup",
            &[
                "-d",
                &ci,
                "-D",
                &d,
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-password",
            ],
            Duration::from_secs(600),
        )
        .await?;
        self.install_base_config()
    }

    /// Rewinds a diverged former primary onto `source`'s timeline (pg_rewind itself runs crash
    /// recovery first on a directory that was not shut down cleanly).
    pub async fn rewind(&self, source: &PgAddr) -> Result<(), PgError> {
        self.clear_dead_lock_file().await?;
        let d = self.data().display().to_string();
        let ci = self.conninfo(source, &self.member, self.cfg.rewind_role());
        // A freshly promoted source updates its control file's timeline only at its next
        // checkpoint; without one pg_rewind may wrongly conclude no rewind is needed.
        self.checkpoint(source).await?;
        self.run(
            "pg_rewind",
            &["-D", &d, "--source-server", &ci],
            Duration::from_secs(600),
        )
        .await?;
        self.install_base_config()
    }

    /// Creates the replication and rewind roles (and pgpool's check role, `monitor`) on this
    /// server (the primary) when they are missing, with the passfile's passwords as SCRAM verifiers computed here (no clear-text
    /// password reaches the server or its log). An existing role is left as it is: rotating a
    /// password is the operator's `ALTER ROLE` plus the passfile. Returns the roles created.
    pub async fn ensure_roles(&self, monitor: Option<&str>) -> Result<Vec<String>, PgError> {
        // (role, replication, rewind, monitor): one role may serve several purposes.
        let mut wanted: Vec<(&str, bool, bool, bool)> = Vec::new();
        let (repl, rew) = (self.cfg.replication_role(), self.cfg.rewind_role());
        for r in [Some(repl), Some(rew), monitor].into_iter().flatten() {
            if r == self.cfg.user || wanted.iter().any(|w| w.0 == r) {
                continue;
            }
            wanted.push((r, r == repl, r == rew, Some(r) == monitor));
        }
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let err = |m: String| PgError::Tool {
            what: "creating the replication and rewind roles".into(),
            message: m,
        };
        let entries = match &self.cfg.passfile {
            Some(p) => Some(crate::secrets::read_passfile(p)?),
            None => None,
        };
        let LocalSession(client, task) = self.local_session().await.map_err(err)?;
        let mut created = Vec::new();
        let r = async {
            for (role, replication, rewind, monitoring) in wanted {
                let exists = tokio::time::timeout(
                    Duration::from_secs(5),
                    client.query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role]),
                )
                .await
                .map_err(|_| err("no answer within 5 s".into()))?
                .map_err(|e| err(super::observe::refusal(&e)))?
                .is_some();
                if exists {
                    continue;
                }
                let password = match &entries {
                    Some(e) => {
                        let pw = pgw_core::pgpass::role_password(e, role).ok_or_else(|| {
                            err(format!(
                                "postgres.passfile has no line for role `{role}` (`*:*:*:{role}:PASSWORD`)"
                            ))
                        })?;
                        let v = postgres_protocol::password::scram_sha_256(pw.as_bytes());
                        format!(" PASSWORD '{}'", v.replace('\'', "''"))
                    }
                    None => String::new(),
                };
                let attrs = if replication { "LOGIN REPLICATION" } else { "LOGIN" };
                // The standbys need this role to connect: its commit must not wait for them
                // (a role lost with the primary is created again by the next one).
                let mut sql = format!(
                    "BEGIN; SET LOCAL synchronous_commit = local; CREATE ROLE \"{role}\" {attrs}{password};"
                );
                if rewind {
                    // What pg_rewind reads from its source, and the CHECKPOINT before it.
                    for f in [
                        "pg_ls_dir(text, boolean, boolean)",
                        "pg_stat_file(text, boolean)",
                        "pg_read_binary_file(text)",
                        "pg_read_binary_file(text, bigint, bigint, boolean)",
                    ] {
                        sql.push_str(&format!(
                            "GRANT EXECUTE ON FUNCTION pg_catalog.{f} TO \"{role}\";"
                        ));
                    }
                    sql.push_str(&format!("GRANT pg_checkpoint TO \"{role}\";"));
                }
                if monitoring {
                    // pgpool's primary search (`pg_is_in_recovery()`, replication views).
                    sql.push_str(&format!("GRANT pg_monitor TO \"{role}\";"));
                }
                sql.push_str("COMMIT;");
                tokio::time::timeout(Duration::from_secs(10), client.batch_execute(&sql))
                    .await
                    .map_err(|_| err(format!("role `{role}`: no answer within 10 s")))?
                    .map_err(|e| err(format!("role `{role}`: {}", super::observe::refusal(&e))))?;
                created.push(role.to_string());
            }
            Ok::<_, PgError>(())
        }
        .await;
        drop(client);
        task.abort();
        r.map(|_| created)
    }

    /// Runs CHECKPOINT on `addr` as the rewind role (`pg_checkpoint`), through libpq like the
    /// rewind itself: the same TLS and password file, and proof that `addr` answers.
    ///
    /// `addr` must run as a primary: a server still in recovery (promotion not finished) would
    /// make pg_rewind compare against its old timeline and find nothing to do.
    /// Whether sources may be in recovery (a standby cluster's cascade).
    pub fn set_cascading(&self, yes: bool) {
        self.cascading
            .store(yes, std::sync::atomic::Ordering::Relaxed);
    }

    pub async fn checkpoint(&self, addr: &PgAddr) -> Result<(), PgError> {
        let ci = self.conninfo(addr, "pg-watcher", self.cfg.rewind_role());
        let out = self
            .run(
                "psql",
                &[
                    "-X",
                    "-q",
                    "-A",
                    "-t",
                    "-w",
                    "-d",
                    &ci,
                    "-c",
                    "SELECT pg_is_in_recovery()",
                    "-c",
                    "CHECKPOINT",
                ],
                Duration::from_secs(60),
            )
            .await?;
        let cascading = self.cascading.load(std::sync::atomic::Ordering::Relaxed);
        if out.lines().next().map(str::trim) != Some("f") && !cascading {
            return Err(PgError::Tool {
                what: format!("source {}:{}", addr.host, addr.port),
                message: "not running as primary yet (still in recovery); retrying".into(),
            });
        }
        Ok(())
    }

    /// Moves the data directory aside (before a fresh clone); never deletes data.
    pub fn move_aside(&self) -> Result<PathBuf, PgError> {
        let mut n = 0;
        loop {
            let mut p = self.data().as_os_str().to_os_string();
            p.push(format!(".old{n}"));
            let p = PathBuf::from(p);
            if !p.exists() {
                std::fs::rename(self.data(), &p).map_err(|e| ferr(self.data(), e))?;
                return Ok(p);
            }
            n += 1;
        }
    }

    /// PID in `postmaster.pid`, if that process is a postgres (a stale file whose pid was
    /// reused by another program yields `None`).
    pub fn postmaster_pid(&self) -> Option<i32> {
        let pid = lock_file_pid(&self.data().join("postmaster.pid"))?;
        match std::fs::read(format!("/proc/{pid}/cmdline")) {
            Ok(c) if !String::from_utf8_lossy(&c).contains("postgres") => None,
            _ => Some(pid),
        }
    }

    /// A crashed postmaster whose parent has not reaped it yet is a zombie: dead, but postgres'
    /// own check (`kill(pid, 0)`) takes it for a running server and refuses to start, recover
    /// or be rewound in that directory. Once no live process of the old instance is left
    /// (backends work in the data directory: none has it as its cwd any more), its lock file
    /// is removed. Waits up to 5 s for the old backends to exit.
    pub async fn clear_dead_lock_file(&self) -> Result<(), PgError> {
        let lock = self.data().join("postmaster.pid");
        let Some(pid) = lock_file_pid(&lock) else {
            return Ok(());
        };
        let zombie = is_zombie(pid);
        if !zombie {
            return Ok(()); // running (we must not touch it) or gone (postgres handles that)
        }
        let data = std::fs::canonicalize(self.data()).unwrap_or_else(|_| self.data().to_path_buf());
        let t0 = std::time::Instant::now();
        loop {
            let live: Vec<i32> = processes_in(&data);
            if live.is_empty() {
                break;
            }
            if t0.elapsed() > Duration::from_secs(5) {
                return Err(PgError::Tool {
                    what: format!("{}", lock.display()),
                    message: format!(
                        "the old postmaster {pid} is dead but processes {live:?} still work in the data directory"
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!(
            pid,
            "removing the lock file of a dead (unreaped) postmaster"
        );
        std::fs::remove_file(&lock).map_err(|e| ferr(&lock, e))?;
        // Its socket's lock file names it too.
        let sock = self
            .run_dir()
            .join(format!(".s.PGSQL.{}.lock", self.addr.port));
        if lock_file_pid(&sock) == Some(pid) {
            std::fs::remove_file(&sock).map_err(|e| ferr(&sock, e))?;
        }
        Ok(())
    }

    /// Whether a `postmaster.pid` file exists (a server ran and did not shut down cleanly, or
    /// still runs).
    pub fn has_pid_file(&self) -> bool {
        self.data().join("postmaster.pid").exists()
    }

    /// SIGKILLs the postmaster and every process whose parent it is (fencing a hung server).
    /// Whether a postmaster runs on our data directory (its pid file names a live process).
    pub fn postmaster_alive(&self) -> bool {
        self.postmaster_pid()
            .is_some_and(|pm| std::path::Path::new(&format!("/proc/{pm}")).exists())
    }

    pub fn kill_all(&self) {
        let Some(pm) = self.postmaster_pid() else {
            return;
        };
        for pid in children_of(pm).into_iter().chain([pm]) {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// At start: the password file is one libpq will use (see [`crate::secrets::read_passfile`]), postgres' own
/// processes can read it (the walreceiver reads it as `os_user`), and it has a line for every
/// role the watcher creates.
fn check_passfile(p: &Path, cfg: &PostgresConfig, os_user: Option<OsUser>) -> Result<(), PgError> {
    use std::os::unix::fs::MetadataExt;
    let entries = crate::secrets::read_passfile(p)?;
    let bad = |m: String| PgError::Tool {
        what: format!("postgres.passfile {}", p.display()),
        message: m,
    };
    if let Some(u) = os_user {
        let owner = std::fs::metadata(p).map_err(|e| bad(e.to_string()))?.uid();
        if owner != u.uid {
            return Err(bad(format!(
                "owned by uid {owner}; postgres runs as `{}` (uid {}) and reads it too: chown it",
                cfg.os_user, u.uid
            )));
        }
    }
    for role in [cfg.replication_role(), cfg.rewind_role()] {
        if role != cfg.user && pgw_core::pgpass::role_password(&entries, role).is_none() {
            return Err(bad(format!(
                "no line for role `{role}` (add `*:*:*:{role}:PASSWORD`)"
            )));
        }
    }
    Ok(())
}

/// Live (not zombie) processes whose working directory is `dir`.
fn processes_in(dir: &Path) -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|c| c == dir))
        .filter(|pid| pid_alive(*pid))
        .collect()
}

/// Direct children of `pid`, from /proc (a postmaster's backends and auxiliary processes).
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().nth(1))
                .and_then(|x| x.parse::<i32>().ok());
            if ppid == Some(pid) {
                out.push(p);
            }
        }
    }
    out
}

/// Whether a process exists and is not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill(pid, 0) only checks for existence.
    let r = unsafe { libc::kill(pid, 0) };
    let exists = r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    exists && !is_zombie(pid)
}

/// The pid a postgres lock file (`postmaster.pid`, `.s.PGSQL.<port>.lock`) names on its
/// first line.
fn lock_file_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Whether `pid` has exited but its parent has not reaped it yet.
fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// A libpq conninfo value, single-quoted when it needs to be.
pub fn quote(v: &str) -> String {
    if !v.is_empty() && !v.contains([' ', '\'', '\\', '=']) {
        return v.to_string();
    }
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
mod conninfo_tests {
    use super::*;

    #[test]
    fn values_are_quoted_only_when_needed() {
        assert_eq!(quote("10.1.0.11"), "10.1.0.11");
        assert_eq!(quote("/etc/pg watcher/pgpass"), "'/etc/pg watcher/pgpass'");
        assert_eq!(quote("it's"), "'it\\'s'");
        assert_eq!(quote(""), "''");
    }

    #[test]
    fn a_passfile_others_can_read_is_refused_by_name() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("pgpass");
        std::fs::write(&p, "*:*:*:replicator:pw\n").expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = crate::secrets::read_passfile(&p).expect_err("0644 refused");
        assert!(
            e.to_string().contains("postgres.passfile") && e.to_string().contains("644"),
            "{e}"
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(crate::secrets::read_passfile(&p).expect("0600").len(), 1);
    }
}
