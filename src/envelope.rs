//! A consumed message with its retry state: where it first came from, how often it failed and
//! since when. Read from the `pa.*` headers a retry hop or a replay wrote.

use std::collections::HashSet;
use std::ffi::CStr;
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use rdkafka::message::{BorrowedHeaders, Headers, Message, OwnedMessage};

use crate::ownership::{Hold, Ownership};
use crate::persist::Source;

/// Header names written on forwarded messages; values are UTF-8 strings.
pub mod header {
    pub const PREFIX: &str = "pa.";
    pub const ATTEMPT: &str = "pa.attempt";
    pub const ORIGINAL_TOPIC: &str = "pa.original.topic";
    pub const ORIGINAL_PARTITION: &str = "pa.original.partition";
    pub const ORIGINAL_OFFSET: &str = "pa.original.offset";
    pub const ORIGINAL_TIMESTAMP: &str = "pa.original.timestamp";
    pub const FIRST_FAILURE: &str = "pa.first-failure";
    pub const DUE: &str = "pa.due";
    pub const ERROR_CLASS: &str = "pa.error.class";
    pub const ERROR_CODE: &str = "pa.error.code";
    pub const ERROR_MESSAGE: &str = "pa.error.message";
    pub const CONSUMER_GROUP: &str = "pa.consumer-group";
    pub const AGENT_VERSION: &str = "pa.agent-version";
    pub const REPLAYED_FROM: &str = "pa.replayed-from";
    /// On a dead letter whose value the topic refused (too large): why it was dropped.
    pub const VALUE_DROPPED: &str = "pa.value-dropped";

    /// Kept as they are on every hop (`pa.original.*` is rewritten from the checked origin).
    pub fn is_kept(name: &str) -> bool {
        name == FIRST_FAILURE || name == REPLAYED_FROM
    }
}

pub type RawHeaders = Vec<(String, Option<Vec<u8>>)>;

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
            get(header::ORIGINAL_TOPIC).filter(|t| trust.input_topics.contains(*t)),
            get(header::ORIGINAL_PARTITION).and_then(|p| p.parse::<i32>().ok()),
            get(header::ORIGINAL_OFFSET).and_then(|o| o.parse::<i64>().ok()),
        ) {
            (Some(t), Some(p), Some(o)) if p >= 0 && o >= 0 => Some(Origin {
                topic: t.to_string(),
                partition: p,
                offset: o,
                timestamp_ms: get(header::ORIGINAL_TIMESTAMP)
                    .and_then(parse_time)
                    .map(|t| t.min(now).timestamp_millis()),
            }),
            _ => None,
        };
        let attempt = get(header::ATTEMPT).and_then(|a| a.trim().parse::<u64>().ok());
        let first_failure = get(header::FIRST_FAILURE).and_then(parse_time);
        let mut clamped = Vec::new();
        if attempt.is_some_and(|a| a > u64::from(MAX_ATTEMPT)) {
            clamped.push(header::ATTEMPT);
        }
        if first_failure.is_some_and(|t| t > now) {
            clamped.push(header::FIRST_FAILURE);
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

/// Every header as (name, value), in order. rdkafka's own iterator panics on a header name that
/// is not UTF-8; a producer's mistake must not crash the agent, so names are read lossily here.
pub fn read_headers(hs: &BorrowedHeaders) -> RawHeaders {
    use rdkafka::bindings::{rd_kafka_header_get_all, rd_kafka_headers_t};
    use rdkafka::types::RDKafkaRespErr;
    // rdkafka's BorrowedHeaders is a view of the native header list: the same pointer.
    let native = hs as *const BorrowedHeaders as *const rd_kafka_headers_t;
    let mut out = Vec::with_capacity(hs.count());
    for idx in 0..hs.count() {
        let mut name = std::ptr::null();
        let mut value = std::ptr::null();
        let mut size = 0;
        // SAFETY: `native` is the live list behind `hs` and idx < its count; the returned
        // pointers stay valid while `hs` is borrowed, and are copied before it ends.
        let err = unsafe { rd_kafka_header_get_all(native, idx, &mut name, &mut value, &mut size) };
        if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            continue;
        }
        let name = unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned();
        let value = (!value.is_null())
            .then(|| unsafe { std::slice::from_raw_parts(value as *const u8, size) }.to_vec());
        out.push((name, value));
    }
    out
}

/// The last value of header `name`, when it is UTF-8.
pub fn header_str<'a>(headers: &'a RawHeaders, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| v.as_deref())
        .and_then(|v| std::str::from_utf8(v).ok())
}

pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

pub fn from_millis(ms: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms)
}

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
                h(header::ORIGINAL_TOPIC, "in"),
                h(header::ORIGINAL_PARTITION, "2"),
                h(header::ORIGINAL_OFFSET, "40"),
                h(header::ATTEMPT, "1"),
                h(header::FIRST_FAILURE, "2026-01-01T00:00:00.000Z"),
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
