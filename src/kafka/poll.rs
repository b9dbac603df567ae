//! The poll loop: one thread owns the consumer, hands each message to a worker (same key,
//! same worker, so a key's requests stay in order), stops taking messages at the in-flight
//! bounds, pauses for outages and stalls, and holds retry-tier partitions until their next
//! message is due.

use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::IntGauge;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc::UnboundedSender;

use super::due::DueGate;
use super::rebalance::{AgentContext, Shared};
use super::worker::Job;
use crate::classify::Failure;
use crate::message::headers;
use crate::ops::kafka_health;
use crate::ops::lifecycle::Lifecycle;

/// How much work the loop lets out at once, and how long it waits.
pub struct Limits {
    pub max_in_flight: usize,
    pub max_in_flight_bytes: usize,
    /// How long the loop may wait at an in-flight bound with nothing finishing before it pauses
    /// the partitions instead: a wait serves no rebalance and no `max.poll.interval.ms`, a
    /// pause serves both but drops librdkafka's fetched messages, which are fetched again.
    pub stall_pause_after: Duration,
    pub shutdown_timeout: Duration,
}

pub struct PollLoop {
    consumer: Arc<BaseConsumer<AgentContext>>,
    shared: Arc<Shared>,
    workers: Vec<UnboundedSender<Job>>,
    life: Arc<Lifecycle>,
    limits: Limits,
    /// Retry-tier consumers hold each partition until its next message is due.
    gate: Option<DueGate>,
    /// All assigned partitions are paused (a stall or a database outage).
    paused: bool,
    /// Since when an in-flight bound has held with nothing finishing.
    full_since: Option<Instant>,
    /// This consumer's gauges, looked up once: the loop sets them on every turn.
    in_flight: IntGauge,
    in_flight_bytes: IntGauge,
    paused_partitions: IntGauge,
}

const POLL_TIMEOUT: Duration = Duration::from_millis(50);

/// A message's size as the in-flight byte bound counts it.
fn size(msg: &OwnedMessage) -> usize {
    msg.payload().map_or(0, <[u8]>::len) + msg.key().map_or(0, <[u8]>::len)
}

impl PollLoop {
    pub fn new(
        consumer: BaseConsumer<AgentContext>,
        shared: Arc<Shared>,
        workers: Vec<UnboundedSender<Job>>,
        life: Arc<Lifecycle>,
        mut limits: Limits,
        gate: Option<DueGate>,
    ) -> Self {
        limits.max_in_flight = limits.max_in_flight.max(1);
        limits.max_in_flight_bytes = limits.max_in_flight_bytes.max(1);
        let gauge = |vec: &prometheus::IntGaugeVec| vec.with_label_values(&[shared.name]);
        let m = &shared.metrics;
        let (in_flight, in_flight_bytes, paused_partitions) = (
            gauge(&m.in_flight),
            gauge(&m.in_flight_bytes),
            gauge(&m.paused_partitions),
        );
        Self {
            consumer: Arc::new(consumer),
            shared,
            workers,
            life,
            limits,
            gate,
            paused: false,
            full_since: None,
            in_flight,
            in_flight_bytes,
            paused_partitions,
        }
    }

    /// Runs on a dedicated thread until shutdown; then drains, commits and closes the consumer.
    pub fn run(mut self) {
        let shutdown = self.life.shutdown.clone();
        while !shutdown.is_cancelled() {
            self.shared.apply_ready(&self.consumer);
            self.on_assignment_change();
            let full = self.full();
            self.backpressure();
            self.resume_due();
            if full && !self.paused {
                // At a bound: leave the next messages in librdkafka's queue (bounded by
                // `queued.max.messages.kbytes`) and take one as soon as a worker finishes, so
                // the workers never wait for a fetch.
                if self.shared.apply_next(&self.consumer, POLL_TIMEOUT) {
                    // Work finishes: not a stall, even if one large message keeps the bytes up.
                    self.full_since = Some(Instant::now());
                }
                continue;
            }
            match self.consumer.poll(POLL_TIMEOUT) {
                None => {}
                Some(Ok(m)) => {
                    kafka_health::healthy();
                    self.dispatch(m.detach())
                }
                // Repeats many times a second while the brokers are down: said once.
                Some(Err(e)) => kafka_health::client_error(&e, ""),
            }
        }
        tracing::info!("shutting down: draining in-flight messages");
        let drained = self
            .shared
            .drain(&self.consumer, &[], self.limits.shutdown_timeout);
        self.shared.commit(&self.consumer, "shutdown");
        self.shared.closing.store(true, Ordering::Release);
        tracing::info!(drained, "offsets committed; closing consumer");
        self.in_flight.set(0);
        self.in_flight_bytes.set(0);
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
        self.full_since = None;
        if let Some(g) = &mut self.gate {
            g.clear();
        }
        self.paused_partitions.set(0);
        self.shared.metrics.delayed_partitions.set(0);
    }

    /// Whether an in-flight bound (count or bytes) is reached; updates the gauges.
    fn full(&mut self) -> bool {
        let in_flight = self.in_flight();
        let bytes = self.shared.in_flight_bytes.load(Ordering::Acquire);
        self.in_flight.set(in_flight as i64);
        self.in_flight_bytes.set(bytes as i64);
        let full =
            in_flight >= self.limits.max_in_flight || bytes >= self.limits.max_in_flight_bytes;
        self.full_since = match full {
            true => self.full_since.or_else(|| Some(Instant::now())),
            false => None,
        };
        full
    }

    fn in_flight(&self) -> usize {
        self.shared
            .tracker
            .lock()
            .expect("tracker lock")
            .in_flight()
    }

    /// Pauses all assigned partitions while the database is down, or once the in-flight bound
    /// has held for `stall_pause_after` with no message finishing (slow transactions), and resumes
    /// below half the bounds once the database is back; polling goes on while paused, so the
    /// group session and rebalances are served.
    fn backpressure(&mut self) {
        let outage = self.life.in_outage();
        let want_paused = outage
            || match self.paused {
                true => self.above_half(),
                false => self.stalled(),
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
        match (want_paused, outage) {
            (true, true) => tracing::warn!("database unavailable: consumption paused"),
            (true, false) => tracing::warn!(
                after = ?self.limits.stall_pause_after,
                "no message finished at the in-flight bound: consumption paused"
            ),
            (false, _) => tracing::info!("consumption resumed"),
        }
        let count = if want_paused {
            assignment.count() as i64
        } else {
            0
        };
        self.paused_partitions.set(count);
        self.paused = want_paused;
    }

    /// `full_since` is set only while a bound is reached.
    fn stalled(&self) -> bool {
        self.full_since
            .is_some_and(|t| t.elapsed() >= self.limits.stall_pause_after)
    }

    fn above_half(&self) -> bool {
        self.in_flight() > self.limits.max_in_flight / 2
            || self.shared.in_flight_bytes.load(Ordering::Acquire)
                > self.limits.max_in_flight_bytes / 2
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
            m.with_label_values(&[headers::DUE]).inc();
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
        let bytes = size(&msg);
        self.shared
            .in_flight_bytes
            .fetch_add(bytes, Ordering::AcqRel);
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
        if worker
            .send(Job {
                msg,
                epoch,
                owner,
                bytes,
            })
            .is_err()
        {
            // Every later message for that worker would be dropped: stop, commit what is done.
            let f = Failure::internal("worker_stopped", "a worker stopped".into());
            self.life.fail(&f);
        }
    }
}
