//! Runs this member's role-change hooks (`[[hooks]]`): which changes they run on is pure
//! ([`pgw_core::hooks::changes`]); this module waits for the local pgpool to follow, runs the
//! command (argv, no shell) with a timeout and retries, and reports the outcome to the leader,
//! which records it in the cluster's history. Nothing here ever waits on the decision path: a
//! hook that hangs or fails delays no failover.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use pgw_core::config::HookConfig;
use pgw_core::hooks::{changes, Change, Seen};
use pgw_proto::admin_client::AdminClient;
use tokio::io::AsyncReadExt;

use crate::member::Shared;
use crate::telemetry;

/// How long a hook waits for this member's pgpool of the cluster to point at the new primary.
const REPOINT_WAIT: Duration = Duration::from_secs(15);

/// Starts the hook runner when this member has hooks.
pub fn spawn(s: &Shared) {
    if s.cfg().my_hooks().is_empty() {
        return;
    }
    tokio::spawn(watch(s.clone()));
}

async fn watch(s: Shared) {
    let rooms: BTreeMap<String, String> = s
        .cfg()
        .members
        .iter()
        .map(|m| (m.name.clone(), m.room().to_string()))
        .collect();
    let active = s.cfg().active_cluster().map(str::to_string);
    let mut seen = Seen::default();
    let mut rx = s.raft.metrics();
    loop {
        if rx.borrow().state == openraft::ServerState::Shutdown {
            return;
        }
        let facts = s.sm.applied().facts;
        for change in changes(&mut seen, &facts, active.as_deref(), &rooms) {
            for hook in s.cfg().my_hooks() {
                let wanted = hook.on.contains(&change.event)
                    && (hook.clusters.is_empty() || hook.clusters.contains(&change.cluster));
                if wanted {
                    tokio::spawn(run(s.clone(), hook.clone(), change.clone()));
                }
            }
        }
        // Applied facts change with the Raft metrics (last_applied); poll as a backstop.
        let _ = tokio::time::timeout(Duration::from_millis(500), rx.changed()).await;
    }
}

/// Waits (bounded) until this member's pgpool of the cluster sends writes to the new primary.
/// Returns a note for the history when it did not.
async fn wait_repointed(s: &Shared, change: &Change) -> Option<String> {
    let has_pool = s
        .cfg()
        .servers(&change.cluster)
        .iter()
        .any(|x| x.member == s.cfg().member && x.pcp.is_some());
    if !has_pool {
        return None;
    }
    let t0 = Instant::now();
    let mut last = String::new();
    while t0.elapsed() < REPOINT_WAIT {
        match crate::pgpool::local_pool_primary(s, &change.cluster).await {
            Ok(Some(p)) if p == change.new_primary => return None,
            Ok(p) => last = format!("it points at {}", p.as_deref().unwrap_or("no primary")),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Some(format!(
        "ran without the local pgpool following ({last}) after {} s",
        REPOINT_WAIT.as_secs()
    ))
}

/// The last line of a hook's output, shortened (no secrets are expected there, but the
/// history is not a log: keep it brief).
fn last_line(out: &[u8]) -> String {
    let text = String::from_utf8_lossy(out);
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    line.chars().take(160).collect()
}

/// One attempt: the command with the change in its environment, killed after the timeout.
async fn attempt(hook: &HookConfig, env: &[(&'static str, String)]) -> Result<String, String> {
    let Some((prog, args)) = hook.command.split_first() else {
        return Err("no command".into());
    };
    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {prog}: {e}"))?;
    let mut out = Vec::new();
    let mut err = Vec::new();
    let mut so = child.stdout.take();
    let mut se = child.stderr.take();
    let limit = Duration::from_millis(hook.timeout_ms);
    let run = async {
        let read_out = async {
            if let Some(o) = so.as_mut() {
                let _ = o.read_to_end(&mut out).await;
            }
        };
        let read_err = async {
            if let Some(e) = se.as_mut() {
                let _ = e.read_to_end(&mut err).await;
            }
        };
        let (_, _, st) = tokio::join!(read_out, read_err, child.wait());
        st
    };
    match tokio::time::timeout(limit, run).await {
        Err(_) => Err(format!("timed out after {} ms (killed)", hook.timeout_ms)),
        Ok(Err(e)) => Err(format!("waiting for it: {e}")),
        Ok(Ok(st)) if st.success() => Ok(last_line(&out)),
        Ok(Ok(st)) => {
            let why = last_line(&err);
            let why = if why.is_empty() { last_line(&out) } else { why };
            Err(format!(
                "{st}{}",
                if why.is_empty() {
                    String::new()
                } else {
                    format!(": {why}")
                }
            ))
        }
    }
}

async fn run(s: Shared, hook: HookConfig, change: Change) {
    let note = wait_repointed(&s, &change).await;
    let env = change.env(&s.cfg().member);
    let t0 = Instant::now();
    let mut attempts = 0;
    let mut result = Err(String::new());
    while attempts <= hook.retries {
        attempts += 1;
        result = attempt(&hook, &env).await;
        if result.is_ok() {
            break;
        }
        if attempts <= hook.retries {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    let ok = result.is_ok();
    let mut detail = match &result {
        Ok(out) if out.is_empty() => "exit 0".to_string(),
        Ok(out) => format!("exit 0: {out}"),
        Err(e) => e.clone(),
    };
    detail = format!(
        "{} ({}, new primary {} in {}){}",
        detail,
        change.event.name(),
        change.new_primary,
        change.room,
        note.map(|n| format!("; {n}")).unwrap_or_default()
    );
    let labels = [
        ("hook", hook.name.clone()),
        ("cluster", change.cluster.clone()),
    ];
    metrics::counter!(
        telemetry::HOOK_RUNS,
        &[
            ("hook", hook.name.clone()),
            ("cluster", change.cluster.clone()),
            ("result", if ok { "success" } else { "failure" }.to_string()),
        ]
    )
    .increment(1);
    metrics::gauge!(telemetry::HOOK_LAST_SUCCESS, &labels).set(if ok { 1.0 } else { 0.0 });
    metrics::gauge!(telemetry::HOOK_LAST_DURATION, &labels).set(t0.elapsed().as_secs_f64());
    if ok {
        tracing::info!(hook = %hook.name, cluster = %change.cluster, attempts, "hook ran: {detail}");
    } else {
        tracing::warn!(hook = %hook.name, cluster = %change.cluster, attempts, "hook failed: {detail}");
    }
    record(&s, &hook, &change, ok, attempts, detail).await;
}

/// Hands the outcome to the leader (directly, since it records what the calling member says
/// about itself), following leader changes for a while.
async fn record(
    s: &Shared,
    hook: &HookConfig,
    change: &Change,
    ok: bool,
    attempts: u32,
    detail: String,
) {
    let req = pgw_proto::HookResultRequest {
        identity: Some(s.identity()),
        cluster: change.cluster.clone(),
        hook: hook.name.clone(),
        epoch: change.epoch,
        succeeded: ok,
        attempts,
        detail: detail.clone(),
    };
    let me = s.cfg().me().map(|m| m.id);
    for _ in 0..40 {
        let leader = s.raft.metrics().borrow().current_leader;
        let sent = match leader {
            None => false,
            Some(l) if Some(l) == me => {
                let cmd = pgw_core::Command::RecordHook {
                    cluster: change.cluster.clone(),
                    member: s.cfg().member.clone(),
                    hook: hook.name.clone(),
                    epoch: change.epoch,
                    succeeded: ok,
                    attempts,
                    detail: detail.clone(),
                };
                s.propose(cmd).await.is_ok()
            }
            Some(l) => match s.leader_addr(l).map(|a| (s.channels)(&a)) {
                Some(Ok(ch)) => {
                    let mut r = tonic::Request::new(req.clone());
                    r.set_timeout(Duration::from_secs(5));
                    AdminClient::new(ch).hook_result(r).await.is_ok()
                }
                _ => false,
            },
        };
        if sent {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tracing::warn!(hook = %hook.name, "hook outcome not recorded in the history (no leader took it)");
}
