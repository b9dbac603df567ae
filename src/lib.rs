//! persistence-agent: the one durable writer of persistence requests. The folders follow the
//! data (see ARCHITECTURE.md): `kafka` consumes and commits, `decode`, `persist` and `route`
//! are the stages, `pipeline` alone decides each message's outcome, `ops` is configuration,
//! metrics and events, `app` wires it all, and `tools` are the operator commands.

pub mod app;
pub mod classify;
pub mod decode;
pub mod kafka;
pub mod message;
pub mod ops;
pub mod persist;
pub mod pipeline;
pub mod route;
pub mod tools;

/// Version and commit, as written in the `pa.agent-version` header.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "+", env!("GIT_SHA"));
