//! Logs and metrics. Metric names are stable (a public contract) and carry their unit.

use std::fmt;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::{DefaultFields, Format, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;

/// Current Raft term (gauge).
pub const RAFT_TERM: &str = "pgwatcher_raft_term";
/// 1 while this member is the Raft leader (gauge).
pub const RAFT_IS_LEADER: &str = "pgwatcher_raft_is_leader";
/// Times this member saw the leader change, including to "no leader" (counter).
pub const RAFT_LEADER_CHANGES: &str = "pgwatcher_raft_leader_changes_total";
/// Time from proposing a decision to it being committed and applied (histogram, seconds).
pub const RAFT_COMMIT_LATENCY: &str = "pgwatcher_raft_commit_latency_seconds";
/// Index of the last applied log entry (gauge).
pub const RAFT_LAST_APPLIED: &str = "pgwatcher_raft_last_applied_index";
/// 1 when the last RPC to `peer` succeeded, else 0 (gauge, label `peer`).
pub const PEER_REACHABLE: &str = "pgwatcher_peer_reachable";
/// Epoch (fencing token) of a PostgreSQL cluster's primary record (gauge, label `cluster`).
pub const CLUSTER_EPOCH: &str = "pgwatcher_cluster_epoch";
/// 1 while a PostgreSQL cluster has a recorded primary (gauge, label `cluster`).
pub const CLUSTER_HAS_PRIMARY: &str = "pgwatcher_cluster_has_primary";
/// Decisions this member proposed as leader, by cluster and kind (counter).
pub const DECISIONS: &str = "pgwatcher_decisions_total";
/// 1 while the leader can read a room's pgpool through PCP (gauge, label `room`).
pub const PGPOOL_REACHABLE: &str = "pgwatcher_pgpool_reachable";
/// 1 while a room's pgpool routes exactly as the group decided (gauge, label `room`).
pub const PGPOOL_AGREES: &str = "pgwatcher_pgpool_agrees";
/// PCP commands sent to a room's pgpool, by command (counter, labels `room`, `command`).
pub const PGPOOL_COMMANDS: &str = "pgwatcher_pgpool_commands_total";

/// Callers refused before any handler ran, by reason (counter, label `reason`).
pub const REFUSED: &str = "pgwatcher_refused_total";
/// Reports dropped because they named a member or cluster that is not configured (counter,
/// label `reason`).
pub const REPORTS_DROPPED: &str = "pgwatcher_reports_dropped_total";
/// End of validity of this member's certificate, Unix seconds (gauge).
pub const TLS_CERT_EXPIRY: &str = "pgwatcher_tls_cert_expiry_timestamp_seconds";
/// Certificate reloads that failed (the previous certificates stayed in use) (counter).
pub const TLS_RELOAD_FAILURES: &str = "pgwatcher_tls_reload_failures_total";
/// 1 once the Raft storage failed; the member is stopping (gauge).
pub const STORAGE_FAILED: &str = "pgwatcher_storage_failed";

/// 1 while the local PostgreSQL answers but refuses the watcher's connection (gauge, label
/// `cluster`): running, state unknown; see `nodes[].error` in status.
/// Role-change hook runs, by hook, cluster and result (success | failure).
pub const HOOK_RUNS: &str = "pgwatcher_hook_runs_total";
/// 1 when the hook's last run on this member succeeded, 0 when it failed.
pub const HOOK_LAST_SUCCESS: &str = "pgwatcher_hook_last_success";
/// How long the hook's last run took, retries included.
pub const HOOK_LAST_DURATION: &str = "pgwatcher_hook_last_duration_seconds";
pub const POSTGRES_REFUSED: &str = "pgwatcher_postgres_refused";

pub fn report_dropped(reason: &'static str) {
    metrics::counter!(REPORTS_DROPPED, "reason" => reason).increment(1);
}

pub fn cert_expiry(not_after: Option<i64>) {
    if let Some(t) = not_after {
        metrics::gauge!(TLS_CERT_EXPIRY).set(t as f64);
    }
}

/// Installs the process-wide Prometheus recorder. Returns `None` when one is already installed
/// (several members in one test process share the first).
pub fn install_metrics() -> Option<PrometheusHandle> {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(RAFT_COMMIT_LATENCY.to_string()),
            &[
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
            ],
        )
        .ok()?;
    let handle = builder.install_recorder().ok()?;
    metrics::describe_gauge!(RAFT_TERM, "Current Raft term");
    metrics::describe_gauge!(RAFT_IS_LEADER, "1 while this member is the Raft leader");
    metrics::describe_counter!(RAFT_LEADER_CHANGES, "Leader changes seen by this member");
    metrics::describe_histogram!(
        RAFT_COMMIT_LATENCY,
        metrics::Unit::Seconds,
        "Decision commit latency"
    );
    metrics::describe_gauge!(RAFT_LAST_APPLIED, "Last applied Raft log index");
    metrics::describe_counter!(REFUSED, "Callers refused before any handler ran");
    metrics::describe_counter!(
        REPORTS_DROPPED,
        "Reports naming a member or cluster that is not configured"
    );
    metrics::describe_gauge!(
        TLS_CERT_EXPIRY,
        metrics::Unit::Seconds,
        "End of validity of this member's certificate (Unix time)"
    );
    metrics::describe_counter!(TLS_RELOAD_FAILURES, "Failed certificate reloads");
    metrics::describe_gauge!(STORAGE_FAILED, "1 once the Raft storage failed");
    metrics::describe_gauge!(
        POSTGRES_REFUSED,
        "1 while the local PostgreSQL refuses the watcher's connection"
    );
    metrics::describe_gauge!(PEER_REACHABLE, "1 when the last RPC to the peer succeeded");
    metrics::describe_gauge!(CLUSTER_EPOCH, "Epoch of the cluster's primary record");
    metrics::describe_gauge!(
        CLUSTER_HAS_PRIMARY,
        "1 while the cluster has a recorded primary"
    );
    metrics::describe_counter!(
        HOOK_RUNS,
        "Role-change hook runs by hook, cluster and result"
    );
    metrics::describe_gauge!(
        HOOK_LAST_SUCCESS,
        "1 when the hook's last run on this member succeeded"
    );
    metrics::describe_gauge!(
        HOOK_LAST_DURATION,
        metrics::Unit::Seconds,
        "Duration of the hook's last run, retries included"
    );
    metrics::describe_counter!(DECISIONS, "Decisions proposed by this member as leader");
    metrics::describe_gauge!(
        PGPOOL_REACHABLE,
        "1 while the leader reads the room's pgpool"
    );
    metrics::describe_gauge!(
        PGPOOL_AGREES,
        "1 while the room's pgpool routes as the group decided"
    );
    metrics::describe_counter!(PGPOOL_COMMANDS, "PCP commands sent to the room's pgpool");
    Some(handle)
}

pub fn peer_reachable(peer: &str, up: bool) {
    metrics::gauge!(PEER_REACHABLE, "peer" => peer.to_string()).set(if up { 1.0 } else { 0.0 });
}

pub fn commit_latency(d: Duration) {
    metrics::histogram!(RAFT_COMMIT_LATENCY).record(d.as_secs_f64());
}

/// Prefixes every log line with the cluster and member, including lines from openraft's own
/// tasks, which do not inherit our spans.
struct MemberPrefix {
    prefix: String,
    inner: Format,
}

impl<S, N> FormatEvent<S, N> for MemberPrefix
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        write!(writer, "{} ", self.prefix)?;
        self.inner.format_event(ctx, writer, event)
    }
}

/// Initialises logging to stderr. `level` is a `Targets` directive such as `info,openraft=warn`.
pub fn init_logging(cluster_id: &str, member: &str, level: &str) -> Result<(), String> {
    let targets: Targets = level
        .parse()
        .map_err(|e| format!("config field `log.level`: `{level}`: {e}"))?;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .fmt_fields(DefaultFields::new())
        .event_format(MemberPrefix {
            prefix: format!("cluster={cluster_id} member={member}"),
            inner: Format::default().with_target(true),
        });
    tracing_subscriber::registry()
        .with(fmt.with_filter(targets))
        .try_init()
        .map_err(|e| e.to_string())
}

/// Logs a fatal error (the process is about to exit).
pub fn log_fatal(msg: &str) {
    tracing::error!("fatal: {msg}");
}
