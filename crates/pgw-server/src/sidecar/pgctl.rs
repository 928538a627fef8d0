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

fn ferr(path: &Path, e: impl std::fmt::Display) -> PgError {
    PgError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// The OS identity postgres runs as (only switched to when we are root).
#[derive(Debug, Clone, Copy)]
pub struct OsUser {
    pub uid: u32,
    pub gid: u32,
}

/// Looks a user up in /etc/passwd.
pub fn lookup_user(name: &str) -> Option<OsUser> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() >= 4 && f[0] == name {
            Some(OsUser {
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
            })
        } else {
            None
        }
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
        Ok(PgCtl {
            cfg,
            member: member.to_string(),
            addr,
            os_user,
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

    /// libpq conninfo to reach `addr` as the configured user (a password in it is for libpq
    /// only: [`split_password`] keeps it off command lines and out of messages).
    pub fn conninfo(&self, addr: &PgAddr, application_name: &str) -> String {
        let mut s = format!(
            "host={} port={} user={} dbname=postgres application_name={} connect_timeout=2",
            addr.host, addr.port, self.cfg.user, application_name
        );
        if !self.cfg.conninfo.trim().is_empty() {
            s.push(' ');
            s.push_str(self.cfg.conninfo.trim());
        }
        s
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
        // A password in a conninfo argument would be visible to every local user in the
        // process list and would reach our error messages: it travels in the child's
        // environment instead (readable by its owner only), and never into `what`.
        let mut password = None;
        let args: Vec<String> = args
            .iter()
            .map(|a| {
                let (clean, pw) = split_password(a);
                if pw.is_some() {
                    password = pw;
                }
                clean
            })
            .collect();
        let mut cmd = tokio::process::Command::new(&bin);
        if let Some(pw) = &password {
            cmd.env("PGPASSWORD", pw);
        }
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("PGCONNECT_TIMEOUT", "3")
            .kill_on_drop(true)
            .current_dir(self.run_dir());
        if let Some(u) = self.os_user {
            cmd.uid(u.uid).gid(u.gid);
        }
        let what = format!("{} {}", bin.display(), args.join(" "));
        let text_of = |b: &[u8]| redact(&String::from_utf8_lossy(b), password.as_deref());
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
        s.push_str(&format!("cluster_name = '{}'\n", self.member));
        for line in &self.cfg.settings {
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

    /// Makes `postgresql.conf` include `pgw.conf` (once) and writes `pg_hba.conf`.
    fn install_base_config(&self) -> Result<(), PgError> {
        let conf = self.data().join("postgresql.conf");
        let text = std::fs::read_to_string(&conf).map_err(|e| ferr(&conf, e))?;
        if !text.contains("include_if_exists = 'pgw.conf'") {
            let t = format!("{text}\n# pg-watcher\ninclude_if_exists = 'pgw.conf'\n");
            self.write_file(&conf, &t)?;
        }
        let hba = self.data().join("pg_hba.conf");
        let mut h = String::from("# Written by pg-watcher from [postgres] hba\n");
        for l in &self.cfg.hba {
            h.push_str(l.trim());
            h.push('\n');
        }
        self.write_file(&hba, &h)?;
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

    /// `initdb` with data checksums, then our configuration.
    pub async fn initdb(&self) -> Result<(), PgError> {
        self.prepare_dirs()?;
        let d = self.data().display().to_string();
        self.run(
            "initdb",
            &[
                "-D",
                &d,
                "-U",
                &self.cfg.user,
                "--data-checksums",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
            ],
            Duration::from_secs(120),
        )
        .await?;
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
        let ci = self.conninfo(source, &self.member);
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

    /// Rewinds a diverged former primary onto `source`'s timeline (the server must be stopped
    /// cleanly; we run a single-user crash recovery first if it was not).
    pub async fn rewind(&self, source: &PgAddr) -> Result<(), PgError> {
        let d = self.data().display().to_string();
        let ci = self.conninfo(source, &self.member);
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

    /// Runs CHECKPOINT on `addr`.
    pub async fn checkpoint(&self, addr: &PgAddr) -> Result<(), PgError> {
        let ci = self.conninfo(addr, "pg-watcher");
        let err = |m: String| PgError::Tool {
            what: format!("CHECKPOINT on {}:{}", addr.host, addr.port),
            message: m,
        };
        let (client, conn) = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_postgres::connect(&ci, tokio_postgres::NoTls),
        )
        .await
        .map_err(|_| err("connect timed out".into()))?
        .map_err(|e| err(e.to_string()))?;
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        let r = tokio::time::timeout(Duration::from_secs(60), client.batch_execute("CHECKPOINT"))
            .await
            .map_err(|_| err("timed out".into()))
            .and_then(|r| r.map_err(|e| err(e.to_string())));
        drop(client);
        task.abort();
        r
    }

    /// Brings a crashed data directory to a clean shutdown state so pg_rewind accepts it.
    pub async fn ensure_clean_shutdown(&self) -> Result<(), PgError> {
        let d = self.data().display().to_string();
        // Single-user mode replays WAL to a consistent point and shuts down cleanly.
        let bin = self.cfg.bin_dir.join("postgres");
        let mut cmd = tokio::process::Command::new(&bin);
        cmd.args(["--single", "-D", &d, "-c", "archive_mode=off", "postgres"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .current_dir(self.run_dir());
        if let Some(u) = self.os_user {
            cmd.uid(u.uid).gid(u.gid);
        }
        let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
            .await
            .map_err(|_| PgError::Tool {
                what: "postgres --single".into(),
                message: "timed out".into(),
            })?
            .map_err(|e| PgError::Tool {
                what: "postgres --single".into(),
                message: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(PgError::Tool {
                what: "postgres --single".into(),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
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
        let text = std::fs::read_to_string(self.data().join("postmaster.pid")).ok()?;
        let pid: i32 = text.lines().next()?.trim().parse().ok()?;
        match std::fs::read(format!("/proc/{pid}/cmdline")) {
            Ok(c) if !String::from_utf8_lossy(&c).contains("postgres") => None,
            _ => Some(pid),
        }
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
    exists
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(false)
}

/// Splits a `password=...` (plain or single-quoted, libpq conninfo syntax) out of `arg`:
/// (the argument without it, the password). Arguments that are not conninfo pass unchanged.
pub fn split_password(arg: &str) -> (String, Option<String>) {
    let Some(start) = find_key(arg, "password") else {
        return (arg.to_string(), None);
    };
    let after = &arg[start..];
    let Some(eq) = after.find('=') else {
        return (arg.to_string(), None);
    };
    let mut rest = after[eq + 1..].trim_start().chars().peekable();
    let mut value = String::new();
    let mut consumed = after.len() - after[eq + 1..].trim_start().len();
    if rest.peek() == Some(&'\'') {
        rest.next();
        consumed += 1;
        let mut esc = false;
        for c in rest {
            consumed += c.len_utf8();
            match (esc, c) {
                (false, '\\') => esc = true,
                (false, '\'') => break,
                (_, c) => {
                    value.push(c);
                    esc = false;
                }
            }
        }
    } else {
        for c in rest {
            if c.is_whitespace() {
                break;
            }
            consumed += c.len_utf8();
            value.push(c);
        }
    }
    let before = arg[..start].trim_end();
    let after_pw = arg[start + consumed..].trim_start();
    let clean = match (before.is_empty(), after_pw.is_empty()) {
        (true, _) => after_pw.to_string(),
        (_, true) => before.to_string(),
        _ => format!("{before} {after_pw}"),
    };
    (clean, Some(value))
}

/// Where `key` starts as a conninfo keyword (at the start or after whitespace, then `=`).
fn find_key(s: &str, key: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = s[from..].find(key) {
        let at = from + i;
        let starts = at == 0 || s[..at].ends_with(char::is_whitespace);
        let follows = s[at + key.len()..].trim_start().starts_with('=');
        if starts && follows {
            return Some(at);
        }
        from = at + key.len();
    }
    None
}

/// `text` with `password` (if any) replaced.
pub fn redact(text: &str, password: Option<&str>) -> String {
    match password {
        Some(p) if !p.is_empty() => text.replace(p, "********"),
        _ => text.to_string(),
    }
}

#[cfg(test)]
mod password_tests {
    use super::*;

    #[test]
    fn passwords_leave_conninfo_arguments() {
        let (c, p) = split_password("host=a port=5 user=u password=s3cret dbname=postgres");
        assert_eq!(c, "host=a port=5 user=u dbname=postgres");
        assert_eq!(p.as_deref(), Some("s3cret"));
        let (c, p) = split_password("host=a password = 'it''s x\\'y' connect_timeout=2");
        assert_eq!(p.as_deref(), Some("it"));
        assert!(!c.contains("password"), "{c}");
        let (c, p) = split_password("password='a b\\'c'");
        assert_eq!((c.as_str(), p.as_deref()), ("", Some("a b'c")));
        let (c, p) = split_password("host=a passwordx=1 mypassword=2");
        assert_eq!((c.as_str(), p), ("host=a passwordx=1 mypassword=2", None));
        let (c, p) = split_password("-D");
        assert_eq!((c.as_str(), p), ("-D", None));
        assert_eq!(
            redact("failed for s3cret", Some("s3cret")),
            "failed for ********"
        );
    }
}
