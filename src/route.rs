//! Route stage: forwards a failed message to its next delayed retry tier or to the dead-letter
//! topic, with the original key, value and headers plus `pa.*` headers, and waits for the
//! broker's acknowledgement (acks=all, idempotent producer) before the caller may commit.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;

use crate::classify::{Disposition, Failure};
use crate::config::RetryArgs;
use crate::envelope::{format_time, header, Envelope};
use crate::pipeline::truncate;

/// Longest `pa.error.message`, in characters.
pub const MAX_ERROR_HEADER_CHARS: usize = 500;

/// Names of the retry-tier and dead-letter topics.
#[derive(Debug, Clone)]
pub struct Topology {
    delays: Vec<Duration>,
    retry_override: Vec<String>,
    dlq_override: Option<String>,
}

/// `5m`, `30m`, `2h`, `10s`, `1500ms`: the tier's name in topics and metric labels.
pub fn tier_label(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        _ if ms > 0 && ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        _ if ms > 0 && ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        _ if ms % 1000 == 0 => format!("{}s", ms / 1000),
        _ => format!("{ms}ms"),
    }
}

impl Topology {
    pub fn new(args: &RetryArgs) -> anyhow::Result<Topology> {
        let retry_override: Vec<String> = args
            .retry_topics
            .iter()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect();
        anyhow::ensure!(
            retry_override.is_empty() || retry_override.len() == args.retry_delays.0.len(),
            "RETRY_TOPICS names {} topics but RETRY_DELAYS has {} tiers",
            retry_override.len(),
            args.retry_delays.0.len()
        );
        Ok(Topology {
            delays: args.retry_delays.0.clone(),
            retry_override,
            dlq_override: args.dlq_topic.clone().filter(|t| !t.trim().is_empty()),
        })
    }

    pub fn tiers(&self) -> usize {
        self.delays.len()
    }

    pub fn delay(&self, tier: usize) -> Duration {
        self.delays[tier]
    }

    pub fn label(&self, tier: usize) -> String {
        tier_label(self.delays[tier])
    }

    pub fn tier_topic(&self, original: &str, tier: usize) -> String {
        match self.retry_override.get(tier) {
            Some(t) => t.clone(),
            None => format!("{original}.retry.{}", self.label(tier)),
        }
    }

    pub fn dlq_topic(&self, original: &str) -> String {
        dlq_topic(self.dlq_override.as_deref(), original)
    }

    /// Every tier topic of `inputs`, with its delay (deduplicated: overrides are shared).
    pub fn retry_topics(&self, inputs: &[String]) -> Vec<(String, Duration)> {
        let mut out: Vec<(String, Duration)> = Vec::new();
        for input in inputs {
            for tier in 0..self.tiers() {
                let t = self.tier_topic(input, tier);
                if !out.iter().any(|(o, _)| *o == t) {
                    out.push((t, self.delay(tier)));
                }
            }
        }
        out
    }

    pub fn dlq_topics(&self, inputs: &[String]) -> Vec<String> {
        dlq_topics(self.dlq_override.as_deref(), inputs)
    }
}

/// The dead-letter topic of `original`: `DLQ_TOPIC` when set, else `<original>.dlq`.
pub fn dlq_topic(dlq_override: Option<&str>, original: &str) -> String {
    match dlq_override {
        Some(t) => t.to_string(),
        None => format!("{original}.dlq"),
    }
}

/// The dead-letter topics of `inputs`, deduplicated (an override is shared by all).
pub fn dlq_topics(dlq_override: Option<&str>, inputs: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for t in inputs.iter().map(|i| dlq_topic(dlq_override, i)) {
        if !out.contains(&t) {
            out.push(t);
        }
    }
    out
}

/// Where a failed message goes next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Tier {
        index: usize,
        label: String,
        topic: String,
        due: DateTime<Utc>,
    },
    DeadLetter {
        topic: String,
    },
}

impl Destination {
    pub fn topic(&self) -> &str {
        match self {
            Destination::Tier { topic, .. } | Destination::DeadLetter { topic } => topic,
        }
    }
}

pub struct Router {
    producer: FutureProducer,
    pub topology: Topology,
    group: String,
    give_up_after: Duration,
}

impl Router {
    pub fn new(
        producer: FutureProducer,
        topology: Topology,
        group: String,
        give_up_after: Duration,
    ) -> Self {
        Self {
            producer,
            topology,
            group,
            give_up_after,
        }
    }

    /// librdkafka's fatal error of the forwarding producer, if it had one.
    pub fn fatal_error(&self) -> Option<String> {
        fatal_error(&self.producer, "forwarding")
    }

    /// The next tier, or the dead-letter topic when the failure will not heal, the tiers are
    /// spent, or the first failure is older than `GIVE_UP_AFTER`.
    pub fn destination(&self, env: &Envelope, f: &Failure, now: DateTime<Utc>) -> Destination {
        let original = &env.origin.topic;
        let next = env.attempt as usize;
        let given_up = env.first_failure.is_some_and(|first| {
            now - first
                > chrono::Duration::from_std(self.give_up_after).unwrap_or(chrono::Duration::MAX)
        });
        if f.disposition == Disposition::DeadLetter || next >= self.topology.tiers() || given_up {
            return Destination::DeadLetter {
                topic: self.topology.dlq_topic(original),
            };
        }
        let delay = self.topology.delay(next);
        Destination::Tier {
            index: next,
            label: self.topology.label(next),
            topic: self.topology.tier_topic(original, next),
            due: chrono::Duration::from_std(delay)
                .ok()
                .and_then(|d| now.checked_add_signed(d))
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
        }
    }

    /// The forwarded headers: the message's own, origin headers kept from earlier hops (or
    /// written now), retry state and error headers replaced.
    pub fn headers(
        &self,
        env: &Envelope,
        f: &Failure,
        dest: &Destination,
        now: DateTime<Utc>,
    ) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        let mut set = |k: &str, v: String| out.push((k.to_string(), v));
        // Always from the envelope's origin, which the pipeline checked against the input
        // topics: a hop carries the same values, and forged headers do not travel on.
        let o = &env.origin;
        set(header::ORIGINAL_TOPIC, o.topic.clone());
        set(header::ORIGINAL_PARTITION, o.partition.to_string());
        set(header::ORIGINAL_OFFSET, o.offset.to_string());
        if let Some(ts) = o.timestamp_ms.and_then(crate::envelope::from_millis) {
            set(header::ORIGINAL_TIMESTAMP, format_time(ts));
        }
        if env.first_failure.is_none() {
            set(header::FIRST_FAILURE, format_time(now));
        }
        set(header::ATTEMPT, env.attempt.saturating_add(1).to_string());
        if let Destination::Tier { due, .. } = dest {
            set(header::DUE, format_time(*due));
        }
        set(header::ERROR_CLASS, f.class.to_string());
        set(header::ERROR_CODE, f.code.clone());
        set(
            header::ERROR_MESSAGE,
            truncate(&f.message, MAX_ERROR_HEADER_CHARS),
        );
        set(header::CONSUMER_GROUP, self.group.clone());
        set(header::AGENT_VERSION, crate::VERSION.to_string());
        out
    }

    /// Hands the forwarded copy to the producer; the returned future resolves with the
    /// broker's acknowledgement (`acked`). With `drop_value`, the copy carries the headers only
    /// (plus `pa.value-dropped`): for a value the dead-letter topic refuses.
    pub async fn enqueue(
        &self,
        env: &Envelope,
        f: &Failure,
        dest: &Destination,
        now: DateTime<Utc>,
        drop_value: Option<&KafkaError>,
    ) -> Result<DeliveryFuture, KafkaError> {
        let mut ours = self.headers(env, f, dest, now);
        if let Some(e) = drop_value {
            let why = format!("{} bytes refused: {e}", env.payload.len());
            ours.push((header::VALUE_DROPPED.to_string(), why));
        }
        let mut hs = OwnedHeaders::new_with_capacity(env.headers.len() + ours.len());
        // The message's own headers travel unchanged; earlier `pa.*` retry state is replaced.
        for (k, v) in &env.headers {
            if !k.starts_with(header::PREFIX) || header::is_kept(k) {
                hs = hs.insert(Header {
                    key: k,
                    value: v.as_deref(),
                });
            }
        }
        for (k, v) in &ours {
            hs = hs.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let payload: &[u8] = match drop_value {
            Some(_) => &[],
            None => &env.payload,
        };
        let mut record = FutureRecord::to(dest.topic())
            .payload(payload)
            .headers(hs)
            // The time it entered the tier: a new owner computes the same due time from it.
            .timestamp(now.timestamp_millis());
        if let Some(k) = &env.key {
            record = record.key(k.as_slice());
        }
        send_queued(&self.producer, record).await
    }
}

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

/// librdkafka's fatal error of a producer (a broken idempotent sequence, fencing): it will
/// refuse every record from now on. `which` names the producer in the message.
pub fn fatal_error(producer: &FutureProducer, which: &str) -> Option<String> {
    use rdkafka::producer::Producer;
    let (code, reason) = producer.client().fatal_error()?;
    Some(format!(
        "{which} producer failed fatally: {code:?}: {reason}"
    ))
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
        Ok(Ok(_)) => Ok(()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_tiers_after_their_delays() {
        let labels: Vec<String> = [300, 1800, 7200, 2]
            .iter()
            .map(|s| tier_label(Duration::from_secs(*s)))
            .collect();
        assert_eq!(labels, ["5m", "30m", "2h", "2s"]);
        assert_eq!(tier_label(Duration::from_millis(1500)), "1500ms");
    }
}
