//! Who may call what. Every gRPC request passes [`AuthLayer`] before any handler runs: the
//! caller is identified from the TLS handshake ([`crate::tls::PeerCert`]) or a role token, the
//! method's requirement is looked up in one table ([`need_for`]), and a caller who does not
//! meet it is answered `UNAUTHENTICATED` / `PERMISSION_DENIED` naming the role it lacks.
//! Unknown methods are refused. Handlers read the [`Caller`] from the request's extensions
//! (to check that a member speaks only for itself, and to record who asked for a decision).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use pgw_core::Config;
use tonic::Status;

use crate::tls::{PeerCert, RefusalLog};

/// Metadata set by a member that hands an operator's call on to the leader.
pub const FORWARDED: &str = "x-pgw-forwarded";
/// ... the operator's identity and role, as the forwarding member established them.
pub const FORWARDED_CALLER: &str = "x-pgw-caller";
pub const FORWARDED_ROLE: &str = "x-pgw-role";

/// Operator roles, each including the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum OpRole {
    Read,
    Operate,
    Admin,
}

impl OpRole {
    pub fn name(self) -> &'static str {
        match self {
            OpRole::Read => "read",
            OpRole::Operate => "operate",
            OpRole::Admin => "admin",
        }
    }
    pub fn parse(s: &str) -> Option<OpRole> {
        match s {
            "read" => Some(OpRole::Read),
            "operate" => Some(OpRole::Operate),
            "admin" => Some(OpRole::Admin),
            _ => None,
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Another member of the group (its certificate names it).
    Member { name: String, id: u64 },
    /// An operator or a tool, with the role its certificate or token grants.
    Operator { name: String, role: OpRole },
}

impl Caller {
    /// How the caller is named in logs and in the history.
    pub fn name(&self) -> &str {
        match self {
            Caller::Member { name, .. } | Caller::Operator { name, .. } => name,
        }
    }
}

/// What a method requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Only a member of the group (Raft, reports, PCP requests).
    Member,
    /// A member, or an operator with at least this role.
    Role(OpRole),
}

/// The one table of requirements. `None`: an unknown method, refused.
pub fn need_for(path: &str) -> Option<Need> {
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    Some(match (service, method) {
        ("pgwatcher.v1.Raft", "AppendEntries" | "Vote" | "InstallSnapshot") => Need::Member,
        ("pgwatcher.v1.Admin", "Report" | "Pcp" | "HookResult" | "GetRoster") => Need::Member,
        ("pgwatcher.v1.Admin", "Hello" | "Status" | "History" | "GetOperation") => {
            Need::Role(OpRole::Read)
        }
        ("pgwatcher.v1.Admin", "Switchover" | "SetPaused" | "Recover" | "Restart" | "Reload") => {
            Need::Role(OpRole::Operate)
        }
        ("pgwatcher.v1.Admin", "Failover" | "MemberChange" | "PromoteGroup") => {
            Need::Role(OpRole::Admin)
        }
        ("grpc.health.v1.Health", "Check" | "Watch") => Need::Role(OpRole::Read),
        _ => return None,
    })
}

/// Why a token file could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{field} ({path}): {message}")]
pub struct TokenError {
    pub field: &'static str,
    pub path: String,
    pub message: String,
}

/// The caller-to-role mapping of one member's config.
pub struct Policy {
    /// Member certificate names and their node ids: the group's member list, swapped when
    /// the roster changes.
    members: RwLock<BTreeMap<String, u64>>,
    roles: BTreeMap<String, OpRole>,
    token_files: Vec<(OpRole, &'static str, std::path::PathBuf)>,
    tokens: RwLock<Vec<(OpRole, Vec<u8>)>>,
    refusals: RefusalLog,
    /// The group generation this member belongs to: every refusal carries it, so that a
    /// member of an older generation learns it was superseded.
    generation: std::sync::atomic::AtomicU64,
}

/// Metadata key every refusal carries: the refusing member's group generation.
pub const GENERATION_KEY: &str = "pgw-generation";

/// `st` with the group generation `g` in its metadata.
pub fn with_generation(st: Status, g: u64) -> Status {
    let mut md = st.metadata().clone();
    if let Ok(v) = g.to_string().parse() {
        md.insert(GENERATION_KEY, v);
    }
    Status::with_metadata(st.code(), st.message().to_string(), md)
}

/// The generation a refusal names, if it carries one.
pub fn generation_of(st: &Status) -> Option<u64> {
    st.metadata()
        .get(GENERATION_KEY)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Shortest token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

fn read_token(field: &'static str, path: &Path) -> Result<Vec<u8>, TokenError> {
    let err = |message: String| TokenError {
        field,
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let token = text.trim();
    if token.len() < MIN_TOKEN_LEN || token.contains(char::is_whitespace) {
        return Err(err(format!(
            "must hold one token of at least {MIN_TOKEN_LEN} characters without spaces"
        )));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path) {
            if m.permissions().mode() & 0o077 != 0 {
                return Err(err(
                    "is readable by group or others; chmod 600 it".to_string()
                ));
            }
        }
    }
    Ok(token.as_bytes().to_vec())
}

/// Compares without an early exit, so timing does not reveal a token's prefix.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Policy {
    pub fn from_config(cfg: &Config) -> Result<Policy, TokenError> {
        let mut roles = BTreeMap::new();
        for (role, names) in [
            (OpRole::Read, &cfg.auth.read),
            (OpRole::Operate, &cfg.auth.operate),
            (OpRole::Admin, &cfg.auth.admin),
        ] {
            for n in names {
                roles.insert(n.clone(), role);
            }
        }
        let token_files: Vec<_> = [
            (
                OpRole::Read,
                "auth.read_token_file",
                &cfg.auth.read_token_file,
            ),
            (
                OpRole::Operate,
                "auth.operate_token_file",
                &cfg.auth.operate_token_file,
            ),
            (
                OpRole::Admin,
                "auth.admin_token_file",
                &cfg.auth.admin_token_file,
            ),
        ]
        .into_iter()
        .filter_map(|(r, f, p)| p.clone().map(|p| (r, f, p)))
        .collect();
        let p = Policy {
            members: RwLock::new(cfg.members.iter().map(|m| (m.name.clone(), m.id)).collect()),
            roles,
            token_files,
            tokens: RwLock::new(Vec::new()),
            refusals: RefusalLog::default(),
            generation: std::sync::atomic::AtomicU64::new(cfg.generation),
        };
        p.reload_tokens()?;
        Ok(p)
    }

    /// Takes the member list of `cfg` (after a roster change).
    pub fn set_members(&self, cfg: &Config) {
        self.generation
            .store(cfg.generation, std::sync::atomic::Ordering::Relaxed);
        let m: BTreeMap<String, u64> = cfg.members.iter().map(|m| (m.name.clone(), m.id)).collect();
        match self.members.write() {
            Ok(mut g) => *g = m,
            Err(p) => *p.into_inner() = m,
        }
    }

    /// Reads the token files again (with the certificates, on change or SIGHUP).
    pub fn reload_tokens(&self) -> Result<(), TokenError> {
        let mut tokens = Vec::new();
        for (role, field, path) in &self.token_files {
            tokens.push((*role, read_token(field, path)?));
        }
        match self.tokens.write() {
            Ok(mut t) => *t = tokens,
            Err(p) => *p.into_inner() = tokens,
        }
        Ok(())
    }

    fn token_role(&self, presented: &[u8]) -> Option<OpRole> {
        let tokens = match self.tokens.read() {
            Ok(t) => t,
            Err(p) => p.into_inner(),
        };
        // Check all, highest role wins.
        tokens
            .iter()
            .filter(|(_, t)| same(t, presented))
            .map(|(r, _)| *r)
            .max()
    }

    /// Who is calling. A member certificate identifies a member; on a call a member forwards
    /// for an operator, the operator it names. An operator certificate's name is looked up in
    /// the role lists; a caller without a known certificate may present a role token.
    pub fn identify(
        &self,
        peer: Option<&PeerCert>,
        headers: &http::HeaderMap,
    ) -> Result<Caller, Status> {
        let Some(peer) = peer else {
            return Err(Status::unauthenticated(
                "connection is not TLS-authenticated",
            ));
        };
        let header = |k: &str| headers.get(k).and_then(|v| v.to_str().ok());
        if let Some(name) = peer.name.as_deref() {
            // A member's certificate names it twice (CN and DNS name): an operator certificate
            // that happens to carry a member's CN is not a member.
            let member = match self.members.read() {
                Ok(g) => g.get(name).copied(),
                Err(p) => p.into_inner().get(name).copied(),
            }
            .filter(|_| peer.dns_names.iter().any(|d| d == name));
            if let Some(id) = member {
                if header(FORWARDED).is_some() {
                    if let (Some(op), Some(claimed)) = (
                        header(FORWARDED_CALLER),
                        header(FORWARDED_ROLE).and_then(OpRole::parse),
                    ) {
                        // The forwarding member names the operator; the role is what this
                        // member's own policy gives that operator (its token, forwarded with
                        // the call, or its certificate's name), never more than claimed.
                        let own = match header("authorization") {
                            Some(v) => v
                                .strip_prefix("Bearer ")
                                .and_then(|t| self.token_role(t.trim().as_bytes())),
                            None => self.roles.get(op).copied(),
                        };
                        let Some(own) = own else {
                            return Err(Status::unauthenticated(format!(
                                "forwarded caller `{op}` has no role on this member"
                            )));
                        };
                        return Ok(Caller::Operator {
                            name: op.to_string(),
                            role: own.min(claimed),
                        });
                    }
                }
                return Ok(Caller::Member {
                    name: name.to_string(),
                    id,
                });
            }
        }
        let cert_role = peer
            .name
            .as_deref()
            .and_then(|n| self.roles.get(n).map(|r| (n, *r)));
        let token_role = header("authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| self.token_role(t.trim().as_bytes()));
        match (cert_role, token_role) {
            (_, Some(None)) => Err(Status::unauthenticated("the role token is not valid")),
            (Some((n, r)), Some(Some(t))) => Ok(Caller::Operator {
                name: n.to_string(),
                role: r.max(t),
            }),
            (Some((n, r)), None) => Ok(Caller::Operator {
                name: n.to_string(),
                role: r,
            }),
            (None, Some(Some(t))) => Ok(Caller::Operator {
                name: match peer.name.as_deref() {
                    Some(n) => format!("{n} (token:{})", t.name()),
                    None => format!("token:{}", t.name()),
                },
                role: t,
            }),
            (None, None) => Err(Status::unauthenticated(match peer.name.as_deref() {
                Some(n) => format!(
                    "certificate `{n}` is neither a member nor listed in auth.read, auth.operate or auth.admin"
                ),
                None => "no client certificate and no role token".to_string(),
            })),
        }
    }

    /// Decides one call; on success the caller to hand to the handler.
    pub fn check(
        &self,
        path: &str,
        peer: Option<&PeerCert>,
        headers: &http::HeaderMap,
    ) -> Result<Caller, Status> {
        let who = || {
            peer.and_then(|p| p.addr)
                .map(|a| a.ip().to_string())
                .unwrap_or_else(|| "?".into())
        };
        let need = match need_for(path) {
            Some(n) => n,
            None => {
                self.refusals.refuse_key(&who(), "unknown method");
                return Err(Status::unimplemented(format!("no such method {path}")));
            }
        };
        let caller = match self.identify(peer, headers) {
            Ok(c) => c,
            Err(st) => {
                self.refusals
                    .refuse_key(&who(), &format!("unauthenticated: {}", st.message()));
                return Err(st);
            }
        };
        let method = path.rsplit('/').next().unwrap_or(path);
        let ok = match (&caller, need) {
            // A member reads (bootstrap, status) and speaks for itself; operator actions reach
            // it only forwarded, naming the operator.
            (Caller::Member { .. }, Need::Member | Need::Role(OpRole::Read)) => true,
            (Caller::Member { .. }, Need::Role(_)) => false,
            (Caller::Operator { .. }, Need::Member) => false,
            (Caller::Operator { role, .. }, Need::Role(r)) => *role >= r,
        };
        if ok {
            return Ok(caller);
        }
        let msg = match (&caller, need) {
            (Caller::Operator { name, .. }, Need::Member) => {
                format!("{method} is for members of the group only; `{name}` is not one")
            }
            (Caller::Operator { name, role }, Need::Role(r)) => format!(
                "{method} needs the `{}` role; `{name}` has `{}`",
                r.name(),
                role.name()
            ),
            (Caller::Member { name, .. }, Need::Role(r)) => format!(
                "{method} needs the `{}` role; member `{name}` may only forward an operator's call",
                r.name()
            ),
            _ => format!("{method} refused"),
        };
        self.refusals
            .refuse_key(&who(), &format!("permission denied: {msg}"));
        Err(Status::permission_denied(msg))
    }
}

/// The tower layer that runs [`Policy::check`] in front of every service.
#[derive(Clone)]
pub struct AuthLayer {
    policy: Arc<Policy>,
}

impl AuthLayer {
    pub fn new(policy: Arc<Policy>) -> Self {
        Self { policy }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            policy: self.policy.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    policy: Arc<Policy>,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, RB> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let peer = req.extensions().get::<PeerCert>().cloned();
        match self
            .policy
            .check(req.uri().path(), peer.as_ref(), req.headers())
        {
            Ok(caller) => {
                req.extensions_mut().insert(caller);
                Box::pin(self.inner.call(req))
            }
            Err(status) => {
                let g = self
                    .policy
                    .generation
                    .load(std::sync::atomic::Ordering::Relaxed);
                Box::pin(std::future::ready(Ok(
                    with_generation(status, g).into_http()
                )))
            }
        }
    }
}

/// The caller the layer established for a request (`None` only if the layer was bypassed,
/// which the services treat as a refusal).
pub fn caller<T>(req: &tonic::Request<T>) -> Result<Caller, Status> {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("caller not authenticated"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_has_a_requirement_and_unknown_ones_have_none() {
        assert_eq!(need_for("/pgwatcher.v1.Raft/Vote"), Some(Need::Member));
        assert_eq!(need_for("/pgwatcher.v1.Admin/Report"), Some(Need::Member));
        assert_eq!(
            need_for("/pgwatcher.v1.Admin/Failover"),
            Some(Need::Role(OpRole::Admin))
        );
        assert_eq!(
            need_for("/pgwatcher.v1.Admin/SetPaused"),
            Some(Need::Role(OpRole::Operate))
        );
        assert_eq!(
            need_for("/grpc.health.v1.Health/Check"),
            Some(Need::Role(OpRole::Read))
        );
        assert_eq!(need_for("/pgwatcher.v1.Admin/Nope"), None);
        assert_eq!(need_for("garbage"), None);
        assert_eq!(need_for(""), None);
    }

    #[test]
    fn constant_time_compare() {
        assert!(same(b"abcdefghijklmnop", b"abcdefghijklmnop"));
        assert!(!same(b"abcdefghijklmnop", b"abcdefghijklmnoq"));
        assert!(!same(b"abc", b"abcd"));
    }
}
