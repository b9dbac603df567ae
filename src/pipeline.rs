//! The single place that decides a message's outcome: decode → validate → persist → result event.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{Message, OwnedMessage};
use tokio_util::sync::CancellationToken;

use crate::classify::{Disposition, Failure};
use crate::decode::{DecodeError, Decoder};
use crate::metrics::{outcome, Metrics};
use crate::model::{status, PersistenceRequest, PersistenceResult, ResultError};
use crate::persist::{Persisted, Persister, Source};
use crate::results::{PendingResult, ResultPublisher};

/// What the consumer may do with the message's offset.
pub enum Handled {
    /// The outcome is durable: the offset may be committed once the result event (if any) is
    /// acknowledged.
    Done(Option<PendingResult>),
    /// Not finished (shutdown while the database was down, or a fatal error): never commit it,
    /// so the message is read again.
    Abandoned,
}

pub struct Pipeline {
    pub decoder: Decoder,
    pub persister: Persister,
    pub results: ResultPublisher,
    pub metrics: Arc<Metrics>,
    pub max_message_bytes: usize,
    /// Cancelled at shutdown; also cancelled by a fatal error, with `fatal` set.
    pub shutdown: CancellationToken,
    pub fatal: Arc<std::sync::OnceLock<String>>,
    /// Workers currently waiting for the database.
    pub outage_waiters: AtomicUsize,
}

/// Backoff while holding a message for a dependency that is down (database, schema registry).
const FIRST_HOLD: Duration = Duration::from_millis(200);
const MAX_HOLD: Duration = Duration::from_secs(30);

/// A request id for messages without `metadata.requestId`, stable across redeliveries.
pub fn derived_request_id(source: &Source) -> String {
    format!(
        "kafka:{}:{}:{}",
        source.topic, source.partition, source.offset
    )
}

impl Pipeline {
    pub async fn handle(&self, msg: &OwnedMessage) -> Handled {
        let source = Source {
            topic: msg.topic().to_string(),
            partition: msg.partition(),
            offset: msg.offset(),
        };
        self.metrics
            .messages_consumed
            .with_label_values(&[&source.topic])
            .inc();
        let (request_id, user_id, outcome) = self.process(msg.payload(), &source).await;
        let result = match outcome {
            Ok(persisted) => self.succeeded(&source, persisted),
            Err(f) if f.disposition == Disposition::Fatal => {
                tracing::error!(class = f.class, code = %f.code, error = %f.message, "fatal error: stopping");
                let _ = self.fatal.set(format!("{}: {}", f.code, f.message));
                self.shutdown.cancel();
                return Handled::Abandoned;
            }
            Err(f) if f.disposition == Disposition::Outage => return Handled::Abandoned,
            Err(f) => self.failed(&source, request_id, user_id, f),
        };
        if let Some(ts) = msg.timestamp().to_millis() {
            let age = (chrono::Utc::now().timestamp_millis() - ts).max(0) as f64 / 1000.0;
            let label = self.outcome_label(&result);
            self.metrics
                .end_to_end_latency
                .with_label_values(&[label])
                .observe(age);
        }
        Handled::Done(self.results.publish(&result).await)
    }

    /// Returns the request id and user id (when the message got that far) with the outcome.
    async fn process(
        &self,
        payload: Option<&[u8]>,
        source: &Source,
    ) -> (String, Option<String>, Result<Persisted, Failure>) {
        let derived = derived_request_id(source);
        let payload = payload.unwrap_or_default();
        if payload.len() > self.max_message_bytes {
            return (
                derived,
                None,
                Err(Failure::oversize(payload.len(), self.max_message_bytes)),
            );
        }
        let req = match self.decode(payload).await {
            Ok(req) => req,
            Err(f) => return (derived, None, Err(f)),
        };
        let request_id = req.metadata.request_id.clone().unwrap_or(derived);
        let user_id = Some(req.user_id.clone()).filter(|u| !u.is_empty());
        if let Err(e) = req.validate() {
            return (request_id, user_id, Err(Failure::from(&e)));
        }
        let outcome = self.persist(&req, &request_id, source).await;
        (request_id, user_id, outcome)
    }

    /// Waits `delay` (then doubles it, up to `MAX_HOLD`), or returns false once shutdown begins.
    async fn hold(&self, delay: &mut Duration) -> bool {
        tokio::select! {
            _ = self.shutdown.cancelled() => return false,
            _ = tokio::time::sleep(*delay) => {}
        }
        *delay = (*delay * 2).min(MAX_HOLD);
        true
    }

    /// Decodes; while the schema registry is unreachable the message waits (capped backoff)
    /// rather than failing, and is abandoned (not committed) only at shutdown.
    async fn decode(&self, payload: &[u8]) -> Result<PersistenceRequest, Failure> {
        let mut delay = FIRST_HOLD;
        loop {
            match self.decoder.decode(payload).await {
                Ok((req, _encoding)) => return Ok(req),
                Err(e @ DecodeError::RegistryUnavailable(_)) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "schema registry unavailable; holding the message");
                    if !self.hold(&mut delay).await {
                        let mut f = Failure::from(&e);
                        f.disposition = Disposition::Outage;
                        return Err(f);
                    }
                }
                Err(e) => return Err(Failure::from(&e)),
            }
        }
    }

    /// Persists; while the database is down, waits for it instead of giving the message up.
    async fn persist(
        &self,
        req: &PersistenceRequest,
        request_id: &str,
        source: &Source,
    ) -> Result<Persisted, Failure> {
        loop {
            let outcome = self.persister.persist(req, request_id, source).await;
            let down = outcome
                .as_ref()
                .err()
                .is_some_and(Failure::waits_for_database);
            if !down {
                return outcome;
            }
            if !self.wait_for_database().await {
                return outcome.map_err(|mut f| {
                    f.disposition = Disposition::Outage;
                    f
                });
            }
        }
    }

    /// Probes with capped exponential backoff until the database answers (true) or shutdown
    /// begins (false).
    async fn wait_for_database(&self) -> bool {
        // The gauge stays 1 while any worker waits, not just the first to recover.
        self.outage_waiters.fetch_add(1, Ordering::AcqRel);
        self.metrics.database_outage.set(1);
        let mut delay = FIRST_HOLD;
        let up = loop {
            if !self.hold(&mut delay).await {
                break false;
            }
            if self.database_answers().await {
                break true;
            }
            tracing::warn!(retry_in = ?delay, "database unavailable; holding messages");
        };
        if self.outage_waiters.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.metrics.database_outage.set(0);
        }
        up
    }

    pub async fn database_answers(&self) -> bool {
        let probe = async {
            let c = self.persister.pool().get().await.ok()?;
            c.simple_query("SELECT 1").await.ok()
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(2), probe).await,
            Ok(Some(_))
        )
    }

    fn succeeded(&self, source: &Source, p: Persisted) -> PersistenceResult {
        let label = if p.duplicate {
            outcome::DUPLICATE
        } else {
            outcome::PERSISTED
        };
        self.metrics
            .outcomes
            .with_label_values(&[&source.topic, label])
            .inc();
        let r = p.result;
        let meta = r.persistence_metadata.as_ref();
        tracing::info!(
            action = if p.duplicate { "RECOMMENDATION_DUPLICATE" } else { "RECOMMENDATION_PERSISTED" },
            recommendationId = r.recommendation_id.as_deref().unwrap_or_default(),
            userId = r.user_id.as_deref().unwrap_or_default(),
            requestId = %r.request_id,
            bookCount = r.book_count,
            transactionId = meta.map(|m| m.transaction_id.as_str()).unwrap_or_default(),
            processingTime = meta.map(|m| m.persistence_time).unwrap_or_default(),
            attempts = p.attempts,
            status = %r.persistence_status,
        );
        r
    }

    fn failed(
        &self,
        source: &Source,
        request_id: String,
        user_id: Option<String>,
        f: Failure,
    ) -> PersistenceResult {
        self.metrics
            .outcomes
            .with_label_values(&[&source.topic, outcome::FAILED])
            .inc();
        self.metrics.failures.with_label_values(&[f.class]).inc();
        tracing::warn!(
            action = "RECOMMENDATION_FAILED",
            requestId = %request_id,
            userId = user_id.as_deref().unwrap_or_default(),
            topic = %source.topic,
            partition = source.partition,
            offset = source.offset,
            class = f.class,
            code = %f.code,
            disposition = ?f.disposition,
            error = %f.message,
            status = status::FAILED,
        );
        PersistenceResult {
            request_id,
            user_id,
            recommendation_id: None,
            context_id: None,
            book_count: 0,
            persistence_status: status::FAILED.to_string(),
            timestamp: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            persistence_metadata: None,
            error: Some(ResultError {
                class: f.class.to_string(),
                code: f.code,
                message: truncate(&f.message, 512),
            }),
        }
    }

    fn outcome_label(&self, r: &PersistenceResult) -> &'static str {
        match r.persistence_status.as_str() {
            status::SUCCESS => outcome::PERSISTED,
            _ => outcome::FAILED,
        }
    }
}

pub fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}
