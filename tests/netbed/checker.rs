//! The consistency checker that runs during every scenario.
//!
//! - Writers in the client namespace write numbered rows through each room's pgpool and straight
//!   to each postgres server; each write returns the server that committed it
//!   (`inet_server_addr()`), and every acknowledged id is recorded with that server and with when
//!   it was sent and acknowledged.
//! - Split-brain probe: the group's history says who was primary when (each `primary := X` record
//!   opens X's period, the next `primary :=` record closes it; times are the proposer's wall
//!   clock, the same machine's clock as the writers'). A server that acknowledges a write it was
//!   sent after its period closed was accepting writes while another server could be: a
//!   split-brain window. The lease rule says this never happens (the old primary has fenced
//!   itself before the group names anyone else).
//! - After healing: the cluster must be healthy again (every member answering, every data member
//!   the primary or a sync replica, every pgpool agreeing) and every acknowledged id must be on
//!   the final primary.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgw_cli::writer::{create_table, ids_on, next_id, spawn_writer_paced, Ack, Acks};

use super::Bed;

const PACE: Duration = Duration::from_millis(10);
const WRITER_LIMIT: Duration = Duration::from_secs(600);
const IDS_PER_WRITER: i64 = 1_000_000;
const PROBE_BASE: i64 = 1_000_000_000;
const PROBE_EVERY: Duration = Duration::from_millis(50);

async fn connect_or_panic(addr: &str) -> tokio_postgres::Client {
    pgw_cli::writer::try_connect(addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Writes to one server every `PROBE_EVERY` with `synchronous_commit = local` until `stop`
/// (bounded by `WRITER_LIMIT`), recording every acknowledgement.
async fn probe(addr: String, stop: Arc<AtomicBool>, acks: Acks, first: i64) {
    let t0 = Instant::now();
    let mut id = first;
    let mut conn: Option<tokio_postgres::Client> = None;
    while !stop.load(Ordering::Relaxed) && t0.elapsed() < WRITER_LIMIT {
        tokio::time::sleep(PROBE_EVERY).await;
        if conn.as_ref().is_none_or(|c| c.is_closed()) {
            conn = match pgw_cli::writer::try_connect(&addr).await {
                Ok(c) => match c.batch_execute("SET synchronous_commit TO local").await {
                    Ok(()) => Some(c),
                    Err(_) => None,
                },
                Err(_) => None,
            };
        }
        let Some(c) = conn.as_ref() else { continue };
        let (sent, sent_wall_ms) = (Instant::now(), pgw_cli::writer::wall_ms());
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
        let q = c.query_one(
            "INSERT INTO probe (id) VALUES ($1) RETURNING host(inet_server_addr()) || ':' || inet_server_port()",
            &params,
        );
        match tokio::time::timeout(Duration::from_secs(1), q).await {
            Ok(Ok(row)) => {
                if let Ok(mut g) = acks.0.lock() {
                    g.push(Ack {
                        id,
                        server: addr.clone(),
                        backend: row.try_get(0).unwrap_or_default(),
                        sent,
                        sent_wall_ms,
                        at: Instant::now(),
                        wall_ms: pgw_cli::writer::wall_ms(),
                    });
                }
                id += 1;
            }
            // Read-only (a replica), a duplicate id from before a failover, a dead server.
            Ok(Err(_)) => id += 1,
            Err(_) => conn = None,
        }
    }
}

pub struct Writer {
    /// `pgpool room-a` or `direct room-b`.
    pub label: String,
    /// The room whose pgpool it writes through (None: straight to a server).
    pub pgpool_room: Option<String>,
    pub acks: Acks,
    handle: tokio::task::JoinHandle<()>,
}

pub struct Checker {
    stop: Arc<AtomicBool>,
    pub writers: Vec<Writer>,
    /// Split-brain probes: one per server, writing with `synchronous_commit = local`, so a
    /// server that still runs as primary acknowledges even when cut off from its standbys (the
    /// synchronous writers could not show it). Not durable: left out of the loss check.
    pub probes: Vec<Writer>,
    pub started: Instant,
}

/// A primary period from the group's history (wall-clock ms).
#[derive(Debug, Clone)]
pub struct Period {
    pub member: String,
    pub epoch: u64,
    pub start_ms: u64,
    pub end_ms: Option<u64>,
}

#[derive(Debug)]
pub struct Report {
    pub acked: usize,
    pub lost: Vec<i64>,
    pub split_brain: Vec<String>,
    pub split_brain_windows: usize,
    pub final_primary: String,
    pub periods: Vec<Period>,
    /// The group's history at the end (`index at_ms event`), printed by `print`.
    pub history: Vec<String>,
    /// (at_ms, epoch) of every record that moved the epoch.
    pub history_epochs: Vec<(u64, u64)>,
}

impl Report {
    pub fn print(&self, scenario: &str) {
        eprintln!(
            "{scenario}: {} writes acknowledged, {} lost, {} split-brain windows, final primary {}; history:\n  {}",
            self.acked,
            self.lost.len(),
            self.split_brain_windows,
            self.final_primary,
            self.history.join("\n  ")
        );
    }

    /// Primary changes (epoch moves) recorded after `since_ms`.
    pub fn epoch_moves_since(&self, since_ms: u64) -> usize {
        self.history_epochs
            .iter()
            .filter(|(at, _)| *at > since_ms)
            .count()
    }

    /// Fails the test on any lost acknowledged write or split-brain window.
    pub fn assert_safe(&self) {
        assert!(
            self.split_brain.is_empty(),
            "split brain: {} window(s):\n{}\nprimary periods: {:#?}",
            self.split_brain_windows,
            self.split_brain.join("\n"),
            self.periods
        );
        assert!(
            self.lost.is_empty(),
            "{} acknowledged writes missing on the final primary {}: {:?}",
            self.lost.len(),
            self.final_primary,
            &self.lost[..self.lost.len().min(20)]
        );
        assert!(self.acked > 0, "no write was acknowledged at all");
    }
}

impl Checker {
    /// Starts the writers (the cluster must have a primary).
    pub async fn start(bed: &Bed) -> Checker {
        let s = bed.wait_healthy(Duration::from_secs(120)).await;
        let p = crate::common::primary_of(&s).expect("primary");
        let paddr = bed.hosts[bed.index_of(&p)].pg_addr();
        create_table(&paddr).await.expect("create the table");
        let first = next_id(&paddr).await;
        let stop = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::new();
        let mut k = 0;
        for i in bed.data_members() {
            let h = &bed.hosts[i];
            for (label, addr, room) in [
                (
                    format!("pgpool {}", h.name()),
                    h.pgpool_addr(),
                    Some(h.name().to_string()),
                ),
                (format!("direct {}", h.name()), h.pg_addr(), None),
            ] {
                let (acks, handle) = spawn_writer_paced(
                    vec![addr],
                    stop.clone(),
                    first + k * IDS_PER_WRITER,
                    IDS_PER_WRITER,
                    WRITER_LIMIT,
                    PACE,
                );
                k += 1;
                writers.push(Writer {
                    label,
                    pgpool_room: room,
                    acks,
                    handle,
                });
            }
        }
        let c = connect_or_panic(&paddr).await;
        c.batch_execute("CREATE TABLE IF NOT EXISTS probe (id bigint PRIMARY KEY)")
            .await
            .expect("create the probe table");
        let mut probes = Vec::new();
        for (n, i) in bed.data_members().into_iter().enumerate() {
            let h = &bed.hosts[i];
            let acks = Acks::default();
            let handle = tokio::spawn(probe(
                h.pg_addr(),
                stop.clone(),
                acks.clone(),
                PROBE_BASE + n as i64 * IDS_PER_WRITER,
            ));
            probes.push(Writer {
                label: format!("probe {}", h.name()),
                pgpool_room: None,
                acks,
                handle,
            });
        }
        Checker {
            stop,
            writers,
            probes,
            started: Instant::now(),
        }
    }

    /// Every acknowledged write so far.
    pub fn acks(&self) -> Vec<Ack> {
        self.writers.iter().flat_map(|w| w.acks.all()).collect()
    }

    /// The earliest acknowledgement of a write sent after `t` through the pgpool of one of
    /// `rooms` that `pick` accepts.
    fn first_via(&self, rooms: &[String], t: Instant, pick: impl Fn(&Ack) -> bool) -> Option<Ack> {
        self.writers
            .iter()
            .filter(|w| w.pgpool_room.as_ref().is_some_and(|r| rooms.contains(r)))
            .filter_map(|w| w.acks.all().into_iter().find(|a| a.sent > t && pick(a)))
            .min_by_key(|a| a.at)
    }

    /// The first write acknowledged after `t` by server `backend` through the pgpool of one of
    /// `rooms`.
    pub fn first_via_pgpool(&self, rooms: &[String], backend: &str, t: Instant) -> Option<Ack> {
        self.first_via(rooms, t, |a| a.backend == backend)
    }

    /// Waits (bounded) until a write sent after `t` is acknowledged by any server other than
    /// `not` through the pgpool of one of `rooms`; returns it.
    pub async fn wait_write_via(
        &self,
        rooms: &[String],
        not: Option<&str>,
        t: Instant,
        limit: Duration,
    ) -> Ack {
        let t0 = Instant::now();
        loop {
            let hit = self.first_via(rooms, t, |a| Some(a.backend.as_str()) != not);
            if let Some(a) = hit {
                return a;
            }
            assert!(
                t0.elapsed() < limit,
                "no write through the pgpool of {rooms:?} acknowledged within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the writers, waits until the cluster is healthy again, and checks everything.
    pub async fn finish(self, bed: &Bed) -> Report {
        self.stop.store(true, Ordering::SeqCst);
        wait_done(&self.writers, Duration::from_secs(10)).await;
        let s = bed.wait_healthy(Duration::from_secs(180)).await;
        let primary = crate::common::primary_of(&s).expect("primary");
        let paddr = bed.hosts[bed.index_of(&primary)].pg_addr();
        wait_done(&self.probes, Duration::from_secs(5)).await;
        let acks = self.acks();
        let probe_acks: Vec<Ack> = self.probes.iter().flat_map(|w| w.acks.all()).collect();
        let have: BTreeSet<i64> = ids_on(&paddr).await.into_iter().collect();
        assert!(!have.is_empty() || acks.is_empty(), "cannot read {paddr}");
        let mut lost: Vec<i64> = acks
            .iter()
            .map(|a| a.id)
            .filter(|id| !have.contains(id))
            .collect();
        lost.sort_unstable();
        let entries = history(bed).await;
        let periods = periods_of(&entries);
        let mut all = acks.clone();
        all.extend(probe_acks);
        let (split_brain, windows) = split_brain(bed, &all, &periods);
        let mut last = 0;
        let mut history_epochs = Vec::new();
        for e in &entries {
            if e.epoch > last {
                last = e.epoch;
                history_epochs.push((e.at_ms, e.epoch));
            }
        }
        Report {
            acked: acks.len(),
            lost,
            split_brain,
            split_brain_windows: windows,
            final_primary: primary,
            periods,
            history: entries
                .iter()
                .map(|e| format!("{} {} {}", e.log_index, e.at_ms, e.event))
                .collect(),
            history_epochs,
        }
    }
}

/// Waits (each at most `limit`) until the writers' tasks have ended after `stop`.
async fn wait_done(writers: &[Writer], limit: Duration) {
    for w in writers {
        let t0 = Instant::now();
        while !w.handle.is_finished() && t0.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The group's history (the newest 256 records), oldest first: the longest any member has (a
/// member that lags must not hide a record).
pub async fn history(bed: &Bed) -> Vec<pgw_proto::HistoryEntry> {
    let mut entries: Vec<pgw_proto::HistoryEntry> = Vec::new();
    for ep in bed.endpoints() {
        let Ok(mut c) = pgw_cli::status::connect(&ep, Duration::from_secs(1)).await else {
            continue;
        };
        if let Ok(h) = c
            .history(pgw_proto::HistoryRequest {
                cluster: String::new(),
                limit: 256,
            })
            .await
        {
            let e = h.into_inner().entries;
            let last = |v: &[pgw_proto::HistoryEntry]| v.iter().map(|x| x.log_index).max();
            if last(&e) > last(&entries) {
                entries = e;
            }
        }
    }
    entries.sort_by_key(|e| e.log_index);
    entries
}

/// The primary periods in the group's history.
pub fn periods_of(entries: &[pgw_proto::HistoryEntry]) -> Vec<Period> {
    let mut out: Vec<Period> = Vec::new();
    for e in entries {
        let Some(rest) = e.event.strip_prefix("primary := ") else {
            continue;
        };
        // A primary's period ends when the group names the next primary (a release in between,
        // such as a switchover's fence or a lost primary's release, does not end it: nobody
        // else can write until the next primary is named).
        if let Some(last) = out.last_mut() {
            if last.end_ms.is_none() {
                last.end_ms = Some(e.at_ms);
            }
        }
        let member = rest.split_whitespace().next().unwrap_or_default();
        out.push(Period {
            member: member.to_string(),
            epoch: e.epoch,
            start_ms: e.at_ms,
            end_ms: None,
        });
    }
    out
}

/// Acknowledged writes outside the acknowledging server's primary periods, and how many
/// distinct windows (server, the period it outlived) they fall in.
pub fn split_brain(bed: &Bed, acks: &[Ack], periods: &[Period]) -> (Vec<String>, usize) {
    let mut out = Vec::new();
    let mut windows = BTreeSet::new();
    for a in acks {
        let member = bed
            .member_at(&a.backend)
            .unwrap_or_else(|| a.backend.clone());
        let inside = periods.iter().any(|p| {
            p.member == member
                && p.start_ms <= a.wall_ms
                && p.end_ms.is_none_or(|end| a.sent_wall_ms < end)
        });
        if !inside {
            let outlived = periods
                .iter()
                .filter(|p| p.member == member && p.start_ms <= a.wall_ms)
                .map(|p| p.epoch)
                .next_back()
                .unwrap_or(0);
            windows.insert((member.clone(), outlived));
            if out.len() < 20 {
                out.push(format!(
                    "{member} acknowledged id {} (sent at {} ms, acknowledged at {} ms via {}) outside its primary periods",
                    a.id, a.sent_wall_ms, a.wall_ms, a.server
                ));
            }
        }
    }
    (out, windows.len())
}
