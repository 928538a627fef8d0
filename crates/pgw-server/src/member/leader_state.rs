//! What the leader keeps beside the committed facts: the latest sidecar reports (observed
//! state), lease grants, the moment it became leader, why a decision waits, and which primary
//! moves are in flight. Followers keep nothing here.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use pgw_core::failover::Observation;
use tokio::sync::Notify;
use tokio::time::Instant;

#[derive(Default)]
struct Inner {
    /// cluster -> member -> (latest report, leader-clock ms when it arrived)
    reports: BTreeMap<String, BTreeMap<String, (Observation, u64)>>,
    /// cluster -> leader-clock ms of the last lease grant to its primary
    granted: BTreeMap<String, u64>,
    /// Whether we were leader at the last check, and since when.
    leader_since: Option<u64>,
    /// cluster -> why the last decision had to wait (for logs and status)
    waiting: BTreeMap<String, String>,
    /// cluster -> epoch at which a proposal that moves the primary record is in flight: no
    /// lease is granted at that epoch meanwhile (the decision used the grants before it).
    replacing: BTreeMap<String, u64>,
}

/// Longer than any report can travel: a sidecar gives up on a report at its fence point
/// (`lease_ms - fence_budget_ms`), and a relay adds at most `lease_ms` (both far below this with
/// any sane lease). A run numbered lower than the previous one (a wall-clock step back across a
/// watcher restart) is heard again after this.
const REPORT_IN_FLIGHT_MS: u64 = 5_000;

/// Shared leader-side failover state (empty on followers).
#[derive(Clone)]
pub struct LeaderState {
    inner: Arc<Mutex<Inner>>,
    base: Instant,
    pub wake: Arc<Notify>,
}

impl Default for LeaderState {
    fn default() -> Self {
        Self::new()
    }
}

impl LeaderState {
    pub fn new() -> Self {
        Self {
            inner: Arc::default(),
            base: Instant::now(),
            wake: Arc::new(Notify::new()),
        }
    }

    /// Leader monotonic clock in ms.
    pub fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    /// Keeps a report unless an older one would replace a newer one. Returns whether it may
    /// renew a lease: a report strictly newer (same run, later sequence; or a later run) than
    /// the kept one; one kept only because the kept one has aged (a restarted sidecar whose
    /// clock stepped back) counts only when it came straight from its member (`direct`), never
    /// when relayed, so a relayed copy replayed later cannot renew anything.
    pub fn record_report(&self, obs: Observation, direct: bool) -> bool {
        let now = self.now_ms();
        let mut renews = false;
        if let Ok(mut g) = self.inner.lock() {
            let per = g.reports.entry(obs.cluster.clone()).or_default();
            let (newer, replaces) = match per.get(&obs.member) {
                None => (true, true),
                Some((old, at)) => (
                    (obs.incarnation, obs.seq) > (old.incarnation, old.seq),
                    obs.supersedes(old, now.saturating_sub(*at), REPORT_IN_FLIGHT_MS),
                ),
            };
            if replaces {
                renews = newer || direct;
                per.insert(obs.member.clone(), (obs, now));
            }
        }
        self.wake.notify_one();
        renews
    }

    /// Records a lease grant to `cluster`'s primary at `epoch`; false (no grant) while a
    /// proposal that moves the primary record at that epoch is in flight.
    pub fn record_grant(&self, cluster: &str, epoch: u64) -> bool {
        let now = self.now_ms();
        let Ok(mut g) = self.inner.lock() else {
            return false;
        };
        if g.replacing.get(cluster) == Some(&epoch) {
            return false;
        }
        g.granted.insert(cluster.to_string(), now);
        true
    }

    /// Latest reports of one cluster (for status).
    pub fn reports(&self, cluster: &str) -> BTreeMap<String, (Observation, u64)> {
        self.inner
            .lock()
            .ok()
            .and_then(|g| g.reports.get(cluster).cloned())
            .unwrap_or_default()
    }

    /// Leader-clock ms since which this member leads (`None`: not leading, or not noticed yet).
    pub fn leader_since(&self) -> Option<u64> {
        self.inner.lock().ok().and_then(|g| g.leader_since)
    }

    pub fn waiting(&self, cluster: &str) -> Option<String> {
        self.inner
            .lock()
            .ok()
            .and_then(|g| g.waiting.get(cluster).cloned())
    }

    /// Called on every leadership check; on becoming leader, forgets old reports and treats
    /// "now" as the last possible lease grant of the predecessor (see `pgw_core::lease`).
    pub fn leadership(&self, is_leader: bool, clusters: &[String]) {
        let now = self.now_ms();
        if let Ok(mut g) = self.inner.lock() {
            match (is_leader, g.leader_since) {
                (true, None) => {
                    g.leader_since = Some(now);
                    g.reports.clear();
                    for c in clusters {
                        g.granted.insert(c.clone(), now);
                    }
                }
                (false, Some(_)) => {
                    g.leader_since = None;
                    g.reports.clear();
                }
                _ => {}
            }
        }
    }

    /// Leader-clock ms of the last lease grant to `cluster`'s primary (0: none).
    pub fn granted(&self, cluster: &str) -> u64 {
        self.inner
            .lock()
            .ok()
            .and_then(|g| g.granted.get(cluster).copied())
            .unwrap_or(0)
    }

    /// Records why `cluster`'s decision waits (`None`: it does not). Returns whether the reason
    /// changed.
    pub fn set_waiting(&self, cluster: &str, why: Option<&str>) -> bool {
        let Ok(mut g) = self.inner.lock() else {
            return false;
        };
        match why {
            Some(w) => {
                g.waiting
                    .insert(cluster.to_string(), w.to_string())
                    .as_deref()
                    != Some(w)
            }
            None => g.waiting.remove(cluster).is_some(),
        }
    }

    /// Before proposing a move of `cluster`'s primary at `epoch`: refused (false) when a grant
    /// newer than `granted_seen` (the one the decision used) slipped in; otherwise no lease is
    /// granted at that epoch until [`Self::end_replacing`].
    pub fn begin_replacing(&self, cluster: &str, epoch: u64, granted_seen: u64) -> bool {
        let Ok(mut g) = self.inner.lock() else {
            return false;
        };
        if g.granted.get(cluster).copied().unwrap_or(0) != granted_seen {
            return false;
        }
        g.replacing.insert(cluster.to_string(), epoch);
        true
    }

    pub fn end_replacing(&self, cluster: &str) {
        if let Ok(mut g) = self.inner.lock() {
            g.replacing.remove(cluster);
        }
    }
}
