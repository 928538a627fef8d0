//! Mutual TLS for every gRPC link (rustls with the ring provider; no OpenSSL).
//!
//! Every member and every operator certificate is issued by the group's CA (`tls.ca`). The
//! server asks every caller for a certificate and verifies it against that CA during the
//! handshake, so a plaintext caller or one certified by another CA never reaches a handler.
//! The verified certificate's subject common name is the caller's identity; the `auth` module
//! decides what that identity may do. A member verifies the peer it connects to by the peer's
//! member name (a DNS subject alternative name of the peer's certificate), so a member cannot
//! be impersonated by another holder of a certificate from the same CA.
//!
//! Certificates are reloaded without a restart: when one of the three files changes, or on
//! SIGHUP. A reload that fails (a half-written file, a key that does not match) keeps the
//! previous certificates and says why.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use hyper_util::rt::TokioIo;
use pgw_core::config::TlsConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::telemetry;
use crate::x509;

/// How long a caller may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections a member serves at once (handshakes included); more are closed at accept.
pub const MAX_CONNECTIONS: usize = 512;

/// Why certificates could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{field} ({path}): {message}")]
    File {
        field: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("TLS setup: {0}")]
    Setup(String),
}

fn file_err(field: &'static str, path: &Path, message: impl ToString) -> TlsError {
    TlsError::File {
        field,
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM bundle of CA certificates into a root store.
pub fn load_roots(field: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let certs = load_certs(field, path)?;
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots
            .add(c)
            .map_err(|e| file_err(field, path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// Reads a PEM certificate chain (at least one certificate).
pub fn load_certs(
    field: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| file_err(field, path, e))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(field, path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(file_err(field, path, "holds no PEM certificate"));
    }
    Ok(certs)
}

/// Reads a PEM private key.
pub fn load_key(field: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| file_err(field, path, e))?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| file_err(field, path, format!("no PEM private key: {e}")))
}

/// A client configuration: trusts `ca`, presents `cert`/`key` when given (operators that use
/// a token instead connect without a certificate).
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<ClientConfig, TlsError> {
    let roots = load_roots("ca", ca)?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_root_certificates(roots);
    let mut cfg = match identity {
        Some((cert, key_file)) => {
            let certs = load_certs("cert", cert)?;
            let key = load_key("key", key_file)?;
            builder.with_client_auth_cert(certs, key).map_err(|e| {
                file_err(
                    "key",
                    key_file,
                    format!("does not fit the certificate: {e}"),
                )
            })?
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// One loaded set of certificates, as the configs rustls uses.
pub struct Material {
    /// gRPC server: asks every caller for a certificate issued by the CA.
    pub grpc: Arc<ServerConfig>,
    /// HTTPS for load balancers and Prometheus: no client certificate.
    pub https: Arc<ServerConfig>,
    /// Calls to other members, presenting this member's certificate.
    pub client: Arc<ClientConfig>,
    /// This member's certificate's end, seconds since the Unix epoch.
    pub not_after: Option<i64>,
    /// Verifies certificates against the CA (reports relayed by another member).
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    /// Signs this member's reports, so that a member relaying one cannot alter it.
    signer: Arc<dyn rustls::sign::SigningKey>,
    /// This member's certificate (DER), sent with a signed report.
    cert_der: Vec<u8>,
}

fn load_material(
    cfg: &TlsConfig,
    member: &str,
    certless_clients: bool,
) -> Result<Material, TlsError> {
    let roots = Arc::new(load_roots("tls.ca", &cfg.ca)?);
    let certs = load_certs("tls.cert", &cfg.cert)?;
    let key = load_key("tls.key", &cfg.key)?;
    let info = certs
        .first()
        .and_then(|c| x509::parse(c.as_ref()))
        .ok_or_else(|| file_err("tls.cert", &cfg.cert, "the certificate could not be read"))?;
    if info.common_name.as_deref() != Some(member) {
        return Err(file_err(
            "tls.cert",
            &cfg.cert,
            format!(
                "the certificate's subject CN is `{}`, but this member is `{member}`: each member needs a certificate naming it",
                info.common_name.as_deref().unwrap_or("")
            ),
        ));
    }
    if !info.dns_names.iter().any(|n| n == member) {
        return Err(file_err(
            "tls.cert",
            &cfg.cert,
            format!("the certificate has no DNS subject alternative name `{member}`; peers verify members by it"),
        ));
    }
    let strict = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| file_err("tls.ca", &cfg.ca, e))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| file_err("tls.key", &cfg.key, e))?;
    let cert_der = certs
        .first()
        .map(|c| c.as_ref().to_vec())
        .unwrap_or_default();
    let mut verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider());
    if certless_clients {
        // Operators holding a role token (auth.*_token_file) may connect without a certificate;
        // a certificate that is presented must still be valid. Member calls always need one.
        verifier = verifier.allow_unauthenticated();
    }
    let verifier = verifier
        .build()
        .map_err(|e| file_err("tls.ca", &cfg.ca, e))?;
    let mismatch = |e: rustls::Error| {
        file_err(
            "tls.key",
            &cfg.key,
            format!("does not fit the certificate in tls.cert: {e}"),
        )
    };
    let mut grpc = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs.clone(), key.clone_key())
        .map_err(mismatch)?;
    grpc.alpn_protocols = vec![b"h2".to_vec()];
    let mut https = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs.clone(), key.clone_key())
        .map_err(mismatch)?;
    https.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut client = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(mismatch)?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Material {
        grpc: Arc::new(grpc),
        https: Arc::new(https),
        client: Arc::new(client),
        not_after: info.not_after,
        verifier: strict,
        signer,
        cert_der,
    })
}

/// This member's certificates, reloadable at run time.
#[derive(Clone)]
pub struct Tls {
    inner: Arc<TlsInner>,
}

struct TlsInner {
    cfg: TlsConfig,
    member: String,
    certless_clients: bool,
    current: RwLock<Arc<Material>>,
    stamps: Mutex<Vec<Option<SystemTime>>>,
}

fn stamps(cfg: &TlsConfig) -> Vec<Option<SystemTime>> {
    [&cfg.ca, &cfg.cert, &cfg.key]
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

impl Tls {
    /// Loads the certificates of `member`; `certless_clients` lets callers without a
    /// certificate complete the handshake (they then need a role token).
    pub fn load(cfg: &TlsConfig, member: &str, certless_clients: bool) -> Result<Tls, TlsError> {
        let stamps0 = stamps(cfg);
        let m = load_material(cfg, member, certless_clients)?;
        telemetry::cert_expiry(m.not_after);
        Ok(Tls {
            inner: Arc::new(TlsInner {
                cfg: cfg.clone(),
                member: member.to_string(),
                certless_clients,
                current: RwLock::new(Arc::new(m)),
                stamps: Mutex::new(stamps0),
            }),
        })
    }

    pub fn current(&self) -> Arc<Material> {
        match self.inner.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Reads the files again and switches to them; on error the previous ones stay in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let i = &self.inner;
        let st = stamps(&i.cfg);
        let m = load_material(&i.cfg, &i.member, i.certless_clients)?;
        telemetry::cert_expiry(m.not_after);
        match i.current.write() {
            Ok(mut g) => *g = Arc::new(m),
            Err(p) => *p.into_inner() = Arc::new(m),
        }
        if let Ok(mut s) = i.stamps.lock() {
            *s = st;
        }
        Ok(())
    }

    /// Whether a file changed since the last (re)load.
    fn changed(&self) -> bool {
        let now = stamps(&self.inner.cfg);
        self.inner.stamps.lock().map(|s| *s != now).unwrap_or(false)
    }

    /// Reloads when a file changes (checked every `every`) or on SIGHUP; `also` runs after
    /// every successful reload (the role tokens are read again with the certificates).
    pub fn spawn_reloader(&self, every: Duration, also: impl Fn() + Send + 'static) {
        let tls = self.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let mut hup = signal(SignalKind::hangup()).ok();
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let why = tokio::select! {
                    _ = tick.tick() => {
                        if !tls.changed() { continue; }
                        "certificate files changed"
                    }
                    Some(_) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => "SIGHUP",
                };
                match tls.reload() {
                    Ok(()) => {
                        also();
                        tracing::info!("certificates reloaded ({why})");
                    }
                    Err(e) => {
                        // Do not retry a half-written file every tick: wait for the next change.
                        if let Ok(mut s) = tls.inner.stamps.lock() {
                            *s = stamps(&tls.inner.cfg);
                        }
                        metrics::counter!(telemetry::TLS_RELOAD_FAILURES).increment(1);
                        tracing::error!(
                            "certificate reload failed, keeping the previous certificates: {e}"
                        );
                    }
                }
            }
        });
    }

    /// Signs `msg` with this member's key: (scheme, signature, certificate DER).
    pub fn sign(&self, msg: &[u8]) -> Option<(u16, Vec<u8>, Vec<u8>)> {
        let m = self.current();
        let schemes = provider()
            .signature_verification_algorithms
            .supported_schemes();
        let signer = m.signer.choose_scheme(&schemes)?;
        let sig = signer.sign(msg).ok()?;
        Some((u16::from(signer.scheme()), sig, m.cert_der.clone()))
    }

    /// Checks that `sig` over `msg` was made by `member`'s key: the certificate must chain to
    /// the CA and name the member (CN and DNS name), and the signature must verify with it.
    pub fn verify_member_signature(
        &self,
        member: &str,
        cert_der: &[u8],
        scheme: u16,
        msg: &[u8],
        sig: &[u8],
    ) -> Result<(), String> {
        let cert = CertificateDer::from(cert_der);
        self.current()
            .verifier
            .verify_client_cert(&cert, &[], rustls::pki_types::UnixTime::now())
            .map_err(|e| format!("the signing certificate is not valid: {e}"))?;
        let info = x509::parse(cert_der).ok_or("the signing certificate cannot be read")?;
        if info.common_name.as_deref() != Some(member)
            || !info.dns_names.iter().any(|n| n == member)
        {
            return Err(format!("the signing certificate does not name `{member}`"));
        }
        let scheme = rustls::SignatureScheme::from(scheme);
        let alg = provider()
            .signature_verification_algorithms
            .mapping
            .iter()
            .find(|(s, _)| *s == scheme)
            .and_then(|(_, algs)| algs.first().copied())
            .ok_or_else(|| format!("signature scheme {scheme:?} is not supported"))?;
        let ee = webpki::EndEntityCert::try_from(&cert)
            .map_err(|e| format!("the signing certificate cannot be used: {e}"))?;
        ee.verify_signature(alg, msg, sig)
            .map_err(|e| format!("bad signature: {e}"))
    }

    /// The server side of a handshake on an accepted connection.
    pub async fn accept<IO>(&self, io: IO, addr: Option<SocketAddr>) -> io::Result<Authed<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.current().grpc.clone());
        let stream = acceptor.accept(io).await?;
        let peer = PeerCert::of(stream.get_ref().1.peer_certificates(), addr);
        Ok(Authed {
            stream,
            peer,
            _permit: None,
        })
    }

    /// A channel to another member, verifying that the peer's certificate names `member`.
    pub fn peer_channel(
        &self,
        addr: &str,
        member: &str,
        connect_timeout: Duration,
    ) -> Result<Channel, String> {
        let tls = self.clone();
        channel(
            addr,
            Some(member.to_string()),
            Arc::new(move || tls.current().client.clone()),
            connect_timeout,
        )
    }
}

/// What the handshake established about the caller.
#[derive(Debug, Clone, Default)]
pub struct PeerCert {
    /// The verified client certificate's subject common name (`None`: no certificate, or a
    /// certificate without a common name).
    pub name: Option<String>,
    /// Whether the caller presented a (verified) certificate at all.
    pub has_cert: bool,
    /// The certificate's DNS subject alternative names (a member's certificate has its name).
    pub dns_names: Vec<String>,
    pub addr: Option<SocketAddr>,
}

impl PeerCert {
    fn of(certs: Option<&[CertificateDer<'_>]>, addr: Option<SocketAddr>) -> PeerCert {
        let first = certs.and_then(|c| c.first());
        let info = first
            .and_then(|c| x509::parse(c.as_ref()))
            .unwrap_or_default();
        PeerCert {
            name: info.common_name,
            has_cert: first.is_some(),
            dns_names: info.dns_names,
            addr,
        }
    }
}

/// An accepted, TLS-authenticated connection; tonic hands [`PeerCert`] to every request on it.
pub struct Authed<IO> {
    stream: tokio_rustls::server::TlsStream<IO>,
    peer: PeerCert,
    _permit: Option<(OwnedSemaphorePermit, IpSlot)>,
}

/// Connections one address may hold at once ([`MAX_CONNECTIONS`] in all): one caller cannot
/// take every slot and keep the members from reaching each other.
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 64;

/// Counts connections per source address.
#[derive(Clone, Default)]
pub struct PerIp(Arc<Mutex<HashMap<std::net::IpAddr, usize>>>);

/// One connection's place in [`PerIp`]; released when dropped.
pub struct IpSlot(PerIp, std::net::IpAddr);

impl PerIp {
    pub fn take(&self, ip: std::net::IpAddr) -> Option<IpSlot> {
        let mut m = self.0.lock().ok()?;
        let n = m.entry(ip).or_insert(0);
        if *n >= MAX_CONNECTIONS_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(IpSlot(self.clone(), ip))
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        if let Ok(mut m) = (self.0).0.lock() {
            if let Some(n) = m.get_mut(&self.1) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&self.1);
                }
            }
        }
    }
}

impl<IO> Connected for Authed<IO> {
    type ConnectInfo = PeerCert;
    fn connect_info(&self) -> PeerCert {
        self.peer.clone()
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for Authed<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Authed<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts TCP connections and completes their TLS handshakes (each under
/// [`HANDSHAKE_TIMEOUT`], at most [`MAX_CONNECTIONS`] at once): the stream tonic serves.
/// A caller that fails the handshake (plaintext, no certificate, another CA) is dropped here
/// and logged once per interval.
pub fn incoming(listener: TcpListener, tls: Tls) -> ReceiverStream<io::Result<Authed<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Authed<TcpStream>>>(64);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_ip = PerIp::default();
    let refusals = RefusalLog::default();
    tokio::spawn(async move {
        loop {
            let (tcp, addr) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(ip_slot) = per_ip.take(addr.ip()) else {
                refusals.refuse(addr, "too many connections from one address");
                continue;
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                refusals.refuse(addr, "too many connections");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let tls = tls.clone();
            let tx = tx.clone();
            let refusals = refusals.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp, Some(addr))).await {
                    Ok(Ok(mut s)) => {
                        s._permit = Some((permit, ip_slot));
                        let _ = tx.send(Ok(s)).await;
                    }
                    Ok(Err(e)) => refusals.refuse(addr, &format!("TLS handshake failed: {e}")),
                    Err(_) => refusals.refuse(addr, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Logs refused callers at most once per interval per address and reason, with the number of
/// refusals it did not log; counts every refusal in `pgwatcher_refused_total`.
#[derive(Clone, Default)]
pub struct RefusalLog {
    seen: Arc<Mutex<HashMap<String, (Instant, u64)>>>,
}

/// How often one kind of refusal from one address is logged.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl RefusalLog {
    pub fn refuse(&self, addr: SocketAddr, reason: &str) {
        self.refuse_key(&addr.ip().to_string(), reason);
    }

    pub fn refuse_key(&self, who: &str, reason: &str) {
        let kind = reason.split(':').next().unwrap_or(reason).to_string();
        metrics::counter!(telemetry::REFUSED, "reason" => kind.clone()).increment(1);
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        let key = format!("{who}|{kind}");
        let now = Instant::now();
        if seen.len() >= 4096 && !seen.contains_key(&key) {
            // Many distinct callers: drop entries older than the interval; if all are recent,
            // log this one under a shared key so the log stays bounded.
            seen.retain(|_, (t, _)| now.duration_since(*t) < REFUSAL_LOG_INTERVAL);
            if seen.len() >= 4096 {
                let shared = format!("*|{kind}");
                match seen.get_mut(&shared) {
                    Some((_, n)) => *n += 1,
                    None => {
                        tracing::warn!("refused: {reason} (many callers; further ones not logged)");
                        seen.insert(shared, (now, 0));
                    }
                }
                return;
            }
        }
        match seen.get_mut(&key) {
            Some((last, n)) if now.duration_since(*last) < REFUSAL_LOG_INTERVAL => *n += 1,
            Some((last, n)) => {
                tracing::warn!(caller = %who, "refused: {reason} ({} more like it not logged)", *n);
                *last = now;
                *n = 0;
            }
            None => {
                tracing::warn!(caller = %who, "refused: {reason}");
                seen.insert(key, (now, 0));
            }
        }
    }
}

/// The client configuration to use at each (re)connect, so reloaded certificates are used
/// from then on.
pub type ClientConfigFn = Arc<dyn Fn() -> Arc<ClientConfig> + Send + Sync>;

/// Connects TCP then TLS for tonic. `server_name` is what the server's certificate must name
/// (a member name; `None`: the host of the address, as for any TLS client).
#[derive(Clone)]
pub struct TlsConnector {
    pub server_name: Option<String>,
    pub config: ClientConfigFn,
}

type Connecting = Pin<
    Box<
        dyn std::future::Future<
                Output = io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>,
            > + Send,
    >,
>;

impl tower::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Connecting {
        let server_name = self.server_name.clone();
        let config = (self.config)();
        Box::pin(async move {
            let host = uri
                .host()
                .unwrap_or_default()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "address without a port")
            })?;
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            let _ = tcp.set_nodelay(true);
            let stream = connect(tcp, server_name.as_deref().unwrap_or(&host), config).await?;
            Ok(TokioIo::new(stream))
        })
    }
}

/// A lazily connected gRPC channel over TLS (see [`TlsConnector`]).
pub fn channel(
    addr: &str,
    server_name: Option<String>,
    config: ClientConfigFn,
    connect_timeout: Duration,
) -> Result<Channel, String> {
    let ep = endpoint(addr, connect_timeout).map_err(|e| e.to_string())?;
    Ok(ep.connect_with_connector_lazy(TlsConnector {
        server_name,
        config,
    }))
}

/// The client side of a handshake over any stream (TCP, or the simulator's).
pub async fn connect<IO>(
    io: IO,
    server_name: &str,
    config: Arc<ClientConfig>,
) -> io::Result<tokio_rustls::client::TlsStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let name = ServerName::try_from(server_name.to_string()).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("`{server_name}` is not a valid server name: {e}"),
        )
    })?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, io)
        .await
}

/// Builds an endpoint with the transport's settings (used for both Raft and admin calls).
pub fn endpoint(
    addr: &str,
    connect_timeout: Duration,
) -> Result<Endpoint, tonic::transport::Error> {
    Ok(configure(
        Endpoint::from_shared(format!("http://{addr}"))?,
        connect_timeout,
    ))
}

/// The transport settings every peer channel gets. HTTP/2 keep-alive pings detect a connection
/// that a partition left half-dead (no RST ever arrives) within ~3 s, so the channel reconnects
/// once the network heals instead of waiting on a dead connection.
pub fn configure(ep: Endpoint, connect_timeout: Duration) -> Endpoint {
    ep.connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(true)
}
