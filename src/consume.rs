//! Consume stage: one poll thread owns the Kafka consumer and the offset tracker, hands messages
//! to workers (same key → same worker, so one user's requests stay ordered), stores each
//! partition's low watermark as workers finish, and commits synchronously on revoke and shutdown.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{ClientContext, Offset, Statistics, TopicPartitionList};
use tokio::sync::mpsc::UnboundedSender;

use crate::due::DueGate;
use crate::metrics::Metrics;
use crate::offsets::{OffsetTracker, TopicPartition};
use crate::ownership::{Hold, Ownership};

/// A worker's report on one message.
pub struct Completion {
    pub tp: TopicPartition,
    pub epoch: u64,
    pub offset: i64,
    pub done: bool,
}

pub struct Job {
    pub msg: OwnedMessage,
    pub epoch: u64,
    pub owner: Arc<Ownership>,
}

/// How long a revoke waits, after the drain, for work that already acted (and so holds its
/// partition until its completion is reported) before it lets the partition go.
const REVOKE_WAIT: Duration = Duration::from_secs(2);

/// State shared by the poll loop and the rebalance callbacks (both run on the poll thread).
pub struct Shared {
    /// `main` or `retry`: the `consumer` label of this consumer's gauges.
    pub name: &'static str,
    tracker: Mutex<OffsetTracker>,
    completions: Mutex<Receiver<Completion>>,
    drain_timeout: Duration,
    metrics: Arc<Metrics>,
    assignment_changed: AtomicBool,
    /// Set once the group assigned partitions (or an empty assignment): readiness.
    pub joined: AtomicBool,
    /// Set once the shutdown drain is over.
    closing: AtomicBool,
    pub lag: Mutex<Vec<(TopicPartition, i64)>>,
}

pub struct AgentContext {
    pub shared: Arc<Shared>,
}

impl ClientContext for AgentContext {
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
            // Queued messages belong to the next owner from now on.
            owners.iter().for_each(|o| o.begin_revoke());
            let drained = self.shared.drain(consumer, &tps, timeout);
            // Work that outlived the drain may not act any more: the new owner redoes it.
            // Every partition closes at once; then one shared wait for work still holding them.
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
    fn apply_ready(&self, consumer: &BaseConsumer<AgentContext>) {
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

    /// Waits until `tps` (all partitions when empty) have nothing in flight, or `timeout`.
    /// Returns whether everything finished.
    fn drain(
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

    fn commit(&self, consumer: &BaseConsumer<AgentContext>, reason: &'static str) {
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

pub struct PollLoop {
    pub consumer: Arc<BaseConsumer<AgentContext>>,
    pub shared: Arc<Shared>,
    pub workers: Vec<UnboundedSender<Job>>,
    pub pipeline: Arc<crate::pipeline::Pipeline>,
    pub max_in_flight: usize,
    pub shutdown_timeout: Duration,
    /// Retry-tier consumers hold each partition until its next message is due.
    pub gate: Option<DueGate>,
    /// All assigned partitions are paused (backpressure or a database outage).
    pub paused: bool,
}

impl PollLoop {
    /// Runs on a dedicated thread until shutdown; then drains, commits and closes the consumer.
    pub fn run(mut self) {
        let shutdown = self.pipeline.shutdown.clone();
        while !shutdown.is_cancelled() {
            self.shared.apply_ready(&self.consumer);
            self.on_assignment_change();
            self.backpressure();
            self.resume_due();
            match self.consumer.poll(Duration::from_millis(50)) {
                None => {}
                Some(Ok(m)) => self.dispatch(m.detach()),
                Some(Err(e)) => tracing::warn!(error = %e, "kafka consumer error"),
            }
        }
        tracing::info!("shutting down: draining in-flight messages");
        let drained = self
            .shared
            .drain(&self.consumer, &[], self.shutdown_timeout);
        self.shared.commit(&self.consumer, "shutdown");
        self.shared.closing.store(true, Ordering::Release);
        tracing::info!(drained, "offsets committed; closing consumer");
        self.gauge(&self.shared.metrics.in_flight).set(0);
    }

    /// librdkafka keeps the application's pauses across a rebalance, and every partition
    /// restarts from its committed offset: start over unpaused, with no message waited for.
    fn on_assignment_change(&mut self) {
        if !self.shared.assignment_changed.swap(false, Ordering::AcqRel) {
            return;
        }
        if let Err(e) = self
            .consumer
            .assignment()
            .and_then(|a| self.consumer.resume(&a))
        {
            tracing::warn!(error = %e, "resume after rebalance failed");
        }
        self.paused = false;
        if let Some(g) = &mut self.gate {
            g.clear();
        }
        self.gauge(&self.shared.metrics.paused_partitions).set(0);
        self.shared.metrics.delayed_partitions.set(0);
    }

    /// Pauses all assigned partitions above `max_in_flight` or while the database is down, and
    /// resumes below half of it once it is back; polling goes on meanwhile, so the group
    /// session and rebalances are served.
    fn backpressure(&mut self) {
        let in_flight = self
            .shared
            .tracker
            .lock()
            .expect("tracker lock")
            .in_flight();
        self.gauge(&self.shared.metrics.in_flight)
            .set(in_flight as i64);
        let outage = self.pipeline.outage_waiters.load(Ordering::Acquire) > 0;
        let want_paused = outage
            || match self.paused {
                true => in_flight > self.max_in_flight / 2,
                false => in_flight >= self.max_in_flight,
            };
        if want_paused == self.paused {
            return;
        }
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        // librdkafka resumes each partition at the first message not yet handed to the agent;
        // partitions waiting for a due time stay paused.
        let result = match want_paused {
            true => self.consumer.pause(&assignment),
            false => self.consumer.resume(&self.without_waiting(&assignment)),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "pause/resume failed");
            return;
        }
        if want_paused && outage {
            tracing::warn!("database unavailable: consumption paused");
        }
        let count = if want_paused {
            assignment.count() as i64
        } else {
            0
        };
        self.gauge(&self.shared.metrics.paused_partitions)
            .set(count);
        self.paused = want_paused;
    }

    fn gauge(&self, vec: &prometheus::IntGaugeVec) -> prometheus::IntGauge {
        vec.with_label_values(&[self.shared.name])
    }

    fn without_waiting(&self, tpl: &TopicPartitionList) -> TopicPartitionList {
        let mut out = TopicPartitionList::new();
        for e in tpl.elements() {
            let tp = (e.topic().to_string(), e.partition());
            if !self.gate.as_ref().is_some_and(|g| g.is_waiting(&tp)) {
                out.add_partition(e.topic(), e.partition());
            }
        }
        out
    }

    /// Resumes partitions whose waited-for message is due (unless everything is paused; the
    /// general resume then picks them up).
    fn resume_due(&mut self) {
        let Some(gate) = &mut self.gate else {
            return;
        };
        if gate.is_empty() {
            return;
        }
        let now = chrono::Utc::now();
        let due = gate.take_due(now);
        let waiting = gate.len() as i64;
        self.shared.metrics.delayed_partitions.set(waiting);
        if due.is_empty() || self.paused {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for ((t, p), _) in &due {
            tpl.add_partition(t, *p);
        }
        if let Err(e) = self.consumer.resume(&tpl) {
            // Still paused: try again on the next turn of the loop.
            tracing::warn!(error = %e, "resume of a due retry partition failed");
            for (tp, offset) in due {
                gate.wait(tp, offset, now);
            }
        }
    }

    /// Holds a retry-tier message that is not yet due: pause its partition and set the fetch
    /// position back to it. Returns whether it was held.
    fn hold_until_due(&mut self, msg: &OwnedMessage) -> bool {
        let Some(gate) = &mut self.gate else {
            return false;
        };
        let tp = (msg.topic().to_string(), msg.partition());
        if gate.is_behind_a_wait(&tp, msg.offset()) {
            return true;
        }
        if gate.was_released(&tp, msg.offset()) {
            return false;
        }
        let Some((due, clamped)) = gate.due_at(msg) else {
            return false;
        };
        if clamped {
            let m = &self.shared.metrics.headers_clamped;
            m.with_label_values(&[crate::envelope::header::DUE]).inc();
        }
        if due <= chrono::Utc::now() {
            return false;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&tp.0, tp.1);
        let held = self.consumer.pause(&tpl).and_then(|_| {
            self.consumer.seek(
                &tp.0,
                tp.1,
                Offset::Offset(msg.offset()),
                Duration::from_secs(5),
            )
        });
        if let Err(e) = held {
            // Not held: handle it now rather than risk skipping it.
            tracing::warn!(topic = %tp.0, partition = tp.1, error = %e, "cannot pause a retry partition until due");
            let _ = self.consumer.resume(&tpl);
            return false;
        }
        tracing::debug!(topic = %tp.0, partition = tp.1, offset = msg.offset(), %due, "retry message not yet due; partition paused");
        gate.wait(tp, msg.offset(), due);
        self.shared
            .metrics
            .delayed_partitions
            .set(gate.len() as i64);
        true
    }

    fn dispatch(&mut self, msg: OwnedMessage) {
        if self.hold_until_due(&msg) {
            return;
        }
        let tp = (msg.topic().to_string(), msg.partition());
        let (epoch, owner) = self
            .shared
            .tracker
            .lock()
            .expect("tracker lock")
            .dispatched(&tp, msg.offset());
        let mut h = std::hash::DefaultHasher::new();
        match msg.key() {
            Some(k) => k.hash(&mut h),
            // Keyless messages keep their partition's order.
            None => tp.hash(&mut h),
        }
        let worker = &self.workers[(h.finish() % self.workers.len() as u64) as usize];
        if worker.send(Job { msg, epoch, owner }).is_err() {
            // Every later message for that worker would be dropped: stop, commit what is done.
            let _ = self.pipeline.fatal.set("a worker stopped".into());
            self.pipeline.shutdown.cancel();
        }
    }
}

/// Worker task: handles its jobs one by one and reports each to the poll thread.
pub async fn worker(
    mut jobs: tokio::sync::mpsc::UnboundedReceiver<Job>,
    pipeline: Arc<crate::pipeline::Pipeline>,
    shared: Arc<Shared>,
    done: Sender<Completion>,
) {
    use crate::pipeline::Handled;
    while let Some(Job { msg, epoch, owner }) = jobs.recv().await {
        let mut c = Completion {
            tp: (msg.topic().to_string(), msg.partition()),
            epoch,
            offset: msg.offset(),
            done: false,
        };
        // Queued messages of a partition this consumer no longer owns belong to the new owner,
        // and once shutdown begins they are left for the next one.
        let current = shared
            .tracker
            .lock()
            .expect("tracker lock")
            .is_current(&c.tp, epoch);
        let hold = Hold::default();
        let handled = match current && owner.may_start() && !pipeline.shutdown.is_cancelled() {
            false => Handled::Abandoned,
            true => run_isolated(&pipeline, msg, owner, hold.clone()).await,
        };
        match handled {
            Handled::Abandoned => {}
            Handled::Done(None) => c.done = true,
            // The next message starts while the broker acknowledges this one's result event.
            Handled::Done(Some(pending)) => {
                let done = done.clone();
                let p = pipeline.clone();
                tokio::spawn(async move {
                    c.done = pending.delivered(&p.shutdown, &p.fatal).await;
                    let _ = done.send(c);
                    // Reported first: a revoke waiting for this hold then commits it.
                    drop(hold.take());
                });
                continue;
            }
        }
        let reported = done.send(c).is_ok();
        drop(hold.take());
        if !reported {
            return;
        }
    }
}

/// Runs one message in its own task, so a panic stops the agent (nothing committed past the
/// message) instead of silently killing this worker and every message hashed to it.
async fn run_isolated(
    pipeline: &Arc<crate::pipeline::Pipeline>,
    msg: OwnedMessage,
    owner: Arc<Ownership>,
    hold: Hold,
) -> crate::pipeline::Handled {
    let p = pipeline.clone();
    match tokio::spawn(async move { p.handle(&msg, owner, hold).await }).await {
        Ok(handled) => handled,
        Err(e) => {
            tracing::error!(error = %e, "message handling panicked: stopping");
            let _ = pipeline
                .fatal
                .set(format!("message handling panicked: {e}"));
            pipeline.shutdown.cancel();
            crate::pipeline::Handled::Abandoned
        }
    }
}
