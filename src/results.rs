//! Route stage: publishes each request's result event to the results topic, keyed by request id.

use std::sync::Arc;
use std::time::Duration;

use apache_avro::Schema;
use rdkafka::producer::{FutureProducer, FutureRecord};

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
    let defaults = [
        ("acks", "all"),
        ("enable.idempotence", "true"),
        ("linger.ms", "5"),
        ("message.timeout.ms", "30000"),
    ];
    Ok(kafka
        .client_config(ClientRole::Producer, &defaults)?
        .create()?)
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

    /// Waits for the broker's acknowledgement; a failure is logged and counted, not retried
    /// forever: the data itself is already committed, and a redelivery repeats the confirmation.
    pub async fn publish(&self, result: &PersistenceResult) {
        let Some(topic) = self.topic.as_deref() else {
            return;
        };
        let payload = match self.encode(result) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(request_id = %result.request_id, error = %e, "result event not encodable");
                self.metrics
                    .results_published
                    .with_label_values(&["error"])
                    .inc();
                return;
            }
        };
        let record = FutureRecord::to(topic)
            .key(&result.request_id)
            .payload(&payload);
        let delivery = match self.producer.send(record, Duration::from_secs(30)).await {
            Ok(_) => "ok",
            Err((e, _)) => {
                tracing::warn!(request_id = %result.request_id, error = %e, "result event not delivered");
                "error"
            }
        };
        self.metrics
            .results_published
            .with_label_values(&[delivery])
            .inc();
    }
}
