//! How `pgwctl` (and the demo, tests and benches) authenticate to members: a client
//! certificate from the group's CA (`--ca/--cert/--key`, `PGW_CA/PGW_CERT/PGW_KEY`), or a role
//! token over TLS for tooling that cannot hold a certificate (`--token-file`, `PGW_TOKEN_FILE`),
//! or both from a small client config file (`--client-config`, `PGW_CLIENT_CONFIG`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use pgw_proto::admin_client::AdminClient;
use serde::Deserialize;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::CliError;

/// A client's credentials: the TLS configuration and an optional bearer token.
#[derive(Clone)]
pub struct ClientAuth {
    pub config: Arc<rustls::ClientConfig>,
    pub token: Option<MetadataValue<Ascii>>,
}

/// `--client-config FILE`: the same settings as the flags, in TOML.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    #[serde(default)]
    pub endpoints: Vec<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
}

impl ClientFile {
    pub fn load(path: &Path) -> Result<ClientFile, CliError> {
        let text = std::fs::read_to_string(path).map_err(|e| CliError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| CliError::Io {
            path: path.display().to_string(),
            message: e.to_string().trim().to_string(),
        })
    }
}

impl ClientAuth {
    /// Reads the CA, the client certificate and key (both or neither) and the token file.
    pub fn from_files(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
        token_file: Option<&Path>,
    ) -> Result<ClientAuth, CliError> {
        let ca = ca.ok_or_else(|| {
            CliError::Usage(
                "no CA certificate: pass --ca FILE (or set PGW_CA), with --cert/--key or --token-file".into(),
            )
        })?;
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(CliError::Usage("--cert needs --key (or PGW_KEY)".into()))
            }
            (None, Some(_)) => {
                return Err(CliError::Usage("--key needs --cert (or PGW_CERT)".into()))
            }
        };
        if identity.is_none() && token_file.is_none() {
            return Err(CliError::Usage(
                "no credentials: pass --cert/--key (PGW_CERT/PGW_KEY) or --token-file (PGW_TOKEN_FILE)".into(),
            ));
        }
        let config = pgw_server::tls::client_config(ca, identity).map_err(|e| CliError::Io {
            path: String::from("certificates"),
            message: e.to_string(),
        })?;
        let token = match token_file {
            None => None,
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| CliError::Io {
                    path: p.display().to_string(),
                    message: e.to_string(),
                })?;
                let v = format!("Bearer {}", text.trim())
                    .parse()
                    .map_err(|_| CliError::Io {
                        path: p.display().to_string(),
                        message: "the token is not printable ASCII".into(),
                    })?;
                Some(v)
            }
        };
        Ok(ClientAuth {
            config: Arc::new(config),
            token,
        })
    }
}

static DEFAULT: RwLock<Option<ClientAuth>> = RwLock::new(None);

/// Sets the credentials [`connect`] uses (pgwctl sets them from its flags once).
pub fn set_default(auth: ClientAuth) {
    match DEFAULT.write() {
        Ok(mut d) => *d = Some(auth),
        Err(p) => *p.into_inner() = Some(auth),
    }
}

/// The credentials set with [`set_default`].
pub fn default_auth() -> Result<ClientAuth, CliError> {
    let d = match DEFAULT.read() {
        Ok(d) => d.clone(),
        Err(p) => p.into_inner().clone(),
    };
    d.ok_or_else(|| {
        CliError::Usage(
            "no client certificate: pass --ca/--cert/--key (or PGW_CA/PGW_CERT/PGW_KEY)".into(),
        )
    })
}

/// Adds the bearer token, if any, to every call.
#[derive(Clone)]
pub struct Token(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("authorization", t.clone());
        }
        Ok(req)
    }
}

/// An operator API client.
pub type Admin = AdminClient<InterceptedService<Channel, Token>>;

/// The whole chain of an error (tonic's transport error alone says only "transport error").
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// A TLS channel to one member with `auth`, verifying the member's certificate against the
/// CA and the address's host (for any gRPC client: the operator API, `grpc.health.v1`).
pub async fn channel_as(
    addr: &str,
    timeout: Duration,
    auth: &ClientAuth,
) -> Result<Channel, CliError> {
    let ep = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| CliError::Usage(format!("endpoint `{addr}` is not host:port: {e}")))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let config = auth.config.clone();
    let connector = pgw_server::tls::TlsConnector {
        server_name: None,
        config: Arc::new(move || config.clone()),
    };
    tokio::time::timeout(timeout, ep.connect_with_connector(connector))
        .await
        .map_err(|_| CliError::Unreachable {
            endpoint: addr.to_string(),
            message: format!("no answer within {} ms", timeout.as_millis()),
        })?
        .map_err(|e| CliError::Unreachable {
            endpoint: addr.to_string(),
            message: chain(&e),
        })
}

/// Connects to one member's operator API with `auth` (its token, if any, goes with every call).
pub async fn connect_as(
    addr: &str,
    timeout: Duration,
    auth: &ClientAuth,
) -> Result<Admin, CliError> {
    let ch = channel_as(addr, timeout, auth).await?;
    Ok(AdminClient::with_interceptor(ch, Token(auth.token.clone())))
}

/// Connects with the default credentials.
pub async fn connect(addr: &str, timeout: Duration) -> Result<Admin, CliError> {
    connect_as(addr, timeout, &default_auth()?).await
}

/// A refusal as an operator reads it: the role it lacks, not gRPC's text.
pub fn refusal(s: &tonic::Status) -> CliError {
    match s.code() {
        tonic::Code::PermissionDenied => {
            CliError::Refused(format!("permission denied: {}", s.message()))
        }
        tonic::Code::Unauthenticated => {
            CliError::Refused(format!("not authenticated: {}", s.message()))
        }
        _ => CliError::Refused(s.message().to_string()),
    }
}
