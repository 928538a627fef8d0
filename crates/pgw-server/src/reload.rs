//! `pgwctl reload` on one member: the config file read again, and what may change without a
//! restart ([postgres] settings and hba) handed to the sidecar, which re-renders the files,
//! reloads postgres and says which settings still need a restart. The rule of what may change
//! is pure (`Config::reload_diff`); this module only carries the request and the answer.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;

/// The [postgres] settings and hba the sidecar should run with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PgLive {
    pub generation: u64,
    pub settings: Vec<String>,
    pub hba: Vec<String>,
}

/// What the sidecar did with a generation: settings pending a restart, or why it failed.
#[derive(Debug, Clone)]
pub struct Applied {
    pub generation: u64,
    pub result: Result<Vec<String>, String>,
}

/// One local server's channel: what it should run with, and what it did.
struct Channel {
    want: watch::Sender<PgLive>,
    done: watch::Sender<Applied>,
}

pub struct Live {
    config_path: std::sync::RwLock<Option<PathBuf>>,
    /// One per local server, by cluster.
    servers: std::collections::BTreeMap<String, Channel>,
}

impl Live {
    pub fn new(cfg: &pgw_core::Config) -> Live {
        let servers = cfg
            .postgres
            .iter()
            .map(|p| {
                let start = PgLive {
                    generation: 0,
                    settings: p.settings.clone(),
                    hba: p.hba.clone(),
                };
                let ch = Channel {
                    want: watch::channel(start).0,
                    done: watch::channel(Applied {
                        generation: 0,
                        result: Ok(Vec::new()),
                    })
                    .0,
                };
                (cfg.pg_cluster_of(p), ch)
            })
            .collect();
        Live {
            config_path: std::sync::RwLock::new(None),
            servers,
        }
    }

    pub fn set_config_path(&self, p: PathBuf) {
        if let Ok(mut g) = self.config_path.write() {
            *g = Some(p);
        }
    }

    pub fn config_path(&self) -> Option<PathBuf> {
        self.config_path.read().ok().and_then(|g| g.clone())
    }

    /// The sidecar's side: what to run with (`None`: no local server of `cluster`).
    pub fn subscribe(&self, cluster: &str) -> Option<watch::Receiver<PgLive>> {
        self.servers.get(cluster).map(|c| c.want.subscribe())
    }

    /// The sidecar's side: the outcome of a generation.
    pub fn report(&self, cluster: &str, a: Applied) {
        if let Some(c) = self.servers.get(cluster) {
            c.done.send_replace(a);
        }
    }

    /// Asks the server of `cluster` for `settings`/`hba`; returns (changed, the sidecar's
    /// outcome) once it applied them, or `None` as the outcome if it did not within `limit`
    /// (it is busy: it applies them when done) or runs no server of `cluster`.
    pub async fn apply(
        &self,
        cluster: &str,
        settings: Vec<String>,
        hba: Vec<String>,
        limit: Duration,
    ) -> (bool, Option<Result<Vec<String>, String>>) {
        let Some(ch) = self.servers.get(cluster) else {
            return (false, None);
        };
        let mut rx = ch.done.subscribe();
        let mut changed = false;
        let mut generation = 0;
        ch.want.send_modify(|w| {
            changed = w.settings != settings || w.hba != hba;
            w.generation += 1;
            w.settings = settings;
            w.hba = hba;
            generation = w.generation;
        });
        let outcome = tokio::time::timeout(limit, async {
            rx.wait_for(|a| a.generation >= generation)
                .await
                .map(|a| a.result.clone())
                .ok()
        })
        .await
        .ok()
        .flatten();
        (changed, outcome)
    }
}
