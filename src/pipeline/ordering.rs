//! Per-key ordering across retry tiers: the pipeline's side of the parking protocol in
//! `crate::park` (which statements run when, and what a release settles).

use std::future::Future;

use super::{Handled, Pipeline, Settled, FIRST_HOLD};
use crate::classify::{Disposition, Failure};
use crate::envelope::Envelope;
use crate::metrics::outcome;
use crate::park::{self, Gate};
use crate::route::Destination;

/// What holding a key before routing to a tier did.
pub(super) enum KeyHold {
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
    /// Runs a step of the parking protocol while `env`'s work may act: parked state is never
    /// changed by work that outlived its partition's revoke. None then, at shutdown or on a
    /// fatal error.
    pub(super) async fn db<T, F, Fut>(&self, env: &Envelope, what: &str, op: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        self.retry_db(what, || env.act(), op).await
    }

    /// Runs a database step until it succeeds, waiting out an outage like any write; None at
    /// shutdown, on a fatal error, or once `may_go_on` says the work may no longer go on.
    pub(super) async fn retry_db<T, F, Fut, G, GFut>(
        &self,
        what: &str,
        mut may_go_on: G,
        mut op: F,
    ) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
        G: FnMut() -> GFut,
        GFut: Future<Output = bool>,
    {
        let mut delay = FIRST_HOLD;
        loop {
            if !may_go_on().await {
                return None;
            }
            let f = match op().await {
                Ok(v) => return Some(v),
                Err(f) => f,
            };
            if f.disposition == Disposition::Fatal {
                self.stop_fatal(&f);
                return None;
            }
            tracing::warn!(step = what, class = f.class, code = %f.code, error = %f.message, "database step failed; retrying");
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
    pub(super) async fn hold_key(&self, env: &Envelope, order: &Order<'_>) -> Option<KeyHold> {
        let pool = self.persister.pool();
        match order {
            Order::Unordered => Some(KeyHold::Unordered),
            Order::Fresh(_) => match self.db(env, "park", || park::gate(pool, env)).await? {
                Gate::Parked => Some(KeyHold::Parked),
                Gate::Free | Gate::Head => {
                    self.db(env, "park", || park::park_head(pool, env)).await?;
                    Some(KeyHold::Headed)
                }
            },
            Order::Follower(f) => {
                self.db(env, "promote", || park::promote(pool, f)).await?;
                Some(KeyHold::Headed)
            }
        }
    }

    /// Settles the requests parked behind `head` in arrival order, until one goes to a retry
    /// tier (it becomes the new head) or none are left (the key is released). False when
    /// shutdown interrupted it: the head must not be committed, so its redelivery resumes.
    /// `settled`: `head` is the message just settled (false for the reaper, which releases a
    /// head it never saw).
    pub(super) async fn release(&self, head: &Envelope, settled: bool) -> bool {
        let Some(key) = park::ParkKey::of(head).filter(|_| self.order_by_key) else {
            return true;
        };
        let pool = self.persister.pool();
        let mut head_offset = head.origin.offset;
        let mut head_settled = settled;
        loop {
            let next = self.db(head, "release", || {
                park::next_follower(pool, &key, head_offset, head_settled, &self.trust)
            });
            let (mut follower, resumed) = match next.await {
                None => return false,
                Some(park::Next::Done) => return true,
                Some(park::Next::Follower(f)) => (f, false),
                Some(park::Next::Resume(f)) => (f, true),
            };
            // The releaser's work: it acts while the releaser's partition is ours.
            follower.envelope.owner = head.owner.clone();
            follower.envelope.hold = head.hold.clone();
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
            // Confirmed before it leaves the queue: should the release stop in between, the
            // next one settles it again and the ledger repeats the confirmation.
            self.observe_latency(env, &result);
            let pending = match self.confirm(env, &result).await {
                Handled::Abandoned => return false,
                Handled::Done(p) => p,
            };
            if let Some(p) = pending {
                if !p.delivered(&self.shutdown, &self.fatal).await {
                    return false;
                }
            }
            if self
                .db(head, "unpark", || park::finished(pool, &follower))
                .await
                .is_none()
            {
                return false;
            }
            if to_tier {
                return true;
            }
            // A promoted follower that ended outside the tiers (its tier refused it) holds the
            // key now: the release goes on in its name.
            if resumed || headed {
                head_offset = env.origin.offset;
                head_settled = true;
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

/// Serialises reapers across replicas (per schema): releasing a key twice at once would settle
/// its followers twice.
const REAPER_LOCK_KEY: &str = "persistence-agent.reaper";

/// At most this many keys are released per run, oldest first, so one run stays short.
const REAP_BATCH: i64 = 100;

impl Pipeline {
    /// Refreshes the parked-key gauges and releases keys parked longer than `ttl`, whose head
    /// can no longer be in any tier; returns how many it released.
    pub async fn reap_parked(&self, ttl: std::time::Duration) -> Result<usize, Failure> {
        let c = self
            .persister
            .pool()
            .get()
            .await
            .map_err(|e| Failure::from(&e))?;
        let row = c
            .query_one(
                "SELECT count(*), COALESCE(extract(epoch FROM now() - min(parked_at)), 0)::float8
                 FROM parked_key",
                &[],
            )
            .await?;
        self.metrics.parked_keys.set(row.get(0));
        self.metrics.parked_oldest_age.set(row.get(1));
        let lock = "SELECT pg_try_advisory_lock(hashtext(current_schema() || $1))";
        if !c
            .query_one(lock, &[&REAPER_LOCK_KEY])
            .await?
            .get::<_, bool>(0)
        {
            return Ok(0);
        }
        let stale = c
            .query(
                "SELECT topic, partition, key, head_offset FROM parked_key
                 WHERE parked_at < now() - make_interval(secs => $1)
                 ORDER BY parked_at LIMIT $2",
                &[&ttl.as_secs_f64(), &REAP_BATCH],
            )
            .await;
        let mut reaped = 0;
        for r in stale.as_deref().unwrap_or_default() {
            let (topic, partition, key, head): (String, i32, Vec<u8>, i64) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            tracing::warn!(%topic, partition, head_offset = head, "parked key outlived PARKED_KEY_TTL: its head is in no tier; releasing the requests behind it");
            let env = Envelope::new(
                (topic, partition, head),
                Some(key),
                vec![],
                vec![],
                None,
                &self.trust,
            );
            if !self.release(&env, false).await {
                break;
            }
            self.metrics.parked_keys_reaped.inc();
            reaped += 1;
        }
        let unlock = "SELECT pg_advisory_unlock(hashtext(current_schema() || $1))";
        c.query_one(unlock, &[&REAPER_LOCK_KEY]).await?;
        stale?;
        Ok(reaped)
    }
}
