//! Per-key ordering across retry tiers: the pipeline's side of the parking protocol in
//! `crate::persist::park` (which statements run when, and what a release settles).

use std::future::Future;

use super::waits::FIRST_HOLD;
use super::{Pipeline, Settled};
use crate::classify::{Disposition, Failure};
use crate::kafka::worker::Handled;
use crate::message::envelope::Envelope;
use crate::persist::park::{self, Gate};
use crate::route::Destination;

/// What holding a key before routing to a tier did.
pub(super) enum KeyHold {
    /// Not ordered (or already the head): nothing held.
    Unordered,
    /// The request now heads its key: wherever it ends, it releases or hands on the key.
    Headed,
    /// Another request holds the key: this one was parked behind it.
    Parked,
    /// A parked request's release lost the key to another release, which settles it.
    Superseded,
}

/// How a request takes part in per-key ordering.
pub(super) enum Order<'a> {
    /// Keyless, too long a key, ordering off, or a tier copy (its key is held for it).
    Unordered,
    /// A fresh keyed request: not written while its key is parked, and parked as its key's head
    /// before it goes to a tier.
    Fresh(Vec<u8>),
    /// A parked request being released: made head before it goes to a tier, provided the key
    /// is still held as the release found it (its head, and the record running the release).
    Follower(&'a park::Follower, (i64, &'a str)),
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
                self.life.fail(&f);
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
            Order::Follower(f, by) => match self
                .db(env, "promote", || park::promote(pool, f, *by))
                .await?
            {
                true => Some(KeyHold::Headed),
                false => Some(KeyHold::Superseded),
            },
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
        let releaser = park::releaser(head);
        loop {
            let next = self.db(head, "release", || {
                let at = (head_offset, releaser.as_str());
                park::next_follower(pool, &key, at, head_settled, &self.trust)
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
                false => Order::Follower(&follower, (head_offset, releaser.as_str())),
            };
            let (result, to_tier, headed) = match Box::pin(self.settle(env, &order)).await {
                Settled::Abandoned | Settled::Blocked | Settled::Parked => return false,
                // Another release holds the key now: the rest is its to settle.
                Settled::Superseded => return true,
                Settled::Persisted(r, _) => (r, false, false),
                Settled::Routed(r, dest, headed) => {
                    (r, matches!(dest, Destination::Tier { .. }), headed)
                }
            };
            // Confirmed before it leaves the queue: should the release stop in between, the
            // next one settles it again and the ledger repeats the confirmation.
            let pending = match self.confirm(env, &result).await {
                Handled::Abandoned => return false,
                Handled::Done(p) => p,
            };
            if let Some(p) = pending {
                if !p.delivered(&self.life).await {
                    return false;
                }
            }
            // A promoted follower that ended outside the tiers (its tier refused it) holds the
            // key now: the release goes on in its name, and its queue entry goes with the next
            // step (`next_follower` drops a settled head's own entry in the transaction that
            // hands the key on), so a cut in between leaves it for the releaser to resume.
            if (resumed || headed) && !to_tier {
                head_offset = env.origin.offset;
                head_settled = true;
                continue;
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
        }
    }
}
