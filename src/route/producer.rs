//! The producers the agent writes with (acks=all, idempotent) and sending one record: waiting
//! out a full local queue, waiting for the acknowledgement, telling final refusals apart.

use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryFuture, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;

use crate::ops::config::{ClientRole, KafkaArgs};
use crate::ops::kafka_health::{self, QuietContext};

/// The agent's producers: their librdkafka trouble is reported once, not per retry.
pub type FutureProducer = rdkafka::producer::FutureProducer<QuietContext>;

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
        .create_with_context(QuietContext)?)
}

/// Forwarded failures are few, and a retry consumer seeks back to each one: one record per
/// batch keeps every record individually fetchable (brokers such as tansu return nothing for
/// a fetch that starts inside a batch).
pub const ROUTE_PRODUCER: &[(&str, &str)] = &[("batch.num.messages", "1"), ("linger.ms", "0")];

/// Whether the brokers refuse this record for its size, however often it is sent. (Other
/// refusals, such as a missing ACL, are held and retried: they are fixed by operators, and
/// dropping the value for them would lose data.)
pub fn is_too_large(e: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        e,
        KafkaError::MessageProduction(
            MessageSizeTooLarge | InvalidMessageSize | MessageBatchTooLarge
        )
    )
}

/// Whether the producer will refuse every record from now on: librdkafka's fatal error (a
/// broken idempotent sequence), or a delivery refused because the broker fenced this
/// producer. librdkafka raises no fatal error for the latter: after a record times out it
/// bumps the producer's epoch, and a broker without KIP-360 (tansu 0.6) answers every later
/// record with `ProducerFenced`, so holding the message for it would wedge the agent. `which`
/// names the producer in the message.
pub fn fatal_error(producer: &FutureProducer, which: &str, last: &KafkaError) -> Option<String> {
    use rdkafka::producer::Producer;
    use RDKafkaErrorCode::*;
    if let Some((code, reason)) = producer.client().fatal_error() {
        return Some(format!(
            "{which} producer failed fatally: {code:?}: {reason}"
        ));
    }
    match last {
        // Not InvalidProducerEpoch: librdkafka recovers from that one itself (an epoch bump).
        KafkaError::MessageProduction(ProducerFenced) => Some(format!(
            "{which} producer fenced by the broker: ProducerFenced"
        )),
        _ => None,
    }
}

/// Sends one record and waits for its acknowledgement, waiting out a full local queue.
pub async fn send_acked(
    producer: &FutureProducer,
    record: FutureRecord<'_, [u8], [u8]>,
) -> Result<(), KafkaError> {
    acked(send_queued(producer, record).await?).await
}

/// The broker's acknowledgement of an enqueued record.
pub async fn acked(delivery: DeliveryFuture) -> Result<(), KafkaError> {
    match delivery.await {
        Ok(Ok(_)) => {
            kafka_health::healthy();
            Ok(())
        }
        Ok(Err((e, _))) => Err(e),
        Err(_) => Err(KafkaError::Canceled),
    }
}

/// Hands one record to the producer, waiting out a full local queue.
pub async fn send_queued(
    producer: &FutureProducer,
    mut record: FutureRecord<'_, [u8], [u8]>,
) -> Result<DeliveryFuture, KafkaError> {
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err((e, _)) => return Err(e),
        }
    }
}
