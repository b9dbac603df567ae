//! Persist stage: one SERIALIZABLE transaction per request (the specification's transaction flow), retried
//! in-process with jittered backoff for transient failures.
//!
//! All five steps run as one statement of chained data-modifying CTEs that also assembles the
//! confirmation, pipelined with BEGIN and COMMIT, so a request costs one round trip. Every
//! write is gated on the ledger insert: for a request already recorded nothing is written and
//! the original confirmation comes back instead.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::Retryable;
use deadpool_postgres::Pool;

use crate::classify::{Disposition, Failure};
use crate::message::envelope::Source;
use crate::message::model::{PersistenceRequest, PersistenceResult};
use crate::ops::metrics::{attempt, Metrics};

mod batch;
pub mod db;
pub mod park;
mod sql;
mod warm;

pub use batch::{BatchConfig, BATCH_SQL};
use batch::{Batcher, Member};

pub use sql::CLAIM_SQL;
use sql::{statements, Params};

/// What the transaction did with the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    New,
    /// Already in the ledger: nothing written, the stored confirmation returned.
    Duplicate,
    /// Nothing written: an earlier request of the key waits in a retry tier.
    Blocked,
    /// Nothing written: the partition belongs to another owner now.
    Fenced,
}

#[derive(Debug, Clone)]
pub struct Persisted {
    pub result: PersistenceResult,
    pub written: Written,
    pub attempts: u32,
}

/// Added to twice the statement timeout for the client-side deadline of one transaction.
const CLIENT_DEADLINE_MARGIN: Duration = Duration::from_secs(5);

pub struct Persister {
    pool: Pool,
    statement_timeout: Duration,
    backoff: Vec<Duration>,
    metrics: Arc<Metrics>,
    /// None when batching is off (`BATCH_MAX` 1).
    batcher: Option<Batcher>,
}

impl Persister {
    /// Starts the batch collector (a task: call it inside the runtime) when `batch.max` > 1.
    pub fn new(
        pool: Pool,
        statement_timeout: Duration,
        backoff: Vec<Duration>,
        metrics: Arc<Metrics>,
        batch: BatchConfig,
    ) -> Self {
        let batcher = (batch.max > 1)
            .then(|| Batcher::start(batch, pool.clone(), statement_timeout, metrics.clone()));
        Self {
            pool,
            statement_timeout,
            backoff,
            metrics,
            batcher,
        }
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Opens up to `connections` pooled connections and prepares this persister's statements
    /// on each (the batch statement only when batching); returns how many were warmed.
    pub async fn warm(&self, connections: usize) -> usize {
        let mut statements = vec![sql::PERSIST_SQL];
        if self.batcher.is_some() {
            statements.push(BATCH_SQL);
        }
        warm::warm(&self.pool, connections, &statements, self.statement_timeout).await
    }

    /// Persists `req` under `request_id`, retrying transient failures in-process. The error is
    /// the last attempt's, classified.
    pub async fn persist(
        &self,
        req: &Arc<PersistenceRequest>,
        request_id: &str,
        source: &Source,
    ) -> Result<Persisted, Failure> {
        if let Some(batcher) = &self.batcher {
            let member = Member {
                req: Arc::clone(req),
                request_id: request_id.to_string(),
                source: source.clone(),
            };
            if let Some(p) = batcher.submit(member).await {
                return Ok(p);
            }
        }
        let attempts = AtomicU32::new(0);
        let timeouts = AtomicU32::new(0);
        let run = || async {
            attempts.fetch_add(1, Ordering::Relaxed);
            // Seed 000: a statement timeout is retried once with double the timeout.
            let timeout = self.statement_timeout * (1 << timeouts.load(Ordering::Relaxed).min(1));
            self.attempt(req, request_id, source, timeout).await
        };
        let outcome = run
            .retry(jittered(&self.backoff))
            .sleep(tokio::time::sleep)
            .when(|f: &Failure| match f.class {
                crate::classify::class::TIMEOUT => timeouts.fetch_add(1, Ordering::Relaxed) == 0,
                // A terminated connection (57P01) or a brief failover heals within the backoff;
                // a longer outage is the pipeline's to wait out.
                _ => matches!(f.disposition, Disposition::RetryInProcess | Disposition::Outage),
            })
            .notify(|f: &Failure, after: Duration| {
                tracing::debug!(request_id, class = f.class, code = %f.code, ?after, "transaction retry");
            })
            .await;
        let attempts = attempts.into_inner();
        outcome.map(|mut p| {
            p.attempts = attempts;
            p
        })
    }

    async fn attempt(
        &self,
        req: &PersistenceRequest,
        request_id: &str,
        source: &Source,
        timeout: Duration,
    ) -> Result<Persisted, Failure> {
        let started = Instant::now();
        let result = self
            .transaction(req, request_id, source, timeout, started)
            .await;
        self.metrics
            .txn_duration
            .observe(started.elapsed().as_secs_f64());
        let label = attempt_label(&result);
        self.metrics.txn_attempts.with_label_values(&[label]).inc();
        result
    }

    async fn transaction(
        &self,
        req: &PersistenceRequest,
        request_id: &str,
        source: &Source,
        timeout: Duration,
        started: Instant,
    ) -> Result<Persisted, Failure> {
        let guard = Checkout::get(&self.pool).await?;
        let p = Params::new(req, request_id, source);
        let deadline = deadline(timeout);
        let outcome =
            tokio::time::timeout(deadline, statements(guard.client(), &p, timeout, started)).await;
        guard.finish(deadline, outcome)
    }
}

/// The `transaction_attempts_total` label of one request's attempt, batched or not.
fn attempt_label(result: &Result<Persisted, Failure>) -> &'static str {
    match result {
        Ok(p) => p.written.label(),
        Err(f) => f.class,
    }
}

impl Written {
    fn label(self) -> &'static str {
        match self {
            Written::New => attempt::COMMITTED,
            Written::Duplicate => attempt::DUPLICATE,
            Written::Blocked => attempt::BLOCKED,
            Written::Fenced => attempt::FENCED,
        }
    }
}

/// The client-side deadline of one transaction: the server's statement timeout cannot fire on
/// a connection that no longer answers. Counted from the checkout (a wait for a busy pool is
/// not a hung connection) over the round trip; on a new connection the statement's first
/// prepare adds one, and each wait there counts against the statement timeout.
fn deadline(statement_timeout: Duration) -> Duration {
    statement_timeout * 2 + CLIENT_DEADLINE_MARGIN
}

/// A pooled connection that goes back to the pool only when its transaction was finished: a
/// future dropped mid-transaction (shutdown) discards the connection instead of lending out an
/// open transaction.
struct Checkout(Option<deadpool_postgres::Object>);

impl Checkout {
    async fn get(pool: &Pool) -> Result<Self, Failure> {
        Ok(Self(Some(pool.get().await.map_err(|e| Failure::from(&e))?)))
    }

    fn client(&self) -> &deadpool_postgres::Object {
        self.0.as_ref().expect("checked out")
    }

    /// The connection, free to go back to the pool: its transaction is over.
    fn release(mut self) -> deadpool_postgres::Object {
        self.0.take().expect("checked out")
    }

    /// Returns the connection to the pool once its transaction is over, or discards it. The
    /// statements end every transaction they begin, failed or not (`sql::transaction`), or
    /// leave a broken connection, which the pool's recycle check discards: no ROLLBACK here.
    fn finish<T>(
        self,
        deadline: Duration,
        outcome: Result<Result<T, Failure>, tokio::time::error::Elapsed>,
    ) -> Result<T, Failure> {
        // A hung connection is dropped with the guard (discarded, not pooled), unasked.
        let Ok(outcome) = outcome else {
            return Err(Failure::hung(deadline));
        };
        drop(self.release());
        outcome
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Some(obj) = self.0.take() {
            drop(deadpool_postgres::Object::take(obj));
        }
    }
}

/// The configured delays with ±50 % jitter, so concurrent losers of a conflict do not collide
/// again in lockstep.
fn jittered(delays: &[Duration]) -> impl backon::BackoffBuilder {
    let delays: Vec<Duration> = delays.to_vec();
    delays.into_iter().map(|d| d.mul_f64(0.5 + fastrand::f64()))
}
