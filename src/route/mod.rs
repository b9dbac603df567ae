//! Route stage: forwards a failed message to its next delayed retry tier or to the dead-letter
//! topic, with the original key, value and headers plus `pa.*` headers, and waits for the
//! broker's acknowledgement (acks=all, idempotent producer) before the caller may commit.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryFuture, FutureRecord};

use crate::classify::{Disposition, Failure};
use crate::message::envelope::Envelope;
use producer::FutureProducer;

pub mod headers;
pub mod producer;
pub mod results;
pub mod tiers;

pub use producer::{acked, fatal_error, is_too_large, send_acked, send_queued};
pub use tiers::{dlq_topic, dlq_topics, tier_label, Topology};

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

    /// Why the forwarding producer will refuse every record from now on, if it will.
    pub fn fatal_error(&self, last: &KafkaError) -> Option<String> {
        fatal_error(&self.producer, "forwarding", last)
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
        let hs = headers::forwarded(env, f, dest, now, &self.group, drop_value);
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
