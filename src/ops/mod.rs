//! Operating the agent: configuration, the metrics registry, one event per outcome (log line
//! and metrics together), and the process's stop state.

pub mod config;
pub mod errors;
pub mod events;
pub mod kafka_health;
pub mod lifecycle;
pub mod metrics;
