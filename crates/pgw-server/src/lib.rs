//! The pg-watcher daemon: durable Raft storage, gRPC transport, admin / health / HTTP endpoints.

pub mod auth;
pub mod daemon;
pub mod durable;
pub mod hooks;
pub mod http;
pub mod leader;
pub mod member;
pub mod membership;
pub mod node;
pub mod pgpool;
pub mod placement;
pub mod raft;
pub mod recovery;
pub mod reload;
pub mod secrets;
pub mod service;
pub mod sidecar;
pub mod standby;
pub mod telemetry;
pub mod tls;
pub mod x509;

pub use node::{tls_channels, Node, NodeError};
pub use raft::network::ChannelMaker;
