//! A consumed message with its retry state: where it first came from, how often it failed and
//! since when. Read from the `pa.*` headers a retry hop or a replay wrote.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use rdkafka::message::{Message, OwnedMessage};

use crate::message::headers::{self, header_str, parse_time, read_headers, RawHeaders};
use crate::message::ownership::{Hold, Ownership};

/// Highest `pa.attempt` believed; any count at or past the number of tiers dead-letters.
pub const MAX_ATTEMPT: u32 = 1000;

/// Where a message was first published, before any retry hop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
}

/// Which headers are believed. Only the agent's own tier topics carry retry state: on an input
/// topic (a producer's stray headers, a replay, a parked request read back) a request starts
/// afresh, and origin headers naming a topic we do not consume are ignored.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    pub input_topics: HashSet<String>,
}

impl Trust {
    pub fn new(input_topics: impl IntoIterator<Item = String>) -> Trust {
        Trust {
            input_topics: input_topics.into_iter().collect(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Envelope {
    /// Where this copy was consumed.
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: RawHeaders,
    pub timestamp_ms: Option<i64>,
    pub origin: Origin,
    /// Failed processing attempts so far that were routed to a tier (0: fresh).
    pub attempt: u32,
    pub first_failure: Option<DateTime<Utc>>,
    /// Retry headers whose values were out of bounds and clamped (for the metric).
    pub clamped: Vec<&'static str>,
    /// The assignment of the partition this copy was consumed from: its work acts only while
    /// that lasts. Parked requests settled by a release act under their releaser's.
    pub owner: Arc<Ownership>,
    /// Taken at the first side effect (`act`), released after the message was reported.
    pub hold: Hold,
}

impl Envelope {
    pub fn from_message(m: &OwnedMessage, trust: &Trust) -> Envelope {
        let headers = m
            .headers()
            .map(|hs| read_headers(hs.as_borrowed()))
            .unwrap_or_default();
        Envelope::new(
            (m.topic().to_string(), m.partition(), m.offset()),
            m.key().map(<[u8]>::to_vec),
            m.payload().unwrap_or_default().to_vec(),
            headers,
            m.timestamp().to_millis(),
            trust,
        )
    }

    /// The one constructor: `at` is (topic, partition, offset) where this copy was read, and
    /// `trust` decides which of its `pa.*` headers count.
    pub fn new(
        at: (String, i32, i64),
        key: Option<Vec<u8>>,
        payload: Vec<u8>,
        headers: RawHeaders,
        timestamp_ms: Option<i64>,
        trust: &Trust,
    ) -> Envelope {
        let (topic, partition, offset) = at;
        let here = Origin {
            topic: topic.clone(),
            partition,
            offset,
            timestamp_ms,
        };
        let mut env = Envelope {
            topic,
            partition,
            offset,
            key,
            payload,
            headers,
            timestamp_ms,
            origin: here,
            attempt: 0,
            first_failure: None,
            clamped: Vec::new(),
            owner: Ownership::detached(),
            hold: Hold::default(),
        };
        if !trust.input_topics.contains(&env.topic) {
            env.read_retry_state(trust, Utc::now());
        }
        env
    }

    /// Retry state from the headers of a tier copy, each value bounded.
    fn read_retry_state(&mut self, trust: &Trust, now: DateTime<Utc>) {
        let get = |name: &str| header_str(&self.headers, name);
        let origin = match (
            get(headers::ORIGINAL_TOPIC).filter(|t| trust.input_topics.contains(*t)),
            get(headers::ORIGINAL_PARTITION).and_then(|p| p.parse::<i32>().ok()),
            get(headers::ORIGINAL_OFFSET).and_then(|o| o.parse::<i64>().ok()),
        ) {
            (Some(t), Some(p), Some(o)) if p >= 0 && o >= 0 => Some(Origin {
                topic: t.to_string(),
                partition: p,
                offset: o,
                timestamp_ms: get(headers::ORIGINAL_TIMESTAMP)
                    .and_then(parse_time)
                    .map(|t| t.min(now).timestamp_millis()),
            }),
            _ => None,
        };
        let attempt = get(headers::ATTEMPT).and_then(|a| a.trim().parse::<u64>().ok());
        let first_failure = get(headers::FIRST_FAILURE).and_then(parse_time);
        let mut clamped = Vec::new();
        if attempt.is_some_and(|a| a > u64::from(MAX_ATTEMPT)) {
            clamped.push(headers::ATTEMPT);
        }
        if first_failure.is_some_and(|t| t > now) {
            clamped.push(headers::FIRST_FAILURE);
        }
        if let Some(o) = origin {
            self.origin = o;
        }
        self.attempt = attempt.map_or(0, |a| a.min(u64::from(MAX_ATTEMPT)) as u32);
        self.first_failure = first_failure.map(|t| t.min(now));
        self.clamped = clamped;
    }

    /// Whether this message's work may still act (forward, park, release, publish): false
    /// once its partition was revoked, when the new owner redoes it.
    pub async fn act(&self) -> bool {
        self.hold.act(&self.owner).await
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        header_str(&self.headers, name)
    }

    /// The ledger's record of where the request came from: its origin, so every retry hop of
    /// a request without `metadata.requestId` derives the same request id. `order_key` makes
    /// the transaction check that the key is not parked.
    pub fn source(&self, order_key: Option<Vec<u8>>) -> Source {
        Source {
            topic: self.origin.topic.clone(),
            partition: self.origin.partition,
            offset: self.origin.offset,
            order_key,
            fence: None,
        }
    }
}

/// Where a request came from; recorded in the ledger.
#[derive(Debug, Clone)]
pub struct Source {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// With per-key ordering, the message key: the transaction writes nothing while this key
    /// is parked (`parked_key`) and reports `blocked` instead. None skips that check.
    pub order_key: Option<Vec<u8>>,
    /// The consumed partition and this owner's generation: the transaction writes nothing once
    /// another owner claimed a later one (`fenced`). None skips that check.
    pub fence: Option<Fence>,
}

/// A consumed partition (topic, partition) and its owner's generation.
pub type Fence = (String, i32, i64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_comes_from_headers_after_a_hop() {
        let h = |k: &str, v: &str| (k.to_string(), Some(v.as_bytes().to_vec()));
        let trust = Trust::new(["in".to_string()]);
        let fresh = Envelope::new(
            ("in".into(), 2, 40),
            None,
            vec![],
            vec![],
            Some(1000),
            &trust,
        );
        assert_eq!(
            (fresh.origin.topic.as_str(), fresh.origin.offset),
            ("in", 40)
        );
        assert_eq!(fresh.attempt, 0);
        let hop = Envelope::new(
            ("in.retry.5m".into(), 0, 7),
            None,
            vec![],
            vec![
                h(headers::ORIGINAL_TOPIC, "in"),
                h(headers::ORIGINAL_PARTITION, "2"),
                h(headers::ORIGINAL_OFFSET, "40"),
                h(headers::ATTEMPT, "1"),
                h(headers::FIRST_FAILURE, "2026-01-01T00:00:00.000Z"),
            ],
            Some(2000),
            &trust,
        );
        let source = hop.source(None);
        assert_eq!(source.topic, "in");
        assert_eq!((source.partition, source.offset), (2, 40));
        assert_eq!(hop.attempt, 1);
        assert!(hop.first_failure.is_some());
    }
}
