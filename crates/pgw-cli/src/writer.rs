//! A bounded writer that records every acknowledged id and the server that acknowledged it, and
//! the checks run after a fault. Used by `pgwctl demo failover`, the tests and the benchmarks.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

pub async fn connect(addr: &str) -> Option<Client> {
    try_connect(addr).await.ok()
}

/// Connects to `addr` (`host:port`) as `postgres` within 2 s; the error says why not.
pub async fn try_connect(addr: &str) -> Result<Client, String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("`{addr}` is not host:port"))?;
    let ci = format!("host={host} port={port} user=postgres dbname=postgres connect_timeout=1");
    let (c, conn) =
        tokio::time::timeout(Duration::from_secs(2), tokio_postgres::connect(&ci, NoTls))
            .await
            .map_err(|_| format!("connect to {addr}: no answer within 2 s"))?
            .map_err(|e| format!("connect to {addr}: {}", pg_error_text(&e)))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(c)
}

/// A postgres error with the server's message or the underlying cause (tokio-postgres' own
/// `Display` says only "db error" / "error connecting to server").
pub fn pg_error_text(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    match std::error::Error::source(e) {
        Some(src) => format!("{e}: {src}"),
        None => e.to_string(),
    }
}

/// One acknowledged write.
#[derive(Debug, Clone)]
pub struct Ack {
    pub id: i64,
    /// The address the write was sent to (a postgres server or a pgpool).
    pub server: String,
    /// The postgres server that acknowledged it (`host:port`, from the server itself: through
    /// a pgpool this is the backend pgpool chose).
    pub backend: String,
    /// When the statement was sent (the server committed it between `sent` and `at`).
    pub sent: Instant,
    /// `sent` as wall-clock milliseconds since the epoch.
    pub sent_wall_ms: u64,
    pub at: Instant,
    /// Wall-clock milliseconds since the epoch (to compare with the group's history).
    pub wall_ms: u64,
}

/// A failed write attempt (the session saw an error or a timeout).
#[derive(Debug, Clone)]
pub struct WriteError {
    pub server: String,
    pub at: Instant,
    pub message: String,
}

pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Clone, Default)]
pub struct Acks(pub Arc<Mutex<Vec<Ack>>>, pub Arc<Mutex<Vec<WriteError>>>);

impl Acks {
    pub fn errors(&self) -> Vec<WriteError> {
        self.1.lock().map(|g| g.clone()).unwrap_or_default()
    }
    fn error(&self, server: &str, message: String) {
        if let Ok(mut g) = self.1.lock() {
            if g.len() < 10_000 {
                g.push(WriteError {
                    server: server.to_string(),
                    at: Instant::now(),
                    message,
                });
            }
        }
    }
    pub fn all(&self) -> Vec<Ack> {
        self.0.lock().map(|g| g.clone()).unwrap_or_default()
    }
    pub fn count_after(&self, t: Instant) -> usize {
        self.all().iter().filter(|a| a.at > t).count()
    }
    pub fn first_after(&self, t: Instant) -> Option<Ack> {
        self.all().into_iter().find(|a| a.at > t)
    }
}

/// Creates the table on `primary`.
pub async fn create_table(primary: &str) -> Result<(), String> {
    let c = connect(primary)
        .await
        .ok_or_else(|| format!("cannot connect to {primary}"))?;
    c.batch_execute(
        "CREATE TABLE IF NOT EXISTS acked (id bigint PRIMARY KEY, at timestamptz DEFAULT now())",
    )
    .await
    .map_err(|e| format!("{primary}: {e}"))
}

/// The id after the largest one already in the table on `primary`.
pub async fn next_id(primary: &str) -> i64 {
    let Some(c) = connect(primary).await else {
        return 1;
    };
    c.query_one("SELECT coalesce(max(id), 0) + 1 FROM acked", &[])
        .await
        .map(|r| r.get::<_, i64>(0))
        .unwrap_or(1)
}

/// Writes ids 1.. through whichever server accepts them, until `stop`, at most `max` ids or
/// `limit` time. Each statement has a 2 s timeout so a hung server cannot stall it forever.
pub fn spawn_writer(
    servers: Vec<String>,
    stop: Arc<AtomicBool>,
    max: i64,
    limit: Duration,
) -> (Acks, tokio::task::JoinHandle<()>) {
    spawn_writer_from(servers, stop, 1, max, limit)
}

/// [`spawn_writer`] starting at id `first`.
pub fn spawn_writer_from(
    servers: Vec<String>,
    stop: Arc<AtomicBool>,
    first: i64,
    max: i64,
    limit: Duration,
) -> (Acks, tokio::task::JoinHandle<()>) {
    spawn_writer_paced(servers, stop, first, max, limit, Duration::ZERO)
}

/// [`spawn_writer_from`] that waits `pace` after every acknowledged write (bounds the load).
pub fn spawn_writer_paced(
    servers: Vec<String>,
    stop: Arc<AtomicBool>,
    first: i64,
    max: i64,
    limit: Duration,
    pace: Duration,
) -> (Acks, tokio::task::JoinHandle<()>) {
    let acks = Acks::default();
    let a2 = acks.clone();
    let h = tokio::spawn(async move {
        let t0 = Instant::now();
        let mut id = first;
        let mut conns: BTreeMap<String, Client> = BTreeMap::new();
        let mut cursor = 0usize;
        while !stop.load(Ordering::Relaxed) && id < first + max && t0.elapsed() < limit {
            let server = servers[cursor % servers.len()].clone();
            if !conns.contains_key(&server) {
                match try_connect(&server).await {
                    Ok(c) => {
                        conns.insert(server.clone(), c);
                    }
                    Err(e) => {
                        a2.error(&server, e);
                        cursor += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                }
            }
            let Some(c) = conns.get(&server) else {
                continue;
            };
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
            let (sent, sent_wall_ms) = (Instant::now(), wall_ms());
            let q = c.query_one(
                "INSERT INTO acked (id) VALUES ($1) RETURNING host(inet_server_addr()) || ':' || inet_server_port()",
                &params,
            );
            match tokio::time::timeout(Duration::from_secs(2), q).await {
                Ok(Ok(row)) => {
                    let backend: String = row.try_get(0).unwrap_or_default();
                    if let Ok(mut g) = a2.0.lock() {
                        g.push(Ack {
                            id,
                            server: server.clone(),
                            backend,
                            sent,
                            sent_wall_ms,
                            at: Instant::now(),
                            wall_ms: wall_ms(),
                        });
                    }
                    id += 1;
                    if !pace.is_zero() {
                        tokio::time::sleep(pace).await;
                    }
                }
                Ok(Err(e)) => {
                    a2.error(&server, pg_error_text(&e));
                    let dup = e.code().is_some_and(|c| c.code() == "23505");
                    if dup {
                        // Committed earlier but the ack was lost; the id is durable: move on.
                        id += 1;
                    } else {
                        if c.is_closed() {
                            conns.remove(&server);
                        }
                        cursor += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                Err(_) => {
                    a2.error(&server, "no answer within 2 s".into());
                    // Hung (e.g. waiting for a sync standby): the outcome is unknown, not acked.
                    conns.remove(&server);
                    cursor += 1;
                }
            }
        }
    });
    (acks, h)
}

/// Ids present on `server`.
pub async fn ids_on(server: &str) -> Vec<i64> {
    let Some(c) = connect(server).await else {
        return Vec::new();
    };
    match c.query("SELECT id FROM acked ORDER BY id", &[]).await {
        Ok(rows) => rows.iter().map(|r| r.get::<_, i64>(0)).collect(),
        Err(_) => Vec::new(),
    }
}

/// Whether `server` answers as a writable primary.
pub async fn is_primary(server: &str) -> Option<bool> {
    let c = connect(server).await?;
    let r = tokio::time::timeout(
        Duration::from_secs(2),
        c.query_one("SELECT pg_is_in_recovery()", &[]),
    )
    .await
    .ok()?
    .ok()?;
    Some(!r.get::<_, bool>(0))
}

/// Checks that every acknowledged id is on `primary`; returns how many were missing.
pub async fn missing_acks(acks: &Acks, primary: &str) -> Vec<i64> {
    let have: std::collections::BTreeSet<i64> = ids_on(primary).await.into_iter().collect();
    acks.all()
        .iter()
        .map(|a| a.id)
        .filter(|id| !have.contains(id))
        .collect()
}
