//! Raft plumbing: the openraft type configuration, the durable log and state machine, and the
//! gRPC transport between members. Nothing here decides anything about PostgreSQL.

pub mod network;
pub mod store;
pub mod types;
