//! Metrics and health endpoints: `/metrics`, `/healthz` (alive: no fatal stop), `/readyz`
//! (joined the consumer group, database answers, not draining, no fatal stop).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::app::agent::Agent;

#[derive(Clone)]
pub struct HttpState {
    pub metrics: Arc<crate::ops::metrics::Metrics>,
    pub pipeline: Arc<crate::pipeline::Pipeline>,
    /// One per consumer (main, retry).
    pub consumers: Vec<Arc<crate::kafka::Shared>>,
    pub life: Arc<crate::ops::lifecycle::Lifecycle>,
}

impl HttpState {
    pub fn of(agent: &Agent) -> Self {
        Self {
            metrics: agent.metrics.clone(),
            pipeline: agent.pipeline.clone(),
            consumers: agent.consumers.clone(),
            life: agent.life.clone(),
        }
    }
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on HTTP_ADDR {addr}: {e}"))
}

/// Serves until `stop` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HttpState,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "http endpoints listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(stop.cancelled_owned())
        .await?;
    Ok(())
}

async fn metrics(State(s): State<HttpState>) -> impl IntoResponse {
    s.metrics.observe_pool(s.pipeline.persister.pool().status());
    let lag: Vec<_> = s
        .consumers
        .iter()
        .map(|c| (c.name, c.lag.lock().expect("lag lock").clone()))
        .collect();
    s.metrics.observe_lag(&lag);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

/// Alive unless a fatal error stopped the agent; the process then exits once its drain and
/// `FATAL_LINGER` are over, or sooner when the orchestrator's liveness probe gives up on it.
async fn healthz(State(s): State<HttpState>) -> impl IntoResponse {
    match s.life.fatal() {
        None => (StatusCode::OK, "ok".to_string()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("stopped on a fatal error: {why}"),
        ),
    }
}

async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    let reason = if s.life.fatal().is_some() {
        Some("stopped on a fatal error")
    } else if s.life.stopping() {
        Some("draining for shutdown")
    } else if !s
        .consumers
        .iter()
        .all(|c| c.joined.load(std::sync::atomic::Ordering::Acquire))
    {
        Some("not yet joined the consumer group")
    } else if s.metrics.database_outage.get() != 0 || !s.pipeline.database_answers().await {
        Some("database unavailable")
    } else {
        None
    };
    match reason {
        None => (StatusCode::OK, "ready".to_string()),
        Some(r) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {r}")),
    }
}
