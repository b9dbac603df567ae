//! persistence-agent: the one durable writer of persistence requests. Stages follow the data:
//! consume → decode → persist → route (result events) → commit; `pipeline` decides outcomes.

pub mod agent;
pub mod classify;
pub mod config;
pub mod consume;
pub mod db;
pub mod decode;
pub mod http;
pub mod metrics;
pub mod model;
pub mod offsets;
pub mod persist;
pub mod pipeline;
pub mod produce;
pub mod results;
pub mod schemas;
