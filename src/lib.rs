//! persistence-agent: the one durable writer of persistence requests. Stages follow the data:
//! consume → decode → persist → route (result events) → commit; `pipeline` decides outcomes.

pub mod agent;
pub mod classify;
pub mod config;
pub mod consume;
pub mod db;
pub mod decode;
pub mod dlq;
pub mod due;
pub mod envelope;
pub mod http;
pub mod metrics;
pub mod model;
pub mod offsets;
pub mod ownership;
pub mod park;
pub mod persist;
pub mod pipeline;
pub mod produce;
pub mod results;
pub mod route;
pub mod schemas;
pub mod topics;

/// Version and commit, as written in the `pa.agent-version` header.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "+", env!("GIT_SHA"));
