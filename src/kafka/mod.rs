//! The Kafka side: consuming (poll loop, workers), rebalances and offsets (commit), the due
//! gate of retry tiers, partition bookkeeping and topic administration. Produced records
//! (tiers, dead letters, results) are in `route`.

pub mod due;
pub mod offsets;
pub mod poll;
pub mod rebalance;
pub mod topics;
pub mod worker;

pub use poll::{Limits, PollLoop};
pub use rebalance::{AgentContext, Completion, Shared};
