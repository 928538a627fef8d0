//! `pgwctl member add | remove | replace | promote`: the group's member list (admin role).

use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use pgw_proto::{MemberChangeReply, MemberChangeRequest, MemberSpec};

use crate::status::{gather, GroupStatus};
use crate::CliError;

/// How to describe a member the group does not know yet.
#[derive(Debug, Clone, Args)]
pub struct NewMember {
    /// Raft node id: >= 1, never used before in this group (also in the member's own file).
    #[arg(long)]
    pub id: u64,
    /// data | arbiter | sidecar
    #[arg(long)]
    pub role: String,
    /// host:port the member serves gRPC on.
    #[arg(long)]
    pub grpc: String,
    /// host:port of its HTTP endpoint.
    #[arg(long)]
    pub http: String,
    /// Its machine room (default: its name).
    #[arg(long)]
    pub room: Option<String>,
    /// host:port of its PostgreSQL (data members).
    #[arg(long)]
    pub postgres: Option<String>,
    /// host:port of its room's pgpool.
    #[arg(long)]
    pub pgpool: Option<String>,
    /// host:port of that pgpool's PCP port.
    #[arg(long)]
    pub pcp: Option<String>,
    /// Failover preference (default 100).
    #[arg(long)]
    pub priority: Option<u32>,
    /// A cold spare (data or arbiter): it receives the log as a non-voter until `pgwctl member
    /// promote` (or `pg-watcher --force-new-group --survivors` naming it) makes it vote.
    #[arg(long)]
    pub spare: bool,
}

/// Whether and how long to wait until the membership has settled.
#[derive(Debug, Clone, Args)]
pub struct Wait {
    /// Wait until the change has settled in Raft (the member votes, or is gone).
    #[arg(long)]
    pub wait: bool,
    #[arg(long, default_value_t = 120)]
    pub wait_secs: u64,
}

#[derive(Debug, Clone, Subcommand)]
pub enum MemberCmd {
    /// Add a member. It joins as a non-voter (start it with `pg-watcher --config FILE --join
    /// ADDR`), catches up, and becomes a voter (data, arbiter) through joint consensus.
    Add {
        name: String,
        #[command(flatten)]
        member: NewMember,
        #[command(flatten)]
        wait: Wait,
    },
    /// Remove a member (not one holding a primary: switch over first). Its vote goes at once.
    Remove {
        name: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Replace a (dead) member by a new one under a new name, in one change: the vote moves
    /// from OLD to NEW once NEW has caught up; the group never has fewer voters meanwhile.
    Replace {
        old: String,
        new: String,
        #[command(flatten)]
        member: NewMember,
        #[command(flatten)]
        wait: Wait,
    },
    /// Make a spare member vote (it has been receiving the log as a non-voter). Needs the
    /// group's majority; after losing it, name the spare among the survivors of `pg-watcher
    /// --force-new-group` instead.
    Promote {
        name: String,
        #[command(flatten)]
        wait: Wait,
    },
}

fn spec(name: &str, m: &NewMember) -> MemberSpec {
    MemberSpec {
        name: name.to_string(),
        id: m.id,
        role: m.role.clone(),
        grpc: m.grpc.clone(),
        http: m.http.clone(),
        room: m.room.clone().unwrap_or_default(),
        postgres: m.postgres.clone().unwrap_or_default(),
        pgpool: m.pgpool.clone().unwrap_or_default(),
        pcp: m.pcp.clone().unwrap_or_default(),
        priority: m.priority.unwrap_or(0),
        spare: m.spare,
    }
}

/// Sends one change to the group (followers forward it to the leader). While no member can
/// take it (the leader just died and the others have not elected yet) it is tried again for up
/// to 20 s; any refusal is final. A change whose reply was lost is refused on the retry with
/// the reason (the name is taken, or the member is already gone): the group has it.
pub async fn change(
    endpoints: &[String],
    req: MemberChangeRequest,
) -> Result<MemberChangeReply, CliError> {
    let t0 = Instant::now();
    loop {
        let r = crate::first_accepting(endpoints, |mut c| {
            let mut r = tonic::Request::new(req.clone());
            r.set_timeout(Duration::from_secs(15));
            async move { c.member_change(r).await }
        })
        .await;
        match r {
            Err(CliError::NoEndpoint(e)) if t0.elapsed() < Duration::from_secs(20) => {
                note_retry(&e);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => return other,
        }
    }
}

fn note_retry(e: &str) {
    eprintln!("no member could take the change yet ({e}); retrying");
}

/// Whether the group's membership has settled as the change wants: `present` members voting
/// (or non-voters for sidecars), `absent` gone from Raft, and no change in flight.
pub fn settled(s: &GroupStatus, present: Option<(&str, bool)>, absent: Option<&str>) -> bool {
    if s.membership_changing || s.leader.is_none() {
        return false;
    }
    if s.members
        .iter()
        .any(|m| m.standing == "leaving" || m.standing == "joining")
    {
        return false;
    }
    if let Some((name, votes)) = present {
        let want = if votes { "voter" } else { "non_voter" };
        if !s
            .members
            .iter()
            .any(|m| m.name == name && m.standing == want)
        {
            return false;
        }
    }
    if let Some(name) = absent {
        if s.members.iter().any(|m| m.name == name) {
            return false;
        }
    }
    true
}

async fn wait_settled(
    endpoints: &[String],
    present: Option<(&str, bool)>,
    absent: Option<&str>,
    secs: u64,
) -> Result<GroupStatus, CliError> {
    let t0 = Instant::now();
    loop {
        let s = gather(endpoints, Duration::from_secs(2)).await;
        if let Ok(s) = &s {
            if settled(s, present, absent) {
                return Ok(s.clone());
            }
        }
        if t0.elapsed() > Duration::from_secs(secs) {
            let now = s
                .map(|s| {
                    s.members
                        .iter()
                        .map(|m| format!("{} {}", m.name, m.standing))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_else(|e| e.to_string());
            return Err(CliError::Timeout(format!(
                "membership not settled after {secs} s (now: {now}); the change goes on"
            )));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn voters(s: &GroupStatus) -> String {
    s.members
        .iter()
        .filter(|m| m.standing == "voter")
        .map(|m| m.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs a `pgwctl member` subcommand.
pub async fn run(endpoints: &[String], cmd: MemberCmd) -> Result<(), CliError> {
    let (req, present, absent, wait) = match &cmd {
        MemberCmd::Add { name, member, wait } => (
            MemberChangeRequest {
                member: Some(spec(name, member)),
                old: String::new(),
                promote: String::new(),
            },
            Some((name.as_str(), member.role != "sidecar" && !member.spare)),
            None,
            wait,
        ),
        MemberCmd::Remove { name, wait } => (
            MemberChangeRequest {
                member: None,
                old: name.clone(),
                promote: String::new(),
            },
            None,
            Some(name.as_str()),
            wait,
        ),
        MemberCmd::Replace {
            old,
            new,
            member,
            wait,
        } => (
            MemberChangeRequest {
                member: Some(spec(new, member)),
                old: old.clone(),
                promote: String::new(),
            },
            Some((new.as_str(), member.role != "sidecar" && !member.spare)),
            Some(old.as_str()),
            wait,
        ),
        MemberCmd::Promote { name, wait } => (
            MemberChangeRequest {
                member: None,
                old: String::new(),
                promote: name.clone(),
            },
            Some((name.as_str(), true)),
            None,
            wait,
        ),
    };
    if let Some(m) = &req.member {
        if m.name.is_empty() {
            return Err(CliError::Usage("member name must not be empty".into()));
        }
    }
    let r = change(endpoints, req).await?;
    println!(
        "{} (member list version {}, log index {}, leader {})",
        r.result, r.roster_version, r.log_index, r.committed_by
    );
    if let (MemberCmd::Add { name, .. } | MemberCmd::Replace { new: name, .. }, false) =
        (&cmd, wait.wait)
    {
        println!(
            "start it with: pg-watcher --config FILE --join {}",
            endpoints.join(",")
        );
        println!("then `pgwctl status` shows {name} as a voter once it has caught up");
    }
    if wait.wait {
        let s = wait_settled(endpoints, present, absent, wait.wait_secs).await?;
        println!("settled: voters {}", voters(&s));
    }
    Ok(())
}
