//! Per-key ordering across retry tiers: the pipeline's side of the parking protocol in
//! `crate::park` (which statements run when, and what a release settles).

use std::future::Future;

use super::{Pipeline, Settled, FIRST_HOLD};
use crate::classify::{Disposition, Failure};
use crate::envelope::Envelope;
use crate::metrics::outcome;
use crate::park::{self, Gate};
use crate::route::Destination;

/// What holding a key before routing to a tier did.
pub(super) enum Hold {
    /// Not ordered (or already the head): nothing held.
    Unordered,
    /// The request now heads its key: wherever it ends, it releases or hands on the key.
    Headed,
    /// Another request holds the key: this one was parked behind it.
    Parked,
}

/// How a request takes part in per-key ordering.
pub(super) enum Order<'a> {
    /// Keyless, too long a key, ordering off, or a tier copy (its key is held for it).
    Unordered,
    /// A fresh keyed request: not written while its key is parked, and parked as its key's head
    /// before it goes to a tier.
    Fresh(Vec<u8>),
    /// A parked request being released: made head before it goes to a tier.
    Follower(&'a park::Follower),
}

impl Pipeline {
    /// Runs a database step of the parking protocol until it succeeds; None at shutdown or on a
    /// fatal error.
    pub(super) async fn db<T, F, Fut>(&self, what: &str, mut op: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let mut delay = FIRST_HOLD;
        loop {
            let f = match op().await {
                Ok(v) => return Some(v),
                Err(f) => f,
            };
            if f.disposition == Disposition::Fatal {
                self.stop_fatal(&f);
                return None;
            }
            tracing::warn!(step = what, class = f.class, code = %f.code, error = %f.message, "parking step failed; retrying");
            let waited = match f.waits_for_database() {
                true => self.wait_for_database().await,
                false => self.hold(&mut delay).await,
            };
            if !waited {
                return None;
            }
        }
    }

    /// Before a request goes to a retry tier, makes it its key's head, so its tier copy always
    /// finds the key held for it. A fresh request whose key another request holds (its
    /// transaction failed rather than reporting the key blocked) is parked instead. None at
    /// shutdown.
    pub(super) async fn hold_key(&self, env: &Envelope, order: &Order<'_>) -> Option<Hold> {
        let pool = self.persister.pool();
        match order {
            Order::Unordered => Some(Hold::Unordered),
            Order::Fresh(_) => match self.db("park", || park::gate(pool, env)).await? {
                Gate::Parked => Some(Hold::Parked),
                Gate::Free | Gate::Head => {
                    self.db("park", || park::park_head(pool, env)).await?;
                    Some(Hold::Headed)
                }
            },
            Order::Follower(f) => {
                self.db("promote", || park::promote(pool, f)).await?;
                Some(Hold::Headed)
            }
        }
    }

    /// Settles the requests parked behind `head` in arrival order, until one goes to a retry
    /// tier (it becomes the new head) or none are left (the key is released). False when
    /// shutdown interrupted it: the head must not be committed, so its redelivery resumes.
    pub(super) async fn release(&self, head: &Envelope) -> bool {
        let Some(key) = park::ParkKey::of(head).filter(|_| self.order_by_key) else {
            return true;
        };
        let pool = self.persister.pool();
        let mut head_offset = head.origin.offset;
        loop {
            let next = self.db("release", || {
                park::next_follower(pool, &key, head_offset, &self.trust)
            });
            let (follower, resumed) = match next.await {
                None => return false,
                Some(park::Next::Done) => return true,
                Some(park::Next::Follower(f)) => (f, false),
                Some(park::Next::Resume(f)) => (f, true),
            };
            let env = &follower.envelope;
            // A resumed follower already heads the key.
            let order = match resumed {
                true => Order::Unordered,
                false => Order::Follower(&follower),
            };
            let (result, to_tier, headed) = match Box::pin(self.settle(env, &order)).await {
                Settled::Abandoned | Settled::Blocked | Settled::Parked => return false,
                Settled::Persisted(r) => (r, false, false),
                Settled::Routed(r, dest, headed) => {
                    (r, matches!(dest, Destination::Tier { .. }), headed)
                }
            };
            if self
                .db("unpark", || park::finished(pool, &follower))
                .await
                .is_none()
            {
                return false;
            }
            self.observe_latency(env, &result);
            if let Some(pending) = self.results.publish(&result).await {
                if !pending.delivered(&self.shutdown, &self.fatal).await {
                    return false;
                }
            }
            if to_tier {
                return true;
            }
            // A promoted follower that ended outside the tiers (its tier refused it) holds the
            // key now: the release goes on in its name.
            if resumed || headed {
                head_offset = env.origin.offset;
            }
        }
    }

    pub(super) fn parked(&self, env: &Envelope) {
        self.metrics
            .outcomes
            .with_label_values(&[&env.origin.topic, outcome::PARKED])
            .inc();
        tracing::info!(
            action = "RECOMMENDATION_PARKED",
            topic = %env.topic,
            partition = env.partition,
            offset = env.offset,
            "an earlier request with this key waits in a retry tier; parked behind it",
        );
    }
}
