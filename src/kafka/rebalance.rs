//! Rebalances and offsets: what happens when partitions are assigned or revoked (drain, close,
//! commit synchronously), and turning workers' completions into stored offsets.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::{ClientContext, Offset, Statistics, TopicPartitionList};

use super::offsets::{OffsetTracker, TopicPartition};
use crate::message::ownership::Ownership;
use crate::ops::kafka_health;
use crate::ops::metrics::Metrics;

/// A worker's report on one message.
pub struct Completion {
    pub tp: TopicPartition,
    pub epoch: u64,
    pub offset: i64,
    pub done: bool,
    /// The message's size, as counted against `MAX_IN_FLIGHT_BYTES` when it was dispatched.
    pub bytes: usize,
}

/// How long a revoke waits, after the drain, for work that already acted (and so holds its
/// partition until its completion is reported) before it lets the partition go.
const REVOKE_WAIT: Duration = Duration::from_secs(2);

/// State shared by the poll loop and the rebalance callbacks (both run on the poll thread).
pub struct Shared {
    /// `main` or `retry`: the `consumer` label of this consumer's gauges.
    pub name: &'static str,
    pub(super) tracker: Mutex<OffsetTracker>,
    /// Bytes of the messages dispatched and not yet reported complete (backpressure).
    pub(super) in_flight_bytes: AtomicUsize,
    completions: Mutex<Receiver<Completion>>,
    drain_timeout: Duration,
    pub(super) metrics: Arc<Metrics>,
    pub(super) assignment_changed: AtomicBool,
    /// Set once the group assigned partitions (or an empty assignment): readiness.
    pub joined: AtomicBool,
    /// Set once the shutdown drain is over.
    pub(super) closing: AtomicBool,
    pub lag: Mutex<Vec<(TopicPartition, i64)>>,
}

pub struct AgentContext {
    pub shared: Arc<Shared>,
}

impl ClientContext for AgentContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        kafka_health::client_log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        kafka_health::client_error(&error, reason);
    }

    fn stats(&self, stats: Statistics) {
        let lag = stats
            .topics
            .values()
            .flat_map(|t| {
                t.partitions
                    .values()
                    .map(move |p| ((t.topic.clone(), p.partition), p.consumer_lag))
            })
            .filter(|((_, p), lag)| *p >= 0 && *lag >= 0)
            .collect::<Vec<_>>();
        // librdkafka keeps reporting partitions it no longer owns, with a stale lag.
        let tracker = self.shared.tracker.lock().expect("tracker lock");
        let lag = lag
            .into_iter()
            .filter(|(tp, _)| tracker.is_assigned(tp))
            .collect();
        drop(tracker);
        *self.shared.lag.lock().expect("lag lock") = lag;
    }
}

impl ConsumerContext for AgentContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let tps = topic_partitions(tpl);
            // After the shutdown drain, the close-time revoke has nothing left to wait for.
            // A lost assignment belongs to its new owner already: nothing to wait for.
            let timeout =
                match self.shared.closing.load(Ordering::Acquire) || consumer.assignment_lost() {
                    true => Duration::ZERO,
                    false => self.shared.drain_timeout,
                };
            let owners: Vec<Arc<Ownership>> = {
                let tracker = self.shared.tracker.lock().expect("tracker lock");
                tps.iter().filter_map(|tp| tracker.ownership(tp)).collect()
            };
            // Never claimed back from now on.
            owners.iter().for_each(|o| o.begin_revoke());
            // Queued messages still start during the drain: the offset committed is the oldest
            // message unfinished, so handing queued ones over unstarted made the next owner redo
            // everything finished above them (10,855-17,858 duplicates per scale run of the
            // bench, BENCHMARKS.md; with them drained, none, and the drain took 0.3 s).
            // Without a drain (the revoke at close, after the shutdown's own drain; a lost
            // assignment; REBALANCE_DRAIN_TIMEOUT=0) nothing new starts.
            if timeout.is_zero() {
                owners.iter().for_each(|o| o.stop_queued());
            }
            let drained = self.shared.drain(consumer, &tps, timeout);
            // From here nothing queued starts (`close` implies `stop_queued`), and work that
            // outlived the drain may not act any more: the next owner redoes both. Every
            // partition closes at once; then one shared wait for work still holding them.
            owners.iter().for_each(|o| o.close());
            let deadline = Instant::now() + REVOKE_WAIT;
            let busy = owners.iter().filter(|o| !o.wait_idle(deadline)).count();
            let settled = busy == 0;
            // Work that held the partition reported before letting go: commit it too.
            self.shared.apply_ready(consumer);
            tracing::info!(
                partitions = tps.len(),
                drained,
                settled,
                "partitions revoked"
            );
            // A lost assignment belongs to someone else already: committing would fail.
            if !consumer.assignment_lost() {
                self.shared.commit(consumer, "revoke");
            }
            let mut tracker = self.shared.tracker.lock().expect("tracker lock");
            tps.iter().for_each(|tp| tracker.revoke(tp));
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let tps = topic_partitions(tpl);
                kafka_health::healthy();
                tracing::info!(partitions = ?tps, "partitions assigned");
                let mut tracker = self.shared.tracker.lock().expect("tracker lock");
                tps.into_iter().for_each(|tp| tracker.assign(tp));
                self.shared
                    .assignment_changed
                    .store(true, Ordering::Release);
                self.shared.joined.store(true, Ordering::Release);
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
            Rebalance::Revoke(_) => {}
        }
    }
}

fn topic_partitions(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

impl Shared {
    pub fn new(
        name: &'static str,
        completions: Receiver<Completion>,
        drain_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            name,
            tracker: Mutex::default(),
            in_flight_bytes: AtomicUsize::new(0),
            completions: Mutex::new(completions),
            drain_timeout,
            metrics,
            assignment_changed: AtomicBool::new(false),
            joined: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            lag: Mutex::default(),
        }
    }

    /// Partitions this consumer owns now.
    pub fn assigned(&self) -> usize {
        self.tracker.lock().expect("tracker lock").assigned()
    }

    fn apply(&self, consumer: &BaseConsumer<AgentContext>, c: Completion) {
        self.in_flight_bytes.fetch_sub(c.bytes, Ordering::AcqRel);
        let mut tracker = self.tracker.lock().expect("tracker lock");
        if !c.done {
            tracker.abandoned(&c.tp, c.epoch, c.offset);
            return;
        }
        let Some(next) = tracker.completed(&c.tp, c.epoch, c.offset) else {
            return;
        };
        drop(tracker);
        let mut tpl = TopicPartitionList::new();
        let stored = tpl
            .add_partition_offset(&c.tp.0, c.tp.1, Offset::Offset(next))
            .and_then(|_| consumer.store_offsets(&tpl));
        if let Err(e) = stored {
            tracing::warn!(topic = %c.tp.0, partition = c.tp.1, offset = next, error = %e, "offset not stored");
        }
    }

    /// Applies every completion already reported, without waiting.
    pub(super) fn apply_ready(&self, consumer: &BaseConsumer<AgentContext>) {
        loop {
            let next = self
                .completions
                .lock()
                .expect("completions lock")
                .try_recv();
            match next {
                Ok(c) => self.apply(consumer, c),
                Err(_) => return,
            }
        }
    }

    /// Waits up to `timeout` for the next completion, then applies every one reported: the
    /// poll loop's wait while the in-flight bounds are reached. Returns whether one came.
    pub(super) fn apply_next(
        &self,
        consumer: &BaseConsumer<AgentContext>,
        timeout: Duration,
    ) -> bool {
        let next = self
            .completions
            .lock()
            .expect("completions lock")
            .recv_timeout(timeout);
        let Ok(c) = next else { return false };
        self.apply(consumer, c);
        self.apply_ready(consumer);
        true
    }

    /// Waits until `tps` (all partitions when empty) have nothing in flight, or `timeout`.
    /// Returns whether everything finished.
    pub(super) fn drain(
        &self,
        consumer: &BaseConsumer<AgentContext>,
        tps: &[TopicPartition],
        timeout: Duration,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let pending = {
                let t = self.tracker.lock().expect("tracker lock");
                if tps.is_empty() {
                    t.in_flight()
                } else {
                    t.in_flight_of(tps)
                }
            };
            if pending == 0 {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    pending,
                    "drain deadline passed; unfinished messages will be redelivered"
                );
                return false;
            }
            let next = self
                .completions
                .lock()
                .expect("completions lock")
                .recv_timeout(left.min(Duration::from_millis(50)));
            match next {
                Ok(c) => self.apply(consumer, c),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return false,
            }
        }
    }

    pub(super) fn commit(&self, consumer: &BaseConsumer<AgentContext>, reason: &'static str) {
        let result = match consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => "ok",
            // Nothing stored since the last commit.
            Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {
                "nothing"
            }
            Err(e) => {
                tracing::warn!(reason, error = %e, "offset commit failed");
                "error"
            }
        };
        self.metrics
            .commits
            .with_label_values(&[reason, result])
            .inc();
    }
}
