//! What the leader last saw of every room's pgpool (shown by status; empty on followers).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use pgw_core::pgpool::NodeInfo;
use tokio::time::Instant;

/// What the leader last saw of one room's pgpool.
#[derive(Debug, Clone, Default)]
pub struct PoolReport {
    pub cluster: String,
    pub room: String,
    /// Client address (what applications connect to).
    pub address: String,
    pub reachable: bool,
    /// Why it is unreachable or cannot be repointed (no secrets in here).
    pub error: String,
    /// member -> (status, pgpool role) in backend order.
    pub nodes: Vec<(String, NodeInfo)>,
    /// The member pgpool sends writes to.
    pub primary: Option<String>,
    pub agrees: bool,
    /// Since when it has disagreed with the group (leader clock).
    pub disagreeing_since: Option<Instant>,
    /// The PCP command sent last, and when.
    pub last_command: String,
}

/// The leader's view of every pgpool, shared with the status service.
#[derive(Clone, Default)]
pub struct PoolViews(Arc<Mutex<BTreeMap<(String, String), PoolReport>>>);

impl PoolViews {
    /// Every pgpool's report, by cluster then room.
    pub fn all(&self) -> Vec<PoolReport> {
        self.0
            .lock()
            .map(|g| g.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn put(&self, r: PoolReport) {
        if let Ok(mut g) = self.0.lock() {
            g.insert((r.cluster.clone(), r.room.clone()), r);
        }
    }

    pub fn clear(&self, cluster: &str, room: &str) {
        if let Ok(mut g) = self.0.lock() {
            g.remove(&(cluster.to_string(), room.to_string()));
        }
    }
}
