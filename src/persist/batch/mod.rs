//! Micro-batching: requests of distinct users and request ids, gathered from the workers while
//! every batch connection is busy (and for at most `BATCH_LINGER` once one is free), written
//! in one SERIALIZABLE transaction. A batch that loses a conflict goes again as a whole, twice
//! at most; a batch that fails otherwise (or still conflicts) has each of its requests written
//! alone, with its own in-process retries and tiers, so none fails for a neighbour's fault.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot};

use super::{deadline, Checkout, Persisted};
use crate::classify::{class, Failure};
use crate::message::envelope::Source;
use crate::message::model::PersistenceRequest;
use crate::ops::metrics::{attempt, Metrics};

mod sql;
pub use sql::BATCH_SQL;

/// Micro-batching settings (`BATCH_MAX`, `BATCH_LINGER`, `BATCH_CONCURRENCY`).
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Most requests in one transaction; 1 turns batching off.
    pub max: usize,
    /// How long a request waits for company once a connection is free.
    pub linger: Duration,
    /// Batch transactions at once.
    pub concurrency: usize,
}

impl BatchConfig {
    /// One request per transaction.
    pub const OFF: Self = Self {
        max: 1,
        linger: Duration::ZERO,
        concurrency: 1,
    };
}

/// One request of a batch, owned: the batch outlives the worker's borrow. The request is
/// shared with its worker, which writes it alone should the batch fail.
pub(crate) struct Member {
    pub req: Arc<PersistenceRequest>,
    pub request_id: String,
    pub source: Source,
}

struct Queued {
    member: Member,
    reply: oneshot::Sender<Option<Persisted>>,
    since: Instant,
}

/// The handle workers submit to; the collector runs as its own task.
pub struct Batcher {
    tx: mpsc::UnboundedSender<Queued>,
}

impl Batcher {
    pub fn start(
        cfg: BatchConfig,
        pool: Pool,
        statement_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = Arc::new(Writer {
            pool,
            statement_timeout,
            metrics,
        });
        tokio::spawn(collect(rx, writer, cfg));
        Self { tx }
    }

    /// The request's outcome when a batch settled it (written, found in the ledger, blocked
    /// or fenced); `None` when it must be written alone: its batch failed.
    pub(crate) async fn submit(&self, member: Member) -> Option<Persisted> {
        let (reply, rx) = oneshot::channel();
        let queued = Queued {
            member,
            reply,
            since: Instant::now(),
        };
        self.tx.send(queued).ok()?;
        match rx.await {
            Ok(outcome) => outcome,
            // Only a panic drops a taken request unanswered: stop the agent, as the worker
            // does for its own panics, rather than write it alone over a broken batch.
            Err(_) => panic!("batch writer stopped without answering"),
        }
    }
}

/// Gathers submitted requests into batches: while every batch connection is busy the queue
/// grows on its own; once one is free, a batch waits out the rest of its linger or until it
/// is full. Users of the batches in flight wait for the next one: two transactions on one
/// reader would only conflict.
struct Collector {
    rx: mpsc::UnboundedReceiver<Queued>,
    done_tx: mpsc::UnboundedSender<Vec<String>>,
    done_rx: mpsc::UnboundedReceiver<Vec<String>>,
    pending: VecDeque<Queued>,
    busy: HashSet<String>,
    in_flight: usize,
    cfg: BatchConfig,
    writer: Arc<Writer>,
}

async fn collect(rx: mpsc::UnboundedReceiver<Queued>, writer: Arc<Writer>, cfg: BatchConfig) {
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let mut c = Collector {
        rx,
        done_tx,
        done_rx,
        pending: VecDeque::new(),
        busy: HashSet::new(),
        in_flight: 0,
        cfg,
        writer,
    };
    while c.turn().await {}
}

impl Collector {
    /// One step: wait for work or a free connection, linger, send a batch. False once closed.
    async fn turn(&mut self) -> bool {
        if self.pending.is_empty() || self.in_flight >= self.cfg.concurrency.max(1) {
            return self.hear(None).await;
        }
        // The linger runs from the oldest request that can go now: one whose user is in a
        // batch in flight must not cut the wait of the others.
        let ready = self
            .pending
            .iter()
            .find(|q| !self.busy.contains(&q.member.req.user_id));
        let Some(oldest) = ready.map(|q| q.since) else {
            return self.hear(None).await;
        };
        let deadline = oldest + self.cfg.linger;
        while self.pending.len() < self.cfg.max && Instant::now() < deadline {
            if !self.hear(Some(deadline)).await {
                return false;
            }
        }
        let batch = take(&mut self.pending, self.cfg.max, &self.busy);
        if batch.is_empty() {
            // Every waiting user is in a batch in flight (or nothing waits any more).
            return self.pending.is_empty() || self.hear(None).await;
        }
        let users: Vec<String> = batch.iter().map(|q| q.member.req.user_id.clone()).collect();
        self.busy.extend(users.iter().cloned());
        self.in_flight += 1;
        let finished = Finished {
            users,
            done: self.done_tx.clone(),
        };
        let writer = self.writer.clone();
        tokio::spawn(async move {
            let _finished = finished;
            writer.write(batch).await;
        });
        true
    }

    /// Waits for a request, a finished batch or the deadline, and takes it in. False once
    /// every submitter is gone (the agent is stopping).
    async fn hear(&mut self, deadline: Option<Instant>) -> bool {
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            q = self.rx.recv() => match q {
                Some(q) => self.pending.push_back(q),
                None => return false,
            },
            Some(users) = self.done_rx.recv() => {
                self.in_flight -= 1;
                for u in &users {
                    self.busy.remove(u);
                }
            }
            _ = sleep => {}
        }
        true
    }
}

/// Hands a batch's users back to the collector when its task ends, by a panic too: otherwise
/// they would stay busy, and their later requests wait forever.
struct Finished {
    users: Vec<String>,
    done: mpsc::UnboundedSender<Vec<String>>,
}

impl Drop for Finished {
    fn drop(&mut self) {
        let _ = self.done.send(std::mem::take(&mut self.users));
    }
}

/// The next batch: up to `max` requests of distinct users and request ids (two rows of one
/// reader, or of one ledger entry, cannot be written by one statement) whose users are in no
/// batch in flight, oldest first. The rest wait for the next batch; requests whose worker
/// gave up are dropped unwritten.
fn take(pending: &mut VecDeque<Queued>, max: usize, busy: &HashSet<String>) -> Vec<Queued> {
    let (mut users, mut ids) = (HashSet::new(), HashSet::new());
    let mut batch = Vec::new();
    let mut rest = VecDeque::with_capacity(pending.len());
    for q in pending.drain(..) {
        if q.reply.is_closed() {
            continue;
        }
        let m = &q.member;
        let user = m.req.user_id.as_str();
        let fits = batch.len() < max
            && !busy.contains(user)
            && !users.contains(user)
            && !ids.contains(m.request_id.as_str());
        if fits {
            users.insert(m.req.user_id.clone());
            ids.insert(m.request_id.clone());
            batch.push(q);
        } else {
            rest.push_back(q);
        }
    }
    *pending = rest;
    batch
}

/// Delays (±50 % jitter) before a batch that lost a serialization conflict or a deadlock goes
/// again as a whole; after the last, its requests are written one by one.
const CONFLICT_RETRIES: [Duration; 2] = [Duration::from_millis(5), Duration::from_millis(25)];

fn is_conflict(f: &Failure) -> bool {
    f.class == class::SERIALIZATION || f.class == class::DEADLOCK
}

struct Writer {
    pool: Pool,
    statement_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Writer {
    async fn write(&self, batch: Vec<Queued>) {
        let (members, replies): (Vec<Member>, Vec<_>) =
            batch.into_iter().map(|q| (q.member, q.reply)).unzip();
        self.metrics.batch_requests.observe(members.len() as f64);
        let mut conflicts = 0;
        let outcome = loop {
            let outcome = self.attempt(&members).await;
            match &outcome {
                // A conflict is no member's fault: the batch goes again, briefly, as a whole.
                Err(f) if is_conflict(f) && conflicts < CONFLICT_RETRIES.len() => {
                    tokio::time::sleep(CONFLICT_RETRIES[conflicts].mul_f64(0.5 + fastrand::f64()))
                        .await;
                    conflicts += 1;
                }
                _ => break outcome,
            }
        };
        match outcome {
            Ok(persisted) => {
                for (reply, mut p) in replies.into_iter().zip(persisted) {
                    // Conflict retries of the batch are each member's attempts too.
                    p.attempts += conflicts as u32;
                    let label = p.written.label();
                    self.metrics.txn_attempts.with_label_values(&[label]).inc();
                    let _ = reply.send(Some(p));
                }
            }
            Err(f) => {
                tracing::debug!(requests = members.len(), class = f.class, code = %f.code,
                    "batch failed; its requests are written one by one");
                for reply in replies {
                    let _ = reply.send(None);
                }
            }
        }
    }

    /// One attempt, counted by result.
    async fn attempt(&self, members: &[Member]) -> Result<Vec<Persisted>, Failure> {
        let started = Instant::now();
        let outcome = self.transaction(members, started).await;
        self.metrics
            .txn_duration
            .observe(started.elapsed().as_secs_f64());
        let label = match &outcome {
            Ok(_) => attempt::COMMITTED,
            Err(f) => f.class,
        };
        self.metrics
            .batch_transactions
            .with_label_values(&[label])
            .inc();
        outcome
    }

    async fn transaction(
        &self,
        members: &[Member],
        started: Instant,
    ) -> Result<Vec<Persisted>, Failure> {
        let guard = Checkout::get(&self.pool).await?;
        let timeout = self.statement_timeout;
        let deadline = deadline(timeout);
        let outcome = tokio::time::timeout(
            deadline,
            sql::statements(guard.client(), members, timeout, started),
        )
        .await;
        guard.finish(deadline, outcome)
    }
}
