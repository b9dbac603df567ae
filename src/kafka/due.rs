//! Retry-tier timing: a message in a tier is due at the time it entered the tier plus the tier's
//! delay. Until then its partition is paused with the fetch position set back to it, so no later
//! message of that partition runs early and the poll loop (and the group session) goes on.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::message::{Message, OwnedMessage};

use crate::kafka::offsets::TopicPartition;
use crate::message::headers::{self, header_str, parse_time, read_headers};

pub struct DueGate {
    /// Tier topic → its delay.
    delays: HashMap<String, Duration>,
    /// Paused partitions: the offset waited for and when it is due.
    waiting: HashMap<TopicPartition, (i64, DateTime<Utc>)>,
    /// The message each partition last waited for, once due: it is never held again, however
    /// its headers read (a clamped due time is relative to now, and would otherwise recede).
    released: HashMap<TopicPartition, i64>,
}

/// `due`, or `now + delay` when that is sooner.
pub fn clamp(
    due: DateTime<Utc>,
    now: DateTime<Utc>,
    delay: chrono::Duration,
) -> (DateTime<Utc>, bool) {
    match now.checked_add_signed(delay) {
        Some(latest) if due > latest => (latest, true),
        _ => (due, false),
    }
}

impl DueGate {
    pub fn new(topics: &[(String, Duration)]) -> DueGate {
        DueGate {
            delays: topics.iter().cloned().collect(),
            waiting: HashMap::new(),
            released: HashMap::new(),
        }
    }

    /// When `msg` is due: its `pa.due` header, else its timestamp (tier entry) plus the tier's
    /// delay, so any owner computes the same time. Headers and timestamps are untrusted: a due
    /// time later than the tier's delay from now is clamped to it (`true` says it was), so a
    /// garbled date cannot hold a partition. None when it is not a tier message.
    pub fn due_at(&self, msg: &OwnedMessage) -> Option<(DateTime<Utc>, bool)> {
        let delay = chrono::Duration::from_std(*self.delays.get(msg.topic())?).ok()?;
        let headers = msg
            .headers()
            .map(|hs| read_headers(hs.as_borrowed()))
            .unwrap_or_default();
        let from_header = header_str(&headers, headers::DUE).and_then(parse_time);
        let from_timestamp = || {
            let entered = DateTime::from_timestamp_millis(msg.timestamp().to_millis()?)?;
            entered.checked_add_signed(delay)
        };
        let due = from_header.or_else(from_timestamp)?;
        Some(clamp(due, Utc::now(), delay))
    }

    /// Whether this message already waited its turn (it is due, whatever its headers say).
    pub fn was_released(&mut self, tp: &TopicPartition, offset: i64) -> bool {
        self.released.get(tp).is_some_and(|o| *o == offset)
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
        due.iter().for_each(|(tp, offset)| {
            self.waiting.remove(tp);
            self.released.insert(tp.clone(), *offset);
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
        self.released.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::Timestamp;

    fn tier_message(timestamp_ms: i64, due: Option<&str>) -> OwnedMessage {
        let headers = due.map(|d| {
            OwnedHeaders::new().insert(Header {
                key: headers::DUE,
                value: Some(d),
            })
        });
        OwnedMessage::new(
            None,
            None,
            "in.retry.5m".into(),
            Timestamp::CreateTime(timestamp_ms),
            0,
            0,
            headers,
        )
    }

    fn gate() -> DueGate {
        DueGate::new(&[("in.retry.5m".into(), Duration::from_secs(300))])
    }

    #[test]
    fn far_future_timestamp_is_clamped_not_a_panic() {
        // The latest time chrono represents: adding the tier delay overflows.
        let max_ms = DateTime::<Utc>::MAX_UTC.timestamp_millis();
        for ts in [max_ms, max_ms - 1000, i64::MAX, i64::MIN, -1] {
            let before = Utc::now();
            if let Some((due, _)) = gate().due_at(&tier_message(ts, None)) {
                assert!(
                    due <= Utc::now() + chrono::Duration::seconds(300),
                    "{ts}: {due}"
                );
                assert!(due >= before - chrono::Duration::days(365 * 300_000));
            }
        }
    }

    #[test]
    fn garbled_due_header_is_clamped_to_the_tier_delay() {
        let now = Utc::now().timestamp_millis();
        let (due, clamped) = gate()
            .due_at(&tier_message(now, Some("9999-12-31T23:59:59Z")))
            .unwrap();
        assert!(clamped);
        assert!(due <= Utc::now() + chrono::Duration::seconds(300));
        let (_, clamped) = gate()
            .due_at(&tier_message(now, Some("2020-01-01T00:00:00Z")))
            .unwrap();
        assert!(!clamped, "a due time in the past is simply due");
    }
}
