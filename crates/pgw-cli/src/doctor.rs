//! `pgwctl doctor`: the runbook's troubleshooting order as one command. Names first (every
//! member's addresses resolve), then the watchers (gRPC, certificates, Raft leader and terms),
//! then each cluster's servers (running, role as recorded, timeline, lag), each room's pgpool
//! (reachable, routing as recorded), and last the HTTP checks load balancers use. Every finding
//! says what is wrong and what to do. The rules are pure ([`diagnose`]); [`probe`] does the I/O.

use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::status::GroupStatus;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub level: Level,
    /// names | grpc | raft | cluster NAME | pgpool ROOM | http
    pub area: String,
    pub what: String,
    /// What to do about it (empty when all is well).
    pub fix: String,
}

/// The answers of one member's HTTP checks (`Err`: no HTTP answer at all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAnswers {
    pub health: Result<u16, String>,
    pub primary: Result<u16, String>,
}

/// What the I/O found, per member: (member, address, resolution result), HTTP answers per
/// (member, cluster), and the last run of every role-change hook (from the history).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Probes {
    pub names: Vec<(String, String, Result<(), String>)>,
    pub http: Vec<(String, String, HttpAnswers)>,
    pub hooks: Vec<HookRun>,
}

/// The last recorded run of one hook on one member for one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookRun {
    pub cluster: String,
    pub hook: String,
    pub member: String,
    pub succeeded: bool,
    /// The history line.
    pub event: String,
}

/// Reads a hook outcome from a history line (`hook NAME on MEMBER ran|FAILED for epoch ...`).
pub fn parse_hook_event(cluster: &str, event: &str) -> Option<HookRun> {
    let rest = event.strip_prefix("hook ")?;
    let mut w = rest.split_whitespace();
    let hook = w.next()?;
    (w.next()? == "on").then_some(())?;
    let member = w.next()?;
    let succeeded = match w.next()? {
        "ran" => true,
        "FAILED" => false,
        _ => return None,
    };
    Some(HookRun {
        cluster: cluster.to_string(),
        hook: hook.to_string(),
        member: member.to_string(),
        succeeded,
        event: event.to_string(),
    })
}

fn f(level: Level, area: &str, what: String, fix: &str) -> Finding {
    Finding {
        level,
        area: area.to_string(),
        what,
        fix: fix.to_string(),
    }
}

/// The rules, in the runbook's order.
pub fn diagnose(s: &GroupStatus, p: &Probes) -> Vec<Finding> {
    let mut out = Vec::new();
    // 1. Names.
    let bad: Vec<&(String, String, Result<(), String>)> =
        p.names.iter().filter(|(_, _, r)| r.is_err()).collect();
    if bad.is_empty() {
        out.push(f(
            Level::Ok,
            "names",
            format!("{} member addresses resolve", p.names.len()),
            "",
        ));
    }
    for (m, addr, r) in bad {
        out.push(f(
            Level::Error,
            "names",
            format!("{m}: `{addr}` does not resolve: {}", r.clone().err().unwrap_or_default()),
            "fix /etc/hosts or DNS on this host for that name (every member needs the same entries)",
        ));
    }
    // 2. Watchers: gRPC and certificates (and where each stands in the membership).
    if let Some(why) = &s.automatic_failover_off {
        out.push(f(
            Level::Warn,
            "members",
            format!("automatic failover is off: {why}"),
            "add an arbiter in a third room (`pgwctl member add NAME --role arbiter ...`)",
        ));
    }
    for m in s
        .members
        .iter()
        .filter(|m| m.standing == "joining" || m.standing == "leaving")
    {
        out.push(f(
            Level::Warn,
            "members",
            format!("{}: membership change in flight ({})", m.name, m.standing),
            if m.standing == "joining" {
                "start it with `pg-watcher --config FILE --join ADDR`; the leader adds it once it answers"
            } else {
                "the leader drops it from Raft once the change commits; if this stays, check `pgwctl status` for a leader"
            },
        ));
    }
    for m in s.members.iter().filter(|m| m.standing != "leaving") {
        match &m.error {
            None => {}
            Some(e) => {
                let cert = ["certificate", "tls", "handshake", "unknown ca", "expired"]
                    .iter()
                    .any(|k| e.to_lowercase().contains(k));
                out.push(f(
                    Level::Error,
                    "grpc",
                    format!("{} ({}): unreachable: {e}", m.name, m.grpc),
                    if cert {
                        "the TLS handshake failed: check that its certificate is issued by the group's CA, names the member and has not expired (`pgwctl certs`, deploy/tls/make-certs.sh)"
                    } else {
                        "check that pg-watcher runs there (`systemctl status pg-watcher`, its log) and that this host reaches its gRPC port"
                    },
                ));
            }
        }
    }
    let listed: Vec<_> = s
        .members
        .iter()
        .filter(|m| m.standing != "leaving")
        .collect();
    let up = listed.iter().filter(|m| m.error.is_none()).count();
    if up == listed.len() {
        out.push(f(
            Level::Ok,
            "grpc",
            format!("all {up} watchers answer"),
            "",
        ));
    }
    // 3. Raft.
    match &s.leader {
        None => out.push(f(
            Level::Error,
            "raft",
            "no Raft leader: automation is stopped".into(),
            "a majority of members must run and reach each other; start the members that are down, or for a lost majority see the runbook's force-new-group",
        )),
        Some(l) => {
            let terms: std::collections::BTreeSet<u64> =
                s.members.iter().filter_map(|m| m.term).collect();
            if terms.len() > 1 {
                out.push(f(
                    Level::Warn,
                    "raft",
                    format!("members report different terms {terms:?} (leader {l})"),
                    "usually an election just happened; if it persists a member cannot reach the leader",
                ));
            } else {
                out.push(f(
                    Level::Ok,
                    "raft",
                    format!("leader {l}, term {}", s.term),
                    "",
                ));
            }
        }
    }
    // 4. Each cluster's servers.
    for c in &s.clusters {
        let area = format!("cluster {}", c.name);
        let Some(primary) = &c.primary else {
            out.push(f(
                Level::Error,
                &area,
                format!(
                    "no primary recorded (epoch {}){}",
                    c.epoch,
                    c.waiting_for
                        .as_ref()
                        .map(|w| format!("; waiting: {w}"))
                        .unwrap_or_default()
                ),
                "see `pgwctl status` and `pgwctl history`; bring back a server that holds every acknowledged commit",
            ));
            continue;
        };
        let mut problems = 0;
        if c.paused {
            problems += 1;
            out.push(f(
                Level::Warn,
                &area,
                "automation is paused".into(),
                "`pgwctl resume` when the maintenance is over",
            ));
        }
        if c.degraded {
            problems += 1;
            out.push(f(
                Level::Warn,
                &area,
                "running degraded: commits do not wait for a standby (RPO > 0)".into(),
                "bring a standby back; the sync set is widened again once one streams",
            ));
        }
        let ptl = c
            .nodes
            .iter()
            .find(|n| &n.member == primary)
            .map(|n| n.timeline);
        for n in &c.nodes {
            let want_primary = &n.member == primary;
            let (level, what, fix) = match n.role.as_str() {
                "primary" if want_primary => continue,
                "sync_replica" if !want_primary => {
                    if ptl.is_some_and(|t| t != n.timeline) {
                        (Level::Warn, format!("{} streams on timeline {} while the primary is on {}", n.member, n.timeline, ptl.unwrap_or(0)), "it should follow the new timeline within seconds; if not, `pgwctl recover` it")
                    } else {
                        continue;
                    }
                }
                "replica" => (
                    Level::Warn,
                    format!("{} is a replica but not synchronous ({} bytes behind)", n.member, n.lag_bytes),
                    "it is catching up or cannot stream; if it stays, check its log and `pgwctl recover` it",
                ),
                "down" | "fenced" => (
                    Level::Error,
                    format!(
                        "{}'s PostgreSQL is {}{}",
                        n.member,
                        n.role,
                        n.error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()
                    ),
                    "its watcher restarts it when it can; check that member's watcher and PostgreSQL logs, then `pgwctl recover` it if it does not rejoin",
                ),
                other => (
                    Level::Error,
                    format!(
                        "{} runs as {other} but the record names {primary} primary",
                        n.member
                    ),
                    "the watchers correct this on their own within seconds; if it persists, check that member's watcher log",
                ),
            };
            problems += 1;
            out.push(f(level, &area, what, fix));
        }
        for m in c
            .sync_standbys
            .iter()
            .filter(|m| !c.nodes.iter().any(|n| &n.member == *m))
        {
            problems += 1;
            out.push(f(
                Level::Error,
                &area,
                format!("{m} has not reported at all"),
                "check that member's watcher (`systemctl status pg-watcher`) and its PostgreSQL",
            ));
        }
        if problems == 0 {
            out.push(f(
                Level::Ok,
                &area,
                format!(
                    "{primary} primary (epoch {}), every standby synchronous",
                    c.epoch
                ),
                "",
            ));
        }
        // 5. Each room's pgpool.
        for pool in &c.pgpool {
            let area = format!("pgpool {}", pool.room);
            if !pool.reachable {
                out.push(f(
                    Level::Error,
                    &area,
                    format!(
                        "{} does not answer PCP{}",
                        pool.address,
                        pool.error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
                    ),
                    "check that pgpool runs in that room (the watcher restarts a managed one) and its pcp.conf password",
                ));
                continue;
            }
            let mut bad = false;
            if pool.primary.as_deref() != Some(primary.as_str()) {
                bad = true;
                out.push(f(
                    Level::Error,
                    &area,
                    format!(
                        "writes go to {} but the record names {primary}",
                        pool.primary.as_deref().unwrap_or("no server")
                    ),
                    "the leader repoints it within seconds; if it persists see the leader's log for its PCP errors",
                ));
            }
            for node in &pool.nodes {
                let running = c
                    .nodes
                    .iter()
                    .find(|n| n.member == node.member)
                    .is_some_and(|n| !matches!(n.role.as_str(), "down" | "fenced"));
                if node.status == "up" && !running {
                    bad = true;
                    out.push(f(
                        Level::Error,
                        &area,
                        format!("sends sessions to {}, whose PostgreSQL is not running", node.member),
                        "the leader detaches it within seconds; if it persists, `pcp_detach_node` it and check the leader's log",
                    ));
                }
            }
            if !pool.agrees && !bad {
                bad = true;
                out.push(f(
                    Level::Warn,
                    &area,
                    format!("does not route as recorded for {} ms", pool.disagreeing_ms),
                    "the leader corrects it; if it persists see the leader's log",
                ));
            }
            if !bad {
                out.push(f(Level::Ok, &area, format!("writes to {primary}"), ""));
            }
        }
        // 6. HTTP checks (load balancers).
        for (m, _, a) in p.http.iter().filter(|(_, cl, _)| *cl == c.name) {
            let member_up = s.members.iter().any(|x| &x.name == m && x.error.is_none());
            match (&a.health, &a.primary) {
                (Err(e), _) | (_, Err(e)) => {
                    if member_up {
                        out.push(f(
                            Level::Error,
                            "http",
                            format!("{m}: no answer on its HTTP port: {e}"),
                            "load balancers cannot see this member: check `members[].http` and the firewall (HTTPS when `[tls] http = true`)",
                        ));
                    }
                }
                (Ok(h), Ok(code)) => {
                    let says_primary = *code == 200;
                    if *h != 200 || says_primary != (m == primary) {
                        out.push(f(
                            Level::Error,
                            "http",
                            format!("{m}: /health {h}, /primary {code}, but the record names {primary} primary"),
                            "a load balancer would route wrongly; check that member's watcher log",
                        ));
                    }
                }
            }
        }
    }
    // 7. The last run of each role-change hook.
    for h in &p.hooks {
        let area = format!("hook {}", h.hook);
        if h.succeeded {
            out.push(f(
                Level::Ok,
                &area,
                format!("{} ({})", h.member, h.cluster),
                "",
            ));
        } else {
            out.push(f(
                Level::Warn,
                &area,
                format!("last run on {} failed: {}", h.member, h.event),
                "run its command by hand with the PGW_* environment of that change and fix it (failovers never wait for hooks)",
            ));
        }
    }
    out
}

/// The last run of every hook, per (cluster, hook, member), from the history.
async fn hook_runs(s: &GroupStatus, timeout: Duration) -> Vec<HookRun> {
    for m in &s.members {
        let Ok(mut c) = crate::status::connect(&m.grpc, timeout).await else {
            continue;
        };
        let req = pgw_proto::HistoryRequest {
            cluster: String::new(),
            limit: 500,
        };
        let Ok(Ok(h)) = tokio::time::timeout(timeout, c.history(req)).await else {
            continue;
        };
        let mut last: std::collections::BTreeMap<(String, String, String), HookRun> =
            Default::default();
        for e in h.into_inner().entries {
            if let Some(r) = parse_hook_event(&e.cluster, &e.event) {
                last.insert((r.cluster.clone(), r.hook.clone(), r.member.clone()), r);
            }
        }
        return last.into_values().collect();
    }
    Vec::new()
}

/// Resolves every member's addresses and asks each for its HTTP checks.
pub async fn probe(s: &GroupStatus, timeout: Duration) -> Probes {
    let mut p = Probes::default();
    for m in &s.members {
        for addr in [&m.grpc, &m.http] {
            if addr.is_empty() {
                continue;
            }
            let r =
                match tokio::time::timeout(timeout, tokio::net::lookup_host(addr.as_str())).await {
                    Ok(Ok(mut it)) => {
                        if it.next().is_some() {
                            Ok(())
                        } else {
                            Err("no address".to_string())
                        }
                    }
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
                };
            p.names.push((m.name.clone(), addr.clone(), r));
        }
        if !m.http.is_empty() {
            for c in &s.clusters {
                p.http.push((
                    m.name.clone(),
                    c.name.clone(),
                    HttpAnswers {
                        health: http_status(&m.http, "/health", timeout).await,
                        primary: http_status(
                            &m.http,
                            &format!("/primary?cluster={}", c.name),
                            timeout,
                        )
                        .await,
                    },
                ));
            }
        }
    }
    p.hooks = hook_runs(s, timeout).await;
    p
}

/// A plain HTTP GET; the status code.
async fn http_status(addr: &str, path: &str, timeout: Duration) -> Result<u16, String> {
    let exchange = async {
        let mut c = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        c.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        c.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        let head = String::from_utf8_lossy(&buf);
        head.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| "not an HTTP answer".to_string())
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

/// One line per finding, worst last in each area's order as found.
pub fn render(findings: &[Finding]) -> String {
    let mut s = String::new();
    for x in findings {
        let tag = match x.level {
            Level::Ok => "ok   ",
            Level::Warn => "WARN ",
            Level::Error => "ERROR",
        };
        s.push_str(&format!("{tag} {:<16} {}\n", x.area, x.what));
        if !x.fix.is_empty() {
            s.push_str(&format!("      {:<16} -> {}\n", "", x.fix));
        }
    }
    let errors = findings.iter().filter(|x| x.level == Level::Error).count();
    let warns = findings.iter().filter(|x| x.level == Level::Warn).count();
    s.push_str(&format!("{errors} errors, {warns} warnings\n"));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{ClusterView, MemberStatus, NodeView, PgpoolNodeView, PgpoolView};

    fn member(name: &str, error: Option<&str>) -> MemberStatus {
        MemberStatus {
            name: name.into(),
            room: name.into(),
            role: "data".into(),
            raft: if error.is_some() {
                "unreachable"
            } else {
                "follower"
            }
            .into(),
            grpc: format!("{name}:7400"),
            http: format!("{name}:7401"),
            term: error.is_none().then_some(3),
            last_applied: Some(10),
            error: error.map(String::from),
            standing: "voter".into(),
        }
    }

    fn node(m: &str, role: &str) -> NodeView {
        NodeView {
            member: m.into(),
            role: role.into(),
            lsn: "0/1".into(),
            lag_bytes: 0,
            timeline: 2,
            error: None,
        }
    }

    fn healthy() -> (GroupStatus, Probes) {
        let s = GroupStatus {
            cluster_id: "g".into(),
            leader: Some("a".into()),
            term: 3,
            members: vec![member("a", None), member("b", None), member("c", None)],
            active_cluster: Some("global".into()),
            active_room: Some("a".into()),
            membership_changing: false,
            roster_version: 0,
            generation: 0,
            automatic_failover_off: None,
            clusters: vec![ClusterView {
                name: "global".into(),
                primary: Some("a".into()),
                primary_room: Some("a".into()),
                epoch: 5,
                paused: false,
                sync_standbys: vec!["b".into(), "c".into()],
                sync_quorum: 1,
                nodes: vec![
                    node("a", "primary"),
                    node("b", "sync_replica"),
                    node("c", "sync_replica"),
                ],
                pgpool: vec![PgpoolView {
                    room: "a".into(),
                    primary: Some("a".into()),
                    address: "a:9999".into(),
                    reachable: true,
                    agrees: true,
                    error: None,
                    disagreeing_ms: 0,
                    nodes: ["a", "b", "c"]
                        .iter()
                        .map(|m| PgpoolNodeView {
                            member: m.to_string(),
                            status: "up".into(),
                            role: if *m == "a" { "primary" } else { "standby" }.into(),
                        })
                        .collect(),
                }],
                degraded: false,
                waiting_for: None,
                standby: None,
            }],
        };
        let p = Probes {
            names: ["a", "b", "c"]
                .iter()
                .map(|m| (m.to_string(), format!("{m}:7400"), Ok(())))
                .collect(),
            hooks: vec![],
            http: ["a", "b", "c"]
                .iter()
                .map(|m| {
                    (
                        m.to_string(),
                        "global".to_string(),
                        HttpAnswers {
                            health: Ok(200),
                            primary: Ok(if *m == "a" { 200 } else { 503 }),
                        },
                    )
                })
                .collect(),
        };
        (s, p)
    }

    fn errors(v: &[Finding]) -> Vec<String> {
        v.iter()
            .filter(|x| x.level == Level::Error)
            .map(|x| format!("{}: {}", x.area, x.what))
            .collect()
    }

    #[test]
    fn a_healthy_group_has_no_finding_to_act_on() {
        let (s, p) = healthy();
        let v = diagnose(&s, &p);
        assert!(v.iter().all(|x| x.level == Level::Ok), "{}", render(&v));
    }

    #[test]
    fn each_fault_is_named_with_what_to_do() {
        // A member down: its watcher, its server and its HTTP port.
        let (mut s, mut p) = healthy();
        s.members[2] = member("c", Some("connection refused"));
        s.clusters[0].nodes[2].role = "down".into();
        s.clusters[0].pgpool[0].nodes[2].status = "up".into();
        p.http[2].2.health = Err("connection refused".into());
        let e = errors(&diagnose(&s, &p));
        assert!(
            e.iter()
                .any(|x| x.starts_with("grpc: c (c:7400): unreachable")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|x| x == "cluster global: c's PostgreSQL is down"),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|x| x == "pgpool a: sends sessions to c, whose PostgreSQL is not running"),
            "{e:?}"
        );
        // The HTTP port of a watcher that is down is not reported twice.
        assert!(!e.iter().any(|x| x.starts_with("http:")), "{e:?}");

        // pgpool writing to the wrong server, a name that does not resolve, no leader.
        let (mut s, mut p) = healthy();
        s.clusters[0].pgpool[0].primary = Some("b".into());
        p.names[1].2 = Err("Name or service not known".into());
        s.leader = None;
        let v = diagnose(&s, &p);
        let e = errors(&v);
        assert!(
            e.contains(&"pgpool a: writes go to b but the record names a".to_string()),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|x| x.starts_with("names: b: `b:7400` does not resolve")),
            "{e:?}"
        );
        assert!(
            e.iter().any(|x| x.starts_with("raft: no Raft leader")),
            "{e:?}"
        );
        assert!(v
            .iter()
            .filter(|x| x.level == Level::Error)
            .all(|x| !x.fix.is_empty()));

        // An HTTP check that contradicts the record.
        let (s, mut p) = healthy();
        p.http[1].2.primary = Ok(200);
        let e = errors(&diagnose(&s, &p));
        assert!(
            e.iter()
                .any(|x| x.starts_with("http: b: /health 200, /primary 200")),
            "{e:?}"
        );

        // A hook whose last run failed is a warning naming it; a recorded success is fine.
        let (s, mut p) = healthy();
        let failed = "hook hosts on b FAILED for epoch 7 (attempt 3): exit status: 1";
        p.hooks = vec![
            parse_hook_event("global", failed).expect("parses"),
            parse_hook_event(
                "global",
                "hook hosts on a ran for epoch 7 (attempt 1): exit 0",
            )
            .expect("parses"),
        ];
        assert_eq!(parse_hook_event("global", "primary := a (epoch 7)"), None);
        let v = diagnose(&s, &p);
        let warn: Vec<_> = v.iter().filter(|x| x.level == Level::Warn).collect();
        assert_eq!(warn.len(), 1, "{}", render(&v));
        assert_eq!(warn[0].area, "hook hosts");
        assert!(warn[0].what.contains("on b failed") && warn[0].what.contains("epoch 7"));
        assert!(!warn[0].fix.is_empty());
    }
}
