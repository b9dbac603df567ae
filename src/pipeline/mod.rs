//! The single place that decides a message's outcome: park (per-key order) → decode → validate
//! → persist, or route to a retry tier / the dead-letter topic → result event.

use std::sync::Arc;

use rdkafka::message::OwnedMessage;

use crate::classify::{Disposition, Failure};
use crate::decode::Decoder;
use crate::kafka::worker::{Handle, Handled};
use crate::message::envelope::{Envelope, Source, Trust};
use crate::message::model::limits::MAX_ID_CHARS;
use crate::message::model::PersistenceResult;
use crate::message::ownership::{Hold, Ownership};
use crate::ops::events::{self, Emit};
use crate::ops::lifecycle::Lifecycle;
use crate::ops::metrics::Metrics;
use crate::persist::park::{self, Gate};
use crate::persist::{Persisted, Persister, Written};
use crate::route::results::ResultPublisher;
use crate::route::{self, Destination, Router};

mod claim;
mod forward;
mod ordering;
mod reaper;
mod waits;
use ordering::Order;

/// How processing a request ended.
enum Settled {
    /// Written now, or found in the ledger (`Written::Duplicate`).
    Persisted(PersistenceResult, Written),
    /// Forwarded, and acknowledged by the broker; `headed` when routing made the request its
    /// key's head (it must then release or hand on the key, wherever it ended).
    Routed(PersistenceResult, Destination, bool),
    /// Shutdown or a fatal error came first: nothing durable happened.
    Abandoned,
    /// Nothing written: an earlier request of the key waits in a retry tier.
    Blocked,
    /// Stored behind an earlier request of its key that waits in a retry tier.
    Parked,
    /// A parked request being released, left to another release that took the key over.
    Superseded,
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
    /// Shutdown, fatal errors, and the workers waiting out a database outage.
    pub life: Arc<Lifecycle>,
}

/// A request id for messages without `metadata.requestId`, stable across redeliveries.
pub fn derived_request_id(source: &Source) -> String {
    format!(
        "kafka:{}:{}:{}",
        source.topic, source.partition, source.offset
    )
}

impl Handle for Pipeline {
    async fn handle(&self, msg: &OwnedMessage, owner: Arc<Ownership>, hold: Hold) -> Handled {
        Pipeline::handle(self, msg, owner, hold).await
    }
}

impl Pipeline {
    /// Settles one consumed message. `owner` is its partition's assignment, whose revoke stops
    /// the work from acting any more; `hold` keeps the revoke waiting once the work acted, and
    /// the caller releases it after reporting the message.
    pub async fn handle(&self, msg: &OwnedMessage, owner: Arc<Ownership>, hold: Hold) -> Handled {
        let mut env = Envelope::from_message(msg, &self.trust);
        env.owner = owner;
        env.hold = hold;
        events::Consumed { env: &env }.emit(&self.metrics);
        let (settled, is_head) = self.settle_in_order(&env).await;
        let result = match settled {
            // Superseded comes only from a release, never from a consumed message.
            Settled::Abandoned | Settled::Blocked | Settled::Superseded => {
                return Handled::Abandoned
            }
            Settled::Parked => {
                events::Parked { env: &env }.emit(&self.metrics);
                return Handled::Done(None);
            }
            Settled::Persisted(r, _) => r,
            Settled::Routed(r, Destination::Tier { .. }, _) => return self.confirm(&env, &r).await,
            Settled::Routed(r, Destination::DeadLetter { .. }, _) => r,
        };
        // A head's outcome is final: the requests parked behind it go next, before its commit.
        if is_head && !self.release(&env, true).await {
            return Handled::Abandoned;
        }
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
    /// tier copy, a request found parked for itself, one that routing made head, or one found
    /// in the ledger, which may be a head settled before), which must then release or hand on
    /// the key wherever it ended.
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
                // A request found in the ledger may be a head settled before, whose release a
                // crash, shutdown or revoke cut short (the ledger outranks the parked key): it
                // releases its key, or resumes the follower that release promoted. A key free,
                // or held by a head that this message did not promote, gives it nothing to do.
                let recorded = matches!(settled, Settled::Persisted(_, Written::Duplicate));
                let resumes = recorded && matches!(order, Order::Fresh(_));
                return (settled, is_head || headed || resumes);
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
            Ok(persisted) => {
                let written = persisted.written;
                Settled::Persisted(self.succeeded(env, persisted), written)
            }
            Err(f) if f.disposition == Disposition::Fatal => {
                self.life.fail(&f);
                Settled::Abandoned
            }
            Err(f) if f.disposition == Disposition::Outage => Settled::Abandoned,
            Err(f) => self.route(env, request_id, user_id, f, order).await,
        }
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
        // Shared with a batch without a copy: the worker still holds it, should the batch fail.
        let outcome = self.persist(&Arc::new(req), &request_id, source).await;
        (request_id, user_id, outcome)
    }

    fn succeeded(&self, env: &Envelope, p: Persisted) -> PersistenceResult {
        let tiers = self.router.topology.tiers();
        let from_tier = (env.attempt > 0 && tiers > 0).then(|| {
            let tier = (env.attempt as usize - 1).min(tiers - 1);
            self.router.topology.label(tier)
        });
        let settled = events::Settled {
            env,
            result: &p.result,
            attempts: p.attempts,
            from_tier,
        };
        match p.written {
            Written::Duplicate => events::Duplicate(settled).emit(&self.metrics),
            _ => events::Persisted(settled).emit(&self.metrics),
        }
        p.result
    }

    fn routed(
        &self,
        env: &Envelope,
        request_id: String,
        user_id: Option<String>,
        failure: &Failure,
        dest: &Destination,
    ) -> PersistenceResult {
        let result = route::results::routed(env, request_id, user_id, failure, dest);
        let routing = result
            .routing
            .as_ref()
            .expect("a routed result names its route");
        let routed = events::Routed {
            env,
            failure,
            result: &result,
            routing,
        };
        match dest {
            Destination::Tier { .. } => events::RetryScheduled(routed).emit(&self.metrics),
            Destination::DeadLetter { .. } => events::DeadLettered(routed).emit(&self.metrics),
        }
        result
    }
}
