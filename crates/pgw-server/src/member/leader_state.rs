//! The leader's kept state: one [`pgw_core::arbiter::Arbiter`] (pure: reports, grants, the
//! moment this member became leader, why a decision waits, primary moves in flight) behind a
//! lock, with the monotonic clock it runs on. Followers keep nothing in it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use pgw_core::arbiter::{Action, Arbiter, ArbiterConfig, GrantRequest};
use pgw_core::failover::Observation;
use pgw_core::Facts;
use tokio::sync::Notify;
use tokio::time::Instant;

#[derive(Clone)]
pub struct LeaderState {
    arbiter: Arc<Mutex<Arbiter>>,
    base: Instant,
    /// Wakes the decision loop (a report arrived).
    pub wake: Arc<Notify>,
    /// Standby clusters: what this leader last read from the main group, by cluster.
    mains: Arc<Mutex<BTreeMap<String, MainView>>>,
}

/// The main group of a standby cluster, as the leader last read it.
#[derive(Debug, Clone, Default)]
pub struct MainView {
    /// Its primary (member, PostgreSQL address, epoch), when it has one.
    pub upstream: Option<pgw_core::facts::Upstream>,
    /// Its primary's WAL position, when its leader answered.
    pub lsn: Option<u64>,
    /// Some member of it answered.
    pub reachable: bool,
    /// Why it did not, if it did not.
    pub error: String,
}

impl LeaderState {
    pub fn new(cfg: &pgw_core::Config) -> Self {
        Self {
            arbiter: Arc::new(Mutex::new(Arbiter::new(ArbiterConfig::from_config(cfg)))),
            base: Instant::now(),
            wake: Arc::new(Notify::new()),
            mains: Arc::default(),
        }
    }

    /// Event: the main group of standby cluster `cluster` was read (see
    /// [`Arbiter::set_main`]); wakes the decision loop.
    pub fn set_main(&self, cluster: &str, view: MainView) {
        self.lock().set_main(cluster, view.upstream.clone());
        if let Ok(mut m) = self.mains.lock() {
            m.insert(cluster.to_string(), view);
        }
        self.wake.notify_one();
    }

    /// What this leader last read from the main group of `cluster` (`None`: never, or it is
    /// not a standby cluster, or this member does not lead).
    pub fn main_view(&self, cluster: &str) -> Option<MainView> {
        self.mains.lock().ok().and_then(|m| m.get(cluster).cloned())
    }

    /// New rules from a changed member list (see [`Arbiter::set_config`]).
    pub fn set_config(&self, cfg: &pgw_core::Config) {
        self.lock().set_config(ArbiterConfig::from_config(cfg));
    }

    /// The leader's monotonic clock in ms: the only clock decisions use.
    pub fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    fn lock(&self) -> MutexGuard<'_, Arbiter> {
        match self.arbiter.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// See [`Arbiter::on_renewal`]; wakes the decision loop.
    pub fn record_report(
        &self,
        obs: Observation,
        direct: bool,
        facts: &Facts,
    ) -> Option<GrantRequest> {
        let now = self.now_ms();
        let req = self.lock().on_renewal(obs, direct, facts, now);
        self.wake.notify_one();
        req
    }

    /// See [`Arbiter::confirm_grant`].
    pub fn record_grant(&self, req: &GrantRequest, facts: &Facts) -> bool {
        let now = self.now_ms();
        self.lock().confirm_grant(req, facts, now)
    }

    pub fn leadership(&self, is_leader: bool) {
        let now = self.now_ms();
        self.lock().on_leadership(is_leader, now);
    }

    pub fn tick(&self, facts: &Facts) -> Vec<Action> {
        let now = self.now_ms();
        self.lock().tick(facts, now)
    }

    pub fn on_proposed(&self, cluster: &str) {
        self.lock().on_proposed(cluster);
    }

    /// See [`Arbiter::fresh_report`], on this leader's clock.
    pub fn fresh_report(&self, cluster: &str, member: &str) -> Option<Observation> {
        let now = self.now_ms();
        self.lock().fresh_report(cluster, member, now).cloned()
    }

    /// Latest reports of one cluster (for status and the pgpool targets).
    pub fn reports(&self, cluster: &str) -> BTreeMap<String, (Observation, u64)> {
        self.lock().reports(cluster)
    }

    /// Leader-clock ms since which this member leads (`None`: not leading, or not noticed yet).
    pub fn leader_since(&self) -> Option<u64> {
        self.lock().leader_since()
    }

    pub fn waiting(&self, cluster: &str) -> Option<String> {
        self.lock().waiting(cluster)
    }

    /// How long a report counts as current.
    pub fn fresh_ms(&self) -> u64 {
        self.lock().config().fresh_ms
    }
}
