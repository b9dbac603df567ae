//! One event per outcome of a message. Each writes its log line and its metrics together, so
//! an outcome is never logged without being counted (or counted twice), as Vector's
//! `internal_events` do. The pipeline decides; these only report.

use std::time::Duration;

use chrono::Utc;

use super::metrics::{outcome, Metrics};
use crate::classify::Failure;
use crate::message::envelope::Envelope;
use crate::message::model::{PersistenceResult, Routing};

/// Reports itself: one log line and its metrics.
pub trait Emit {
    fn emit(self, metrics: &Metrics);
}

/// Seconds since the message was first published, when its timestamp is known.
fn age(env: &Envelope) -> Option<f64> {
    let ts = env.origin.timestamp_ms?;
    Some(Utc::now().timestamp_millis().saturating_sub(ts).max(0) as f64 / 1000.0)
}

/// Counts the outcome and observes its latency; a duplicate's latency counts as `persisted`
/// (its confirmation is the same).
fn count_outcome(m: &Metrics, env: &Envelope, label: &str) {
    m.outcomes
        .with_label_values(&[&env.origin.topic, label])
        .inc();
    let latency = match label {
        outcome::DUPLICATE => outcome::PERSISTED,
        other => other,
    };
    if let Some(age) = age(env) {
        m.end_to_end_latency
            .with_label_values(&[latency])
            .observe(age);
    }
}

/// A message fetched from Kafka, before any decision.
pub struct Consumed<'a> {
    pub env: &'a Envelope,
}

impl Emit for Consumed<'_> {
    fn emit(self, m: &Metrics) {
        m.messages_consumed
            .with_label_values(&[&self.env.topic])
            .inc();
        for h in &self.env.clamped {
            m.headers_clamped.with_label_values(&[h]).inc();
        }
    }
}

/// A request the transaction settled: written now, or found in the ledger.
pub struct Settled<'a> {
    pub env: &'a Envelope,
    pub result: &'a PersistenceResult,
    /// Transaction attempts it took.
    pub attempts: u32,
    /// For a request that succeeded from a retry tier: the tier's label.
    pub from_tier: Option<String>,
}

/// Written to the database now.
pub struct Persisted<'a>(pub Settled<'a>);

/// Found in the ledger (a redelivery or a re-publish): nothing written, the stored
/// confirmation repeated.
pub struct Duplicate<'a>(pub Settled<'a>);

impl Emit for Persisted<'_> {
    fn emit(self, m: &Metrics) {
        self.0
            .report(m, outcome::PERSISTED, "RECOMMENDATION_PERSISTED");
    }
}

impl Emit for Duplicate<'_> {
    fn emit(self, m: &Metrics) {
        self.0
            .report(m, outcome::DUPLICATE, "RECOMMENDATION_DUPLICATE");
    }
}

impl Settled<'_> {
    fn report(&self, m: &Metrics, label: &str, action: &str) {
        count_outcome(m, self.env, label);
        if let Some(tier) = &self.from_tier {
            let since = self.env.first_failure.map_or(0.0, |t| {
                (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0
            });
            m.time_to_success.with_label_values(&[tier]).observe(since);
        }
        let r = self.result;
        let meta = r.persistence_metadata.as_ref();
        tracing::info!(
            action,
            recommendationId = r.recommendation_id.as_deref().unwrap_or_default(),
            userId = r.user_id.as_deref().unwrap_or_default(),
            requestId = %r.request_id,
            bookCount = r.book_count,
            transactionId = meta.map(|m| m.transaction_id.as_str()).unwrap_or_default(),
            processingTime = meta.map(|m| m.persistence_time).unwrap_or_default(),
            attempts = self.attempts,
            retryAttempt = self.env.attempt,
            status = %r.persistence_status,
        );
    }
}

/// A failed request forwarded (and acknowledged) to a retry tier or the dead-letter topic.
pub struct Routed<'a> {
    pub env: &'a Envelope,
    pub failure: &'a Failure,
    pub result: &'a PersistenceResult,
    pub routing: &'a Routing,
}

/// Forwarded to its next retry tier: not final, so outside the SLO.
pub struct RetryScheduled<'a>(pub Routed<'a>);

/// Forwarded to the dead-letter topic: final.
pub struct DeadLettered<'a>(pub Routed<'a>);

impl Emit for RetryScheduled<'_> {
    fn emit(self, m: &Metrics) {
        let r = self.0;
        count_outcome(m, r.env, outcome::RETRY_SCHEDULED);
        let tier = r.routing.tier.as_deref().unwrap_or_default();
        m.retry_routed.with_label_values(&[tier]).inc();
        m.failures.with_label_values(&[r.failure.class]).inc();
        r.log("RECOMMENDATION_RETRY_SCHEDULED");
    }
}

impl Emit for DeadLettered<'_> {
    fn emit(self, m: &Metrics) {
        let r = self.0;
        count_outcome(m, r.env, outcome::DEAD_LETTERED);
        m.dead_letters.with_label_values(&[r.failure.class]).inc();
        m.failures.with_label_values(&[r.failure.class]).inc();
        r.log("RECOMMENDATION_DEAD_LETTERED");
    }
}

impl Routed<'_> {
    fn log(&self, action: &str) {
        let (env, f, routing) = (self.env, self.failure, self.routing);
        tracing::warn!(
            action,
            requestId = %self.result.request_id,
            userId = self.result.user_id.as_deref().unwrap_or_default(),
            topic = %env.topic,
            partition = env.partition,
            offset = env.offset,
            class = f.class,
            code = %f.code,
            disposition = ?f.disposition,
            error = %f.message,
            routedTo = routing.topic,
            tier = routing.tier.as_deref().unwrap_or_default(),
            dueAt = routing.due_at.as_deref().unwrap_or_default(),
            attempt = routing.attempt,
            status = %self.result.persistence_status,
        );
    }
}

/// Stored behind an earlier request of its key that waits in a retry tier; its final outcome
/// is reported when it is released.
pub struct Parked<'a> {
    pub env: &'a Envelope,
}

impl Emit for Parked<'_> {
    fn emit(self, m: &Metrics) {
        let env = self.env;
        m.outcomes
            .with_label_values(&[&env.origin.topic, outcome::PARKED])
            .inc();
        tracing::info!(
            action = "RECOMMENDATION_PARKED",
            topic = %env.topic,
            partition = env.partition,
            offset = env.offset,
            "an earlier request with this key waits in a retry tier; parked behind it",
        );
    }
}

/// What a held message waits for.
#[derive(Debug, Clone, Copy)]
pub enum Dependency {
    Database,
    SchemaRegistry,
    /// The brokers refuse a forwarded copy.
    Brokers,
    /// Every pooled connection is busy (not an outage).
    Connection,
}

/// A message held (not failed, not committed) while a dependency is down; it goes on when the
/// dependency returns, or is read again after a restart. The `database_outage` gauge is kept
/// by the lifecycle, as it spans every waiting worker.
pub struct HeldForOutage<'a> {
    pub dependency: Dependency,
    pub retry_in: Duration,
    pub error: &'a str,
}

impl Emit for HeldForOutage<'_> {
    fn emit(self, _: &Metrics) {
        let (dependency, retry_in, error) = (self.dependency, self.retry_in, self.error);
        match dependency {
            Dependency::Connection => {
                tracing::debug!(?dependency, ?retry_in, error, "holding the message")
            }
            _ => tracing::warn!(
                ?dependency,
                ?retry_in,
                error,
                "dependency unavailable; holding the message"
            ),
        }
    }
}

/// The agent stops: nothing unfinished is committed and the process exits non-zero, so the
/// orchestrator restarts it.
pub struct FatalStop<'a> {
    pub failure: &'a Failure,
}

impl Emit for FatalStop<'_> {
    fn emit(self, m: &Metrics) {
        let f = self.failure;
        m.fatal_errors.with_label_values(&[f.class]).inc();
        tracing::error!(class = f.class, code = %f.code, error = %f.message, "fatal error: stopping");
    }
}
