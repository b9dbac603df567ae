//! Result events: each request's confirmation (persisted, retry scheduled, dead-lettered),
//! published to the results topic keyed by request id; the offset waits for its acknowledgement.

use std::sync::Arc;
use std::time::Duration;

use apache_avro::Schema;
use chrono::Utc;
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryFuture, FutureRecord};

use super::producer::{acked, fatal_error, is_too_large, send_queued, FutureProducer};
use super::Destination;
use crate::classify::Failure;
use crate::message::envelope::Envelope;
use crate::message::headers::format_time;
use crate::message::model::{status, truncate, PersistenceResult, ResultError, Routing};
use crate::ops::config::ResultsFormat;
use crate::ops::lifecycle::Lifecycle;
use crate::ops::metrics::Metrics;

pub struct ResultPublisher {
    producer: FutureProducer,
    topic: Option<String>,
    format: ResultsFormat,
    schema: Schema,
    metrics: Arc<Metrics>,
}

impl ResultPublisher {
    pub fn new(
        producer: FutureProducer,
        topic: Option<String>,
        format: ResultsFormat,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            producer,
            topic,
            format,
            schema: crate::decode::schemas::result_schema()?,
            metrics,
        })
    }

    pub fn encode(&self, result: &PersistenceResult) -> anyhow::Result<Vec<u8>> {
        match self.format {
            ResultsFormat::Json => Ok(serde_json::to_vec(result)?),
            ResultsFormat::Avro => {
                let value = apache_avro::to_value(result)?.resolve(&self.schema)?;
                crate::decode::single_object(&self.schema, value)
            }
        }
    }

    /// Hands the event to the producer and returns its pending acknowledgement; the caller
    /// stores the message's offset only once that resolved, without holding up the next message.
    pub async fn publish(&self, result: &PersistenceResult) -> Option<PendingResult> {
        let topic = self.topic.as_deref()?;
        let payload = match self.encode(result) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(request_id = %result.request_id, error = %e, "result event not encodable");
                count(&self.metrics, "error");
                return None;
            }
        };
        // A record the producer refused outright is sent again by `delivered`, like a failed one.
        let future = send(&self.producer, topic, &result.request_id, &payload).await;
        Some(PendingResult {
            future,
            producer: self.producer.clone(),
            topic: topic.to_string(),
            request_id: result.request_id.clone(),
            payload,
            metrics: self.metrics.clone(),
        })
    }
}

/// Hands one record to the producer, waiting out a full local queue; a refusal is the caller's
/// to retry.
async fn send(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    payload: &[u8],
) -> Result<DeliveryFuture, KafkaError> {
    let record = FutureRecord::to(topic).key(key.as_bytes()).payload(payload);
    send_queued(producer, record).await
}

/// A result event handed to the producer, not yet acknowledged.
pub struct PendingResult {
    future: Result<DeliveryFuture, KafkaError>,
    producer: FutureProducer,
    topic: String,
    request_id: String,
    payload: Vec<u8>,
    metrics: Arc<Metrics>,
}

/// Longest wait between two attempts to deliver a result event.
const MAX_RESEND_DELAY: Duration = Duration::from_secs(5);

impl PendingResult {
    /// Waits until the broker acknowledged the event, sending it again after each failure: the
    /// confirmation is promised at least once, so the message's offset waits for it. False
    /// when shutdown came first, or the producer failed fatally (then `fatal` says why and
    /// `shutdown` is cancelled): the message is not committed and its redelivery repeats the
    /// confirmation from the ledger.
    pub async fn delivered(mut self, life: &Lifecycle) -> bool {
        let mut delay = Duration::from_millis(100);
        loop {
            let pending = std::mem::replace(&mut self.future, Err(KafkaError::Canceled));
            let error = match pending {
                Err(e) => e,
                Ok(f) => match acked(f).await {
                    Ok(()) => {
                        count(&self.metrics, "ok");
                        return true;
                    }
                    Err(e) => e,
                },
            };
            count(&self.metrics, "error");
            // Refused for its size, it would be refused forever: holding the message for it
            // would wedge the partition. (Ids are bounded, so only a misconfigured topic does.)
            if is_too_large(&error) {
                tracing::error!(request_id = %self.request_id, %error, "result event refused for its size; not sent");
                return true;
            }
            if let Some(why) = fatal_error(&self.producer, "results", &error) {
                life.fail(&Failure::producer_fatal(why));
                return false;
            }
            tracing::warn!(request_id = %self.request_id, %error, retry_in = ?delay, "result event not delivered; holding the message");
            tokio::select! {
                _ = life.shutdown.cancelled() => return false,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(MAX_RESEND_DELAY);
            self.future = send(&self.producer, &self.topic, &self.request_id, &self.payload).await;
        }
    }
}

/// Counts one result event by delivery outcome (`ok`, `error`).
fn count(metrics: &Metrics, delivery: &str) {
    metrics
        .results_published
        .with_label_values(&[delivery])
        .inc();
}

/// The result event of a request forwarded to `dest` after failure `f`.
pub fn routed(
    env: &Envelope,
    request_id: String,
    user_id: Option<String>,
    f: &Failure,
    dest: &Destination,
) -> PersistenceResult {
    let attempt = i32::try_from(env.attempt)
        .unwrap_or(i32::MAX)
        .saturating_add(1);
    let (st, routing) = match dest {
        Destination::Tier {
            label, topic, due, ..
        } => {
            let routing = Routing {
                topic: topic.clone(),
                tier: Some(label.clone()),
                attempt,
                due_at: Some(format_time(*due)),
            };
            (status::RETRY_SCHEDULED, routing)
        }
        Destination::DeadLetter { topic } => {
            let routing = Routing {
                topic: topic.clone(),
                tier: None,
                attempt,
                due_at: None,
            };
            (status::DEAD_LETTERED, routing)
        }
    };
    PersistenceResult {
        request_id,
        user_id,
        recommendation_id: None,
        context_id: None,
        book_count: 0,
        persistence_status: st.to_string(),
        timestamp: format_time(Utc::now()),
        persistence_metadata: None,
        error: Some(ResultError {
            class: f.class.to_string(),
            code: f.code.clone(),
            message: truncate(&f.message, 512),
        }),
        routing: Some(routing),
    }
}
