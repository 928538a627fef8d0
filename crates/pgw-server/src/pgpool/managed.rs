//! Runs a data member's room pgpool-II (`[pgpool] manage = true`): renders `pgpool.conf` from
//! the template in `deploy/pgpool/`, writes `pcp.conf`, starts pgpool as the postgres OS user
//! and restarts it when it dies. pgpool is started in its own process group and outlives a
//! watcher restart (applications keep their sessions); a restarted watcher adopts it through
//! its pid file. Who pgpool writes to is decided elsewhere (`super::reconcile`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use pgw_core::Config;

use super::pcp::md5_hex;
use super::PgpoolError;
use crate::sidecar::pgctl::{lookup_user, pid_alive, OsUser};

/// The template every managed pgpool.conf is rendered from (also shipped in `deploy/`).
pub const TEMPLATE: &str = include_str!("../../../../deploy/pgpool/pgpool.conf.template");

fn ferr(path: &Path, e: impl std::fmt::Display) -> PgpoolError {
    PgpoolError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

fn split_addr(field: &str, a: &str) -> Result<(String, u16), PgpoolError> {
    let (h, p) = a.rsplit_once(':').ok_or_else(|| PgpoolError::Config {
        field: field.into(),
        message: format!("`{a}` is not host:port"),
    })?;
    let port = p.parse().map_err(|_| PgpoolError::Config {
        field: field.into(),
        message: format!("`{a}` has no valid port"),
    })?;
    Ok((
        h.trim_start_matches('[').trim_end_matches(']').to_string(),
        port,
    ))
}

/// This member's server entry of `cluster` (its pgpool and PCP addresses).
fn my_server(cfg: &Config, cluster: &str) -> Result<pgw_core::config::ServerConfig, PgpoolError> {
    cfg.servers(cluster)
        .into_iter()
        .find(|x| x.member == cfg.member)
        .ok_or_else(|| PgpoolError::Config {
            field: "member".into(),
            message: format!("`{}` is not a server of cluster `{cluster}`", cfg.member),
        })
}

/// The check role's password from `[postgres] passfile` (empty without one: trust setups).
fn check_password(cfg: &Config, cluster: &str) -> Result<String, PgpoolError> {
    let pg = cfg.postgres_for(cluster).or(cfg.postgres.first());
    let Some(path) = pg.and_then(|p| p.passfile.as_ref()) else {
        return Ok(String::new());
    };
    let user = cfg.pgpool_check_user().unwrap_or_default();
    let entries = crate::secrets::read_passfile(path).map_err(|e| PgpoolError::Config {
        field: "postgres.passfile".into(),
        message: e.to_string(),
    })?;
    pgw_core::pgpass::role_password(&entries, &user)
        .map(str::to_string)
        .ok_or_else(|| PgpoolError::Config {
            field: "postgres.passfile".into(),
            message: format!(
                "no line for role `{user}`, which pgpool logs in as (pgpool.check_user): add `*:*:*:{user}:PASSWORD`"
            ),
        })
}

/// Renders this member's `pgpool.conf`; `sr_password` is the check role's password (written
/// only into this file, mode 0600 in a 0700 directory, as pgpool needs it in clear).
pub fn render_conf(
    cfg: &Config,
    cluster: &str,
    work_dir: &Path,
    sr_password: &str,
) -> Result<String, PgpoolError> {
    let me = my_server(cfg, cluster)?;
    let (host, port) = split_addr("pgpool", me.pgpool.as_deref().unwrap_or_default())?;
    let (pcp_host, pcp_port) = split_addr("pcp", me.pcp.as_deref().unwrap_or_default())?;
    let sr_user = cfg
        .pgpool_check_user()
        .unwrap_or_else(pgw_core::config::defaults::pg_user);
    let wd = work_dir.display().to_string();
    let mut s = TEMPLATE
        .replace("{{sr_check_user}}", &sr_user)
        .replace(
            "{{sr_check_password}}",
            &sr_password.replace('\\', "\\\\").replace('\'', "''"),
        )
        .replace("{{listen_host}}", &host)
        .replace("{{port}}", &port.to_string())
        .replace("{{pcp_host}}", &pcp_host)
        .replace("{{pcp_port}}", &pcp_port.to_string())
        .replace("{{work_dir}}", &wd);
    s.push_str("\n# --- Backends: every data member's postgres, in member order (rendered) ---\n");
    for (i, (member, addr)) in cfg.pgpool_backends(cluster).iter().enumerate() {
        let (h, p) = split_addr(&format!("members.{member}.postgres"), addr)?;
        s.push_str(&format!(
            "backend_hostname{i} = '{h}'\nbackend_port{i} = {p}\nbackend_weight{i} = 1\nbackend_flag{i} = 'ALLOW_TO_FAILOVER'\nbackend_application_name{i} = '{member}'\n"
        ));
    }
    if let Some(pp) = &cfg.pgpool {
        if !pp.settings.is_empty() {
            s.push_str("\n# --- [pgpool] settings from the watcher's config ---\n");
            for l in &pp.settings {
                s.push_str(l);
                s.push('\n');
            }
        }
    }
    Ok(s)
}

/// Reads the PCP password file, refusing one that group or others may read.
pub fn read_password(path: &Path) -> Result<String, PgpoolError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| ferr(path, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(PgpoolError::Config {
            field: "pgpool.pcp_password_file".into(),
            message: format!(
                "{} has mode {mode:04o}; it holds a password and must not be readable by group or others (chmod 600)",
                path.display()
            ),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|e| ferr(path, e))?;
    let pw = text
        .lines()
        .next()
        .unwrap_or_default()
        .trim_end()
        .to_string();
    if pw.is_empty() {
        return Err(PgpoolError::Config {
            field: "pgpool.pcp_password_file".into(),
            message: format!("{} is empty", path.display()),
        });
    }
    Ok(pw)
}

/// A pgpool this watcher runs.
pub struct ManagedPgpool {
    cluster: String,
    /// The stream-replication check password, for re-rendering.
    sr_password: String,
    /// The backends `conf` lists (the group's list only grows: `Roster::pools`).
    backends: Vec<(String, String)>,
    bin: PathBuf,
    work_dir: PathBuf,
    conf: String,
    pcp_conf: String,
    ports: [u16; 2],
    os_user: Option<OsUser>,
}

impl ManagedPgpool {
    pub fn new(
        cfg: &Config,
        cluster: &str,
        password: &str,
    ) -> Result<Option<ManagedPgpool>, PgpoolError> {
        if !cfg.managed_pgpools().iter().any(|c| c == cluster) {
            return Ok(None);
        }
        let Some(pp) = cfg.pgpool.as_ref() else {
            return Ok(None);
        };
        let work_dir = cfg.pgpool_work_dir(cluster).unwrap_or_default();
        let os_user = if crate::sidecar::pgctl::running_as_root() {
            Some(lookup_user(&pp.os_user).ok_or_else(|| PgpoolError::Config {
                field: "pgpool.os_user".into(),
                message: format!("no OS user `{}`", pp.os_user),
            })?)
        } else {
            None
        };
        let me = my_server(cfg, cluster)?;
        let port = split_addr("pgpool", me.pgpool.as_deref().unwrap_or_default())?.1;
        let pcp_port = split_addr("pcp", me.pcp.as_deref().unwrap_or_default())?.1;
        let bin = pp.bin_dir.join("pgpool");
        if !bin.exists() {
            return Err(PgpoolError::Config {
                field: "pgpool.bin_dir".into(),
                message: format!(
                    "{} not found (Debian: apt-get install pgpool2)",
                    bin.display()
                ),
            });
        }
        let sr_password = check_password(cfg, cluster)?;
        Ok(Some(ManagedPgpool {
            cluster: cluster.to_string(),
            backends: cfg.pgpool_backends(cluster),
            bin,
            conf: render_conf(cfg, cluster, &work_dir, &sr_password)?,
            sr_password,
            pcp_conf: format!("{}:{}\n", pp.pcp_user, md5_hex(password.as_bytes())),
            work_dir,
            ports: [port, pcp_port],
            os_user,
        }))
    }

    fn chown(&self, p: &Path) -> Result<(), PgpoolError> {
        if let Some(u) = self.os_user {
            std::os::unix::fs::chown(p, Some(u.uid), Some(u.gid)).map_err(|e| ferr(p, e))?;
        }
        Ok(())
    }

    /// Writes `name` in the work directory (owned by pgpool's OS user) without following
    /// symlinks anyone may have planted there: the temp file is created fresh with O_NOFOLLOW
    /// and its mode and owner are set on the open file.
    fn write(&self, name: &str, text: &str, mode: u32) -> Result<bool, PgpoolError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.work_dir.join(name);
        if std::fs::read_to_string(&path).ok().as_deref() == Some(text) {
            return Ok(false);
        }
        let tmp = self.work_dir.join(format!("{name}.pgwtmp"));
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(|e| ferr(&tmp, e))?;
        f.write_all(text.as_bytes()).map_err(|e| ferr(&tmp, e))?;
        f.sync_all().map_err(|e| ferr(&tmp, e))?;
        if let Some(u) = self.os_user {
            std::os::unix::fs::fchown(&f, Some(u.uid), Some(u.gid)).map_err(|e| ferr(&tmp, e))?;
        }
        drop(f);
        // rename(2) replaces a symlink at `path` itself, never its target.
        std::fs::rename(&tmp, &path).map_err(|e| ferr(&path, e))?;
        Ok(true)
    }

    /// Writes the config files; returns whether pgpool.conf changed.
    fn prepare(&self) -> Result<bool, PgpoolError> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&self.work_dir).map_err(|e| ferr(&self.work_dir, e))?;
        std::fs::set_permissions(&self.work_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| ferr(&self.work_dir, e))?;
        self.chown(&self.work_dir)?;
        self.write("pcp.conf", &self.pcp_conf, 0o600)?;
        self.write("pgpool.conf", &self.conf, 0o600)
    }

    /// The running pgpool's pid, from its pid file.
    pub fn pid(&self) -> Option<i32> {
        pgpool_pid(&self.work_dir)
    }

    fn start(&self) -> Result<(), PgpoolError> {
        // A main pgpool process that was killed alone (the OOM killer) leaves its children
        // running, holding the listening ports: a new pgpool could never bind them. They are in
        // the dead instance's process group (pgpool runs as a group leader): end them first.
        if let Some(old) = pid_file_pid(&self.work_dir) {
            let n = kill_orphans(old);
            if n > 0 {
                tracing::warn!(
                    old_pid = old,
                    "ended {n} orphaned processes of a dead pgpool holding its ports"
                );
            }
        }
        // Sockets left behind by a killed pgpool block a new one.
        for p in self.ports {
            for f in [format!(".s.PGSQL.{p}"), format!(".s.PGSQL.{p}.lock")] {
                let _ = std::fs::remove_file(self.work_dir.join(f));
            }
        }
        let _ = std::fs::remove_file(self.work_dir.join("pgpool.pid"));
        let log = self.work_dir.join("pgpool.log");
        let out = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&log)
        }
        .map_err(|e| ferr(&log, e))?;
        let err = out.try_clone().map_err(|e| ferr(&log, e))?;
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.arg("-n")
            .arg("-D")
            .arg("-f")
            .arg(self.work_dir.join("pgpool.conf"))
            .arg("-F")
            .arg(self.work_dir.join("pcp.conf"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .current_dir(&self.work_dir)
            .process_group(0);
        if let Some(u) = self.os_user {
            cmd.uid(u.uid).gid(u.gid);
        }
        let mut child = cmd.spawn().map_err(|e| PgpoolError::Start {
            message: format!("{}: {e}", self.bin.display()),
        })?;
        // Reap it when it exits (while we live; afterwards init does).
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        Ok(())
    }

    /// Asks the running pgpool to read its config again (SIGHUP, what `pgpool reload` sends):
    /// backends appended to the list are taken in (as `down`; the leader attaches each once it
    /// serves), other changes only at pgpool's next restart.
    fn reload(&self) -> bool {
        let Some(pid) = self.pid() else {
            return false;
        };
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGHUP) == 0 }
    }

    /// Follows the group's backend list (`live`: the running config): a data member added at
    /// run time becomes a backend of this pgpool without a restart.
    fn follow_backends(&mut self, live: &Config) {
        let now = live.pgpool_backends(&self.cluster);
        if now == self.backends {
            return;
        }
        let conf = match render_conf(live, &self.cluster, &self.work_dir, &self.sr_password) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("pgpool: the new backend list cannot be rendered: {e}");
                self.backends = now;
                return;
            }
        };
        let appended = now.starts_with(&self.backends);
        self.conf = conf;
        self.backends = now;
        match self.prepare() {
            Ok(true) if appended && self.reload() => tracing::info!(
                backends = ?self.backends.iter().map(|b| b.0.as_str()).collect::<Vec<_>>(),
                "pgpool: the group's member list changed: backends added, pgpool reloaded"
            ),
            Ok(true) if self.pid().is_some() => tracing::warn!(
                "pgpool: backends changed in place (not only added): restart pgpool to apply them"
            ),
            Ok(_) => {}
            Err(e) => tracing::error!("pgpool: {e}"),
        }
    }

    /// Keeps pgpool running until the process ends, its backends following `live` (the
    /// member's running config).
    pub async fn supervise(mut self, live: impl Fn() -> std::sync::Arc<Config> + Send + 'static) {
        let mut delay = Duration::from_secs(1);
        match self.prepare() {
            Ok(changed) => {
                // Backends added while this watcher was down are taken in by a reload; any
                // other change needs a restart of pgpool.
                if changed && self.reload() {
                    tracing::warn!(work_dir = %self.work_dir.display(), "pgpool.conf changed while pgpool ran: reloaded (added backends apply now; other changes at pgpool's next restart)");
                }
            }
            Err(e) => tracing::error!("pgpool: {e}"),
        }
        if let Some(pid) = self.pid() {
            tracing::info!(pid, "pgpool already running: adopted");
        }
        loop {
            self.follow_backends(&live());
            if self.pid().is_none() {
                let t0 = tokio::time::Instant::now();
                match self.prepare().and_then(|_| self.start()) {
                    Ok(()) => {
                        tracing::info!(ports = ?self.ports, work_dir = %self.work_dir.display(), "pgpool started");
                        // Give it time to write its pid file before checking again.
                        let mut up = false;
                        for _ in 0..50 {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            if self.pid().is_some() {
                                up = true;
                                break;
                            }
                        }
                        if !up || t0.elapsed() < Duration::from_millis(500) && self.pid().is_none()
                        {
                            tracing::error!(log = %self.work_dir.join("pgpool.log").display(), "pgpool did not come up; retrying in {} s", delay.as_secs());
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_secs(10));
                            continue;
                        }
                        delay = Duration::from_secs(1);
                    }
                    Err(e) => {
                        tracing::error!("pgpool: {e}; retrying in {} s", delay.as_secs());
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(10));
                        continue;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// The pid recorded in `work_dir`'s pid file, whether or not that process still runs.
fn pid_file_pid(work_dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(work_dir.join("pgpool.pid")).ok()?;
    text.trim_matches(|c: char| c == '\0' || c.is_whitespace())
        .parse()
        .ok()
        .filter(|p: &i32| *p > 1)
}

/// SIGKILLs every pgpool process left in process group `pgid` whose leader is gone (orphaned
/// children of a killed main process). Only processes named pgpool in that group are touched.
/// Returns how many it ended.
fn kill_orphans(pgid: i32) -> usize {
    if pgpool_pid_alive(pgid) {
        return 0;
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut n = 0;
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|x| x.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // comm is in parentheses and may hold spaces: the fields after the last ')'.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let pgrp: Option<i32> = rest.split_whitespace().nth(2).and_then(|x| x.parse().ok());
        if pgrp == Some(pgid) && head.contains("pgpool") {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            n += 1;
        }
    }
    n
}

fn pgpool_pid_alive(pid: i32) -> bool {
    pid_alive(pid)
        && std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains("pgpool"))
            .unwrap_or(false)
}

/// The pid of the pgpool whose pid file is in `work_dir`, if it runs.
pub fn pgpool_pid(work_dir: &Path) -> Option<i32> {
    pid_file_pid(work_dir).filter(|p| pgpool_pid_alive(*p))
}

/// Stops the pgpool whose pid file is in `work_dir` (immediate shutdown, then SIGKILL of the
/// whole process group). Returns whether one was running.
pub fn stop_pgpool(work_dir: &Path) -> bool {
    let Some(pid) = pgpool_pid(work_dir) else {
        return false;
    };
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, libc::SIGQUIT);
    }
    for _ in 0..30 {
        if !pid_alive(pid) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // pgpool runs in its own process group (its pid): children left behind go too.
    // SAFETY: as above.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("pcp.pass");
        std::fs::write(&p, "s3cret\n").expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = read_password(&p).expect_err("world-readable refused");
        assert!(e.to_string().contains("pgpool.pcp_password_file"), "{e}");
        assert!(e.to_string().contains("0644"), "{e}");
        assert!(!e.to_string().contains("s3cret"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(read_password(&p).expect("ok"), "s3cret");
    }
}
