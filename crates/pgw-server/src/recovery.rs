//! `pg-watcher --config FILE --force-new-group [--survivors A,B] [--i-know-the-others-are-down]`:
//! recovery after losing the majority, offline, on one surviving member.
//!
//! The rule is pure (`pgw_core::recovery::force`); this module checks that the member is
//! stopped, waits until the lost members have been silent longer than the lease (unless the
//! operator says they are down), replays the local log onto the snapshot, and stores the new
//! generation crash-safely (`raft::store::commit_forced`).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use pgw_core::recovery::{self, Order};
use pgw_core::roster::{self, Roster};
use pgw_core::{Config, MemberConfig};

use crate::raft::store;

/// Why a forced recovery did not happen (nothing was changed).
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Force(#[from] recovery::ForceError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Config(#[from] pgw_core::ConfigError),
    #[error("reading the local Raft state: {0}")]
    Storage(String),
}

/// What the operator asked for.
#[derive(Debug, Clone, Default)]
pub struct ForceArgs {
    /// The members that form the new group (empty: this member alone).
    pub survivors: Vec<String>,
    /// Skip the wait for the lost members' silence.
    pub others_down: bool,
}

/// Who runs the command, for the history: the invoking user (through sudo too) and the host.
pub fn operator() -> String {
    let user = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into());
    format!("{user}@{host}")
}

/// Forces a new group of the survivors out of this member's last state. `say` reports
/// progress (the wait takes a lease). Returns what the operator reads afterwards.
pub async fn force_new_group(
    file: &Config,
    args: &ForceArgs,
    say: impl Fn(&str),
) -> Result<Vec<String>, RecoveryError> {
    file.validate()?;
    store::finish_forced(&file.data_dir)?;
    let stored = store::read_roster(&file.data_dir)?;
    let roster = stored.clone().unwrap_or_else(|| Roster::founding(file));
    let running = roster::effective(file, &roster);
    if running.me().is_none() {
        return Err(RecoveryError::Refused(format!(
            "`{}` is not in the group's member list (generation {}): only a member of the group can force a new one",
            file.member, roster.generation
        )));
    }
    // The member must be stopped: its own addresses are free.
    for addr in [running.grpc_listen(), running.http_listen()] {
        if let Err(e) = tokio::net::TcpListener::bind(&addr).await {
            return Err(RecoveryError::Refused(format!(
                "cannot bind {addr} ({e}): stop this member's pg-watcher first (systemctl stop pg-watcher)"
            )));
        }
    }
    let survivors: BTreeSet<String> = if args.survivors.is_empty() {
        [file.member.clone()].into_iter().collect()
    } else {
        args.survivors.iter().cloned().collect()
    };
    // The rule first, on nothing: a wrong name is refused before the wait.
    let probe = Order {
        survivors: survivors.clone(),
        member: file.member.clone(),
        by: operator(),
        at_ms: 0,
        index: 0,
    };
    recovery::force(&pgw_core::Facts::default(), file, &roster, &probe)?;
    let lost: Vec<MemberConfig> = roster
        .members
        .iter()
        .filter(|m| !survivors.contains(&m.name))
        .cloned()
        .collect();
    if !args.others_down {
        if let Some(why) = running.automatic_failover_off() {
            return Err(RecoveryError::Refused(format!(
                "in this layout ({why}) a primary keeps serving when it loses the other room (nothing else could replace it), so silence proves nothing: make sure the lost room is down or cut off from its clients, then pass --i-know-the-others-are-down"
            )));
        }
        let wait = Duration::from_millis(running.failover.lease().leader_wait_ms());
        let names: Vec<&str> = lost.iter().map(|m| m.name.as_str()).collect();
        say(&format!(
            "checking that [{}] stay silent for {} ms (longer than the lease, so a primary among them has fenced itself); --i-know-the-others-are-down skips this",
            names.join(", "),
            wait.as_millis()
        ));
        silent_for(&lost, wait).await?;
    }
    let (mut log, mut sm) = store::open_with(&running, file, stored.as_ref())?;
    let (facts, last) = store::last_state(&mut log, &mut sm)
        .await
        .map_err(|e| RecoveryError::Storage(e.to_string()))?;
    drop((log, sm));
    let order = Order {
        at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        index: last + 1,
        ..probe
    };
    let forced = recovery::force(&facts, file, &roster, &order)?;
    let next = roster::effective(file, &forced.roster);
    next.validate()?;
    store::commit_forced(&next, &forced.roster, forced.facts, order.index)?;
    let names: Vec<&str> = forced
        .roster
        .members
        .iter()
        .map(|m| m.name.as_str())
        .collect();
    let mut out = vec![
        format!(
            "forced generation {} of group `{}`: members [{}]; lost [{}] (their node ids are retired)",
            forced.roster.generation,
            file.cluster_id,
            names.join(", "),
            forced.lost.join(", ")
        ),
        format!("local state kept up to log index {last}; the new generation starts at {}", order.index),
    ];
    out.extend(forced.plan);
    out.push(
        "next: start pg-watcher here (systemctl start pg-watcher); it leads alone and carries out the above".into(),
    );
    let others: Vec<&MemberConfig> = forced
        .roster
        .members
        .iter()
        .filter(|m| m.name != file.member)
        .collect();
    let me = next.me().map(|m| m.grpc.clone()).unwrap_or_default();
    for m in others {
        out.push(format!(
            "next: on {}, start pg-watcher once with --join {me} (it moves to generation {})",
            m.name, forced.roster.generation
        ));
    }
    out.push(
        "next: a lost member comes back only through `pgwctl member add NAME --id NEW-ID ...` and `pg-watcher --join` (its PostgreSQL is rewound or rebuilt as a replica); started as it was, it is refused by generation".into(),
    );
    Ok(out)
}

/// Refuses as soon as a lost member answers on its gRPC port within `wait`.
async fn silent_for(lost: &[MemberConfig], wait: Duration) -> Result<(), RecoveryError> {
    let start = Instant::now();
    loop {
        for m in lost {
            let connect = tokio::net::TcpStream::connect(&m.grpc);
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(300), connect).await {
                return Err(RecoveryError::Refused(format!(
                    "`{}` answered at {} after {} ms: it is not lost. Force a new group only when the others are down; if they run but cannot reach each other, repair the network (or stop them) instead",
                    m.name,
                    m.grpc,
                    start.elapsed().as_millis()
                )));
            }
        }
        if start.elapsed() >= wait {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
