//! The pg-watcher daemon: durable Raft storage, gRPC transport, admin / health / HTTP endpoints.

pub mod auth;
pub mod daemon;
pub mod durable;
pub mod http;
pub mod leader;
pub mod member;
pub mod network;
pub mod node;
pub mod pgpool;
pub mod reload;
pub mod secrets;
pub mod service;
pub mod sidecar;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod types;
pub mod x509;

pub use network::ChannelMaker;
pub use node::{tls_channels, Node, NodeError};
