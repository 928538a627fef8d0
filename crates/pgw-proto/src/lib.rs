//! Generated gRPC types for pg-watcher (`proto/pgwatcher.proto`).
#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("pgwatcher.v1");
}
pub use v1::*;
