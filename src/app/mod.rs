//! The service shell: wiring the stages into a running agent, and its HTTP endpoints.

pub mod agent;
pub mod http;
