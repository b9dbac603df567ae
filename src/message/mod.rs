//! What travels through the stages: the request/result contract, a consumed message with its
//! retry state, and the partition ownership it acts under.

pub mod envelope;
pub mod headers;
pub mod model;
pub mod ownership;
