//! The shipped HAProxy configuration (`deploy/haproxy/haproxy.cfg`) with its example addresses
//! replaced by real ones: used by `pgwctl demo` and by the test that runs it.

use crate::CliError;

/// `deploy/haproxy/haproxy.cfg` as shipped.
pub const SHIPPED: &str = include_str!("../../../deploy/haproxy/haproxy.cfg");

/// One server: its PostgreSQL address and its watcher's HTTP address (`host:port` each).
#[derive(Debug, Clone)]
pub struct Server {
    pub postgres: String,
    pub http: String,
}

/// `shipped` with the write and read listeners bound to `write` and `read` and the example's
/// three servers (`10.N.0.11:5432`, checked on port 7401) replaced by `servers`, in order.
/// Refuses when an example address would be left behind.
pub fn render(
    shipped: &str,
    write: &str,
    read: &str,
    servers: &[Server],
) -> Result<String, CliError> {
    let mut text = shipped
        .replace("bind 0.0.0.0:5000", &format!("bind {write}"))
        .replace("bind 0.0.0.0:5001", &format!("bind {read}"));
    for (i, s) in servers.iter().enumerate() {
        let (ip, port) = s.http.rsplit_once(':').ok_or_else(|| {
            CliError::Usage(format!("`{}` is not a host:port HTTP address", s.http))
        })?;
        text = text.replace(
            &format!("10.{}.0.11:5432 check port 7401", i + 1),
            &format!("{} check addr {ip} port {port}", s.postgres),
        );
    }
    if text.contains(" 10.") || text.contains("0.0.0.0") {
        return Err(CliError::Usage(format!(
            "the HAProxy example has more servers or listeners than the {} given",
            servers.len()
        )));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_example_address_is_replaced() {
        let servers: Vec<Server> = (1..=3)
            .map(|i| Server {
                postgres: format!("127.0.0.{i}:6000"),
                http: format!("127.0.0.{i}:7000"),
            })
            .collect();
        let t = render(SHIPPED, "127.0.0.1:5000", "127.0.0.1:5001", &servers).expect("render");
        assert!(
            t.contains("server room-b 127.0.0.2:6000 check addr 127.0.0.2 port 7000"),
            "{t}"
        );
        assert!(t.contains("bind 127.0.0.1:5001"));
        assert!(render(SHIPPED, "a:1", "b:2", &servers[..2]).is_err());
    }
}
