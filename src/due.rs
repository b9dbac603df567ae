//! Retry-tier timing: a message in a tier is due at the time it entered the tier plus the tier's
//! delay. Until then its partition is paused with the fetch position set back to it, so no later
//! message of that partition runs early and the poll loop (and the group session) goes on.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::message::{Headers, Message, OwnedMessage};

use crate::envelope::{header, parse_time};
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
        let from_header = msg.headers().and_then(|hs| {
            hs.iter()
                .filter(|h| h.key == header::DUE)
                .last()
                .and_then(|h| std::str::from_utf8(h.value?).ok())
                .and_then(parse_time)
        });
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

    /// Removes and returns the partitions whose message is now due.
    pub fn take_due(&mut self, now: DateTime<Utc>) -> Vec<TopicPartition> {
        let due: Vec<TopicPartition> = self
            .waiting
            .iter()
            .filter(|(_, (_, at))| *at <= now)
            .map(|(tp, _)| tp.clone())
            .collect();
        due.iter().for_each(|tp| {
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
