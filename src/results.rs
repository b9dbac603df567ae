//! Route stage: publishes each request's result event to the results topic, keyed by request id.

use std::sync::Arc;
use std::time::Duration;

use apache_avro::Schema;
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;

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
        let mut record = FutureRecord::to(topic)
            .key(&result.request_id)
            .payload(&payload);
        loop {
            match self.producer.send_result(record) {
                Ok(future) => {
                    let (metrics, request_id) = (self.metrics.clone(), result.request_id.clone());
                    return Some(PendingResult {
                        future,
                        metrics,
                        request_id,
                    });
                }
                // The local queue is full: wait for deliveries to drain it.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err((e, _)) => {
                    tracing::warn!(request_id = %result.request_id, error = %e, "result event not delivered");
                    count(&self.metrics, "error");
                    return None;
                }
            }
        }
    }
}

/// A result event handed to the producer, not yet acknowledged.
pub struct PendingResult {
    future: DeliveryFuture,
    metrics: Arc<Metrics>,
    request_id: String,
}

impl PendingResult {
    /// Resolves once the broker acknowledged the event or librdkafka gave up on it
    /// (`message.timeout.ms`): a failed delivery is logged and counted, not retried forever,
    /// because the data itself is committed and a redelivery repeats the confirmation.
    pub async fn delivered(self) {
        let delivery = match self.future.await {
            Ok(Ok(_)) => "ok",
            Ok(Err((e, _))) => {
                tracing::warn!(request_id = %self.request_id, error = %e, "result event not delivered");
                "error"
            }
            Err(_) => "error",
        };
        count(&self.metrics, delivery);
    }
}

/// Counts one result event by delivery outcome (`ok`, `error`).
fn count(metrics: &Metrics, delivery: &str) {
    metrics
        .results_published
        .with_label_values(&[delivery])
        .inc();
}
