//! The pure core of pg-watcher: configuration, the replicated cluster facts and the rules that
//! change them. Nothing here performs I/O or reads a clock; callers pass time in.

pub mod arbiter;
pub mod config;
pub mod facts;
pub mod failover;
pub mod fingerprint;
pub mod guard;
pub mod hooks;
pub mod lease;
pub mod pgpass;
pub mod pgpool;
pub mod placement;
pub mod recovery;
pub mod room_move;
pub mod roster;

pub use config::{Config, ConfigError, MemberConfig, Role};
pub use facts::{ClusterFacts, Command, Facts, HistoryEntry, Outcome, Proposal};
