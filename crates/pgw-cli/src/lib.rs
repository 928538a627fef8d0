//! `pgwctl`: the operator CLI for pg-watcher, and the local demo cluster.

pub mod certs;
pub mod client;
pub mod demo;
pub mod docs;
pub mod doctor;
pub mod haproxy;
pub mod member;
pub mod status;
pub mod writer;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use pgw_proto::{
    DecisionReply, FailoverRequest, HistoryRequest, OperationReply, OperationRequest,
    SetPausedRequest, SwitchoverRequest,
};

/// Errors of the CLI; each names what went wrong.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach {endpoint}: {message}")]
    Unreachable { endpoint: String, message: String },
    #[error("no endpoint answered: {0}")]
    NoEndpoint(String),
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("refused: {0}")]
    Refused(String),
    #[error(transparent)]
    Config(#[from] pgw_core::ConfigError),
    #[error("{0} problem(s) found")]
    Findings(usize),
}

#[derive(Debug, Parser)]
#[command(name = "pgwctl", version, about = "Operate a pg-watcher group")]
pub struct Cli {
    /// Members to ask, comma separated host:port (gRPC). Default: $PGW_ENDPOINTS.
    #[arg(long, global = true, env = "PGW_ENDPOINTS", value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// Per-call timeout in milliseconds.
    #[arg(long, global = true, default_value_t = 2000)]
    pub timeout_ms: u64,
    /// PEM file of the group's CA (verifies the members).
    #[arg(long, global = true, env = "PGW_CA")]
    pub ca: Option<PathBuf>,
    /// PEM client certificate (its common name is looked up in the members' auth lists).
    #[arg(long, global = true, env = "PGW_CERT")]
    pub cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, global = true, env = "PGW_KEY")]
    pub key: Option<PathBuf>,
    /// A role token file, for callers without a client certificate.
    #[arg(long, global = true, env = "PGW_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// A TOML file with `endpoints`, `ca`, `cert`, `key`, `token_file` (flags win).
    #[arg(long, global = true, env = "PGW_CLIENT_CONFIG")]
    pub client_config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Show the group: members, leader, and each PostgreSQL cluster's facts.
    Status {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Check everything in the runbook's order (names, watchers and certificates, Raft, each
    /// cluster's servers, each room's pgpool, the HTTP checks); each finding says what to do.
    /// Exits 1 when it finds an error.
    Doctor {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Stop automatic actions for a PostgreSQL cluster (recorded in Raft).
    Pause {
        #[arg(default_value = "global")]
        cluster: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Resume automatic actions for a PostgreSQL cluster.
    Resume {
        #[arg(default_value = "global")]
        cluster: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Show the history of decisions.
    History {
        /// Only this PostgreSQL cluster (default: all).
        cluster: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Planned, zero-loss change of primary: the old primary shuts down cleanly, the target
    /// receives all its WAL, then the target is promoted.
    Switchover {
        #[arg(default_value = "global")]
        cluster: String,
        /// The new primary (default: the most advanced healthy sync replica).
        #[arg(long, conflicts_with = "room")]
        to: Option<String>,
        /// Move the primary into this room (the best healthy sync replica standing there).
        #[arg(long)]
        room: Option<String>,
        /// With --room: every cluster's primary, one after another in the configured order
        /// (`switch_order`), as one operation. Moving back is the same command.
        #[arg(long, requires = "room")]
        all: bool,
        /// Return the operation id at once instead of waiting for the outcome.
        #[arg(long)]
        no_wait: bool,
    },
    /// Operator-forced promotion while the primary is lost. Refused when the target cannot be
    /// proven to hold every acknowledged commit, unless --accept-data-loss.
    Failover {
        #[arg(default_value = "global")]
        cluster: String,
        #[arg(long)]
        to: String,
        /// Required: confirms this is a manual intervention.
        #[arg(long)]
        force: bool,
        /// Promote even if acknowledged commits could be lost.
        #[arg(long)]
        accept_data_loss: bool,
        #[arg(long)]
        no_wait: bool,
    },
    /// Rejoin a failed member: rebuild it from the primary (a fresh base backup; its old data
    /// directory is kept aside, never deleted), wait until it streams again, and until every
    /// reachable pgpool has it attached.
    Recover {
        member: String,
        #[arg(long, default_value = "global")]
        cluster: String,
        /// Give up waiting after this many seconds (the rebuild itself goes on).
        #[arg(long, default_value_t = 600)]
        wait_secs: u64,
        #[arg(long)]
        no_wait: bool,
    },
    /// Planned restart of a member's PostgreSQL (`pg_ctl restart -m fast`, e.g. for a setting
    /// that needs one, or a minor upgrade): a replica restarts in place and rejoins. For the
    /// primary, choose: `--in-place` (it stays primary at the same epoch; writes pause for the
    /// restart) or `--switchover` (the primary moves to a sync replica first, then the old one
    /// restarts as a replica).
    Restart {
        member: String,
        #[arg(long, default_value = "global")]
        cluster: String,
        /// The primary restarts in place and stays primary.
        #[arg(long, conflicts_with = "switchover")]
        in_place: bool,
        /// If MEMBER is the primary, switch over first.
        #[arg(long)]
        switchover: bool,
        /// Give up waiting after this many seconds (the restart itself goes on).
        #[arg(long, default_value_t = 120)]
        wait_secs: u64,
        #[arg(long)]
        no_wait: bool,
    },
    /// Every member re-reads its config file and applies what changes without a restart:
    /// [postgres] settings and hba (postgres reloaded), certificates. A member whose file
    /// changed anything else refuses, naming the field; settings postgres can only take at a
    /// restart are listed (then `pgwctl restart MEMBER`).
    Reload,
    /// Show an operation's progress and outcome.
    Operation {
        id: u64,
        /// The cluster it belongs to (`all` for a room move; a room move's id is also found
        /// under any cluster).
        #[arg(long, default_value = "global")]
        cluster: String,
    },
    /// The group's member list (admin role): add, remove or replace a member. The config
    /// files' [[members]] only bootstrap the group; from the first change on, the group holds
    /// the list and a new member starts with `pg-watcher --join`.
    Member {
        #[command(subcommand)]
        action: member::MemberCmd,
    },
    /// Turn a standby cluster (`standby_of`: replicating from another group, in another
    /// region) into a normal one after the main region is lost (admin role): its standby
    /// leader is promoted; prints the WAL position it had replicated. Refused while the main
    /// group answers with a primary, unless --force.
    PromoteGroup {
        /// Default: the group's standby cluster.
        cluster: Option<String>,
        /// Promote although the main group still answers with a primary (two writable
        /// primaries in two regions until you stop the old one).
        #[arg(long)]
        force: bool,
        /// Return once the promotion is committed, without waiting for the primary to serve.
        #[arg(long)]
        no_wait: bool,
    },
    /// Print pgwctl's completion script for a shell (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Write both programs' man pages and completion scripts into a directory (packaging).
    #[command(hide = true)]
    GenDocs {
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Make the group's certificates: a CA, one certificate per member, one per operator.
    Certs {
        #[command(subcommand)]
        action: certs::CertsCmd,
    },
    /// A local sandbox on loopback.
    Demo {
        #[command(subcommand)]
        action: DemoCmd,
    },
}

#[derive(Debug, Subcommand)]
pub enum DemoCmd {
    /// Start three members (one per room) on loopback and wait for a leader.
    Up {
        #[arg(long, default_value = demo::DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// Stop everything the demo started.
    Down {
        #[arg(long, default_value = demo::DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// Inject a fault into the primary's room while a writer runs; show the failover, the
    /// lost writes (none), and the old primary rejoining.
    Failover {
        #[arg(long, default_value = demo::DEFAULT_DIR)]
        dir: PathBuf,
        #[arg(long, value_enum, default_value_t = demo::DemoFault::Crash)]
        fault: demo::DemoFault,
        /// The PostgreSQL cluster whose primary is hit (global or recovery).
        #[arg(long, default_value = "global")]
        cluster: String,
    },
}

fn need_endpoints(e: &[String]) -> Result<Vec<String>, CliError> {
    let v: Vec<String> = e
        .iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if v.is_empty() {
        return Err(CliError::Usage(
            "no endpoints: pass --endpoints host:port[,host:port...] or set PGW_ENDPOINTS".into(),
        ));
    }
    Ok(v)
}

/// Sends a pause/resume decision to the first member that accepts it (followers forward to
/// the leader).
pub async fn set_paused(
    endpoints: &[String],
    cluster: &str,
    paused: bool,
    reason: &str,
) -> Result<DecisionReply, CliError> {
    let req = SetPausedRequest {
        cluster: cluster.to_string(),
        paused,
        reason: reason.to_string(),
    };
    first_accepting(endpoints, |mut c| {
        let mut r = tonic::Request::new(req.clone());
        r.set_timeout(Duration::from_secs(10));
        async move { c.set_paused(r).await }
    })
    .await
}

fn print_op(o: &OperationReply) {
    println!(
        "operation {} ({} to {} in {}): {}{}",
        o.id,
        o.kind,
        o.target,
        o.cluster,
        o.state,
        if o.detail.is_empty() {
            String::new()
        } else {
            format!(" - {}", o.detail)
        }
    );
    if o.state == "running" && !o.waiting_for.is_empty() {
        println!("  waiting for: {}", o.waiting_for);
    }
}

/// Asks the first reachable member for an operation.
pub async fn get_operation(
    endpoints: &[String],
    cluster: &str,
    id: u64,
) -> Result<OperationReply, CliError> {
    let mut last = String::new();
    for e in endpoints {
        match status::connect(e, Duration::from_secs(2)).await {
            Ok(mut c) => match c
                .get_operation(OperationRequest {
                    cluster: cluster.to_string(),
                    id,
                })
                .await
            {
                Ok(r) => return Ok(r.into_inner()),
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::NotFound
                            | tonic::Code::PermissionDenied
                            | tonic::Code::Unauthenticated
                    ) =>
                {
                    return Err(client::refusal(&s))
                }
                Err(s) => last = s.message().to_string(),
            },
            Err(err) => last = err.to_string(),
        }
    }
    Err(CliError::NoEndpoint(last))
}

/// Waits for an operation to finish (at most `limit`), printing progress changes.
pub async fn wait_operation(
    endpoints: &[String],
    first: OperationReply,
    limit: Duration,
    quiet: bool,
) -> Result<OperationReply, CliError> {
    let t0 = std::time::Instant::now();
    let mut last = first;
    let mut shown = String::new();
    while last.state == "running" {
        if !quiet && last.waiting_for != shown && !last.waiting_for.is_empty() {
            println!("  ... {}", last.waiting_for);
            shown = last.waiting_for.clone();
        }
        if t0.elapsed() > limit {
            return Err(CliError::Timeout(format!(
                "operation {} still running; check `pgwctl operation {}`",
                last.id, last.id
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(o) = get_operation(endpoints, &last.cluster, last.id).await {
            last = o;
        }
    }
    Ok(last)
}

/// Sends an operator call to the first member that takes it: unreachable members and
/// "unavailable" answers (no leader yet) move on to the next; any other refusal is final.
async fn first_accepting<T, F, Fut>(endpoints: &[String], call: F) -> Result<T, CliError>
where
    F: Fn(client::Admin) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut errors = Vec::new();
    for e in endpoints {
        let c = match status::connect(e, Duration::from_secs(2)).await {
            Ok(c) => c,
            Err(err) => {
                errors.push(err.to_string());
                continue;
            }
        };
        match call(c).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) if s.code() == tonic::Code::Unavailable => {
                errors.push(format!("{e}: {}", s.message()))
            }
            Err(s) => return Err(client::refusal(&s)),
        }
    }
    Err(CliError::NoEndpoint(errors.join("; ")))
}

/// Starts a switchover (followers forward to the leader).
pub async fn switchover(
    endpoints: &[String],
    cluster: &str,
    to: Option<&str>,
) -> Result<OperationReply, CliError> {
    let req = SwitchoverRequest {
        cluster: cluster.to_string(),
        target: to.unwrap_or_default().to_string(),
        room: String::new(),
        all: false,
    };
    first_accepting(endpoints, |mut c| {
        let req = req.clone();
        async move { c.switchover(req).await }
    })
    .await
}

/// Starts a room move: `cluster`'s primary (every cluster's with `all`, in the configured
/// order) into `room`. The reply is one operation (cluster "all" with `all`).
pub async fn switchover_room(
    endpoints: &[String],
    cluster: &str,
    room: &str,
    all: bool,
) -> Result<OperationReply, CliError> {
    let req = SwitchoverRequest {
        cluster: cluster.to_string(),
        target: String::new(),
        room: room.to_string(),
        all,
    };
    first_accepting(endpoints, |mut c| {
        let req = req.clone();
        async move { c.switchover(req).await }
    })
    .await
}

/// Starts a forced failover.
pub async fn failover(
    endpoints: &[String],
    cluster: &str,
    to: &str,
    accept_data_loss: bool,
) -> Result<OperationReply, CliError> {
    let req = FailoverRequest {
        cluster: cluster.to_string(),
        target: to.to_string(),
        accept_data_loss,
    };
    first_accepting(endpoints, |mut c| {
        let req = req.clone();
        async move { c.failover(req).await }
    })
    .await
}

/// Starts the recovery of a member.
pub async fn recover(
    endpoints: &[String],
    cluster: &str,
    member: &str,
) -> Result<OperationReply, CliError> {
    let req = pgw_proto::RecoverRequest {
        cluster: cluster.to_string(),
        member: member.to_string(),
    };
    first_accepting(endpoints, |mut c| {
        let req = req.clone();
        async move { c.recover(req).await }
    })
    .await
}

/// `pgwctl promote-group`: the standby cluster becomes a normal one.
pub async fn promote_group(
    endpoints: &[String],
    cluster: &str,
    force: bool,
) -> Result<pgw_proto::PromoteGroupReply, CliError> {
    let req = pgw_proto::PromoteGroupRequest {
        cluster: cluster.to_string(),
        force,
    };
    first_accepting(endpoints, |mut c| {
        let req = req.clone();
        async move { c.promote_group(req).await }
    })
    .await
}

/// Starts a planned restart of a member's postgres.
pub async fn restart(
    endpoints: &[String],
    cluster: &str,
    member: &str,
) -> Result<OperationReply, CliError> {
    let req = pgw_proto::RestartRequest {
        cluster: cluster.to_string(),
        member: member.to_string(),
    };
    first_accepting(endpoints, |mut c| {
        let req = req.clone();
        async move { c.restart(req).await }
    })
    .await
}

/// `pgwctl reload` on every member of the group (found through `endpoints`): (member,
/// outcome) for each.
pub async fn reload_all(
    endpoints: &[String],
    timeout: Duration,
) -> Result<Vec<(String, Result<pgw_proto::ReloadReply, CliError>)>, CliError> {
    let st = status::gather(endpoints, timeout).await?;
    let mut out = Vec::new();
    for m in &st.members {
        let r = async {
            let mut c = status::connect(&m.grpc, timeout).await?;
            let call = c.reload(pgw_proto::ReloadRequest {});
            match tokio::time::timeout(Duration::from_secs(30), call).await {
                Ok(Ok(r)) => Ok(r.into_inner()),
                Ok(Err(s)) => Err(client::refusal(&s)),
                Err(_) => Err(CliError::NoEndpoint(format!(
                    "{}: no answer within 30 s",
                    m.grpc
                ))),
            }
        }
        .await;
        out.push((m.name.clone(), r));
    }
    Ok(out)
}

/// Waits until every reachable pgpool of `cluster` has `member` attached. Returns the rooms.
pub async fn wait_attached(
    endpoints: &[String],
    cluster: &str,
    member: &str,
    limit: Duration,
) -> Result<Vec<String>, CliError> {
    let t0 = std::time::Instant::now();
    loop {
        let mut last = String::new();
        if let Ok(s) = status::gather(endpoints, Duration::from_secs(2)).await {
            if let Some(c) = s.clusters.iter().find(|c| c.name == cluster) {
                let reachable: Vec<_> = c.pgpool.iter().filter(|p| p.reachable).collect();
                let attached = |p: &status::PgpoolView| {
                    p.nodes
                        .iter()
                        .any(|n| n.member == member && (n.status == "up" || n.status == "waiting"))
                };
                if reachable.iter().all(|p| attached(p)) {
                    return Ok(reachable.iter().map(|p| p.room.clone()).collect());
                }
                last = reachable
                    .iter()
                    .filter(|p| !attached(p))
                    .map(|p| p.room.clone())
                    .collect::<Vec<_>>()
                    .join(", ");
            }
        }
        if t0.elapsed() > limit {
            return Err(CliError::Refused(format!(
                "{member} is not attached in the pgpool of: {last} (after {} s)",
                limit.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Prints a started operation and, unless `no_wait`, waits for its outcome: an error unless it
/// succeeded.
async fn follow(
    eps: &[String],
    op: OperationReply,
    limit: Duration,
    no_wait: bool,
) -> Result<(), CliError> {
    print_op(&op);
    if no_wait {
        return Ok(());
    }
    let done = wait_operation(eps, op, limit, false).await?;
    print_op(&done);
    if done.state != "succeeded" {
        return Err(CliError::Refused(done.detail));
    }
    Ok(())
}

/// Reads the credentials from the flags / environment, or the client config file, and makes
/// them the default for this process. Commands that talk to no member need none.
fn setup_auth(cli: &mut Cli) -> Result<(), CliError> {
    let file = match &cli.client_config {
        Some(p) => client::ClientFile::load(p)?,
        None => client::ClientFile::default(),
    };
    if cli.endpoints.is_empty() {
        cli.endpoints = file.endpoints.clone();
    }
    let ca = cli.ca.clone().or(file.ca);
    let cert = cli.cert.clone().or(file.cert);
    let key = cli.key.clone().or(file.key);
    let token = cli.token_file.clone().or(file.token_file);
    let auth = client::ClientAuth::from_files(
        ca.as_deref(),
        cert.as_deref(),
        key.as_deref(),
        token.as_deref(),
    )?;
    client::set_default(auth);
    Ok(())
}

/// The demo's own credentials (`demo.json` `tls`), unless the operator gave some.
fn demo_auth(cli: &Cli, dir: &std::path::Path) -> Result<(), CliError> {
    if cli.cert.is_some() || cli.token_file.is_some() || cli.client_config.is_some() {
        let mut c = Cli {
            endpoints: cli.endpoints.clone(),
            timeout_ms: cli.timeout_ms,
            ca: cli.ca.clone(),
            cert: cli.cert.clone(),
            key: cli.key.clone(),
            token_file: cli.token_file.clone(),
            client_config: cli.client_config.clone(),
            command: Cmd::Demo {
                action: DemoCmd::Down { dir: dir.into() },
            },
        };
        return setup_auth(&mut c);
    }
    demo::use_demo_credentials(dir, "admin")
}

/// Runs one CLI invocation, writing its output to stdout.
pub async fn run(mut cli: Cli) -> Result<(), CliError> {
    let timeout = Duration::from_millis(cli.timeout_ms.max(1));
    match &cli.command {
        Cmd::Demo { action } => match action {
            DemoCmd::Failover { dir, .. } => demo_auth(&cli, dir)?,
            DemoCmd::Up { .. } | DemoCmd::Down { .. } => {}
        },
        Cmd::Certs { .. } | Cmd::Completions { .. } | Cmd::GenDocs { .. } => {}
        _ => setup_auth(&mut cli)?,
    }
    match cli.command {
        Cmd::Completions { shell } => docs::completion(shell, &mut std::io::stdout()),
        Cmd::GenDocs { out } => {
            for f in docs::write_all(&out)? {
                println!("{f}");
            }
        }
        Cmd::Certs { action } => certs::run(action)?,
        Cmd::Status { format } => {
            let eps = need_endpoints(&cli.endpoints)?;
            let s = status::gather(&eps, timeout).await?;
            match format {
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&s).map_err(|e| CliError::Usage(e.to_string()))?
                ),
                Format::Table => print!("{}", status::render_table(&s)),
            }
        }
        Cmd::Doctor { format } => {
            let eps = need_endpoints(&cli.endpoints)?;
            let findings = match status::gather(&eps, timeout).await {
                Ok(s) => {
                    let p = doctor::probe(&s, timeout).await;
                    doctor::diagnose(&s, &p)
                }
                Err(e) => vec![doctor::Finding {
                    level: doctor::Level::Error,
                    area: "grpc".into(),
                    what: format!("no member answered: {e}"),
                    fix: "check --endpoints, that pg-watcher runs on those hosts, and the client certificate (--ca/--cert/--key)".into(),
                }],
            };
            match format {
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&findings)
                        .map_err(|e| CliError::Usage(e.to_string()))?
                ),
                Format::Table => print!("{}", doctor::render(&findings)),
            }
            let errors = findings
                .iter()
                .filter(|f| f.level == doctor::Level::Error)
                .count();
            if errors > 0 {
                return Err(CliError::Findings(errors));
            }
        }
        Cmd::Pause { cluster, reason } | Cmd::Resume { cluster, reason } if cluster.is_empty() => {
            let _ = reason;
            return Err(CliError::Usage("cluster name must not be empty".into()));
        }
        Cmd::Pause { cluster, reason } => {
            let eps = need_endpoints(&cli.endpoints)?;
            let r = set_paused(&eps, &cluster, true, &reason).await?;
            println!(
                "{cluster}: {} at log index {} (leader {})",
                r.result, r.log_index, r.committed_by
            );
        }
        Cmd::Resume { cluster, reason } => {
            let eps = need_endpoints(&cli.endpoints)?;
            let r = set_paused(&eps, &cluster, false, &reason).await?;
            println!(
                "{cluster}: {} at log index {} (leader {})",
                r.result, r.log_index, r.committed_by
            );
        }
        Cmd::History { cluster, limit } => {
            let eps = need_endpoints(&cli.endpoints)?;
            let mut last = String::new();
            for e in &eps {
                match status::connect(e, timeout).await {
                    Ok(mut c) => {
                        let r = c
                            .history(HistoryRequest {
                                cluster: cluster.clone().unwrap_or_default(),
                                limit,
                            })
                            .await
                            .map_err(|s| client::refusal(&s))?;
                        for h in r.into_inner().entries {
                            println!(
                                "{:>8}  {:<10} epoch {:<4} {}",
                                h.log_index, h.cluster, h.epoch, h.event
                            );
                        }
                        return Ok(());
                    }
                    Err(err) => last = err.to_string(),
                }
            }
            return Err(CliError::NoEndpoint(last));
        }
        Cmd::Switchover {
            cluster,
            to,
            room,
            all,
            no_wait,
        } => {
            let eps = need_endpoints(&cli.endpoints)?;
            let (op, limit) = match room {
                Some(room) => (
                    switchover_room(&eps, &cluster, &room, all).await?,
                    Duration::from_secs(180),
                ),
                None => (
                    switchover(&eps, &cluster, to.as_deref()).await?,
                    Duration::from_secs(60),
                ),
            };
            follow(&eps, op, limit, no_wait).await?;
        }
        Cmd::Failover {
            cluster,
            to,
            force,
            accept_data_loss,
            no_wait,
        } => {
            if !force {
                return Err(CliError::Usage(
                    "a manual failover bypasses the automation: pass --force to confirm (and see --accept-data-loss)".into(),
                ));
            }
            let eps = need_endpoints(&cli.endpoints)?;
            let op = failover(&eps, &cluster, &to, accept_data_loss).await?;
            follow(&eps, op, Duration::from_secs(60), no_wait).await?;
        }
        Cmd::Recover {
            member,
            cluster,
            wait_secs,
            no_wait,
        } => {
            let eps = need_endpoints(&cli.endpoints)?;
            let op = recover(&eps, &cluster, &member).await?;
            let limit = Duration::from_secs(wait_secs.max(1));
            follow(&eps, op, limit, no_wait).await?;
            if !no_wait {
                let rooms = wait_attached(&eps, &cluster, &member, Duration::from_secs(60)).await?;
                if rooms.is_empty() {
                    println!("{member} is back (no pgpool is configured or reachable)");
                } else {
                    println!(
                        "{member} is attached in the pgpool of: {}",
                        rooms.join(", ")
                    );
                }
            }
        }
        Cmd::Restart {
            member,
            cluster,
            in_place,
            switchover: switch_first,
            wait_secs,
            no_wait,
        } => {
            let eps = need_endpoints(&cli.endpoints)?;
            let st = status::gather(&eps, timeout).await?;
            let view = st
                .clusters
                .iter()
                .find(|c| c.name == cluster)
                .ok_or_else(|| CliError::Usage(format!("no cluster `{cluster}`")))?;
            if view.primary.as_deref() == Some(member.as_str()) && !in_place {
                if !switch_first {
                    return Err(CliError::Usage(format!(
                        "{member} is the primary of {cluster}: choose --in-place (it stays primary; writes pause while it restarts) or --switchover (the primary moves first)"
                    )));
                }
                let op = switchover(&eps, &cluster, None).await?;
                follow(&eps, op, Duration::from_secs(60), false).await?;
                // The old primary rejoins as a replica (a rewind first): restart it once it runs.
                let t0 = std::time::Instant::now();
                loop {
                    let st = status::gather(&eps, timeout).await?;
                    let back = st
                        .clusters
                        .iter()
                        .find(|c| c.name == cluster)
                        .and_then(|c| c.nodes.iter().find(|n| n.member == member))
                        .is_some_and(|n| n.role == "sync_replica" || n.role == "replica");
                    if back {
                        break;
                    }
                    if t0.elapsed() > Duration::from_secs(wait_secs.max(1)) {
                        return Err(CliError::Refused(format!(
                            "{member} did not rejoin as a replica within {wait_secs} s after the switchover; not restarting it"
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            let op = restart(&eps, &cluster, &member).await?;
            follow(&eps, op, Duration::from_secs(wait_secs.max(1)), no_wait).await?;
        }
        Cmd::Member { action } => {
            let eps = need_endpoints(&cli.endpoints)?;
            member::run(&eps, action).await?;
        }
        Cmd::PromoteGroup {
            cluster,
            force,
            no_wait,
        } => {
            let eps = need_endpoints(&cli.endpoints)?;
            let r = promote_group(&eps, cluster.as_deref().unwrap_or(""), force).await?;
            println!(
                "{} (log index {}, leader {})",
                r.result, r.log_index, r.committed_by
            );
            if !no_wait {
                let t0 = std::time::Instant::now();
                loop {
                    let s = status::gather(&eps, timeout).await?;
                    let serving = s.clusters.iter().any(|c| {
                        c.standby.is_none()
                            && c.nodes
                                .iter()
                                .any(|n| n.member == r.member && n.role == "primary")
                    });
                    if serving {
                        println!("{} serves as the primary", r.member);
                        break;
                    }
                    if t0.elapsed() > Duration::from_secs(60) {
                        return Err(CliError::Usage(format!(
                            "{} did not serve as the primary within 60 s; see `pgwctl status`",
                            r.member
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
        Cmd::Reload => {
            let eps = need_endpoints(&cli.endpoints)?;
            let mut failed = Vec::new();
            for (member, r) in reload_all(&eps, timeout).await? {
                match r {
                    Ok(r) => {
                        println!(
                            "{member}: reloaded{}",
                            if r.changed {
                                " (postgres settings changed)"
                            } else {
                                " (postgres settings unchanged)"
                            }
                        );
                        for n in &r.notes {
                            println!("  {n}");
                        }
                        if !r.pending_restart.is_empty() {
                            println!(
                                "  needs a restart to take effect: {} (pgwctl restart {member})",
                                r.pending_restart.join(", ")
                            );
                        }
                    }
                    Err(e) => {
                        println!("{member}: not reloaded: {e}");
                        failed.push(member);
                    }
                }
            }
            if !failed.is_empty() {
                return Err(CliError::Refused(format!(
                    "not reloaded on {}",
                    failed.join(", ")
                )));
            }
        }
        Cmd::Operation { id, cluster } => {
            let eps = need_endpoints(&cli.endpoints)?;
            print_op(&get_operation(&eps, &cluster, id).await?);
        }
        Cmd::Demo { action } => match action {
            DemoCmd::Up { dir } => {
                let d = demo::up(&dir).await?;
                println!(
                    "demo is up in {} (cluster id `{}`)",
                    dir.display(),
                    d.cluster_id
                );
                for m in &d.members {
                    println!(
                        "  {:<8} grpc {}  http {}  pid {}  log {}",
                        m.name, m.grpc, m.http, m.pid, m.log
                    );
                }
                for p in &d.postgres {
                    println!("  {:<8} postgres of {:<8} {}", p.cluster, p.member, p.dsn);
                }
                for p in &d.pgpool {
                    println!(
                        "  {:<8} pgpool of {:<10} {}   (PCP port {})",
                        p.cluster, p.room, p.dsn, p.pcp_port
                    );
                }
                match &d.haproxy {
                    Some(h) => {
                        println!("  haproxy, writes     {}", h.write_dsn);
                        println!("  haproxy, reads      {}", h.read_dsn);
                    }
                    None => {
                        println!("  (haproxy is not installed: no HAProxy in front of the servers)")
                    }
                }
                let pgwctl = std::env::current_exe()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|_| "pgwctl".into());
                println!("\nquery it (every call is mutual TLS; the demo made a CA and a client certificate per role):");
                if let Some(t) = &d.tls {
                    println!(
                        "  export PGW_CA={} PGW_CERT={} PGW_KEY={}",
                        t.ca, t.admin.cert, t.admin.key
                    );
                }
                println!("  {pgwctl} --endpoints {} status", d.endpoints);
                println!(
                    "  {pgwctl} --endpoints {} switchover --room room-b --all",
                    d.endpoints
                );
                println!("  curl -s http://{}/health", d.members[0].http);
                println!(
                    "  {pgwctl} demo failover --dir {} [--fault crash|node-loss|hang] [--cluster global|recovery]",
                    dir.display()
                );
                println!("  {pgwctl} --endpoints {} switchover", d.endpoints);
                println!("  {pgwctl} demo down --dir {}", dir.display());
            }
            DemoCmd::Down { dir } => {
                let stopped = demo::down(&dir)?;
                println!(
                    "stopped: {}",
                    if stopped.is_empty() {
                        "nothing was running".to_string()
                    } else {
                        stopped.join(", ")
                    }
                );
            }
            DemoCmd::Failover {
                dir,
                fault,
                cluster,
            } => {
                println!(
                    "injecting {fault:?} into the room of {cluster}'s primary while a writer runs..."
                );
                let r = demo::failover(&dir, fault, &cluster).await?;
                println!("  {cluster} primary {} -> {}", r.old_primary, r.new_primary);
                println!(
                    "  first write acknowledged by {} {} ms after the fault",
                    r.new_primary, r.first_write_ms
                );
                println!(
                    "  acknowledged writes: {}, lost: {}",
                    r.acknowledged_writes, r.lost_writes
                );
                match r.rejoined_ms {
                    Some(ms) => println!(
                        "  {} rejoined as a sync replica {} ms after healing",
                        r.old_primary, ms
                    ),
                    None => println!(
                        "  {} has not rejoined yet (see its pg-watcher.log)",
                        r.old_primary
                    ),
                }
                println!(
                    "  other clusters' primaries {}",
                    if r.others_unchanged {
                        "unchanged"
                    } else {
                        "changed too (a node loss takes every server of the room)"
                    }
                );
                let eps: Vec<String> = demo_endpoints(&dir)?;
                let s = status::gather(&eps, timeout).await?;
                print!("\n{}", status::render_table(&s));
            }
        },
    }
    Ok(())
}

fn demo_endpoints(dir: &std::path::Path) -> Result<Vec<String>, CliError> {
    let p = dir.join("demo.json");
    let text = std::fs::read_to_string(&p).map_err(|e| CliError::Io {
        path: p.display().to_string(),
        message: e.to_string(),
    })?;
    let d: demo::DemoFile = serde_json::from_str(&text).map_err(|e| CliError::Io {
        path: p.display().to_string(),
        message: e.to_string(),
    })?;
    Ok(d.members.into_iter().map(|m| m.grpc).collect())
}

/// Parses the process arguments (exits with clap's usage message on error).
pub fn parse_args() -> Cli {
    Cli::parse()
}
