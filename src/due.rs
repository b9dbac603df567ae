//! Retry-tier timing: a message in a tier is due at the time it entered the tier plus the tier's
//! delay. Until then its partition is paused with the fetch position set back to it, so no later
//! message of that partition runs early and the poll loop (and the group session) goes on.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::message::{Message, OwnedMessage};

use crate::envelope::{header, header_str, parse_time, read_headers};
use crate::offsets::TopicPartition;

pub struct DueGate {
    /// Tier topic → its delay.
    delays: HashMap<String, Duration>,
    /// Paused partitions: the offset waited for and when it is due.
    waiting: HashMap<TopicPartition, (i64, DateTime<Utc>)>,
}

impl DueGate {
    pub fn new(topics: &[(String, Duration)]) -> DueGate {
        DueGate {
            delays: topics.iter().cloned().collect(),
            waiting: HashMap::new(),
        }
    }

    /// When `msg` is due: its `pa.due` header, else its timestamp (tier entry) plus the tier's
    /// delay, so any owner computes the same time. None when it has no timing at all.
    pub fn due_at(&self, msg: &OwnedMessage) -> Option<DateTime<Utc>> {
        let headers = msg
            .headers()
            .map(|hs| read_headers(hs.as_borrowed()))
            .unwrap_or_default();
        let from_header = header_str(&headers, header::DUE).and_then(parse_time);
        from_header.or_else(|| {
            let entered = DateTime::from_timestamp_millis(msg.timestamp().to_millis()?)?;
            let delay = self.delays.get(msg.topic())?;
            Some(entered + chrono::Duration::from_std(*delay).ok()?)
        })
    }

    /// Whether this message of a paused partition was fetched before the pause took effect;
    /// it is fetched again after the resume.
    pub fn is_behind_a_wait(&self, tp: &TopicPartition, offset: i64) -> bool {
        self.waiting.get(tp).is_some_and(|(o, _)| offset >= *o)
    }

    pub fn wait(&mut self, tp: TopicPartition, offset: i64, due: DateTime<Utc>) {
        self.waiting.insert(tp, (offset, due));
    }

    /// Removes and returns the partitions whose message is now due, with that message's offset.
    pub fn take_due(&mut self, now: DateTime<Utc>) -> Vec<(TopicPartition, i64)> {
        let due: Vec<(TopicPartition, i64)> = self
            .waiting
            .iter()
            .filter(|(_, (_, at))| *at <= now)
            .map(|(tp, (offset, _))| (tp.clone(), *offset))
            .collect();
        due.iter().for_each(|(tp, _)| {
            self.waiting.remove(tp);
        });
        due
    }

    pub fn is_waiting(&self, tp: &TopicPartition) -> bool {
        self.waiting.contains_key(tp)
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// After a rebalance every partition restarts from its committed offset.
    pub fn clear(&mut self) {
        self.waiting.clear();
    }
}
