//! Operator and developer commands beside the service: `produce` (publish requests, load
//! generator) and `dlq` (inspect and replay dead letters).

pub mod dlq;
pub mod produce;
