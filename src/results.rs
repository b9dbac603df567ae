//! Route stage: publishes each request's result event to the results topic, keyed by request id.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use apache_avro::Schema;
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use tokio_util::sync::CancellationToken;

use crate::config::{ClientRole, KafkaArgs, ResultsFormat};
use crate::metrics::Metrics;
use crate::model::PersistenceResult;

pub struct ResultPublisher {
    producer: FutureProducer,
    topic: Option<String>,
    format: ResultsFormat,
    schema: Schema,
    metrics: Arc<Metrics>,
}

/// Producer settings for every record the agent writes: nothing is acknowledged until all
/// in-sync replicas have it, and retries never duplicate or reorder.
pub fn producer(kafka: &KafkaArgs) -> anyhow::Result<FutureProducer> {
    producer_with(kafka, &[])
}

/// `producer` with further defaults (still overridable by the pass-through).
pub fn producer_with(kafka: &KafkaArgs, extra: &[(&str, &str)]) -> anyhow::Result<FutureProducer> {
    let mut defaults = vec![
        ("acks", "all"),
        ("enable.idempotence", "true"),
        ("linger.ms", "5"),
        ("message.timeout.ms", "30000"),
    ];
    defaults.extend_from_slice(extra);
    Ok(kafka
        .client_config(ClientRole::Producer, &defaults)?
        .create()?)
}

/// Forwarded failures are few, and a retry consumer seeks back to each one: one record per
/// batch keeps every record individually fetchable (brokers such as tansu return nothing for
/// a fetch that starts inside a batch).
pub const ROUTE_PRODUCER: &[(&str, &str)] = &[("batch.num.messages", "1"), ("linger.ms", "0")];

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
            schema: crate::schemas::result_schema()?,
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
    crate::route::send_queued(producer, record).await
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
    pub async fn delivered(
        mut self,
        shutdown: &CancellationToken,
        fatal: &OnceLock<String>,
    ) -> bool {
        let mut delay = Duration::from_millis(100);
        loop {
            let pending = std::mem::replace(&mut self.future, Err(KafkaError::Canceled));
            let error = match pending {
                Err(e) => e,
                Ok(f) => match crate::route::acked(f).await {
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
            if crate::route::is_too_large(&error) {
                tracing::error!(request_id = %self.request_id, %error, "result event refused for its size; not sent");
                return true;
            }
            if let Some(why) = crate::route::fatal_error(&self.producer, "results") {
                tracing::error!(request_id = %self.request_id, error = %why, "stopping: nothing unfinished is committed");
                let _ = fatal.set(why);
                shutdown.cancel();
                return false;
            }
            tracing::warn!(request_id = %self.request_id, %error, retry_in = ?delay, "result event not delivered; holding the message");
            tokio::select! {
                _ = shutdown.cancelled() => return false,
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
