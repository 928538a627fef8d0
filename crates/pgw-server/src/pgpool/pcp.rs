//! A client for pgpool-II's PCP protocol (the one `pcp_node_info`, `pcp_attach_node`,
//! `pcp_detach_node` and `pcp_promote_node` speak), so that no PCP binary or password ever
//! appears on a command line and every request has a deadline.
//!
//! Wire format (pgpool 4.3, `src/libs/pcp/pcp.c`): every message is a type byte, a 4-byte
//! big-endian length that counts itself, and a payload of NUL-terminated strings. Login asks
//! for a salt (`M`), then sends `R` with the user and `md5(md5(password + user) + salt)`.
//! Attach, detach and promote only queue a request inside pgpool: callers re-read the node list.

use std::time::Duration;

use md5::{Digest, Md5};
pub use pgw_core::pgpool::NodeInfo;
use pgw_core::pgpool::PoolStatus;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Errors talking to one pgpool.
#[derive(Debug, thiserror::Error)]
pub enum PcpError {
    #[error("cannot reach PCP at {addr}: {message}")]
    Connect { addr: String, message: String },
    #[error("PCP at {addr} did not answer within {ms} ms")]
    Timeout { addr: String, ms: u64 },
    #[error("PCP authentication at {addr} failed for user `{user}` (check pcp_password_file and the pgpool's pcp.conf)")]
    Auth { addr: String, user: String },
    #[error("PCP at {addr}: {message}")]
    Protocol { addr: String, message: String },
    #[error("pgpool at {addr} refused `{what}`: {message}")]
    Refused {
        addr: String,
        what: String,
        message: String,
    },
}

/// PCP login. The password never appears in `Debug` output.
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// pgpool's md5 hex of `data`.
pub fn md5_hex(data: &[u8]) -> String {
    let d = Md5::digest(data);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// An authenticated PCP connection.
pub struct PcpClient {
    addr: String,
    stream: TcpStream,
    timeout: Duration,
}

fn frame(tag: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(payload.len() + 5);
    v.push(tag);
    v.extend_from_slice(&((payload.len() + 4) as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// NUL-separated fields of a payload.
fn fields(buf: &[u8]) -> Vec<String> {
    let mut v: Vec<String> = buf
        .split(|b| *b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    if v.last().is_some_and(|s| s.is_empty()) {
        v.pop();
    }
    v
}

/// The message of an `E`/`N` payload (`S<severity>\0M<message>\0D<detail>\0...`).
fn error_text(buf: &[u8]) -> String {
    let mut msg = String::new();
    let mut detail = String::new();
    for f in fields(buf) {
        let mut c = f.chars();
        match c.next() {
            Some('M') => msg = c.collect(),
            Some('D') => detail = c.collect(),
            _ => {}
        }
    }
    if detail.is_empty() {
        msg
    } else {
        format!("{msg} ({detail})")
    }
}

impl PcpClient {
    /// Connects and logs in, all within `timeout`.
    pub async fn connect(
        addr: &str,
        creds: &Credentials,
        timeout: Duration,
    ) -> Result<PcpClient, PcpError> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| PcpError::Timeout {
                addr: addr.to_string(),
                ms: timeout.as_millis() as u64,
            })?
            .map_err(|e| PcpError::Connect {
                addr: addr.to_string(),
                message: e.to_string(),
            })?;
        let _ = stream.set_nodelay(true);
        let mut c = PcpClient {
            addr: addr.to_string(),
            stream,
            timeout,
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let login = async {
            c.send(b'M', &[]).await?;
            let (tag, salt) = c.recv().await?;
            if tag != b'm' || salt.len() < 4 {
                return Err(c.protocol(format!("expected a salt, got `{}`", tag as char)));
            }
            // pgpool: md5(md5(md5(password) + user) + salt), each step in hex.
            let pw = md5_hex(creds.password.as_bytes());
            let inner = md5_hex(format!("{pw}{}", creds.user).as_bytes());
            let mut salted = inner.into_bytes();
            salted.extend_from_slice(&salt[..4]);
            let hash = md5_hex(&salted);
            let mut payload = Vec::new();
            payload.extend_from_slice(creds.user.as_bytes());
            payload.push(0);
            payload.extend_from_slice(hash.as_bytes());
            payload.push(0);
            c.send(b'R', &payload).await?;
            match c.recv().await {
                Ok((b'r', body))
                    if fields(&body).first().map(String::as_str) == Some("AuthenticationOK") =>
                {
                    Ok(())
                }
                Ok((b'E', _)) | Err(PcpError::Connect { .. }) => Err(PcpError::Auth {
                    addr: c.addr.clone(),
                    user: creds.user.clone(),
                }),
                Ok((tag, _)) => {
                    Err(c.protocol(format!("unexpected reply `{}` to login", tag as char)))
                }
                Err(e) => Err(e),
            }
        };
        match tokio::time::timeout_at(deadline, login).await {
            Ok(r) => r.map(|_| c),
            Err(_) => Err(PcpError::Timeout {
                addr: addr.to_string(),
                ms: timeout.as_millis() as u64,
            }),
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn protocol(&self, message: String) -> PcpError {
        PcpError::Protocol {
            addr: self.addr.clone(),
            message,
        }
    }

    fn io(&self, e: std::io::Error) -> PcpError {
        PcpError::Connect {
            addr: self.addr.clone(),
            message: e.to_string(),
        }
    }

    async fn send(&mut self, tag: u8, payload: &[u8]) -> Result<(), PcpError> {
        let f = frame(tag, payload);
        let r = self.stream.write_all(&f).await;
        r.map_err(|e| self.io(e))
    }

    async fn recv(&mut self) -> Result<(u8, Vec<u8>), PcpError> {
        loop {
            let mut head = [0u8; 5];
            let r = self.stream.read_exact(&mut head).await;
            r.map_err(|e| self.io(e))?;
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
            if !(4..=1 << 20).contains(&len) {
                return Err(self.protocol(format!("bad message length {len}")));
            }
            let mut body = vec![0u8; len - 4];
            let r = self.stream.read_exact(&mut body).await;
            r.map_err(|e| self.io(e))?;
            if head[0] == b'N' {
                continue; // a notice: informational only
            }
            return Ok((head[0], body));
        }
    }

    async fn with_deadline<T>(
        &mut self,
        f: impl AsyncFnOnce(&mut Self) -> Result<T, PcpError>,
    ) -> Result<T, PcpError> {
        let (addr, ms) = (self.addr.clone(), self.timeout.as_millis() as u64);
        match tokio::time::timeout(self.timeout, f(self)).await {
            Ok(r) => r,
            Err(_) => Err(PcpError::Timeout { addr, ms }),
        }
    }

    /// Every backend pgpool knows, in backend order.
    pub async fn node_info(&mut self) -> Result<Vec<NodeInfo>, PcpError> {
        self.with_deadline(async |c: &mut Self| {
            c.send(b'I', b"-1\0").await?;
            let mut nodes = Vec::new();
            loop {
                let (tag, body) = c.recv().await?;
                if tag == b'E' {
                    return Err(PcpError::Refused {
                        addr: c.addr.clone(),
                        what: "node info".into(),
                        message: error_text(&body),
                    });
                }
                if tag != b'i' {
                    return Err(c.protocol(format!("unexpected `{}` in node info", tag as char)));
                }
                let f = fields(&body);
                match f.first().map(String::as_str) {
                    Some("ArraySize") => {}
                    Some("CommandComplete") => return Ok(nodes),
                    Some("NodeInfo") if f.len() >= 9 => {
                        // NodeInfo, host, port, status, quarantine, pg_status, weight, role,
                        // pg_role, ... (role: 0 main, 1 replica, 2 primary, 3 standby)
                        let code = f[3].parse::<i64>().unwrap_or(0);
                        let quarantine = f[4] == "1";
                        nodes.push(NodeInfo {
                            host: f[1].clone(),
                            port: f[2].parse().unwrap_or(0),
                            status: if quarantine {
                                PoolStatus::Down
                            } else {
                                PoolStatus::from_code(code)
                            },
                            primary: f[7] == "2",
                            pg_role: f[8].clone(),
                        });
                    }
                    _ => return Err(c.protocol("malformed node info".into())),
                }
            }
        })
        .await
    }

    async fn command(&mut self, tag: u8, payload: Vec<u8>, what: String) -> Result<(), PcpError> {
        self.with_deadline(async move |c: &mut Self| {
            c.send(tag, &payload).await?;
            let (rtag, body) = c.recv().await?;
            match rtag {
                b'E' => Err(PcpError::Refused {
                    addr: c.addr.clone(),
                    what,
                    message: error_text(&body),
                }),
                b'c' | b'd'
                    if fields(&body).first().map(String::as_str) == Some("CommandComplete") =>
                {
                    Ok(())
                }
                other => Err(c.protocol(format!("unexpected `{}` after {what}", other as char))),
            }
        })
        .await
    }

    /// Queues "stop sending anything to backend `node`" (`pcp_detach_node`).
    pub async fn detach(&mut self, node: usize) -> Result<(), PcpError> {
        self.command(
            b'D',
            format!("{node}\0").into_bytes(),
            format!("detach node {node}"),
        )
        .await
    }

    /// Queues "use backend `node` again" (`pcp_attach_node`).
    pub async fn attach(&mut self, node: usize) -> Result<(), PcpError> {
        self.command(
            b'C',
            format!("{node}\0").into_bytes(),
            format!("attach node {node}"),
        )
        .await
    }

    /// Queues "route writes to backend `node`" (`pcp_promote_node` without `-s`: pgpool does
    /// not touch postgres; it marks the other nodes down and drops existing sessions).
    pub async fn promote(&mut self, node: usize) -> Result<(), PcpError> {
        self.command(
            b'J',
            format!("{node} \0n").into_bytes(),
            format!("promote node {node}"),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_matches_pg_md5() {
        // `pg_md5 secret` prints this.
        assert_eq!(md5_hex(b"secret"), "5ebe2294ecd0e0f08eab7690d2a6ee69");
    }

    #[test]
    fn frames_count_their_own_length() {
        assert_eq!(frame(b'I', b"-1\0"), vec![b'I', 0, 0, 0, 7, b'-', b'1', 0]);
    }

    #[test]
    fn error_payloads_are_readable() {
        let body = b"SERROR\0Minvalid promote request\0Dnode 1 is already primary\0\0";
        assert_eq!(
            error_text(body),
            "invalid promote request (node 1 is already primary)"
        );
    }

    #[test]
    fn credentials_do_not_print_the_password() {
        let c = Credentials {
            user: "pgw".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
