//! Commit stage bookkeeping: per-partition completion tracking. Messages of one partition finish
//! out of order (different keys run concurrently); the offset that may be committed is always
//! the lowest offset not yet finished, so a crash never skips an unfinished message.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::message::ownership::Ownership;

pub type TopicPartition = (String, i32);

#[derive(Default, Debug)]
struct Partition {
    /// Bumped on every assignment, so completions from an earlier ownership are ignored.
    epoch: u64,
    in_flight: BTreeSet<i64>,
    /// Abandoned messages: never finished here, so the committed offset must stay below them.
    stuck: BTreeSet<i64>,
    /// One past the highest offset dispatched.
    next: Option<i64>,
    /// Last value handed out by `completed`, to report only advances.
    committable: Option<i64>,
    /// This assignment, as the messages' work sees it (fenced at revoke).
    owner: Arc<Ownership>,
}

impl Partition {
    fn low_watermark(&self) -> Option<i64> {
        let pending = self
            .in_flight
            .first()
            .into_iter()
            .chain(self.stuck.first())
            .min()
            .copied();
        pending.or(self.next)
    }
}

#[derive(Default, Debug)]
pub struct OffsetTracker {
    parts: HashMap<TopicPartition, Partition>,
    epochs: u64,
}

impl OffsetTracker {
    pub fn assign(&mut self, tp: TopicPartition) {
        self.epochs += 1;
        let owner = Arc::new(Ownership::of(&tp.0, tp.1));
        self.parts.insert(
            tp,
            Partition {
                epoch: self.epochs,
                owner,
                ..Default::default()
            },
        );
    }

    pub fn revoke(&mut self, tp: &TopicPartition) {
        self.parts.remove(tp);
    }

    /// The current assignment of `tp`.
    pub fn ownership(&self, tp: &TopicPartition) -> Option<Arc<Ownership>> {
        self.parts.get(tp).map(|p| p.owner.clone())
    }

    /// Records a message handed to a worker; returns the epoch its completion must carry and
    /// the ownership its work acts under.
    pub fn dispatched(&mut self, tp: &TopicPartition, offset: i64) -> (u64, Arc<Ownership>) {
        let epochs = &mut self.epochs;
        let p = self.parts.entry(tp.clone()).or_insert_with(|| {
            // A message for a partition the rebalance callback has not reported (never expected).
            *epochs += 1;
            Partition {
                epoch: *epochs,
                ..Default::default()
            }
        });
        p.in_flight.insert(offset);
        // The first message's offset is where this ownership started: nothing to store yet.
        p.committable.get_or_insert(offset);
        p.next = Some(p.next.map_or(offset + 1, |n| n.max(offset + 1)));
        (p.epoch, p.owner.clone())
    }

    /// Marks a message finished; returns the new committable offset when it advanced.
    pub fn completed(&mut self, tp: &TopicPartition, epoch: u64, offset: i64) -> Option<i64> {
        let p = self.parts.get_mut(tp).filter(|p| p.epoch == epoch)?;
        if !p.in_flight.remove(&offset) {
            return None;
        }
        let low = p.low_watermark()?;
        if p.committable.is_some_and(|c| c >= low) {
            return None;
        }
        p.committable = Some(low);
        Some(low)
    }

    /// Marks a message as never to be finished by this consumer.
    pub fn abandoned(&mut self, tp: &TopicPartition, epoch: u64, offset: i64) {
        if let Some(p) = self.parts.get_mut(tp).filter(|p| p.epoch == epoch) {
            if p.in_flight.remove(&offset) {
                p.stuck.insert(offset);
            }
        }
    }

    pub fn assigned(&self) -> usize {
        self.parts.len()
    }

    pub fn is_assigned(&self, tp: &TopicPartition) -> bool {
        self.parts.contains_key(tp)
    }

    /// Whether `epoch` is the current ownership of `tp` (false once revoked or re-assigned).
    pub fn is_current(&self, tp: &TopicPartition, epoch: u64) -> bool {
        self.parts.get(tp).is_some_and(|p| p.epoch == epoch)
    }

    pub fn in_flight(&self) -> usize {
        self.parts.values().map(|p| p.in_flight.len()).sum()
    }

    pub fn in_flight_of(&self, tps: &[TopicPartition]) -> usize {
        tps.iter()
            .filter_map(|tp| self.parts.get(tp))
            .map(|p| p.in_flight.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp() -> TopicPartition {
        ("t".into(), 0)
    }

    #[test]
    fn committable_offset_is_lowest_unfinished() {
        let mut t = OffsetTracker::default();
        t.assign(tp());
        let e = (10..14).map(|o| t.dispatched(&tp(), o).0).last().unwrap();
        assert_eq!(t.completed(&tp(), e, 12), None, "10 still running");
        assert_eq!(t.completed(&tp(), e, 11), None);
        assert_eq!(
            t.completed(&tp(), e, 10),
            Some(13),
            "13 is the lowest unfinished"
        );
        assert_eq!(t.completed(&tp(), e, 13), Some(14));
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn abandoned_message_holds_the_watermark() {
        let mut t = OffsetTracker::default();
        t.assign(tp());
        let e = (0..3).map(|o| t.dispatched(&tp(), o).0).last().unwrap();
        t.abandoned(&tp(), e, 0);
        assert_eq!(
            t.completed(&tp(), e, 1),
            None,
            "offset 0 is where this ownership started"
        );
        assert_eq!(
            t.completed(&tp(), e, 2),
            None,
            "never past the abandoned offset"
        );
        assert_eq!(t.in_flight(), 0, "abandoned messages do not block draining");
    }

    #[test]
    fn completions_from_an_earlier_assignment_are_ignored() {
        let mut t = OffsetTracker::default();
        t.assign(tp());
        let old = t.dispatched(&tp(), 5).0;
        t.revoke(&tp());
        t.assign(tp());
        let new = t.dispatched(&tp(), 7).0;
        assert_eq!(t.completed(&tp(), old, 5), None);
        assert_eq!(t.completed(&tp(), new, 7), Some(8));
    }
}
