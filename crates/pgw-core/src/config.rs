//! The one `Config` type. Every default lives in this file; `validate()` names the bad field.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::fingerprint::fnv1a_hex;

/// A configuration error that names the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {message}")]
    Read { path: String, message: String },
    /// The TOML did not parse or had an unknown / mistyped field.
    #[error("config file {path} is not valid: {message}")]
    Parse { path: String, message: String },
    /// A field has a value that is not allowed.
    #[error("config field `{field}`: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// What a member does in the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Runs beside a PostgreSQL server (and the room's pgpool) and votes.
    Data,
    /// Votes only; never runs a database.
    Arbiter,
    /// Runs beside a PostgreSQL server of some cluster (listed in that cluster's `servers`),
    /// reports and carries out the group's decisions, but never votes: a Raft learner. Lets a
    /// cluster live on hosts of its own, or have more servers than the group has voters.
    Sidecar,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Data => "data",
            Role::Arbiter => "arbiter",
            Role::Sidecar => "sidecar",
        })
    }
}

/// One member of the Raft group. Every member's config carries the same list.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    /// Unique member name, e.g. the room: `room-a`.
    pub name: String,
    /// Raft node id, unique, >= 1. Never reuse an id for a different machine.
    pub id: u64,
    pub role: Role,
    /// `host:port` other members and `pgwctl` use for gRPC.
    pub grpc: String,
    /// `host:port` of the HTTP endpoint (`/health`, `/metrics`, `/primary`, `/replica`).
    pub http: String,
    /// Failover preference among equally safe candidates; higher wins.
    #[serde(default = "defaults::priority")]
    pub priority: u32,
    /// `host:port` of this member's PostgreSQL (data members whose group manages postgres).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<String>,
    /// `host:port` applications of this room connect to: the room's pgpool-II (data members).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgpool: Option<String>,
    /// `host:port` of that pgpool's PCP port; the Raft leader repoints it through PCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcp: Option<String>,
    /// The machine room this member stands in (default: its name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    /// A cold spare (seed 003's "3+2+1"): a data or arbiter member that receives the log as a
    /// non-voter until an operator makes it vote (`pgwctl member promote`, or by naming it
    /// among the survivors of `pg-watcher --force-new-group`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub spare: bool,
}

impl MemberConfig {
    /// Whether this member votes in Raft (data and arbiter members that are not spares).
    pub fn votes(&self) -> bool {
        self.role != Role::Sidecar && !self.spare
    }

    /// The machine room this member stands in: `room`, else its name.
    pub fn room(&self) -> &str {
        self.room.as_deref().unwrap_or(&self.name)
    }
}

/// Addresses this member binds. Default: the member's own `grpc` / `http` addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    pub grpc: Option<String>,
    pub http: Option<String>,
}

/// How far apart the rooms are: picks the defaults of every `[raft]` and `[failover]` timing
/// (a value set in the file wins). See `defaults` for the numbers and the reasoning.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TimingProfile {
    /// Rooms in one city, round trip up to ~10 ms: a silent primary is replaced ~1.1 s after
    /// its last renewal. Not the default yet: see the README's known issues.
    Metro,
    /// Rooms far apart, round trip up to ~300 ms: heartbeats and the lease sized for it (a
    /// silent primary is replaced ~2.45 s after its last renewal). The default.
    #[default]
    WideArea,
}

impl TimingProfile {
    pub fn as_str(self) -> &'static str {
        match self {
            TimingProfile::Metro => "metro",
            TimingProfile::WideArea => "wide-area",
        }
    }
}

/// Raft timing knobs (see `defaults` for the reasoning behind the default values).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    /// Leader heartbeat interval.
    pub heartbeat_ms: u64,
    /// A follower that hears nothing for a random time in [min, max] starts an election.
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Upper bound for one member-to-member RPC (snapshots use 10x).
    pub rpc_timeout_ms: u64,
    /// Take a snapshot (and purge the log) every this many applied entries.
    pub snapshot_logs: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self::for_profile(TimingProfile::default())
    }
}

impl RaftConfig {
    /// The defaults of `profile`.
    pub fn for_profile(profile: TimingProfile) -> Self {
        let (heartbeat_ms, election_timeout_min_ms, election_timeout_max_ms) = match profile {
            TimingProfile::Metro => (
                defaults::metro::HEARTBEAT_MS,
                defaults::metro::ELECTION_MIN_MS,
                defaults::metro::ELECTION_MAX_MS,
            ),
            TimingProfile::WideArea => (
                defaults::HEARTBEAT_MS,
                defaults::ELECTION_MIN_MS,
                defaults::ELECTION_MAX_MS,
            ),
        };
        Self {
            heartbeat_ms,
            election_timeout_min_ms,
            election_timeout_max_ms,
            rpc_timeout_ms: defaults::RPC_TIMEOUT_MS,
            snapshot_logs: defaults::SNAPSHOT_LOGS,
        }
    }
}

/// One PostgreSQL cluster watched by this group (e.g. "global", "recovery").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgClusterConfig {
    pub name: String,
    /// k in `synchronous_standby_names = 'ANY k (...)'`.
    #[serde(default = "defaults::sync_quorum")]
    pub sync_quorum: u32,
    /// Member that becomes the first primary of a brand-new cluster (default: the highest
    /// priority data member that reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap_primary: Option<String>,
    /// Let commits continue asynchronously when no synchronous standby has been connected for
    /// `degrade_after_ms` (RPO > 0 while degraded; no automatic failover then). Default: strict
    /// (commits wait for a standby).
    #[serde(default)]
    pub allow_degraded: bool,
    #[serde(default = "defaults::degrade_after_ms")]
    pub degrade_after_ms: u64,
    /// The servers that hold this cluster: only they are candidates and synchronous standbys.
    /// Empty: every data member, at its own `postgres`/`pgpool`/`pcp` addresses (one such
    /// cluster per group when those addresses are set).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<ServerConfig>,
    /// Position in `pgwctl switchover --room ROOM --all` (lower moves first; default 100,
    /// ties in the order of `clusters`).
    #[serde(default = "defaults::switch_order")]
    pub switch_order: u32,
    /// This cluster is a standby of another group's cluster, in another region (seed 000's
    /// non-region pair; Patroni's standby cluster): its primary is a cascading standby that
    /// replicates asynchronously from that group's primary, followed when it moves, until
    /// `pgwctl promote-group` makes it a normal cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby_of: Option<StandbyOf>,
}

/// Where a standby cluster replicates from: another pg-watcher group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StandbyOf {
    /// gRPC `host:port` of the main group's members (asked with this member's certificate,
    /// which the main group must list in `auth.read`).
    pub endpoints: Vec<String>,
    /// The cluster's name in the main group (default: the same name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// How often the leader asks the main group where its primary is.
    #[serde(default = "defaults::standby_poll_ms")]
    pub poll_ms: u64,
}

impl StandbyOf {
    /// The cluster's name in the main group.
    pub fn cluster_of<'a>(&'a self, ours: &'a str) -> &'a str {
        self.cluster.as_deref().unwrap_or(ours)
    }
}

/// One PostgreSQL server of a cluster, run beside member `member` (a data or sidecar member).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub member: String,
    /// `host:port` of the server (required in a cluster's `servers`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<String>,
    /// `host:port` of this server's room pgpool-II for this cluster (with `pcp`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgpool: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcp: Option<String>,
}

/// What a hook runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookEvent {
    /// A cluster's primary changed (failover, switchover, room move).
    PrimaryChanged,
    /// The group's active room changed (the active cluster's primary moved to another room).
    ActiveRoomChanged,
}

impl HookEvent {
    pub fn name(self) -> &'static str {
        match self {
            HookEvent::PrimaryChanged => "primary_changed",
            HookEvent::ActiveRoomChanged => "active_room_changed",
        }
    }
}

/// A role-change hook (`[[hooks]]`): a command run, without a shell, when a cluster's primary
/// or the active room changes, after this member's pgpool of that cluster points at the new
/// primary. Its environment names the change (`PGW_CLUSTER`, `PGW_OLD_PRIMARY`,
/// `PGW_NEW_PRIMARY`, `PGW_ROOM`, `PGW_ACTIVE_ROOM`, `PGW_EPOCH`, `PGW_OPERATION`,
/// `PGW_EVENT`, `PGW_MEMBER`). It never blocks a failover; each run's outcome is recorded in
/// the cluster's history and in metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookConfig {
    pub name: String,
    /// argv: an absolute path, then its arguments.
    pub command: Vec<String>,
    #[serde(default = "defaults::hook_on")]
    pub on: Vec<HookEvent>,
    /// Only these clusters (default: every cluster).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<String>,
    /// Run on these members (default: every member that has this hook in its config).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<String>,
    /// One attempt's time limit; the command is killed after it.
    #[serde(default = "defaults::hook_timeout_ms")]
    pub timeout_ms: u64,
    /// Further attempts after a failed one (1 s apart).
    #[serde(default = "defaults::hook_retries")]
    pub retries: u32,
}

/// `[postgres]` (one table) or `[[postgres]]` (one entry per local server).
fn one_or_many<'de, D>(d: D) -> Result<Vec<PostgresConfig>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::de::Error;
    let v = toml::Value::deserialize(d)?;
    match v {
        toml::Value::Array(_) => Vec::<PostgresConfig>::deserialize(v).map_err(D::Error::custom),
        other => PostgresConfig::deserialize(other)
            .map(|p| vec![p])
            .map_err(D::Error::custom),
    }
}

/// The local PostgreSQL this member manages (data members only; absent: no sidecar).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Which entry of `clusters` this server belongs to (default: the first).
    #[serde(default)]
    pub cluster: Option<String>,
    /// Directory with `initdb`, `pg_ctl`, `pg_basebackup`, `pg_rewind`.
    #[serde(default = "defaults::pg_bin_dir")]
    pub bin_dir: PathBuf,
    /// The PostgreSQL data directory (created by the first primary's `initdb`, cloned elsewhere).
    pub data_dir: PathBuf,
    /// OS user that runs postgres when the watcher runs as root.
    #[serde(default = "defaults::pg_os_user")]
    pub os_user: String,
    /// Superuser role the watcher logs in as, over the server's local socket (the `local` lines
    /// of `hba` must let it in: `peer` when the watcher runs as the OS user of that name).
    #[serde(default = "defaults::pg_user")]
    pub user: String,
    /// Role replicas stream and clone with (needs `REPLICATION`); default: `user`. Created on
    /// the primary when missing, with its password from `passfile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_user: Option<String>,
    /// Role `pg_rewind` reads a new primary with (the minimal grants pg_rewind needs, and
    /// `pg_checkpoint`); default: `user`. Created on the primary when missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewind_user: Option<String>,
    /// libpq password file (`host:port:database:user:password` lines) for every connection the
    /// servers make to each other. Mode 0600 and, when the watcher runs as root, owned by
    /// `os_user`. Passwords are read from here only: never in a config, on a command line or in
    /// a log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passfile: Option<PathBuf>,
    /// libpq `sslmode` of the connections between servers (replication, clone, rewind):
    /// disable, allow, prefer, require, verify-ca or verify-full. The servers' own `ssl = on`,
    /// `ssl_cert_file` and `ssl_key_file` go in `settings`.
    #[serde(default = "defaults::pg_sslmode")]
    pub sslmode: String,
    /// CA certificate the servers' certificates are checked against (libpq `sslrootcert`);
    /// required by verify-ca and verify-full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sslrootcert: Option<PathBuf>,
    /// `pg_hba.conf` lines written at initdb. Default trusts loopback only: set your own.
    #[serde(default = "defaults::pg_hba")]
    pub hba: Vec<String>,
    /// Extra `postgresql.conf` settings (`name = value` lines) for every server.
    #[serde(default)]
    pub settings: Vec<String>,
}

/// libpq `sslmode` values.
pub const PG_SSLMODES: [&str; 6] = [
    "disable",
    "allow",
    "prefer",
    "require",
    "verify-ca",
    "verify-full",
];

impl PostgresConfig {
    /// A server in `data_dir` with every other field at its default.
    pub fn new(data_dir: impl Into<PathBuf>) -> PostgresConfig {
        PostgresConfig {
            cluster: None,
            bin_dir: defaults::pg_bin_dir(),
            data_dir: data_dir.into(),
            os_user: defaults::pg_os_user(),
            user: defaults::pg_user(),
            replication_user: None,
            rewind_user: None,
            passfile: None,
            sslmode: defaults::pg_sslmode(),
            sslrootcert: None,
            hba: defaults::pg_hba(),
            settings: Vec::new(),
        }
    }

    /// The role replicas stream and clone with.
    pub fn replication_role(&self) -> &str {
        self.replication_user.as_deref().unwrap_or(&self.user)
    }

    /// The role pg_rewind connects with.
    pub fn rewind_role(&self) -> &str {
        self.rewind_user.as_deref().unwrap_or(&self.user)
    }

    fn validate_connections(&self, at: &str) -> Result<(), ConfigError> {
        for (field, v) in [
            ("user", Some(&self.user)),
            ("replication_user", self.replication_user.as_ref()),
            ("rewind_user", self.rewind_user.as_ref()),
            ("os_user", Some(&self.os_user)),
        ] {
            if let Some(v) = v {
                if !valid_name(v) {
                    return Err(invalid(
                        format!("{at}.{field}"),
                        format!(
                            "`{v}` is not a role name (letters, digits, `_`, `-`, `.`; at most 63)"
                        ),
                    ));
                }
            }
        }
        if !PG_SSLMODES.contains(&self.sslmode.as_str()) {
            return Err(invalid(
                format!("{at}.sslmode"),
                format!(
                    "`{}` is not one of {}",
                    self.sslmode,
                    PG_SSLMODES.join(", ")
                ),
            ));
        }
        if self.sslmode.starts_with("verify-") && self.sslrootcert.is_none() {
            return Err(invalid(
                format!("{at}.sslrootcert"),
                format!(
                    "sslmode {} checks the servers' certificates: name the CA file",
                    self.sslmode
                ),
            ));
        }
        for (field, p) in [
            ("passfile", self.passfile.as_ref()),
            ("sslrootcert", self.sslrootcert.as_ref()),
        ] {
            if let Some(p) = p {
                if !p.is_absolute() {
                    return Err(invalid(
                        format!("{at}.{field}"),
                        format!("`{}` must be an absolute path (postgres reads it too, from its own directory)", p.display()),
                    ));
                }
                if p.to_string_lossy().contains(['\'', '\\', '\n']) {
                    return Err(invalid(
                        format!("{at}.{field}"),
                        "must not contain quotes, backslashes or newlines",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The rooms' pgpool-II (present on every member when any member lists a `pcp` address: the
/// leader, arbiter or not, repoints every pgpool).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgpoolConfig {
    /// This watcher starts and supervises its room's pgpool (`pgpool.conf` rendered from
    /// `deploy/pgpool/pgpool.conf.template`). `false`: the pgpool is run by someone else and is
    /// only repointed.
    #[serde(default = "defaults::pgpool_manage")]
    pub manage: bool,
    /// Directory with the `pgpool` binary.
    #[serde(default = "defaults::pgpool_bin_dir")]
    pub bin_dir: PathBuf,
    /// Where a managed pgpool's config, pid file, sockets and log live (default:
    /// `<data_dir>-pgpool`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_dir: Option<PathBuf>,
    /// OS user that runs a managed pgpool when the watcher runs as root.
    #[serde(default = "defaults::pg_os_user")]
    pub os_user: String,
    /// PCP user name (the same on every pgpool of the group).
    #[serde(default = "defaults::pcp_user")]
    pub pcp_user: String,
    /// PostgreSQL role pgpool logs in as to find the primary (`sr_check_user`; member of
    /// `pg_monitor`, created on the primary when missing, its password from
    /// `[postgres] passfile`). Default: `[postgres] user`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_user: Option<String>,
    /// File holding the PCP password (one line). Must not be readable by group or others.
    pub pcp_password_file: PathBuf,
    /// How often the leader reads each pgpool's node list while it agrees with the group
    /// (while it disagrees: every `failover.report_interval_ms`).
    #[serde(default = "defaults::pgpool_check_interval_ms")]
    pub check_interval_ms: u64,
    /// Extra `pgpool.conf` lines for a managed pgpool (`name = value`), after the template's.
    #[serde(default)]
    pub settings: Vec<String>,
}

/// Failure detection and lease timing (see `pgw_core::lease` for the rule).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverConfig {
    /// How often the sidecar checks postgres and reports to the leader.
    pub report_interval_ms: u64,
    /// Primary lease duration.
    pub lease_ms: u64,
    /// Time the primary's watcher allows itself to stop postgres before its lease ends.
    pub fence_budget_ms: u64,
    /// Maximum monotonic clock rate error assumed between members, parts per million.
    pub clock_drift_ppm: u64,
    /// Extra safety margin added to the leader's wait.
    pub margin_ms: u64,
    /// A postgres that does not answer for this long is treated as hung and stopped.
    pub hung_after_ms: u64,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        Self::for_profile(TimingProfile::default())
    }
}

impl FailoverConfig {
    /// The defaults of `profile`.
    pub fn for_profile(profile: TimingProfile) -> Self {
        match profile {
            TimingProfile::Metro => Self {
                report_interval_ms: defaults::metro::REPORT_INTERVAL_MS,
                lease_ms: defaults::metro::LEASE_MS,
                fence_budget_ms: defaults::metro::FENCE_BUDGET_MS,
                clock_drift_ppm: defaults::CLOCK_DRIFT_PPM,
                margin_ms: defaults::metro::MARGIN_MS,
                hung_after_ms: defaults::metro::HUNG_AFTER_MS,
            },
            TimingProfile::WideArea => Self {
                report_interval_ms: defaults::REPORT_INTERVAL_MS,
                lease_ms: defaults::LEASE_MS,
                fence_budget_ms: defaults::FENCE_BUDGET_MS,
                clock_drift_ppm: defaults::CLOCK_DRIFT_PPM,
                margin_ms: defaults::MARGIN_MS,
                hung_after_ms: defaults::HUNG_AFTER_MS,
            },
        }
    }

    pub fn lease(&self) -> crate::lease::LeaseTiming {
        crate::lease::LeaseTiming {
            lease_ms: self.lease_ms,
            fence_budget_ms: self.fence_budget_ms,
            drift_ppm: self.clock_drift_ppm,
            margin_ms: self.margin_ms,
        }
    }
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `error`, `warn`, `info`, `debug` or `trace`, optionally with per-target directives
    /// (`info,openraft=warn`).
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: defaults::LOG_LEVEL.to_string(),
        }
    }
}

/// The whole daemon configuration (`pg-watcher --config FILE`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Identifies the Raft group; peers with another id are refused.
    pub cluster_id: String,
    /// Which entry of `members` this process is.
    pub member: String,
    /// Durable Raft state (vote, log, snapshot) lives here.
    pub data_dir: PathBuf,
    pub members: Vec<MemberConfig>,
    #[serde(default)]
    pub listen: ListenConfig,
    /// The distance between rooms (`metro` | `wide-area`): the defaults of `[raft]` and
    /// `[failover]` timings.
    #[serde(default)]
    pub timing: TimingProfile,
    #[serde(default)]
    pub raft: RaftConfig,
    #[serde(default = "defaults::clusters")]
    pub clusters: Vec<PgClusterConfig>,
    /// The cluster whose primary's room is the group's active room (the seed's
    /// `ks_master_zone`); default: the first cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_cluster: Option<String>,
    #[serde(default)]
    pub log: LogConfig,
    /// The PostgreSQL servers this member runs beside, one per cluster it serves (`[postgres]`
    /// or `[[postgres]]`; each names its `cluster` when there are several).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "one_or_many"
    )]
    pub postgres: Vec<PostgresConfig>,
    #[serde(default)]
    pub failover: FailoverConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgpool: Option<PgpoolConfig>,
    /// Mutual TLS on every gRPC link (required: there is no plaintext mode).
    pub tls: TlsConfig,
    /// Who may do what through the operator API.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Role-change hooks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hooks: Vec<HookConfig>,
    /// The group generation this config runs in: not a file setting, set from the group's
    /// member list (the roster's `effective`). A group forced out of the survivors of a
    /// lost majority (generation > 0) may run with one voter, one data member and clusters of
    /// one server until members are added back.
    #[serde(skip)]
    pub generation: u64,
    /// pgpool backend lists held by the group (`Roster::pools`): not a file setting; empty
    /// until the member list first changed (then the servers, in order).
    #[serde(skip)]
    pub pools: BTreeMap<String, Vec<(String, String)>>,
}

/// Certificates of this member. Every member and every operator certificate is issued by the
/// CA in `ca`; a member's certificate names the member (subject CN = member name, and the member
/// name as a DNS subject alternative name, which peers verify when they connect to it).
/// The files are read again when they change or on SIGHUP, without a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM bundle of the CA(s) that issue member and operator certificates.
    pub ca: PathBuf,
    /// PEM certificate chain of this member.
    pub cert: PathBuf,
    /// PEM private key of `cert` (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Serve the HTTP endpoint (`/health`, `/metrics`, `/primary`, `/replica`) over HTTPS with
    /// this member's certificate (no client certificate asked: load balancers read it).
    #[serde(default)]
    pub http: bool,
    /// How often the certificate files are checked for changes.
    #[serde(default = "defaults::tls_reload_check_ms")]
    pub reload_check_ms: u64,
}

impl TlsConfig {
    /// The section for these three files, with the other fields at their defaults.
    pub fn new(ca: PathBuf, cert: PathBuf, key: PathBuf) -> TlsConfig {
        TlsConfig {
            ca,
            cert,
            key,
            http: false,
            reload_check_ms: defaults::TLS_RELOAD_CHECK_MS,
        }
    }
}

/// Operator roles. `read`: status, history, operation, health. `operate`: switchover,
/// pause/resume, recover (and everything `read` may). `admin`: forced failover, accepting data
/// loss, membership (and everything `operate` may). A client certificate's subject CN is looked
/// up in these lists; a caller without a certificate may present a bearer token instead.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Client certificate common names allowed the `read` role.
    pub read: Vec<String>,
    /// ... the `operate` role.
    pub operate: Vec<String>,
    /// ... the `admin` role.
    pub admin: Vec<String>,
    /// A file holding a bearer token (one line, >= 16 characters) that grants `read`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_token_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operate_token_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
}

impl AuthConfig {
    /// Whether any role can be reached with a token (then TLS clients need no certificate).
    pub fn has_tokens(&self) -> bool {
        self.read_token_file.is_some()
            || self.operate_token_file.is_some()
            || self.admin_token_file.is_some()
    }
}

/// Every default in one place.
pub mod defaults {
    use super::PgClusterConfig;

    // The `wide-area` profile, the default (the `metro` one is in `metro` below). openraft 0.9 gives every AppendEntries, and every leadership confirmation (which the
    // primary's lease renewal needs), `heartbeat_interval` to complete: the heartbeat must be
    // longer than the worst round trip between rooms, or the group cannot commit anything at all
    // (found by the 100 ms ± 50 ms latency test: a 300 ms round trip against a 100 ms heartbeat).
    // 350 ms covers a 300 ms round trip. A follower of a live leader waits `election_timeout_max`
    // (the leader lease) plus a random election timeout before it campaigns: with these defaults
    // a lost leader is replaced after 0.9-1.0 s, and a follower campaigns only after 2.5
    // heartbeats are missing. The primary lease (`LEASE_MS`) must outlast that.
    pub const HEARTBEAT_MS: u64 = 350;
    pub const ELECTION_MIN_MS: u64 = 400;
    pub const ELECTION_MAX_MS: u64 = 500;
    pub const RPC_TIMEOUT_MS: u64 = 1000;
    pub const SNAPSHOT_LOGS: u64 = 1000;
    pub const PRIORITY: u32 = 100;
    pub const SYNC_QUORUM: u32 = 1;
    pub const LOG_LEVEL: &str = "info,openraft=warn";
    pub const CLUSTER_NAME: &str = "global";

    pub fn priority() -> u32 {
        PRIORITY
    }
    pub fn sync_quorum() -> u32 {
        SYNC_QUORUM
    }
    pub const REPORT_INTERVAL_MS: u64 = 100;

    /// The `metro` profile: rooms in one city, round trip up to ~10 ms. The constants outside
    /// this module are the `wide-area` profile's (the default).
    ///
    /// Heartbeat 50 ms (five round trips). A lost Raft leader is replaced after
    /// `election_timeout_max` (openraft's leader lease: voters refuse a candidate until it ran
    /// out) plus a random timeout: 300-400 ms, ~600 ms when the first vote splits. The lease
    /// (1 s) must outlast that plus a renewal round trip before the primary's fence point
    /// (`lease - fence_budget` = 800 ms after its last acknowledged renewal); `validate()`
    /// checks `lease - fence_budget >= 2 x election_timeout_max + heartbeat`. A silent primary
    /// is replaced `ceil(L (1 + rho) / (1 - rho)) + margin` = 1071 ms after the leader's last
    /// grant. Renewals every 50 ms (`report_interval_ms`); a postgres that does not answer for
    /// 1 s is treated as hung.
    pub mod metro {
        pub const HEARTBEAT_MS: u64 = 50;
        pub const ELECTION_MIN_MS: u64 = 150;
        pub const ELECTION_MAX_MS: u64 = 200;
        pub const REPORT_INTERVAL_MS: u64 = 50;
        pub const LEASE_MS: u64 = 1000;
        pub const FENCE_BUDGET_MS: u64 = 200;
        pub const MARGIN_MS: u64 = 50;
        pub const HUNG_AFTER_MS: u64 = 1000;
    }
    // A silent primary is replaced ~2.45 s after its last renewal (L(1+rho)/(1-rho) + margin);
    // it fences itself 2.0 s after the last renewal it sent that was acknowledged (a watchdog
    // task kills postgres at that instant, so 300 ms of fence budget is ample). The lease must
    // outlast a change of Raft leader (renewals need a leader): 0.9-1.0 s with the Raft
    // defaults, ~1.5 s when the first vote splits, plus a renewal round trip. Shorter, and
    // losing the leader's room (the arbiter, a replica's room) makes a healthy primary fence
    // itself: found by the arbiter-isolation test.
    pub const LEASE_MS: u64 = 2300;
    pub const FENCE_BUDGET_MS: u64 = 300;
    pub const CLOCK_DRIFT_PPM: u64 = 10_000;
    pub const MARGIN_MS: u64 = 100;
    pub const HUNG_AFTER_MS: u64 = 1500;
    pub const DEGRADE_AFTER_MS: u64 = 3000;

    pub fn degrade_after_ms() -> u64 {
        DEGRADE_AFTER_MS
    }

    pub fn pg_bin_dir() -> std::path::PathBuf {
        std::path::PathBuf::from("/usr/lib/postgresql/15/bin")
    }
    pub fn pg_os_user() -> String {
        "postgres".into()
    }
    pub fn pg_user() -> String {
        "postgres".into()
    }
    pub fn pg_sslmode() -> String {
        "prefer".into()
    }
    pub fn pg_hba() -> Vec<String> {
        vec![
            "local all all trust".into(),
            "host all all 127.0.0.0/8 trust".into(),
            "host replication all 127.0.0.0/8 trust".into(),
        ]
    }

    pub fn pgpool_manage() -> bool {
        true
    }
    pub fn pgpool_bin_dir() -> std::path::PathBuf {
        std::path::PathBuf::from("/usr/sbin")
    }
    pub fn pcp_user() -> String {
        "pgwatcher".into()
    }
    pub const PGPOOL_CHECK_INTERVAL_MS: u64 = 1000;
    pub const TLS_RELOAD_CHECK_MS: u64 = 2000;
    pub fn tls_reload_check_ms() -> u64 {
        TLS_RELOAD_CHECK_MS
    }
    pub fn pgpool_check_interval_ms() -> u64 {
        PGPOOL_CHECK_INTERVAL_MS
    }

    pub fn clusters() -> Vec<PgClusterConfig> {
        vec![PgClusterConfig {
            name: CLUSTER_NAME.to_string(),
            sync_quorum: SYNC_QUORUM,
            bootstrap_primary: None,
            allow_degraded: false,
            degrade_after_ms: DEGRADE_AFTER_MS,
            servers: Vec::new(),
            switch_order: switch_order(),
            standby_of: None,
        }]
    }
    pub fn standby_poll_ms() -> u64 {
        1000
    }
    pub fn switch_order() -> u32 {
        100
    }
    pub fn hook_on() -> Vec<super::HookEvent> {
        vec![super::HookEvent::PrimaryChanged]
    }
    pub fn hook_timeout_ms() -> u64 {
        10_000
    }
    pub fn hook_retries() -> u32 {
        2
    }
}

/// postgresql.conf settings pg-watcher owns (it writes them to `pgw.conf`), or that would
/// silently give up the zero-loss guarantee: `[postgres] settings` may not set them.
const POSTGRES_OWNED: &[(&str, &str)] = &[
    (
        "listen_addresses",
        "the member's `postgres` address sets it",
    ),
    ("port", "the member's `postgres` address sets it"),
    ("unix_socket_directories", "the watcher connects through it"),
    ("wal_level", "replication needs `replica`"),
    ("hot_standby", "replicas must answer the watcher"),
    ("wal_log_hints", "pg_rewind needs it"),
    (
        "synchronous_commit",
        "anything but `on` gives up zero-loss failover",
    ),
    (
        "synchronous_standby_names",
        "the group sets it from the Raft sync set",
    ),
    (
        "primary_conninfo",
        "the group points replicas at the primary",
    ),
    (
        "primary_slot_name",
        "the group points replicas at the primary",
    ),
    (
        "recovery_target_timeline",
        "replicas must follow a promotion",
    ),
    ("promote_trigger_file", "promotion is the group's decision"),
    ("cluster_name", "names the member in pg_stat_replication"),
    (
        "wal_receiver_status_interval",
        "the sync state the watcher reads depends on it",
    ),
    ("wal_sender_timeout", "failure detection depends on it"),
    ("wal_receiver_timeout", "failure detection depends on it"),
    ("fsync", "turning it off loses acknowledged commits"),
    (
        "full_page_writes",
        "turning it off can corrupt data after a crash",
    ),
    (
        "hba_file",
        "the watcher writes pg_hba.conf from [postgres] hba",
    ),
    (
        "ident_file",
        "the watcher manages the data directory's files",
    ),
    ("data_directory", "the watcher manages the data directory"),
    (
        "config_file",
        "the watcher manages the data directory's files",
    ),
    ("include", "an included file could set any of these"),
    (
        "include_if_exists",
        "an included file could set any of these",
    ),
    ("include_dir", "an included file could set any of these"),
];

/// pgpool.conf settings pg-watcher owns: `[pgpool] settings` may not override them.
const PGPOOL_OWNED: &[&str] = &[
    "failover_on_backend_error",
    "failover_on_backend_shutdown",
    "failover_command",
    "follow_primary_command",
    "failback_command",
    "health_check_period",
    "auto_failback",
    "detach_false_primary",
    "search_primary_node_timeout",
    "use_watchdog",
    "listen_addresses",
    "port",
    "pcp_listen_addresses",
    "pcp_port",
    "unix_socket_directories",
    "pcp_socket_dir",
    "pid_file_name",
    "logdir",
    "sr_check_user",
    "sr_check_password",
];

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
}

/// The path (`a.b[2].c`) of the first place two TOML values differ.
fn first_difference(a: &toml::Value, b: &toml::Value, at: String) -> Option<String> {
    use toml::Value;
    let join = |k: &str| {
        if at.is_empty() {
            k.to_string()
        } else {
            format!("{at}.{k}")
        }
    };
    match (a, b) {
        (Value::Table(x), Value::Table(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| match (x.get(k), y.get(k)) {
                (Some(p), Some(q)) => first_difference(p, q, join(k)),
                _ => Some(join(k)),
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (p, q))| first_difference(p, q, format!("{at}[{i}]"))),
        _ => (a != b).then_some(at),
    }
}

/// Checks `host:port` with a non-empty host and a non-zero port.
fn check_addr(field: &str, addr: &str) -> Result<(), ConfigError> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| invalid(field, format!("`{addr}` is not host:port")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(invalid(field, format!("`{addr}` has no valid host")));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(invalid(
            field,
            format!("`{addr}` has no valid port (1-65535)"),
        )),
    }
}

impl Config {
    /// The cluster whose primary's room is the group's active room.
    pub fn active_cluster(&self) -> Option<&str> {
        self.active_cluster
            .as_deref()
            .or_else(|| self.clusters.first().map(|c| c.name.as_str()))
    }

    /// Parses TOML text. Does not validate.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let parse_err = |e: toml::de::Error| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string().trim().to_string(),
        };
        let mut cfg: Config = toml::from_str(text).map_err(parse_err)?;
        if cfg.timing != TimingProfile::default() {
            // Timings the file leaves out take the profile's defaults, not the default profile's
            // (the struct defaults are the default profile's).
            let table: toml::Table = toml::from_str(text).map_err(parse_err)?;
            let given = |section: &str, key: &str| {
                table
                    .get(section)
                    .and_then(|t| t.as_table())
                    .is_some_and(|t| t.contains_key(key))
            };
            let r = RaftConfig::for_profile(cfg.timing);
            let f = FailoverConfig::for_profile(cfg.timing);
            for (key, dst, v) in [
                ("heartbeat_ms", &mut cfg.raft.heartbeat_ms, r.heartbeat_ms),
                (
                    "election_timeout_min_ms",
                    &mut cfg.raft.election_timeout_min_ms,
                    r.election_timeout_min_ms,
                ),
                (
                    "election_timeout_max_ms",
                    &mut cfg.raft.election_timeout_max_ms,
                    r.election_timeout_max_ms,
                ),
                (
                    "rpc_timeout_ms",
                    &mut cfg.raft.rpc_timeout_ms,
                    r.rpc_timeout_ms,
                ),
            ] {
                if !given("raft", key) {
                    *dst = v;
                }
            }
            for (key, dst, v) in [
                (
                    "report_interval_ms",
                    &mut cfg.failover.report_interval_ms,
                    f.report_interval_ms,
                ),
                ("lease_ms", &mut cfg.failover.lease_ms, f.lease_ms),
                (
                    "fence_budget_ms",
                    &mut cfg.failover.fence_budget_ms,
                    f.fence_budget_ms,
                ),
                (
                    "clock_drift_ppm",
                    &mut cfg.failover.clock_drift_ppm,
                    f.clock_drift_ppm,
                ),
                ("margin_ms", &mut cfg.failover.margin_ms, f.margin_ms),
                (
                    "hung_after_ms",
                    &mut cfg.failover.hung_after_ms,
                    f.hung_after_ms,
                ),
            ] {
                if !given("failover", key) {
                    *dst = v;
                }
            }
        }
        Ok(cfg)
    }

    /// Reads, parses and validates a config file.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let cfg = Self::from_toml(&text, &path.display().to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Renders the config as TOML (used by the demo to write member configs).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|e| invalid("<config>", e.to_string()))
    }

    /// Checks every rule; the first violation is returned with the field's path.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !valid_name(&self.cluster_id) {
            return Err(invalid(
                "cluster_id",
                "must be 1-63 characters of [A-Za-z0-9._-], starting with a letter or digit",
            ));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        let n = self.voters().count();
        let least = self.least();
        if !(least..=7).contains(&n) {
            return Err(invalid(
                "members",
                format!("a group has {least} to 7 voting members (3 recommended), found {n}"),
            ));
        }
        if self.members.len() > 32 {
            return Err(invalid(
                "members",
                format!(
                    "at most 32 members (voters and sidecars), found {}",
                    self.members.len()
                ),
            ));
        }
        let mut names = BTreeSet::new();
        let mut ids = BTreeSet::new();
        let mut addrs = BTreeSet::new();
        for (i, m) in self.members.iter().enumerate() {
            let f = |x: &str| format!("members[{i}].{x}");
            if !valid_name(&m.name) {
                return Err(invalid(
                    f("name"),
                    format!("`{}` must be 1-63 characters of [A-Za-z0-9._-]", m.name),
                ));
            }
            if !names.insert(m.name.as_str()) {
                return Err(invalid(
                    f("name"),
                    format!("duplicate member name `{}`", m.name),
                ));
            }
            if m.id == 0 {
                return Err(invalid(f("id"), "must be >= 1"));
            }
            if !ids.insert(m.id) {
                return Err(invalid(f("id"), format!("duplicate member id {}", m.id)));
            }
            check_addr(&f("grpc"), &m.grpc)?;
            check_addr(&f("http"), &m.http)?;
            for (what, a) in [("grpc", &m.grpc), ("http", &m.http)] {
                if !addrs.insert(a.as_str()) {
                    return Err(invalid(f(what), format!("address `{a}` is used twice")));
                }
            }
        }
        let data = self.data_members().count();
        if data < least {
            return Err(invalid(
                "members",
                format!("at least {least} members must have role = \"data\", found {data}"),
            ));
        }
        if let Some((i, m)) = self
            .members
            .iter()
            .enumerate()
            .find(|(_, m)| m.spare && m.role == Role::Sidecar)
        {
            return Err(invalid(
                format!("members[{i}].spare"),
                format!(
                    "sidecar member `{}` never votes; only a data or arbiter member can be a spare",
                    m.name
                ),
            ));
        }
        if !names.contains(self.member.as_str()) {
            return Err(invalid(
                "member",
                format!("`{}` is not the name of any entry in members", self.member),
            ));
        }
        if let Some(a) = &self.listen.grpc {
            check_addr("listen.grpc", a)?;
        }
        if let Some(a) = &self.listen.http {
            check_addr("listen.http", a)?;
        }
        let r = &self.raft;
        // Upper bounds first: every rule below does arithmetic on these.
        const HOUR_MS: u64 = 3_600_000;
        let f = &self.failover;
        for (field, v, max) in [
            ("raft.heartbeat_ms", r.heartbeat_ms, HOUR_MS),
            (
                "raft.election_timeout_min_ms",
                r.election_timeout_min_ms,
                HOUR_MS,
            ),
            (
                "raft.election_timeout_max_ms",
                r.election_timeout_max_ms,
                HOUR_MS,
            ),
            ("raft.rpc_timeout_ms", r.rpc_timeout_ms, HOUR_MS),
            ("raft.snapshot_logs", r.snapshot_logs, 1_000_000_000),
            ("failover.report_interval_ms", f.report_interval_ms, HOUR_MS),
            ("failover.lease_ms", f.lease_ms, HOUR_MS),
            ("failover.fence_budget_ms", f.fence_budget_ms, HOUR_MS),
            ("failover.clock_drift_ppm", f.clock_drift_ppm, 200_000),
            ("failover.margin_ms", f.margin_ms, HOUR_MS),
            ("failover.hung_after_ms", f.hung_after_ms, HOUR_MS),
            ("tls.reload_check_ms", self.tls.reload_check_ms, HOUR_MS),
        ] {
            if v > max {
                return Err(invalid(
                    field,
                    format!("{v} is out of range (at most {max})"),
                ));
            }
        }
        for (i, c) in self.clusters.iter().enumerate() {
            if c.degrade_after_ms > HOUR_MS {
                return Err(invalid(
                    format!("clusters[{i}].degrade_after_ms"),
                    format!("{} is out of range (at most {HOUR_MS})", c.degrade_after_ms),
                ));
            }
        }
        if let Some(p) = &self.pgpool {
            if p.check_interval_ms > HOUR_MS {
                return Err(invalid(
                    "pgpool.check_interval_ms",
                    format!(
                        "{} is out of range (at most {HOUR_MS})",
                        p.check_interval_ms
                    ),
                ));
            }
        }
        if r.heartbeat_ms < 10 {
            return Err(invalid("raft.heartbeat_ms", "must be >= 10"));
        }
        // A follower campaigns `election_timeout_max` (openraft's leader lease) plus a random
        // election timeout after the last heartbeat: at least min + max.
        if r.election_timeout_min_ms <= r.heartbeat_ms
            || 2 * (r.election_timeout_min_ms + r.election_timeout_max_ms) < r.heartbeat_ms * 5
        {
            return Err(invalid(
                "raft.election_timeout_min_ms",
                format!(
                    "must be greater than raft.heartbeat_ms ({}) and, added to raft.election_timeout_max_ms, at least 2.5 x raft.heartbeat_ms ({}); found {}",
                    r.heartbeat_ms,
                    r.heartbeat_ms * 5 / 2,
                    r.election_timeout_min_ms
                ),
            ));
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return Err(invalid(
                "raft.election_timeout_max_ms",
                "must be greater than raft.election_timeout_min_ms",
            ));
        }
        if r.rpc_timeout_ms < r.heartbeat_ms {
            return Err(invalid(
                "raft.rpc_timeout_ms",
                "must be >= raft.heartbeat_ms",
            ));
        }
        if r.snapshot_logs < 10 {
            return Err(invalid("raft.snapshot_logs", "must be >= 10"));
        }
        if self.clusters.is_empty() {
            return Err(invalid(
                "clusters",
                "at least one PostgreSQL cluster is required",
            ));
        }
        if let Some(a) = &self.active_cluster {
            if !self.clusters.iter().any(|c| &c.name == a) {
                return Err(invalid(
                    "active_cluster",
                    format!("`{a}` is not one of the configured clusters"),
                ));
            }
        }
        for (i, m) in self.members.iter().enumerate() {
            if m.room.as_deref().is_some_and(|r| !valid_name(r)) {
                return Err(invalid(
                    format!("members[{i}].room"),
                    "must be 1-63 characters of [A-Za-z0-9._-]",
                ));
            }
        }
        let mut cnames = BTreeSet::new();
        for (i, c) in self.clusters.iter().enumerate() {
            if !valid_name(&c.name) {
                return Err(invalid(
                    format!("clusters[{i}].name"),
                    format!("`{}` must be 1-63 characters of [A-Za-z0-9._-]", c.name),
                ));
            }
            if let Some(so) = &c.standby_of {
                let f = |x: &str| format!("clusters[{i}].standby_of.{x}");
                if so.endpoints.is_empty() {
                    return Err(invalid(
                        f("endpoints"),
                        "name at least one member of the main group (host:port of its gRPC)",
                    ));
                }
                for (j, e) in so.endpoints.iter().enumerate() {
                    check_addr(&f(&format!("endpoints[{j}]")), e)?;
                }
                if let Some(n) = &so.cluster {
                    if !valid_name(n) {
                        return Err(invalid(
                            f("cluster"),
                            format!("`{n}` must be 1-63 characters of [A-Za-z0-9._-]"),
                        ));
                    }
                }
                if !(100..=60_000).contains(&so.poll_ms) {
                    return Err(invalid(f("poll_ms"), "must be between 100 and 60000"));
                }
            }
            if c.name == "all" {
                return Err(invalid(
                    format!("clusters[{i}].name"),
                    "`all` is reserved (it names every cluster in `pgwctl operation --cluster all`)",
                ));
            }
            if !cnames.insert(c.name.as_str()) {
                return Err(invalid(
                    format!("clusters[{i}].name"),
                    format!("duplicate cluster `{}`", c.name),
                ));
            }
            self.validate_servers(i, c)?;
            let servers = self.server_names(&c.name);
            if let Some(b) = &c.bootstrap_primary {
                if !servers.contains(b) {
                    return Err(invalid(
                        format!("clusters[{i}].bootstrap_primary"),
                        format!("`{b}` is not one of the cluster's servers"),
                    ));
                }
            }
            let standbys = (servers.len().max(1) - 1) as u32;
            // A group forced out of survivors runs with what survived: the leader asks for at
            // most as many standbys as there are until members are added back.
            let above = c.sync_quorum > standbys && self.generation == 0;
            if c.sync_quorum < 1 || above {
                return Err(invalid(
                    format!("clusters[{i}].sync_quorum"),
                    format!("must be between 1 and the number of standbys ({standbys})"),
                ));
            }
        }
        for (i, m) in self.members.iter().enumerate() {
            if m.role == Role::Sidecar {
                if !self
                    .clusters
                    .iter()
                    .any(|c| c.servers.iter().any(|x| x.member == m.name))
                {
                    return Err(invalid(
                        format!("members[{i}].role"),
                        format!(
                            "sidecar member `{}` is not one of any cluster's servers",
                            m.name
                        ),
                    ));
                }
                if m.postgres.is_some() || m.pgpool.is_some() || m.pcp.is_some() {
                    return Err(invalid(
                        format!("members[{i}].postgres"),
                        "a sidecar member's addresses go in its cluster's `servers` entry",
                    ));
                }
            }
        }
        let fo = &self.failover;
        if fo.report_interval_ms < 10 || fo.report_interval_ms > 5000 {
            return Err(invalid(
                "failover.report_interval_ms",
                "must be between 10 and 5000",
            ));
        }
        if fo.fence_budget_ms == 0 || fo.fence_budget_ms >= fo.lease_ms {
            return Err(invalid(
                "failover.fence_budget_ms",
                "must be > 0 and smaller than failover.lease_ms",
            ));
        }
        if fo.lease_ms < fo.report_interval_ms * 4 {
            return Err(invalid(
                "failover.lease_ms",
                "must be at least 4 x failover.report_interval_ms (several renewals per lease)",
            ));
        }
        // Renewals need a Raft leader: the primary must not fence itself during a change of
        // leader (openraft 0.9: up to two election rounds of at most election_timeout_max, then a
        // renewal), or losing the leader's room (the arbiter, a replica's) fails a healthy
        // primary over.
        let leader_change = 2 * r.election_timeout_max_ms + r.heartbeat_ms;
        if fo.lease_ms.saturating_sub(fo.fence_budget_ms) < leader_change {
            return Err(invalid(
                "failover.lease_ms",
                format!(
                    "the primary fences itself failover.lease_ms - failover.fence_budget_ms = {} ms after its last renewal, shorter than a change of Raft leader (2 x raft.election_timeout_max_ms + raft.heartbeat_ms = {leader_change} ms)",
                    fo.lease_ms.saturating_sub(fo.fence_budget_ms)
                ),
            ));
        }
        if fo.clock_drift_ppm > 100_000 {
            return Err(invalid(
                "failover.clock_drift_ppm",
                "must be <= 100000 (10 %)",
            ));
        }
        if fo.hung_after_ms < fo.report_interval_ms * 2 {
            return Err(invalid(
                "failover.hung_after_ms",
                "must be at least 2 x failover.report_interval_ms",
            ));
        }
        let mut local = BTreeSet::new();
        let mut dirs = BTreeSet::new();
        let several = self.postgres.len() > 1;
        for (k, pg) in self.postgres.iter().enumerate() {
            let at = if several {
                format!("postgres[{k}]")
            } else {
                "postgres".to_string()
            };
            let me = self.me();
            if me.is_some_and(|m| m.role == Role::Arbiter) {
                return Err(invalid(
                    at,
                    "an arbiter runs no database; remove [postgres]",
                ));
            }
            if pg.data_dir.as_os_str().is_empty() {
                return Err(invalid(format!("{at}.data_dir"), "must not be empty"));
            }
            if !dirs.insert(pg.data_dir.clone()) {
                return Err(invalid(
                    format!("{at}.data_dir"),
                    format!(
                        "`{}` is used by another [[postgres]] entry",
                        pg.data_dir.display()
                    ),
                ));
            }
            pg.validate_connections(&at)?;
            for (i, l) in pg.settings.iter().enumerate() {
                let field = format!("{at}.settings[{i}]");
                let Some((name, _)) = l.split_once('=').filter(|_| !l.contains('\n')) else {
                    return Err(invalid(
                        field,
                        format!("`{l}` is not a `name = value` line"),
                    ));
                };
                let name = name.trim().to_ascii_lowercase();
                if name.starts_with("synchronous_") || name.starts_with("recovery_target") {
                    return Err(invalid(
                        field,
                        format!("`{name}` is set by pg-watcher (synchronous replication and recovery are the group's); remove it"),
                    ));
                }
                if let Some((_, why)) = POSTGRES_OWNED.iter().find(|(n, _)| *n == name) {
                    return Err(invalid(
                        field,
                        format!("`{name}` is set by pg-watcher ({why}); remove it"),
                    ));
                }
            }
            if several && pg.cluster.is_none() {
                return Err(invalid(
                    format!("{at}.cluster"),
                    "required when a member runs several servers: name the cluster this one belongs to",
                ));
            }
            if let Some(c) = &pg.cluster {
                if self.cluster(c).is_none() {
                    return Err(invalid(
                        format!("{at}.cluster"),
                        format!("`{c}` is not in clusters"),
                    ));
                }
            }
            let cluster = self.pg_cluster_of(pg);
            if !local.insert(cluster.clone()) {
                return Err(invalid(
                    format!("{at}.cluster"),
                    format!("a second server of cluster `{cluster}` on this member"),
                ));
            }
            let servers = self.servers(&cluster);
            match servers.iter().find(|x| x.member == self.member) {
                None => {
                    return Err(invalid(
                        format!("{at}.cluster"),
                        format!(
                            "member `{}` is not one of cluster `{cluster}`'s servers",
                            self.member
                        ),
                    ))
                }
                Some(_) => {
                    for (i, m) in self.members.iter().enumerate() {
                        if servers.iter().any(|x| x.member == m.name) && m.role == Role::Data {
                            if let Some(a) = &m.postgres {
                                check_addr(&format!("members[{i}].postgres"), a)?;
                            }
                        }
                    }
                    if let Some((j, x)) = servers
                        .iter()
                        .enumerate()
                        .find(|(_, x)| x.postgres.is_none())
                    {
                        let ci = self
                            .clusters
                            .iter()
                            .position(|c| c.name == cluster)
                            .unwrap_or(0);
                        let field = if self.clusters[ci].servers.is_empty() {
                            let mi = self
                                .members
                                .iter()
                                .position(|m| m.name == x.member)
                                .unwrap_or(0);
                            format!("members[{mi}].postgres")
                        } else {
                            format!("clusters[{ci}].servers[{j}].postgres")
                        };
                        return Err(invalid(
                            field,
                            format!("every server of cluster `{cluster}` needs its PostgreSQL host:port when [postgres] is set"),
                        ));
                    }
                }
            }
        }
        if self.me().is_some_and(|m| m.role == Role::Sidecar) && self.postgres.is_empty() {
            return Err(invalid(
                "postgres",
                "a sidecar member runs beside a PostgreSQL server: [postgres] is required",
            ));
        }
        self.validate_pgpool()?;
        self.validate_hooks()?;
        self.validate_security(&names)?;
        if self.log.level.trim().is_empty() {
            return Err(invalid("log.level", "must not be empty"));
        }
        Ok(())
    }

    fn validate_hooks(&self) -> Result<(), ConfigError> {
        let mut names = BTreeSet::new();
        for (i, h) in self.hooks.iter().enumerate() {
            let f = |x: &str| format!("hooks[{i}].{x}");
            if !valid_name(&h.name) {
                return Err(invalid(
                    f("name"),
                    format!("`{}` must be 1-63 characters of [A-Za-z0-9._-]", h.name),
                ));
            }
            if !names.insert(h.name.as_str()) {
                return Err(invalid(f("name"), format!("duplicate hook `{}`", h.name)));
            }
            match h.command.first() {
                None => {
                    return Err(invalid(
                        f("command"),
                        "must name a program (argv, no shell)",
                    ))
                }
                Some(p) if !p.starts_with('/') => {
                    return Err(invalid(
                        f("command"),
                        format!(
                            "`{p}` must be an absolute path (hooks run without a shell or PATH)"
                        ),
                    ))
                }
                Some(_) => {}
            }
            if h.command.iter().any(|a| a.contains('\0')) {
                return Err(invalid(f("command"), "must not contain NUL bytes"));
            }
            if h.on.is_empty() {
                return Err(invalid(
                    f("on"),
                    "name at least one event: primary_changed, active_room_changed",
                ));
            }
            for (j, c) in h.clusters.iter().enumerate() {
                if self.cluster(c).is_none() {
                    return Err(invalid(
                        format!("hooks[{i}].clusters[{j}]"),
                        format!("`{c}` is not in clusters"),
                    ));
                }
            }
            for (j, m) in h.members.iter().enumerate() {
                if !self.members.iter().any(|x| &x.name == m) {
                    return Err(invalid(
                        format!("hooks[{i}].members[{j}]"),
                        format!("`{m}` is not the name of any entry in members"),
                    ));
                }
            }
            if !(100..=600_000).contains(&h.timeout_ms) {
                return Err(invalid(f("timeout_ms"), "must be between 100 and 600000"));
            }
            if h.retries > 10 {
                return Err(invalid(f("retries"), "must be at most 10"));
            }
        }
        Ok(())
    }

    /// The hooks this member runs.
    pub fn my_hooks(&self) -> Vec<&HookConfig> {
        self.hooks
            .iter()
            .filter(|h| h.members.is_empty() || h.members.contains(&self.member))
            .collect()
    }

    /// One cluster's `servers` (explicit, or the data members for a cluster that lists none).
    fn validate_servers(&self, i: usize, c: &PgClusterConfig) -> Result<(), ConfigError> {
        if c.servers.is_empty() {
            let member_level = self.data_members().any(|m| m.postgres.is_some());
            let first_implicit = self.clusters.iter().position(|x| x.servers.is_empty());
            if member_level && first_implicit != Some(i) {
                return Err(invalid(
                    format!("clusters[{i}].servers"),
                    format!(
                        "the members' own `postgres` addresses already serve cluster `{}`: list this cluster's servers",
                        first_implicit.map(|k| self.clusters[k].name.as_str()).unwrap_or("")
                    ),
                ));
            }
        }
        let mut seen = BTreeSet::new();
        for (j, x) in c.servers.iter().enumerate() {
            let f = |w: &str| format!("clusters[{i}].servers[{j}].{w}");
            let Some(m) = self.members.iter().find(|m| m.name == x.member) else {
                return Err(invalid(
                    f("member"),
                    format!("`{}` is not the name of any entry in members", x.member),
                ));
            };
            if m.role == Role::Arbiter {
                return Err(invalid(
                    f("member"),
                    format!("`{}` is an arbiter: it runs no database", x.member),
                ));
            }
            if !seen.insert(x.member.as_str()) {
                return Err(invalid(
                    f("member"),
                    format!("`{}` holds cluster `{}` twice", x.member, c.name),
                ));
            }
            match &x.postgres {
                Some(a) => check_addr(&f("postgres"), a)?,
                None => return Err(invalid(f("postgres"), "required: the server's host:port")),
            }
            for (what, a) in [("pgpool", &x.pgpool), ("pcp", &x.pcp)] {
                if let Some(a) = a {
                    check_addr(&f(what), a)?;
                }
            }
            if x.pgpool.is_some() != x.pcp.is_some() {
                return Err(invalid(
                    f(if x.pcp.is_none() { "pcp" } else { "pgpool" }),
                    "a room's pgpool needs both its client address (`pgpool`) and its PCP address (`pcp`)",
                ));
            }
        }
        let n = self.servers(&c.name).len();
        if n < self.least() {
            return Err(invalid(
                format!("clusters[{i}].servers"),
                format!("a cluster needs at least 2 servers (a primary and a synchronous standby), found {n}"),
            ));
        }
        // No address serves twice, across every cluster.
        let mut addrs: BTreeSet<String> = BTreeSet::new();
        for (k, other) in self.clusters.iter().enumerate().take(i + 1) {
            for x in self.servers(&other.name) {
                for a in [&x.postgres, &x.pgpool, &x.pcp].into_iter().flatten() {
                    if !addrs.insert(a.clone()) && k == i {
                        return Err(invalid(
                            format!("clusters[{i}].servers"),
                            format!("address `{a}` is used by two servers"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    fn validate_security(&self, members: &BTreeSet<&str>) -> Result<(), ConfigError> {
        for (f, p) in [
            ("tls.ca", &self.tls.ca),
            ("tls.cert", &self.tls.cert),
            ("tls.key", &self.tls.key),
        ] {
            if p.as_os_str().is_empty() {
                return Err(invalid(f, "must name a PEM file"));
            }
        }
        if self.tls.reload_check_ms < 100 {
            return Err(invalid("tls.reload_check_ms", "must be >= 100"));
        }
        let mut seen = BTreeSet::new();
        for (role, names) in [
            ("read", &self.auth.read),
            ("operate", &self.auth.operate),
            ("admin", &self.auth.admin),
        ] {
            for (i, n) in names.iter().enumerate() {
                let f = format!("auth.{role}[{i}]");
                if n.trim().is_empty() || n.len() > 200 {
                    return Err(invalid(
                        f,
                        "must be a certificate common name (1-200 characters)",
                    ));
                }
                if members.contains(n.as_str()) {
                    return Err(invalid(
                        f,
                        format!(
                            "`{n}` is a member name; operator certificates need names of their own"
                        ),
                    ));
                }
                if !seen.insert(n.as_str()) {
                    return Err(invalid(
                        f,
                        format!("`{n}` is listed in more than one role; list it once, under the highest role it needs"),
                    ));
                }
            }
        }
        for (f, p) in [
            ("auth.read_token_file", &self.auth.read_token_file),
            ("auth.operate_token_file", &self.auth.operate_token_file),
            ("auth.admin_token_file", &self.auth.admin_token_file),
        ] {
            if p.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return Err(invalid(f, "must name a file (or be left out)"));
            }
        }
        Ok(())
    }

    /// This process's own member entry. Valid only after `validate()`.
    fn validate_pgpool(&self) -> Result<(), ConfigError> {
        let mut any = false;
        for (i, m) in self.members.iter().enumerate() {
            let f = |x: &str| format!("members[{i}].{x}");
            for (what, a) in [("pgpool", &m.pgpool), ("pcp", &m.pcp)] {
                let Some(a) = a else { continue };
                any = true;
                if m.role == Role::Arbiter {
                    return Err(invalid(f(what), "an arbiter runs no pgpool"));
                }
                check_addr(&f(what), a)?;
                if m.postgres.is_none() {
                    return Err(invalid(
                        f(what),
                        "pgpool needs every data member's `postgres` address (its backends)",
                    ));
                }
            }
            if m.pgpool.is_some() != m.pcp.is_some() {
                return Err(invalid(
                    f(if m.pcp.is_none() { "pcp" } else { "pgpool" }),
                    "a room's pgpool needs both its client address (`pgpool`) and its PCP address (`pcp`)",
                ));
            }
        }
        any |= self
            .clusters
            .iter()
            .any(|c| c.servers.iter().any(|x| x.pcp.is_some()));
        let Some(pp) = &self.pgpool else {
            if any {
                return Err(invalid(
                    "pgpool",
                    "members list pgpool addresses: a [pgpool] section with pcp_password_file is required on every member",
                ));
            }
            return Ok(());
        };
        if pp.pcp_password_file.as_os_str().is_empty() {
            return Err(invalid("pgpool.pcp_password_file", "must not be empty"));
        }
        if !valid_name(&pp.pcp_user) {
            return Err(invalid(
                "pgpool.pcp_user",
                format!(
                    "`{}` must be 1-63 characters of [A-Za-z0-9._-]",
                    pp.pcp_user
                ),
            ));
        }
        if let Some(u) = pp.check_user.as_deref().filter(|u| !valid_name(u)) {
            return Err(invalid(
                "pgpool.check_user",
                format!("`{u}` is not a role name (letters, digits, `_`, `-`, `.`; at most 63)"),
            ));
        }
        if !(50..=60_000).contains(&pp.check_interval_ms) {
            return Err(invalid(
                "pgpool.check_interval_ms",
                "must be between 50 and 60000",
            ));
        }
        for (i, l) in pp.settings.iter().enumerate() {
            let Some((name, _)) = l.split_once('=').filter(|_| !l.contains('\n')) else {
                return Err(invalid(
                    format!("pgpool.settings[{i}]"),
                    format!("`{l}` is not a `name = value` line"),
                ));
            };
            let name = name.trim();
            if PGPOOL_OWNED
                .iter()
                .any(|k| name == *k || name.starts_with("backend_"))
            {
                return Err(invalid(
                    format!("pgpool.settings[{i}]"),
                    format!("`{name}` is set by pg-watcher (it keeps pgpool's own failover off and the backends in member order); remove it"),
                ));
            }
        }
        if pp.manage {
            for c in self.pooled_clusters() {
                let mine = self
                    .servers(&c)
                    .into_iter()
                    .find(|x| x.member == self.member);
                if mine.is_some_and(|x| x.pgpool.is_none()) {
                    return Err(invalid(
                        "pgpool.manage",
                        format!("member `{}` has no `pgpool`/`pcp` address for cluster `{c}` to run its pgpool on (set them, or manage = false)", self.member),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The cluster named `name`.
    pub fn cluster(&self, name: &str) -> Option<&PgClusterConfig> {
        self.clusters.iter().find(|c| c.name == name)
    }

    /// The servers of cluster `name` in backend order: its `servers`, or, when it lists none,
    /// every data member at its own addresses.
    pub fn servers(&self, name: &str) -> Vec<ServerConfig> {
        let Some(c) = self.cluster(name) else {
            return Vec::new();
        };
        if !c.servers.is_empty() {
            return c.servers.clone();
        }
        self.data_members()
            .map(|m| ServerConfig {
                member: m.name.clone(),
                postgres: m.postgres.clone(),
                pgpool: m.pgpool.clone(),
                pcp: m.pcp.clone(),
            })
            .collect()
    }

    /// The members that hold cluster `name` (its candidates and possible standbys).
    pub fn server_names(&self, name: &str) -> BTreeSet<String> {
        self.servers(name).into_iter().map(|s| s.member).collect()
    }

    /// The cluster a `[[postgres]]` entry belongs to (`cluster`, else the first).
    pub fn pg_cluster_of(&self, pg: &PostgresConfig) -> String {
        pg.cluster
            .clone()
            .or_else(|| self.clusters.first().map(|c| c.name.clone()))
            .unwrap_or_default()
    }

    /// This member's server of cluster `name`, if it runs one.
    pub fn postgres_for(&self, name: &str) -> Option<&PostgresConfig> {
        self.postgres.iter().find(|p| self.pg_cluster_of(p) == name)
    }

    /// The clusters this member runs a server of, in `[[postgres]]` order.
    pub fn local_clusters(&self) -> Vec<String> {
        self.postgres
            .iter()
            .map(|p| self.pg_cluster_of(p))
            .collect()
    }

    /// The clusters whose servers have pgpools (repointed by the leader).
    pub fn pooled_clusters(&self) -> Vec<String> {
        self.clusters
            .iter()
            .filter(|c| self.servers(&c.name).iter().any(|s| s.pcp.is_some()))
            .map(|c| c.name.clone())
            .collect()
    }

    /// pgpool backends of cluster `name` in backend order: every server with an address, or
    /// the list the group holds once its member list changed (members that left stay in it).
    pub fn pgpool_backends(&self, name: &str) -> Vec<(String, String)> {
        if let Some(p) = self.pools.get(name) {
            return p.clone();
        }
        self.servers(name)
            .into_iter()
            .filter_map(|s| s.postgres.map(|a| (s.member, a)))
            .collect()
    }

    /// The role pgpool finds the primary with (`[pgpool] check_user`, else `[postgres] user`),
    /// when this group has pgpools.
    pub fn pgpool_check_user(&self) -> Option<String> {
        let pp = self.pgpool.as_ref()?;
        Some(pp.check_user.clone().unwrap_or_else(|| {
            self.postgres
                .first()
                .map(|p| p.user.clone())
                .unwrap_or_else(defaults::pg_user)
        }))
    }

    /// The clusters whose room pgpool this member runs (managed pgpool).
    pub fn managed_pgpools(&self) -> Vec<String> {
        if !self.pgpool.as_ref().is_some_and(|p| p.manage) {
            return Vec::new();
        }
        self.clusters
            .iter()
            .filter(|c| {
                self.servers(&c.name)
                    .iter()
                    .any(|s| s.member == self.member && s.pgpool.is_some())
            })
            .map(|c| c.name.clone())
            .collect()
    }

    /// Whether this member runs a room pgpool.
    pub fn manages_pgpool(&self) -> bool {
        !self.managed_pgpools().is_empty()
    }

    /// The managed pgpool's work directory for cluster `name` (the first cluster's keeps the
    /// name without a suffix).
    pub fn pgpool_work_dir(&self, name: &str) -> Option<PathBuf> {
        let p = self.pgpool.as_ref()?;
        let first = self.clusters.first().is_some_and(|c| c.name == name);
        let base = p.work_dir.clone().unwrap_or_else(|| {
            // A sibling of the Raft data directory, like postgres's `.run` directory: pgpool runs
            // as another OS user and must not need access to the watcher's own files.
            let mut d = self.data_dir.clone().into_os_string();
            d.push("-pgpool");
            PathBuf::from(d)
        });
        if first {
            return Some(base);
        }
        let mut d = base.into_os_string();
        d.push(format!("-{name}"));
        Some(PathBuf::from(d))
    }

    /// The clusters in the order `switchover --room ROOM --all` moves them: `switch_order`,
    /// then the order of `clusters`.
    pub fn switch_order(&self) -> Vec<String> {
        let mut v: Vec<(u32, usize, String)> = self
            .clusters
            .iter()
            .enumerate()
            .map(|(i, c)| (c.switch_order, i, c.name.clone()))
            .collect();
        v.sort();
        v.into_iter().map(|(_, _, n)| n).collect()
    }

    /// Why this layout cannot fail over on its own, if it cannot: with two voters, losing
    /// either stops every decision. The one rule behind `pgwctl status`, doctor and `--check`.
    pub fn automatic_failover_off(&self) -> Option<String> {
        let voters = self.voters().count();
        (voters < 3).then(|| {
            format!(
                "{voters} voter(s): losing a room stops every decision; the primary keeps serving (when the other room is lost too, if allow_degraded), and losing the primary's room is recovered by `pg-watcher --force-new-group --i-know-the-others-are-down` in a surviving room; add an arbiter in a third room for automatic failover"
            )
        })
    }

    /// Whether the group may replace a primary that fell silent (its lease ran out): only with
    /// three voters or more. With fewer, a majority needs the primary's own member, which
    /// keeps voting while its sidecar is silent or cut off from the other room: a replacement
    /// committed then could meet a primary that never stopped. So there a silent primary is
    /// never replaced (only a crashed one, or through `--force-new-group`), and in turn its
    /// lease does not fence it. The one rule behind the guard's `lease_needed` and the
    /// arbiter's.
    pub fn silent_primary_replaceable(&self) -> bool {
        self.automatic_failover_off().is_none()
    }

    /// The timing profile in words: what each setting means for failover (printed by
    /// `pg-watcher --check`, logged at start). `validate()` refuses the combinations that break
    /// these relations.
    pub fn timing_summary(&self) -> String {
        let (r, f) = (&self.raft, &self.failover);
        let fence = f.lease_ms.saturating_sub(f.fence_budget_ms);
        format!(
            "timing `{}`: heartbeat {} ms (must stay above the worst round trip between rooms); a lost Raft leader is replaced {}-{} ms later (election_timeout_max + a random election timeout); the primary fences itself {fence} ms after its last acknowledged lease renewal (lease_ms - fence_budget_ms), later than a change of Raft leader ({} ms: 2 x election_timeout_max + heartbeat); a silent primary is replaced {} ms after the leader's last grant (lease_ms x (1 + drift) / (1 - drift) + margin_ms); reports every {} ms",
            self.timing.as_str(),
            r.heartbeat_ms,
            r.election_timeout_max_ms + r.election_timeout_min_ms,
            2 * r.election_timeout_max_ms,
            2 * r.election_timeout_max_ms + r.heartbeat_ms,
            f.lease().leader_wait_ms(),
            f.report_interval_ms,
        )
    }

    /// What an operator must know about this layout although it is valid (printed by
    /// `pg-watcher --check` and logged at start).
    pub fn notes(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .automatic_failover_off()
            .map(|why| format!("automatic failover is off in this layout: {why}"))
            .into_iter()
            .collect();
        if self.generation > 0 {
            out.push(format!(
                "this group was forced out of the survivors of a lost majority (generation {}); add members back with `pgwctl member add` and start them with --join",
                self.generation
            ));
        }
        out
    }

    /// The members that vote (data and arbiter members; sidecar members and spares are
    /// learners).
    pub fn voters(&self) -> impl Iterator<Item = &MemberConfig> {
        self.members.iter().filter(|m| m.votes())
    }

    /// The fewest voters, data members and servers per cluster this config may have: 2, or 1
    /// in a group forced out of the survivors of a lost majority.
    fn least(&self) -> usize {
        if self.generation > 0 {
            1
        } else {
            2
        }
    }

    pub fn me(&self) -> Option<&MemberConfig> {
        self.members.iter().find(|m| m.name == self.member)
    }

    pub fn member_by_id(&self, id: u64) -> Option<&MemberConfig> {
        self.members.iter().find(|m| m.id == id)
    }

    pub fn data_members(&self) -> impl Iterator<Item = &MemberConfig> {
        self.members.iter().filter(|m| m.role == Role::Data)
    }

    /// Canonical text of the member list (sorted by id), shared by every member.
    pub fn members_canonical(&self) -> String {
        let mut ms: Vec<&MemberConfig> = self.members.iter().collect();
        ms.sort_by_key(|m| m.id);
        let members = ms
            .iter()
            .map(|m| {
                format!(
                    "{}={}/{}/{}/{}/{}",
                    m.id,
                    m.name,
                    m.role,
                    m.grpc,
                    m.http,
                    m.postgres.as_deref().unwrap_or("-")
                )
            })
            .collect::<Vec<_>>()
            .join(",");
        // Explicit servers decide candidates, so they are part of what every member must share
        // (a group with none keeps the digest it always had).
        let mut out = members;
        for c in self.clusters.iter().filter(|c| !c.servers.is_empty()) {
            let list: Vec<String> = c
                .servers
                .iter()
                .map(|x| format!("{}/{}", x.member, x.postgres.as_deref().unwrap_or("-")))
                .collect();
            out.push_str(&format!(";{}=[{}]", c.name, list.join(",")));
        }
        out
    }

    /// Digest of the member list; every member of one group must have the same.
    /// What reloading `new` (the config file read again) over this running config changes:
    /// `Ok(true)` when `[postgres] settings` or `hba` differ (they apply without a restart),
    /// `Ok(false)` when nothing does. Any other difference is refused, naming the field: it
    /// takes effect only when pg-watcher restarts, and half-applied configs help nobody.
    pub fn reload_diff(&self, new: &Config) -> Result<bool, ConfigError> {
        new.validate()?;
        let live = |c: &Config| {
            c.postgres
                .iter()
                .map(|p| (p.settings.clone(), p.hba.clone()))
                .collect::<Vec<_>>()
        };
        let changed = live(self) != live(new);
        let strip = |c: &Config| {
            let mut c = c.clone();
            for p in c.postgres.iter_mut() {
                p.settings.clear();
                p.hba.clear();
            }
            toml::Value::try_from(&c).unwrap_or(toml::Value::Boolean(false))
        };
        match first_difference(&strip(self), &strip(new), String::new()) {
            None => Ok(changed),
            Some(field) => Err(invalid(
                field,
                "changed in the file: takes effect only when pg-watcher restarts (a reload applies [postgres] settings and hba)",
            )),
        }
    }

    pub fn members_fingerprint(&self) -> String {
        fnv1a_hex(self.members_canonical().as_bytes())
    }

    pub fn grpc_listen(&self) -> String {
        self.listen
            .grpc
            .clone()
            .or_else(|| self.me().map(|m| m.grpc.clone()))
            .unwrap_or_default()
    }

    /// Whether the group manages PostgreSQL: some cluster's servers all have addresses.
    pub fn manages_postgres(&self) -> bool {
        self.clusters.iter().any(|c| {
            let sv = self.servers(&c.name);
            !sv.is_empty() && sv.iter().all(|s| s.postgres.is_some())
        })
    }

    pub fn http_listen(&self) -> String {
        self.listen
            .http
            .clone()
            .or_else(|| self.me().map(|m| m.http.clone()))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
cluster_id = "prod"
member = "room-a"
data_dir = "/var/lib/pg-watcher"

[[members]]
name = "room-a"
id = 1
role = "data"
grpc = "127.0.0.1:7001"
http = "127.0.0.1:7101"

[[members]]
name = "room-b"
id = 2
role = "data"
grpc = "127.0.0.1:7002"
http = "127.0.0.1:7102"

[[members]]
name = "arbiter"
id = 3
role = "arbiter"
grpc = "127.0.0.1:7003"
http = "127.0.0.1:7103"

[tls]
ca = "/etc/pg-watcher/tls/ca.crt"
cert = "/etc/pg-watcher/tls/room-a.crt"
key = "/etc/pg-watcher/tls/room-a.key"

[auth]
read = ["monitoring"]
operate = ["ops"]
admin = ["dba"]
"#;

    fn good() -> Config {
        Config::from_toml(GOOD, "test").expect("parses")
    }

    #[test]
    fn good_config_validates_with_defaults() {
        let c = good();
        c.validate().expect("valid");
        assert_eq!(c.raft, RaftConfig::default());
        assert_eq!(c.clusters[0].name, "global");
        assert_eq!(c.members[0].priority, 100);
        assert_eq!(c.grpc_listen(), "127.0.0.1:7001");
    }

    #[test]
    fn the_timing_profile_sets_the_defaults_and_file_values_win() {
        // wide-area is the default profile; metro is chosen in the file.
        assert_eq!(good().timing, TimingProfile::WideArea);
        assert_eq!(
            good().raft,
            RaftConfig::for_profile(TimingProfile::WideArea)
        );
        let m = Config::from_toml(
            &GOOD.replace(
                "data_dir = \"/var/lib/pg-watcher\"\n",
                "data_dir = \"/var/lib/pg-watcher\"\ntiming = \"metro\"\n",
            ),
            "metro.toml",
        )
        .expect("parses");
        assert_eq!(m.timing, TimingProfile::Metro);
        assert_eq!(m.raft.heartbeat_ms, defaults::metro::HEARTBEAT_MS);
        assert_eq!(m.failover.lease_ms, defaults::metro::LEASE_MS);
        assert_eq!(m.failover.lease().leader_wait_ms(), 1071);
        m.validate().expect("metro validates");
        // wide-area: every timing the file leaves out comes from that profile.
        let text = GOOD.replace(
            "data_dir = \"/var/lib/pg-watcher\"\n",
            "data_dir = \"/var/lib/pg-watcher\"\ntiming = \"wide-area\"\n[failover]\nmargin_ms = 120\n",
        );
        let w = Config::from_toml(&text, "wide.toml").expect("parses");
        assert_eq!(w.timing, TimingProfile::WideArea);
        assert_eq!(w.raft, RaftConfig::for_profile(TimingProfile::WideArea));
        assert_eq!(w.failover.lease_ms, defaults::LEASE_MS);
        assert_eq!(w.failover.report_interval_ms, defaults::REPORT_INTERVAL_MS);
        assert_eq!(w.failover.margin_ms, 120, "a value in the file wins");
        w.validate().expect("wide-area validates");
        assert!(w.timing_summary().contains("timing `wide-area`"));
        // It round-trips (the profile and every value are written out).
        let back = Config::from_toml(&w.to_toml().expect("toml"), "rt").expect("parses");
        assert_eq!(back, w);
        // An unknown profile is an error naming it.
        let bad = GOOD.replace(
            "data_dir = \"/var/lib/pg-watcher\"\n",
            "data_dir = \"/var/lib/pg-watcher\"\ntiming = \"lunar\"\n",
        );
        let e = Config::from_toml(&bad, "bad.toml").unwrap_err().to_string();
        assert!(e.contains("lunar") || e.contains("timing"), "{e}");
        // Each profile's summary names its fence point and the leader's wait.
        assert!(m
            .timing_summary()
            .contains("800 ms after its last acknowledged lease renewal"));
        assert!(m.timing_summary().contains("replaced 1071 ms after"));
    }

    #[test]
    fn two_voters_say_automatic_failover_is_off() {
        let c = good();
        assert!(c.notes().is_empty(), "three voters: nothing to say");
        let mut two = good();
        two.members.truncate(2);
        two.validate()
            .expect("two rooms without an arbiter is a valid layout");
        let notes = two.notes();
        assert_eq!(notes.len(), 1);
        assert!(notes[0].contains("automatic failover is off"), "{notes:?}");
    }

    fn field_of(e: ConfigError) -> String {
        match e {
            ConfigError::Invalid { field, .. } => field,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let mut c = good();
        c.members[1].grpc = "nope".into();
        assert_eq!(field_of(c.validate().unwrap_err()), "members[1].grpc");

        let mut c = good();
        c.members[2].id = 1;
        assert_eq!(field_of(c.validate().unwrap_err()), "members[2].id");

        let mut c = good();
        c.member = "room-z".into();
        assert_eq!(field_of(c.validate().unwrap_err()), "member");

        // The fence point (lease - fence budget = 400 ms) before a change of Raft leader can
        // be over (2 x 200 + 50 ms with the metro defaults).
        let mut c = good();
        c.failover.lease_ms = 700;
        c.failover.fence_budget_ms = 300;
        assert_eq!(field_of(c.validate().unwrap_err()), "failover.lease_ms");

        let mut c = good();
        c.raft.election_timeout_min_ms = 40;
        assert_eq!(
            field_of(c.validate().unwrap_err()),
            "raft.election_timeout_min_ms"
        );

        let mut c = good();
        c.members[1].role = Role::Arbiter;
        assert_eq!(field_of(c.validate().unwrap_err()), "members");

        let mut c = good();
        c.clusters[0].sync_quorum = 2;
        assert_eq!(
            field_of(c.validate().unwrap_err()),
            "clusters[0].sync_quorum"
        );

        let mut c = good();
        c.cluster_id = "".into();
        assert_eq!(field_of(c.validate().unwrap_err()), "cluster_id");

        let mut c = good();
        c.tls.key = PathBuf::new();
        assert_eq!(field_of(c.validate().unwrap_err()), "tls.key");

        let mut c = good();
        c.auth.admin.push("room-b".into());
        assert_eq!(field_of(c.validate().unwrap_err()), "auth.admin[1]");

        let mut c = good();
        c.auth.operate.push("monitoring".into());
        assert_eq!(field_of(c.validate().unwrap_err()), "auth.operate[1]");
    }

    fn with_pgpool() -> Config {
        let mut c = good();
        for (i, m) in c.members.iter_mut().enumerate().take(2) {
            m.postgres = Some(format!("127.0.0.1:{}", 5500 + i));
            m.pgpool = Some(format!("127.0.0.1:{}", 9900 + i));
            m.pcp = Some(format!("127.0.0.1:{}", 9800 + i));
        }
        c.pgpool = Some(PgpoolConfig {
            manage: true,
            bin_dir: defaults::pgpool_bin_dir(),
            work_dir: None,
            os_user: defaults::pg_os_user(),
            pcp_user: defaults::pcp_user(),
            check_user: None,
            pcp_password_file: "/etc/pg-watcher/pcp.pass".into(),
            check_interval_ms: defaults::PGPOOL_CHECK_INTERVAL_MS,
            settings: vec![],
        });
        c
    }

    #[test]
    fn pgpool_settings_are_checked_and_named() {
        let c = with_pgpool();
        c.validate().expect("valid");
        assert_eq!(c.pgpool_backends("global").len(), 2);
        assert_eq!(
            c.pgpool_work_dir("global"),
            Some(PathBuf::from("/var/lib/pg-watcher-pgpool"))
        );

        let mut c = with_pgpool();
        c.pgpool = None;
        assert_eq!(field_of(c.validate().unwrap_err()), "pgpool");

        let mut c = with_pgpool();
        c.members[2].pcp = Some("127.0.0.1:9000".into());
        assert_eq!(field_of(c.validate().unwrap_err()), "members[2].pcp");

        let mut c = with_pgpool();
        c.members[1].pcp = None;
        assert_eq!(field_of(c.validate().unwrap_err()), "members[1].pcp");

        let mut c = with_pgpool();
        c.members[0].pgpool = Some("nohost".into());
        assert_eq!(field_of(c.validate().unwrap_err()), "members[0].pgpool");

        let mut c = with_pgpool();
        if let Some(p) = c.pgpool.as_mut() {
            p.check_interval_ms = 10;
        }
        assert_eq!(
            field_of(c.validate().unwrap_err()),
            "pgpool.check_interval_ms"
        );

        let mut c = with_pgpool();
        if let Some(p) = c.pgpool.as_mut() {
            p.settings = vec!["no equals sign".into()];
        }
        assert_eq!(field_of(c.validate().unwrap_err()), "pgpool.settings[0]");
        let mut c = with_pgpool();
        if let Some(p) = c.pgpool.as_mut() {
            p.settings = vec![
                "num_init_children = 8".into(),
                "health_check_period = 5".into(),
            ];
        }
        assert_eq!(field_of(c.validate().unwrap_err()), "pgpool.settings[1]");

        // The arbiter holds the credentials but runs no pgpool.
        let mut c = with_pgpool();
        c.member = "arbiter".into();
        c.validate().expect("arbiter with [pgpool] is valid");
        assert!(!c.manages_pgpool());
    }

    #[test]
    fn postgres_connection_settings_are_checked_by_name() {
        let mut c = good();
        for (i, m) in c.members.iter_mut().enumerate().take(2) {
            m.postgres = Some(format!("127.0.0.1:{}", 5500 + i));
        }
        c.postgres = vec![PostgresConfig::new("/var/lib/pgw/data")];
        c.validate().expect("defaults are fine");
        let pg = c.postgres.first().expect("pg");
        assert_eq!(
            (pg.replication_role(), pg.rewind_role()),
            ("postgres", "postgres")
        );
        type Change = Box<dyn Fn(&mut PostgresConfig)>;
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|p| p.sslmode = "verify".into()),
                "postgres.sslmode",
            ),
            (
                Box::new(|p| p.sslmode = "verify-full".into()),
                "postgres.sslrootcert",
            ),
            (
                Box::new(|p| p.passfile = Some("pgpass".into())),
                "postgres.passfile",
            ),
            (
                Box::new(|p| p.passfile = Some("/etc/it's".into())),
                "postgres.passfile",
            ),
            (
                Box::new(|p| p.replication_user = Some("re pl".into())),
                "postgres.replication_user",
            ),
            (
                Box::new(|p| p.rewind_user = Some(String::new())),
                "postgres.rewind_user",
            ),
        ];
        for (change, field) in cases {
            let mut bad = c.clone();
            if let Some(p) = bad.postgres.first_mut() {
                change(p);
            }
            match bad.validate() {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        let mut ok = c.clone();
        if let Some(p) = ok.postgres.first_mut() {
            p.sslmode = "verify-ca".into();
            p.sslrootcert = Some("/etc/pg-watcher/tls/ca.crt".into());
            p.replication_user = Some("replicator".into());
        }
        ok.validate().expect("verify-ca with a CA");
        assert_eq!(
            ok.postgres.first().map(|p| p.replication_role()),
            Some("replicator")
        );
    }

    #[test]
    fn a_reload_applies_postgres_settings_and_hba_and_names_anything_else() {
        let mut c = good();
        for (i, m) in c.members.iter_mut().enumerate().take(2) {
            m.postgres = Some(format!("127.0.0.1:{}", 5500 + i));
        }
        c.postgres = vec![PostgresConfig::new("/var/lib/pgw/data")];
        assert_eq!(c.reload_diff(&c.clone()).ok(), Some(false));
        let mut n = c.clone();
        if let Some(p) = n.postgres.first_mut() {
            p.settings.push("work_mem = '8MB'".into());
            p.hba.push("host all all 10.0.0.0/8 scram-sha-256".into());
        }
        assert_eq!(c.reload_diff(&n).ok(), Some(true));
        let field = |r: Result<bool, ConfigError>| match r {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let mut hb = n.clone();
        hb.raft.heartbeat_ms += 10;
        assert_eq!(field(c.reload_diff(&hb)), "raft.heartbeat_ms");
        let mut m = n.clone();
        m.members[1].priority = 7;
        assert_eq!(field(c.reload_diff(&m)), "members[1].priority");
        let mut owned = n.clone();
        if let Some(p) = owned.postgres.first_mut() {
            p.settings.push("synchronous_commit = local".into());
        }
        assert_eq!(field(c.reload_diff(&owned)), "postgres.settings[1]");
    }

    #[test]
    fn owned_postgres_settings_are_refused_by_name() {
        let mut c = good();
        for (i, m) in c.members.iter_mut().enumerate().take(2) {
            m.postgres = Some(format!("127.0.0.1:{}", 5500 + i));
        }
        c.postgres = vec![PostgresConfig {
            settings: vec!["shared_buffers = '64MB'".into(), "work_mem = '8MB'".into()],
            ..PostgresConfig::new("/var/lib/pgw/data")
        }];
        c.validate().expect("ordinary settings are fine");
        for (bad, name) in [
            ("synchronous_commit = local", "synchronous_commit"),
            (
                "synchronous_standby_names = ''",
                "synchronous_standby_names",
            ),
            ("Port=5433", "port"),
            ("  fsync = off", "fsync"),
            ("primary_conninfo = 'host=x'", "primary_conninfo"),
            ("include_dir = 'conf.d'", "include_dir"),
            ("recovery_target_lsn = '0/1'", "recovery_target_lsn"),
        ] {
            let mut c2 = c.clone();
            if let Some(pg) = c2.postgres.first_mut() {
                pg.settings.push(bad.into());
            }
            let e = c2.validate().unwrap_err();
            assert!(e.to_string().contains(name), "{bad}: {e}");
            assert_eq!(field_of(e), "postgres.settings[2]", "{bad}");
        }
        let mut c3 = c.clone();
        if let Some(pg) = c3.postgres.first_mut() {
            pg.settings = vec!["nonsense".into()];
        }
        assert_eq!(field_of(c3.validate().unwrap_err()), "postgres.settings[0]");
    }

    #[test]
    fn unknown_field_is_a_parse_error_naming_it() {
        let text = GOOD.replace("data_dir", "dta_dir");
        let e = Config::from_toml(&text, "x.toml").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("dta_dir"), "{msg}");
    }

    #[test]
    fn fingerprint_depends_on_members_not_on_self() {
        let a = good();
        let mut b = good();
        b.member = "room-b".into();
        assert_eq!(a.members_fingerprint(), b.members_fingerprint());
        b.members[2].grpc = "127.0.0.1:7999".into();
        assert_ne!(a.members_fingerprint(), b.members_fingerprint());
    }

    #[test]
    fn round_trips_through_toml() {
        let c = good();
        let text = c.to_toml().expect("renders");
        assert_eq!(Config::from_toml(&text, "rt").expect("parses"), c);
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        const NUMERIC: &[&str] = &[
            "raft.heartbeat_ms",
            "raft.election_timeout_min_ms",
            "raft.election_timeout_max_ms",
            "raft.rpc_timeout_ms",
            "raft.snapshot_logs",
            "failover.report_interval_ms",
            "failover.lease_ms",
            "failover.fence_budget_ms",
            "failover.clock_drift_ppm",
            "failover.margin_ms",
            "failover.hung_after_ms",
            "tls.reload_check_ms",
        ];

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
            /// Any text: parsing and validating never panic.
            #[test]
            fn arbitrary_text_never_panics(text in any::<String>()) {
                if let Ok(c) = Config::from_toml(&text, "fuzz") {
                    let _ = c.validate();
                }
            }

            /// A valid config with bytes replaced somewhere: never panics.
            #[test]
            fn mutated_config_never_panics(at in 0usize..2000, len in 0usize..8, with in any::<String>()) {
                let mut text = GOOD.to_string();
                let at = at.min(text.len());
                let end = (at + len).min(text.len());
                if text.is_char_boundary(at) && text.is_char_boundary(end) {
                    text.replace_range(at..end, &with);
                }
                if let Ok(c) = Config::from_toml(&text, "fuzz") {
                    let _ = c.validate();
                }
            }

            /// Any value in any timing field: validate() answers (no overflow panics).
            #[test]
            fn extreme_numbers_never_panic(field in 0usize..12, v in prop_oneof![any::<u64>(), Just(u64::MAX), Just(0u64), Just(i64::MAX as u64)]) {
                let (table, key) = NUMERIC[field].split_once('.').unwrap_or(("raft", "heartbeat_ms"));
                let text = format!("{GOOD}\n");
                let mut doc: toml::Table = toml::from_str(&text).expect("good parses");
                let v = i64::try_from(v).unwrap_or(i64::MAX);
                if let Some(t) = doc.entry(table.to_string()).or_insert(toml::Value::Table(Default::default())).as_table_mut() {
                    t.insert(key.to_string(), toml::Value::Integer(v));
                }
                let text = toml::to_string(&doc).expect("renders");
                if let Ok(c) = Config::from_toml(&text, "fuzz") {
                    let _ = c.validate();
                }
            }
        }
    }

    #[test]
    fn rooms_and_the_active_cluster() {
        let c = good();
        assert_eq!(c.active_cluster(), Some("global"));
        assert_eq!(c.members[0].room(), c.members[0].name);
        let mut named = c.clone();
        named.members[1].room = Some("dc-2".into());
        named.active_cluster = Some("global".into());
        assert!(named.validate().is_ok());
        assert_eq!(named.members[1].room(), "dc-2");
        let mut bad = c.clone();
        bad.active_cluster = Some("recovery".into());
        match bad.validate() {
            Err(ConfigError::Invalid { field, message }) => {
                assert_eq!(field, "active_cluster");
                assert!(message.contains("`recovery`"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        let mut bad = c;
        bad.members[2].room = Some("room c".into());
        match bad.validate() {
            Err(ConfigError::Invalid { field, .. }) => assert_eq!(field, "members[2].room"),
            other => panic!("{other:?}"),
        }
    }

    /// Two clusters: "global" on the data members' own addresses, "recovery" on room-b and a
    /// sidecar member; this member (room-b) runs a server of each.
    const TWO: &str = r#"
cluster_id = "prod"
member = "room-b"
data_dir = "/var/lib/pg-watcher"

[[members]]
name = "room-a"
id = 1
role = "data"
grpc = "127.0.0.1:7001"
http = "127.0.0.1:7101"
postgres = "127.0.0.1:5501"

[[members]]
name = "room-b"
id = 2
role = "data"
grpc = "127.0.0.1:7002"
http = "127.0.0.1:7102"
postgres = "127.0.0.1:5502"

[[members]]
name = "arbiter"
id = 3
role = "arbiter"
grpc = "127.0.0.1:7003"
http = "127.0.0.1:7103"

[[members]]
name = "rec-a"
id = 4
role = "sidecar"
grpc = "127.0.0.1:7004"
http = "127.0.0.1:7104"
room = "room-a"

[[clusters]]
name = "global"

[[clusters]]
name = "recovery"
switch_order = 1

[[clusters.servers]]
member = "rec-a"
postgres = "127.0.0.1:5601"

[[clusters.servers]]
member = "room-b"
postgres = "127.0.0.1:5602"

[[postgres]]
cluster = "global"
data_dir = "/var/lib/pgw/global"

[[postgres]]
cluster = "recovery"
data_dir = "/var/lib/pgw/recovery"

[tls]
ca = "/etc/pg-watcher/tls/ca.crt"
cert = "/etc/pg-watcher/tls/room-b.crt"
key = "/etc/pg-watcher/tls/room-b.key"
"#;

    fn two() -> Config {
        let c = Config::from_toml(TWO, "test").expect("parses");
        c.validate().expect("valid");
        c
    }

    #[test]
    fn several_clusters_each_with_its_own_servers() {
        let c = two();
        assert_eq!(c.voters().count(), 3);
        assert_eq!(
            c.server_names("global").into_iter().collect::<Vec<_>>(),
            ["room-a", "room-b"]
        );
        assert_eq!(
            c.server_names("recovery").into_iter().collect::<Vec<_>>(),
            ["rec-a", "room-b"]
        );
        assert_eq!(c.local_clusters(), ["global", "recovery"]);
        assert_eq!(
            c.postgres_for("recovery").map(|p| p.data_dir.clone()),
            Some(PathBuf::from("/var/lib/pgw/recovery"))
        );
        assert_eq!(
            c.pgpool_backends("recovery"),
            vec![
                ("rec-a".to_string(), "127.0.0.1:5601".to_string()),
                ("room-b".to_string(), "127.0.0.1:5602".to_string())
            ]
        );
        // The explicit servers are part of what every member must share.
        let mut moved = c.clone();
        moved.clusters[1].servers[0].postgres = Some("127.0.0.1:5603".into());
        assert_ne!(moved.members_fingerprint(), c.members_fingerprint());
        // A group without explicit servers keeps the digest it always had.
        assert!(!good().members_canonical().contains(';'));
        // Round trip through TOML keeps both servers.
        let back = Config::from_toml(&c.to_toml().expect("toml"), "rt").expect("parses");
        assert_eq!(back, c);
        // A single `[postgres]` table is one entry.
        let one = Config::from_toml(
            &GOOD.replace(
                "[tls]",
                "[postgres]\ndata_dir = \"/var/lib/pgw/data\"\n\n[tls]",
            ),
            "one",
        )
        .expect("parses");
        assert_eq!(one.postgres.len(), 1);
    }

    #[test]
    fn bad_servers_and_sidecars_are_named() {
        type Mutation = Box<dyn Fn(&mut Config)>;
        let cases: Vec<(Mutation, &str, &str)> = vec![
            (
                Box::new(|c| c.clusters[1].servers[0].member = "nobody".into()),
                "clusters[1].servers[0].member",
                "`nobody`",
            ),
            (
                Box::new(|c| c.clusters[1].servers[0].member = "arbiter".into()),
                "clusters[1].servers[0].member",
                "arbiter",
            ),
            (
                Box::new(|c| c.clusters[1].servers[1].member = "rec-a".into()),
                "clusters[1].servers[1].member",
                "twice",
            ),
            (
                Box::new(|c| c.clusters[1].servers[1].postgres = None),
                "clusters[1].servers[1].postgres",
                "required",
            ),
            (
                Box::new(|c| c.clusters[1].servers[1].postgres = Some("127.0.0.1:5501".into())),
                "clusters[1].servers",
                "127.0.0.1:5501",
            ),
            (
                Box::new(|c| {
                    c.clusters[1].servers.pop();
                }),
                "clusters[1].servers",
                "at least 2",
            ),
            (
                Box::new(|c| c.clusters[1].servers[0].pcp = Some("127.0.0.1:9800".into())),
                "clusters[1].servers[0].pgpool",
                "both",
            ),
            (
                Box::new(|c| c.clusters[1].servers.clear()),
                "clusters[1].servers",
                "already serve cluster `global`",
            ),
            (
                Box::new(|c| c.postgres[1].cluster = None),
                "postgres[1].cluster",
                "required",
            ),
            (
                Box::new(|c| c.postgres[1].data_dir = "/var/lib/pgw/global".into()),
                "postgres[1].data_dir",
                "another",
            ),
            (
                Box::new(|c| c.postgres[1].user = "bad user".into()),
                "postgres[1].user",
                "role name",
            ),
            (
                Box::new(|c| c.member = "room-a".into()),
                "postgres[1].cluster",
                "not one of cluster `recovery`'s servers",
            ),
            (
                Box::new(|c| c.clusters[1].bootstrap_primary = Some("room-a".into())),
                "clusters[1].bootstrap_primary",
                "servers",
            ),
            (
                Box::new(|c| c.clusters[1].servers[0].member = "room-a".into()),
                "members[3].role",
                "not one of any cluster's servers",
            ),
            (
                Box::new(|c| {
                    c.members[3].role = Role::Data;
                    c.members[3].postgres = Some("127.0.0.1:5509".into());
                    c.members.push(MemberConfig {
                        name: "x".into(),
                        id: 9,
                        grpc: "127.0.0.1:7009".into(),
                        http: "127.0.0.1:7109".into(),
                        ..c.members[2].clone()
                    });
                    for k in 10..14 {
                        c.members.push(MemberConfig {
                            name: format!("v{k}"),
                            id: k,
                            grpc: format!("127.0.0.1:{}", 7000 + k),
                            http: format!("127.0.0.1:{}", 7100 + k),
                            ..c.members[2].clone()
                        });
                    }
                }),
                "members",
                "voting members",
            ),
        ];
        for (mutate, field, words) in cases {
            let mut c = two();
            mutate(&mut c);
            match c.validate() {
                Err(ConfigError::Invalid { field: f, message }) => {
                    assert_eq!(f, field, "{message}");
                    assert!(message.contains(words), "{field}: {message}");
                }
                other => panic!("{field}: expected an error, got {other:?}"),
            }
        }
        // A sidecar member needs its server.
        let mut c = two();
        c.member = "rec-a".into();
        c.postgres.clear();
        match c.validate() {
            Err(ConfigError::Invalid { field, .. }) => assert_eq!(field, "postgres"),
            other => panic!("{other:?}"),
        }
        c.postgres = vec![PostgresConfig {
            cluster: Some("recovery".into()),
            ..PostgresConfig::new("/var/lib/pgw/recovery")
        }];
        c.validate().expect("a sidecar member with its server");
    }
}
