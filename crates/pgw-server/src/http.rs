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
use pgw_core::Role;
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
/// first configured one).
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
        .or_else(|| s.cfg.clusters.first().map(|c| c.name.clone()))
        .unwrap_or_default();
    let m = s.raft.metrics().borrow().clone();
    let facts = s.sm.applied().facts;
    let f = facts.cluster(&cluster);
    let has_leader = m.current_leader.is_some();
    let me = &s.cfg.member;
    let is_data = s.cfg.me().is_some_and(|m| m.role == Role::Data);
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
    let local = s.local_role.read().ok().and_then(|r| *r);
    let managed = s.cfg.postgres.is_some();
    let local_is = |want: PgRole| !managed || local == Some(want);
    match path {
        "/health" => json(m.state != openraft::ServerState::Shutdown),
        "/primary" => {
            json(has_leader && primary.as_deref() == Some(me.as_str()) && local_is(PgRole::Primary))
        }
        "/replica" => json(
            has_leader
                && is_data
                && primary.as_ref().is_some_and(|p| p != me)
                && local_is(PgRole::Replica),
        ),
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
            "endpoints: /health /primary /replica /metrics\n".into(),
        ),
    }
}

/// Serves HTTP/1.1 (over TLS with the member's certificate when `tls` is given) on `listener`
/// until the task is dropped. Only GET and HEAD are answered: nothing here changes anything.
/// At most [`MAX_HTTP_CONNECTIONS`] connections at once, each for at most 30 s.
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
