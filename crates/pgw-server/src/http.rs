//! HTTP endpoints for load balancers and Prometheus: `/health`, `/primary`, `/replica`,
//! `/metrics`. `/primary` and `/replica` answer 200 or 503 for the local member, as HAProxy-style
//! checks expect.

use std::convert::Infallible;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use pgw_core::failover::PgRole;
use tokio::net::TcpListener;

use crate::member::Shared;
use crate::service::state_name;

fn reply(code: StatusCode, ctype: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    if let Ok(v) = ctype.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Answers one request. `cluster` query parameter selects the PostgreSQL cluster (default: the
/// first one this member runs a server of, else the first configured one).
pub fn handle(
    s: &Shared,
    metrics: Option<&PrometheusHandle>,
    path_and_query: &str,
) -> Response<Full<Bytes>> {
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let cluster = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("cluster="))
        .map(str::to_string)
        .or_else(|| s.cfg().local_clusters().into_iter().next())
        .or_else(|| s.cfg().clusters.first().map(|c| c.name.clone()))
        .unwrap_or_default();
    let m = s.raft.metrics().borrow().clone();
    let facts = s.sm.applied().facts;
    let f = facts.cluster(&cluster);
    let has_leader = m.current_leader.is_some();
    let me = &s.cfg().member;
    // This member holds a server of the cluster (it may be a replica or the primary).
    let is_data = s.cfg().server_names(&cluster).contains(me);
    let primary = f.and_then(|f| f.primary.clone());
    let json = |ok: bool| {
        let body = serde_json::json!({
            "member": me,
            "cluster": cluster,
            "raft": state_name(m.state),
            "leader": m.current_leader.map(|l| s.member_name(l)),
            "term": m.current_term,
            "primary": primary,
            "epoch": f.map(|f| f.epoch),
        });
        let code = if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        reply(code, "application/json", format!("{body}\n"))
    };
    // With a sidecar, the local server must also be doing what the group decided.
    let local = s
        .local
        .read()
        .ok()
        .and_then(|r| r.get(&cluster).copied())
        .unwrap_or_default();
    let managed = s.cfg().postgres_for(&cluster).is_some();
    let lag_limit = match query.split('&').find_map(|kv| kv.strip_prefix("lag=")) {
        None => None,
        Some(v) => match parse_bytes(v) {
            Some(n) => Some(n),
            None => {
                return reply(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    format!("query parameter `lag`: `{v}` is not a size (bytes, or a number with B, kB, MB or GB)\n"),
                )
            }
        },
    };
    let view = CheckView {
        has_leader,
        is_data,
        managed,
        named_primary: primary.as_deref() == Some(me.as_str()),
        other_primary: primary.as_ref().is_some_and(|p| p != me),
        in_sync_set: f.is_some_and(|f| f.sync_standbys.contains(me)),
        local,
    };
    if let Some(kind) = Check::from_path(path) {
        return json(view.passes(kind, lag_limit));
    }
    match path {
        "/health" => json(m.state != openraft::ServerState::Shutdown),
        "/metrics" => match metrics {
            Some(h) => reply(StatusCode::OK, "text/plain; version=0.0.4", h.render()),
            None => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "metrics recorder not installed here\n".into(),
            ),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "endpoints: /health /primary /read-write /replica /read-only /sync /async /metrics (?lag=SIZE, ?cluster=NAME)\n".into(),
        ),
    }
}

/// Serves HTTP/1.1 (over TLS with the member's certificate when `tls` is given) on `listener`
/// until the task is dropped. Only GET and HEAD are answered: nothing here changes anything.
/// At most [`MAX_HTTP_CONNECTIONS`] connections at once, each for at most 30 s.
/// The role checks load balancers ask for, with the names Patroni's REST API uses so that
/// existing HAProxy configurations carry over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// `/primary`, `/read-write`: the recorded primary, running as primary.
    Primary,
    /// `/replica`: a data member running as a standby of another recorded primary.
    Replica,
    /// `/read-only`: the primary or a replica.
    ReadOnly,
    /// `/sync`, `/synchronous`: a streaming replica in the recorded synchronous set.
    Sync,
    /// `/async`, `/asynchronous`: a streaming replica outside it.
    Async,
}

impl Check {
    pub fn from_path(path: &str) -> Option<Check> {
        Some(match path {
            "/primary" | "/read-write" => Check::Primary,
            "/replica" => Check::Replica,
            "/read-only" => Check::ReadOnly,
            "/sync" | "/synchronous" => Check::Sync,
            "/async" | "/asynchronous" => Check::Async,
            _ => return None,
        })
    }
}

/// What a check needs to know, gathered from the member context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckView {
    pub has_leader: bool,
    pub is_data: bool,
    /// This member runs a PostgreSQL server (else the local role is not required).
    pub managed: bool,
    pub named_primary: bool,
    pub other_primary: bool,
    pub in_sync_set: bool,
    pub local: crate::member::LocalView,
}

impl CheckView {
    /// Whether the check passes; `lag_limit` (bytes) applies to replicas: an unknown lag fails.
    pub fn passes(&self, check: Check, lag_limit: Option<u64>) -> bool {
        let local_is = |want: PgRole| !self.managed || self.local.role == Some(want);
        let primary = self.has_leader && self.named_primary && local_is(PgRole::Primary);
        let lag_ok =
            lag_limit.is_none_or(|limit| self.local.lag_bytes().is_some_and(|l| l <= limit));
        let replica = self.has_leader
            && self.is_data
            && self.other_primary
            && local_is(PgRole::Replica)
            && lag_ok;
        let streaming = replica && (!self.managed || self.local.streaming);
        match check {
            Check::Primary => primary,
            Check::Replica => replica,
            Check::ReadOnly => primary || replica,
            Check::Sync => streaming && self.in_sync_set,
            Check::Async => streaming && !self.in_sync_set,
        }
    }
}

/// A size as Patroni's `lag` takes it: bytes, or a number with `B`, `kB`, `MB`, `GB` (1024-based,
/// as PostgreSQL's units). `None` when it is not one.
pub fn parse_bytes(v: &str) -> Option<u64> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "kB" | "KB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

pub async fn serve(
    listener: TcpListener,
    s: Shared,
    metrics: Option<PrometheusHandle>,
    tls: Option<crate::tls::Tls>,
) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_HTTP_CONNECTIONS));
    let per_ip = crate::tls::PerIp::default();
    loop {
        let Ok((stream, addr)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            continue;
        };
        let Some(ip_slot) = per_ip.take(addr.ip()) else {
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let s = s.clone();
        let metrics = metrics.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = (permit, ip_slot);
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let pq = req
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_default();
                let r = if req.method() == hyper::Method::GET || req.method() == hyper::Method::HEAD
                {
                    handle(&s, metrics.as_ref(), &pq)
                } else {
                    let mut r = reply(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "text/plain",
                        "read-only endpoint: GET or HEAD\n".into(),
                    );
                    if let Ok(v) = "GET, HEAD".parse() {
                        r.headers_mut().insert(hyper::header::ALLOW, v);
                    }
                    r
                };
                async move { Ok::<_, Infallible>(r) }
            });
            let limit = std::time::Duration::from_secs(30);
            let _ = tokio::time::timeout(limit, async move {
                // A request's head must arrive within 5 s (no slow-header holding of slots).
                let mut b = hyper::server::conn::http1::Builder::new();
                b.timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(5));
                match tls {
                    Some(tls) => {
                        let acceptor = tokio_rustls::TlsAcceptor::from(tls.current().https.clone());
                        let hs = tokio::time::timeout(
                            crate::tls::HANDSHAKE_TIMEOUT,
                            acceptor.accept(stream),
                        );
                        if let Ok(Ok(st)) = hs.await {
                            let _ = b.serve_connection(TokioIo::new(st), svc).await;
                        }
                    }
                    None => {
                        let _ = b.serve_connection(TokioIo::new(stream), svc).await;
                    }
                }
            })
            .await;
        });
    }
}

/// HTTP connections served at once; more are closed at accept.
pub const MAX_HTTP_CONNECTIONS: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::member::LocalView;

    fn replica(streaming: bool, in_sync: bool, flush: u64, primary: Option<u64>) -> CheckView {
        CheckView {
            has_leader: true,
            is_data: true,
            managed: true,
            named_primary: false,
            other_primary: true,
            in_sync_set: in_sync,
            local: LocalView {
                role: Some(PgRole::Replica),
                streaming,
                flush_lsn: flush,
                primary_lsn: primary,
                narrowed_locally: false,
            },
        }
    }

    #[test]
    fn patroni_style_checks() {
        let sync = replica(true, true, 100, Some(150));
        assert!(sync.passes(Check::Replica, None));
        assert!(sync.passes(Check::ReadOnly, None));
        assert!(sync.passes(Check::Sync, None));
        assert!(!sync.passes(Check::Async, None));
        assert!(!sync.passes(Check::Primary, None));
        // Lag: 50 bytes behind.
        assert!(sync.passes(Check::Replica, Some(50)));
        assert!(!sync.passes(Check::Replica, Some(49)));
        assert!(!sync.passes(Check::Sync, Some(10)));
        // Unknown lag fails a lag check, not a plain one.
        let unknown = replica(true, false, 100, None);
        assert!(unknown.passes(Check::Async, None));
        assert!(!unknown.passes(Check::Async, Some(1 << 30)));
        // A standby that does not stream is a replica but neither sync nor async.
        let idle = replica(false, true, 100, Some(100));
        assert!(idle.passes(Check::Replica, None));
        assert!(!idle.passes(Check::Sync, None) && !idle.passes(Check::Async, None));
        // No leader: nothing passes.
        let lost = CheckView {
            has_leader: false,
            ..sync
        };
        assert!(!lost.passes(Check::Replica, None) && !lost.passes(Check::ReadOnly, None));
        let primary = CheckView {
            named_primary: true,
            other_primary: false,
            local: LocalView {
                role: Some(PgRole::Primary),
                ..LocalView::default()
            },
            ..sync
        };
        assert!(primary.passes(Check::Primary, None));
        assert!(primary.passes(Check::ReadOnly, Some(0)));
        assert!(!primary.passes(Check::Replica, None));
        // Named primary but still a standby (promoting): not yet.
        let promoting = CheckView {
            local: LocalView {
                role: Some(PgRole::Replica),
                ..LocalView::default()
            },
            ..primary
        };
        assert!(!promoting.passes(Check::Primary, None));
    }

    #[test]
    fn lag_sizes() {
        assert_eq!(parse_bytes("0"), Some(0));
        assert_eq!(parse_bytes("1048576"), Some(1 << 20));
        assert_eq!(parse_bytes("16kB"), Some(16 << 10));
        assert_eq!(parse_bytes("1MB"), Some(1 << 20));
        assert_eq!(parse_bytes("2GB"), Some(2 << 30));
        assert_eq!(parse_bytes("1.5MB"), None);
        assert_eq!(parse_bytes("MB"), None);
        assert_eq!(parse_bytes("-1"), None);
        assert_eq!(parse_bytes("99999999999999999999"), None);
        assert_eq!(parse_bytes("18446744073709551615GB"), None);
    }
}
