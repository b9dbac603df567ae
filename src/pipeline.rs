//! The single place that decides a message's outcome: park (per-key order) → decode → validate
//! → persist, or route to a retry tier / the dead-letter topic → result event.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rdkafka::message::OwnedMessage;
use tokio_util::sync::CancellationToken;

use crate::classify::{Disposition, Failure};
use crate::decode::{DecodeError, Decoder};
use crate::envelope::{format_time, Envelope, Trust};
use crate::metrics::{outcome, Metrics};
use crate::model::limits::MAX_ID_CHARS;
use crate::model::{status, PersistenceRequest, PersistenceResult, ResultError, Routing};
use crate::ownership::{Hold, Ownership};
use crate::park::{self, Gate};
use crate::persist::{Persisted, Persister, Source, Written};
use crate::results::{PendingResult, ResultPublisher};
use crate::route::{self, Destination, Router};

mod claim;
mod ordering;
use ordering::{KeyHold, Order};
use rdkafka::error::KafkaError;

/// What the consumer may do with the message's offset.
pub enum Handled {
    /// The outcome is durable: the offset may be committed once the result event (if any) is
    /// acknowledged.
    Done(Option<PendingResult>),
    /// Not finished (shutdown while the database was down, or a fatal error): never commit it,
    /// so the message is read again.
    Abandoned,
}

/// How processing a request ended.
enum Settled {
    Persisted(PersistenceResult),
    /// Forwarded, and acknowledged by the broker; `headed` when routing made the request its
    /// key's head (it must then release or hand on the key, wherever it ended).
    Routed(PersistenceResult, Destination, bool),
    /// Shutdown or a fatal error came first: nothing durable happened.
    Abandoned,
    /// Nothing written: an earlier request of the key waits in a retry tier.
    Blocked,
    /// Stored behind an earlier request of its key that waits in a retry tier.
    Parked,
}

pub struct Pipeline {
    pub decoder: Decoder,
    pub persister: Persister,
    pub results: ResultPublisher,
    pub router: Router,
    pub metrics: Arc<Metrics>,
    pub max_message_bytes: usize,
    /// Keep a key's requests in order while one waits in a retry tier.
    pub order_by_key: bool,
    /// Which headers count: retry state only on tier topics, origins only naming input topics.
    pub trust: Trust,
    /// Cancelled at shutdown; also cancelled by a fatal error, with `fatal` set.
    pub shutdown: CancellationToken,
    pub fatal: Arc<std::sync::OnceLock<String>>,
    /// Workers currently waiting for the database.
    pub outage_waiters: AtomicUsize,
}

/// Backoff while holding a message for a dependency that is down (database, schema registry,
/// the brokers taking a forwarded message).
const FIRST_HOLD: Duration = Duration::from_millis(200);
const MAX_HOLD: Duration = Duration::from_secs(30);
/// Probing a database that is down is one cheap connection attempt: probe often, so writing
/// resumes within about a second of its return.
const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(1);

const WRITABLE_SQL: &str =
    "SELECT NOT pg_is_in_recovery() AND current_setting('transaction_read_only') = 'off'";

/// A request id for messages without `metadata.requestId`, stable across redeliveries.
pub fn derived_request_id(source: &Source) -> String {
    format!(
        "kafka:{}:{}:{}",
        source.topic, source.partition, source.offset
    )
}

impl Pipeline {
    /// Settles one consumed message. `owner` is its partition's assignment, whose revoke stops
    /// the work from acting any more; `hold` keeps the revoke waiting once the work acted, and
    /// the caller releases it after reporting the message.
    pub async fn handle(&self, msg: &OwnedMessage, owner: Arc<Ownership>, hold: Hold) -> Handled {
        let mut env = Envelope::from_message(msg, &self.trust);
        env.owner = owner;
        env.hold = hold;
        self.metrics
            .messages_consumed
            .with_label_values(&[&env.topic])
            .inc();
        for h in &env.clamped {
            self.metrics.headers_clamped.with_label_values(&[h]).inc();
        }
        let (settled, is_head) = self.settle_in_order(&env).await;
        let result = match settled {
            Settled::Abandoned | Settled::Blocked => return Handled::Abandoned,
            Settled::Parked => {
                self.parked(&env);
                return Handled::Done(None);
            }
            Settled::Persisted(r) => r,
            Settled::Routed(r, Destination::Tier { .. }, _) => {
                self.observe_latency(&env, &r);
                return self.confirm(&env, &r).await;
            }
            Settled::Routed(r, Destination::DeadLetter { .. }, _) => r,
        };
        // A head's outcome is final: the requests parked behind it go next, before its commit.
        if is_head && !self.release(&env, true).await {
            return Handled::Abandoned;
        }
        self.observe_latency(&env, &result);
        self.confirm(&env, &result).await
    }

    /// Publishes the result event, unless the partition was revoked meanwhile: then the
    /// message is abandoned and its new owner confirms it (from the ledger, when it was
    /// written here).
    async fn confirm(&self, env: &Envelope, result: &PersistenceResult) -> Handled {
        if !env.act().await {
            return Handled::Abandoned;
        }
        Handled::Done(self.results.publish(result).await)
    }

    /// Settles `env` keeping its key's order, and says whether it ended as its key's head (a
    /// tier copy, a request found parked for itself, or one that routing made head), which
    /// must then release or hand on the key wherever it ended.
    async fn settle_in_order(&self, env: &Envelope) -> (Settled, bool) {
        let fresh = self.trust.input_topics.contains(&env.topic);
        // A fresh keyed request is checked against parked keys inside its own transaction (no
        // extra round trip); only a blocked one takes the parking step.
        let mut order = match self.order_by_key && fresh {
            true => park::ParkKey::of(env).map_or(Order::Unordered, |k| Order::Fresh(k.key)),
            false => Order::Unordered,
        };
        let mut is_head = !fresh;
        loop {
            let settled = self.settle(env, &order).await;
            if !matches!(settled, Settled::Blocked) {
                let headed = matches!(settled, Settled::Routed(_, _, true));
                return (settled, is_head || headed);
            }
            match self
                .db(env, "park", || park::gate(self.persister.pool(), env))
                .await
            {
                None => return (Settled::Abandoned, false),
                Some(Gate::Parked) => return (Settled::Parked, false),
                // Released since the transaction looked: try again, still in order, so a
                // failure now parks it as head before it goes to a tier.
                Some(Gate::Free) => {}
                // Parked as head, but the agent stopped before its tier copy was acknowledged
                // (or this is a replay of the head): settle it again, as the head.
                Some(Gate::Head) => {
                    is_head = true;
                    order = Order::Unordered;
                }
            }
        }
    }

    fn observe_latency(&self, env: &Envelope, result: &PersistenceResult) {
        if let Some(ts) = env.origin.timestamp_ms {
            let age = Utc::now().timestamp_millis().saturating_sub(ts).max(0) as f64 / 1000.0;
            self.metrics
                .end_to_end_latency
                .with_label_values(&[outcome_label(result)])
                .observe(age);
        }
    }

    /// Decodes and persists `env`, or forwards it when that failed. A fresh keyed request is
    /// not written while its key is parked (`Blocked`).
    async fn settle(&self, env: &Envelope, order: &Order<'_>) -> Settled {
        let order_key = match order {
            Order::Fresh(k) => Some(k.clone()),
            _ => None,
        };
        let mut source = env.source(order_key);
        let (request_id, user_id, outcome) = loop {
            source.fence = match self.fence(env).await {
                Ok(f) => f,
                Err(()) => return Settled::Abandoned,
            };
            let processed = self.process(&env.payload, &source).await;
            let generation = source.fence.as_ref().map_or(0, |f| f.2);
            match &processed.2 {
                Ok(p) if p.written == Written::Fenced => {
                    if !self.fenced(env, generation).await {
                        return Settled::Abandoned;
                    }
                }
                _ => break processed,
            }
        };
        match outcome {
            Ok(persisted) if persisted.written == Written::Blocked => Settled::Blocked,
            Ok(persisted) => Settled::Persisted(self.succeeded(env, persisted)),
            Err(f) if f.disposition == Disposition::Fatal => {
                self.stop_fatal(&f);
                Settled::Abandoned
            }
            Err(f) if f.disposition == Disposition::Outage => Settled::Abandoned,
            Err(f) => self.route(env, request_id, user_id, f, order).await,
        }
    }

    fn stop_fatal(&self, f: &Failure) {
        tracing::error!(class = f.class, code = %f.code, error = %f.message, "fatal error: stopping");
        let _ = self.fatal.set(format!("{}: {}", f.code, f.message));
        self.shutdown.cancel();
    }

    /// Forwards a failed request to its next tier or the dead-letter topic and waits for the
    /// broker's acknowledgement; while the brokers refuse it, the message is held.
    async fn route(
        &self,
        env: &Envelope,
        request_id: String,
        user_id: Option<String>,
        f: Failure,
        order: &Order<'_>,
    ) -> Settled {
        let now = Utc::now();
        let mut dest = self.router.destination(env, &f, now);
        let mut headed = false;
        if matches!(dest, Destination::Tier { .. }) {
            match self.hold_key(env, order).await {
                None => return Settled::Abandoned,
                Some(KeyHold::Parked) => return Settled::Parked,
                Some(KeyHold::Headed) => headed = true,
                Some(KeyHold::Unordered) => {}
            }
        }
        let mut delay = FIRST_HOLD;
        let mut refused: Option<KafkaError> = None;
        loop {
            if !env.act().await {
                return Settled::Abandoned;
            }
            let sent = self
                .router
                .enqueue(env, &f, &dest, now, refused.as_ref())
                .await;
            let e = match sent {
                Ok(delivery) => match route::acked(delivery).await {
                    Ok(()) => break,
                    Err(e) => e,
                },
                Err(e) => e,
            };
            if route::is_too_large(&e) && refused.is_none() {
                tracing::warn!(topic = dest.topic(), error = %e, "forwarded copy too large for the brokers");
                match dest {
                    // A tier refusing the record's size will refuse it every time: dead-letter it.
                    Destination::Tier { .. } => {
                        dest = Destination::DeadLetter {
                            topic: self.router.topology.dlq_topic(&env.origin.topic),
                        }
                    }
                    // The dead-letter topic refuses the value: keep the headers, say why.
                    Destination::DeadLetter { .. } => refused = Some(e),
                }
                continue;
            }
            if let Some(why) = self.router.fatal_error() {
                // Nothing will be forwarded again: exit, committing nothing unfinished, so the
                // orchestrator restarts the agent with a new producer.
                self.stop_fatal(&Failure::producer_fatal(why));
                return Settled::Abandoned;
            }
            tracing::warn!(topic = dest.topic(), error = %e, retry_in = ?delay, "cannot forward a failed message; holding it");
            if !self.hold(&mut delay).await {
                return Settled::Abandoned;
            }
        }
        let result = self.routed(env, request_id, user_id, &f, &dest);
        Settled::Routed(result, dest, headed)
    }

    /// Returns the request id and user id (when the message got that far) with the outcome.
    async fn process(
        &self,
        payload: &[u8],
        source: &Source,
    ) -> (String, Option<String>, Result<Persisted, Failure>) {
        let derived = derived_request_id(source);
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
        // Both reach the result event (its key) before validation: an id validation would
        // refuse is not repeated there (a 600 kB id would make an undeliverable event).
        let bounded = |id: &String| !id.trim().is_empty() && id.chars().count() <= MAX_ID_CHARS;
        let request_id = req
            .metadata
            .request_id
            .clone()
            .filter(bounded)
            .unwrap_or(derived);
        let user_id = Some(req.user_id.clone()).filter(bounded);
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

    /// Persists; while the database is down, waits for it instead of giving the message up,
    /// and while every connection is busy, waits for one.
    async fn persist(
        &self,
        req: &PersistenceRequest,
        request_id: &str,
        source: &Source,
    ) -> Result<Persisted, Failure> {
        let mut busy = FIRST_HOLD;
        loop {
            let outcome = self.persister.persist(req, request_id, source).await;
            if outcome
                .as_ref()
                .err()
                .is_some_and(Failure::waits_for_connection)
            {
                if !self.hold(&mut busy).await {
                    return outcome.map_err(|mut f| {
                        f.disposition = Disposition::Outage;
                        f
                    });
                }
                continue;
            }
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
            delay = delay.min(MAX_PROBE_INTERVAL);
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

    /// Whether the database takes writes again: a standby or a read-only primary answers
    /// queries but would refuse every transaction.
    pub async fn database_answers(&self) -> bool {
        let probe = async {
            let c = self.persister.pool().get().await.ok()?;
            let row = c.query_one(WRITABLE_SQL, &[]).await.ok()?;
            row.get::<_, Option<bool>>(0)
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(2), probe).await,
            Ok(Some(true))
        )
    }

    fn succeeded(&self, env: &Envelope, p: Persisted) -> PersistenceResult {
        let duplicate = p.written == Written::Duplicate;
        let label = if duplicate {
            outcome::DUPLICATE
        } else {
            outcome::PERSISTED
        };
        self.metrics
            .outcomes
            .with_label_values(&[&env.origin.topic, label])
            .inc();
        if env.attempt > 0 && self.router.topology.tiers() > 0 {
            let tiers = self.router.topology.tiers();
            let tier = self
                .router
                .topology
                .label((env.attempt as usize - 1).min(tiers - 1));
            let since = env.first_failure.map_or(0.0, |t| {
                (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0
            });
            self.metrics
                .time_to_success
                .with_label_values(&[&tier])
                .observe(since);
        }
        let r = p.result;
        let meta = r.persistence_metadata.as_ref();
        tracing::info!(
            action = if duplicate { "RECOMMENDATION_DUPLICATE" } else { "RECOMMENDATION_PERSISTED" },
            recommendationId = r.recommendation_id.as_deref().unwrap_or_default(),
            userId = r.user_id.as_deref().unwrap_or_default(),
            requestId = %r.request_id,
            bookCount = r.book_count,
            transactionId = meta.map(|m| m.transaction_id.as_str()).unwrap_or_default(),
            processingTime = meta.map(|m| m.persistence_time).unwrap_or_default(),
            attempts = p.attempts,
            retryAttempt = env.attempt,
            status = %r.persistence_status,
        );
        r
    }

    fn routed(
        &self,
        env: &Envelope,
        request_id: String,
        user_id: Option<String>,
        f: &Failure,
        dest: &Destination,
    ) -> PersistenceResult {
        let attempt = i32::try_from(env.attempt)
            .unwrap_or(i32::MAX)
            .saturating_add(1);
        let (label, st, action, routing) = match dest {
            Destination::Tier {
                label, topic, due, ..
            } => {
                self.metrics.retry_routed.with_label_values(&[label]).inc();
                let routing = Routing {
                    topic: topic.clone(),
                    tier: Some(label.clone()),
                    attempt,
                    due_at: Some(format_time(*due)),
                };
                (
                    outcome::RETRY_SCHEDULED,
                    status::RETRY_SCHEDULED,
                    "RECOMMENDATION_RETRY_SCHEDULED",
                    routing,
                )
            }
            Destination::DeadLetter { topic } => {
                self.metrics
                    .dead_letters
                    .with_label_values(&[f.class])
                    .inc();
                let routing = Routing {
                    topic: topic.clone(),
                    tier: None,
                    attempt,
                    due_at: None,
                };
                (
                    outcome::DEAD_LETTERED,
                    status::DEAD_LETTERED,
                    "RECOMMENDATION_DEAD_LETTERED",
                    routing,
                )
            }
        };
        self.metrics
            .outcomes
            .with_label_values(&[&env.origin.topic, label])
            .inc();
        self.metrics.failures.with_label_values(&[f.class]).inc();
        tracing::warn!(
            action,
            requestId = %request_id,
            userId = user_id.as_deref().unwrap_or_default(),
            topic = %env.topic,
            partition = env.partition,
            offset = env.offset,
            class = f.class,
            code = %f.code,
            disposition = ?f.disposition,
            error = %f.message,
            routedTo = routing.topic,
            tier = routing.tier.as_deref().unwrap_or_default(),
            dueAt = routing.due_at.as_deref().unwrap_or_default(),
            attempt,
            status = st,
        );
        PersistenceResult {
            request_id,
            user_id,
            recommendation_id: None,
            context_id: None,
            book_count: 0,
            persistence_status: st.to_string(),
            timestamp: format_time(Utc::now()),
            persistence_metadata: None,
            error: Some(ResultError {
                class: f.class.to_string(),
                code: f.code.clone(),
                message: truncate(&f.message, 512),
            }),
            routing: Some(routing),
        }
    }
}

fn outcome_label(r: &PersistenceResult) -> &'static str {
    match r.persistence_status.as_str() {
        status::SUCCESS => outcome::PERSISTED,
        status::RETRY_SCHEDULED => outcome::RETRY_SCHEDULED,
        status::DEAD_LETTERED => outcome::DEAD_LETTERED,
        _ => outcome::FAILED,
    }
}

pub fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}
