//! Reads the local PostgreSQL's state over one persistent connection.

use std::collections::BTreeMap;
use std::time::Duration;

use pgw_core::failover::PgRole;
use tokio_postgres::{Client, NoTls};

use super::pgctl::{pid_alive, PgAddr, PgCtl};

/// What postgres is doing right now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Local {
    pub role: Option<PgRole>,
    pub timeline: u32,
    pub flush_lsn: u64,
    pub replay_lsn: u64,
    pub streaming: bool,
    /// A walreceiver process exists (in any state): the received LSN may still grow.
    pub receiving: bool,
    /// Member the walreceiver streams from, if any.
    pub upstream: Option<String>,
    pub standbys: BTreeMap<String, pgw_core::failover::SyncState>,
    /// The postmaster is alive but does not answer.
    pub unresponsive: bool,
    /// The server answered but refused us (authentication, too many connections, starting up
    /// or shutting down, a TLS mismatch, ...): it is running, just not observable by us now.
    /// Never a reason to treat it as hung.
    pub refused: Option<String>,
    /// The postmaster died without a clean shutdown (its pid file remains).
    pub died: bool,
    /// Replicas: how far replay trails the upstream's commits, in ms (0: all replayed).
    pub replay_lag_ms: Option<u64>,
}

/// Parses `X/Y` into a 64-bit LSN.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

pub fn format_lsn(l: u64) -> String {
    format!("{:X}/{:X}", l >> 32, l & 0xffff_ffff)
}

const QUERY: &str = "SELECT pg_is_in_recovery(),
  (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() ELSE pg_current_wal_flush_lsn() END)::text,
  pg_last_wal_replay_lsn()::text,
  (SELECT timeline_id FROM pg_control_checkpoint()),
  (CASE WHEN pg_is_in_recovery() THEN NULL ELSE substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END),
  (SELECT status FROM pg_stat_wal_receiver LIMIT 1),
  (SELECT received_tli FROM pg_stat_wal_receiver LIMIT 1),
  (SELECT sender_host || ':' || sender_port FROM pg_stat_wal_receiver LIMIT 1),
  (CASE WHEN NOT pg_is_in_recovery() THEN NULL
        WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0
        ELSE (extract(epoch FROM now() - pg_last_xact_replay_timestamp()) * 1000)::bigint END)";

/// Keeps a connection to the local server and reads its state.
pub struct Observer {
    client: Option<Client>,
    /// Last timeline seen from the walreceiver (survives the receiver stopping).
    last_rx_tli: u32,
}

impl Observer {
    pub fn new() -> Self {
        Self {
            client: None,
            last_rx_tli: 0,
        }
    }

    /// Connects to the local server. `Err(Some(why))`: it answered and refused us;
    /// `Err(None)`: no answer within the limit (only that may be a hang).
    async fn connect(ctl: &PgCtl) -> Result<Client, Option<String>> {
        let cfg = ctl.local_config().map_err(|e| Some(e.to_string()))?;
        let fut = cfg.connect(NoTls);
        match tokio::time::timeout(Duration::from_millis(1000), fut).await {
            Ok(Ok((client, conn))) => {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Ok(client)
            }
            Ok(Err(e)) => Err(Some(refusal(&e))),
            Err(_) => Err(None),
        }
    }

    pub fn reset(&mut self) {
        self.client = None;
    }

    /// Observes the server; `members_pg` maps upstream addresses back to member names.
    pub async fn observe(&mut self, ctl: &PgCtl, members_pg: &BTreeMap<String, PgAddr>) -> Local {
        let mut l = Local::default();
        if !ctl.has_cluster() {
            l.role = Some(PgRole::Empty);
            return l;
        }
        let pm = ctl.postmaster_pid();
        let alive = pm.is_some_and(pid_alive);
        if !alive {
            self.client = None;
            l.role = Some(PgRole::Down);
            l.died = ctl.has_pid_file();
            return l;
        }
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            match Self::connect(ctl).await {
                Ok(c) => self.client = Some(c),
                Err(why) => {
                    self.client = None;
                    match why {
                        // It answered: running, but not letting us in.
                        Some(r) => l.refused = Some(r),
                        // Alive but no answer at all: possibly hung.
                        None => l.unresponsive = true,
                    }
                    return l;
                }
            }
        }
        let Some(client) = self.client.as_ref() else {
            l.unresponsive = true;
            return l;
        };
        let row =
            match tokio::time::timeout(Duration::from_millis(1000), client.query_one(QUERY, &[]))
                .await
            {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    // An error answer (our session was terminated, a permission...).
                    self.client = None;
                    l.refused = Some(refusal(&e));
                    return l;
                }
                Err(_) => {
                    self.client = None;
                    l.unresponsive = true;
                    return l;
                }
            };
        let rec: bool = row.get(0);
        let flush: Option<String> = row.get(1);
        let replay: Option<String> = row.get(2);
        let ckpt_tli: Option<i32> = row.get(3);
        let cur_tli: Option<String> = row.get(4);
        let wr_status: Option<String> = row.get(5);
        let wr_tli: Option<i32> = row.get(6);
        let upstream: Option<String> = row.get(7);
        let lag: Option<i64> = row.get(8);
        l.replay_lag_ms = lag.map(|x| x.max(0) as u64);
        l.replay_lsn = replay.as_deref().and_then(parse_lsn).unwrap_or(0);
        l.flush_lsn = flush
            .as_deref()
            .and_then(parse_lsn)
            .unwrap_or(0)
            .max(l.replay_lsn);
        if rec {
            l.role = Some(PgRole::Replica);
            l.streaming = wr_status.as_deref() == Some("streaming");
            l.receiving = wr_status.is_some();
            if let Some(t) = wr_tli {
                self.last_rx_tli = self.last_rx_tli.max(t as u32);
            }
            l.timeline = self.last_rx_tli.max(ckpt_tli.unwrap_or(0) as u32);
            if l.streaming {
                l.upstream = upstream.and_then(|u| {
                    let a = PgAddr::parse(&u)?;
                    members_pg
                        .iter()
                        .find(|(_, x)| **x == a)
                        .map(|(m, _)| m.clone())
                });
            }
        } else {
            l.role = Some(PgRole::Primary);
            l.timeline = cur_tli
                .as_deref()
                .and_then(|t| u32::from_str_radix(t, 16).ok())
                .unwrap_or(ckpt_tli.unwrap_or(0) as u32);
            // Only standbys that answered recently count (status every 1 s, see pgw.conf).
            let q = "SELECT application_name, sync_state FROM pg_stat_replication \
                     WHERE reply_time > now() - interval '3 seconds'";
            if let Ok(Ok(rows)) =
                tokio::time::timeout(Duration::from_millis(1000), client.query(q, &[])).await
            {
                for r in rows {
                    let name: Option<String> = r.get(0);
                    let st: Option<String> = r.get(1);
                    if let (Some(n), Some(s)) = (name, st) {
                        l.standbys
                            .insert(n, pgw_core::failover::SyncState::parse(&s));
                    }
                }
            }
        }
        l
    }
}

/// Why the server refused us, as an operator reads it: the server's message and SQLSTATE
/// (28P01 bad password, 28000 no hba entry, 53300 too many connections, 57P03 starting up or
/// shutting down, ...), or the client-side reason (TLS, connection refused).
pub fn refusal(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(c) = src {
                s.push_str(": ");
                s.push_str(&c.to_string());
                src = c.source();
            }
            s
        }
    }
}

impl Default for Observer {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trip() {
        assert_eq!(parse_lsn("0/3000148"), Some(0x3000148));
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374D848));
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("nonsense"), None);
    }
}
