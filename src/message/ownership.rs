//! One assignment of one partition to this consumer. Work on a message may outlive the
//! partition's revoke (`REBALANCE_DRAIN_TIMEOUT`); once revoked, that work must not act any
//! more (forward, park, release, publish), because the new owner redoes it. Every such side
//! effect runs under a guard taken from the message's ownership, and the revoke closes it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedRwLockReadGuard, RwLock};

#[derive(Debug, Default)]
pub struct Ownership {
    /// The consumed partition; None for work not tied to one (tools, the reaper).
    pub partition: Option<(String, i32)>,
    /// This assignment's generation in `partition_owner`, claimed before its first write (one
    /// claim at a time: the lock is held while claiming).
    pub generation: tokio::sync::Mutex<Option<i64>>,
    /// Set when the revoke begins: the partition is the next owner's, never claimed back.
    revoking: AtomicBool,
    /// Set once this assignment has claimed a generation: a later claim would be a claim back.
    claimed: AtomicBool,
    /// Set once the revoke's drain is over (at once without one): queued messages of the
    /// partition are not started.
    draining: AtomicBool,
    /// Set once the revoke is decided: no side effect may start.
    revoked: AtomicBool,
    /// Held (shared) by a message's work from its first side effect until its completion was
    /// reported; the revoke takes it exclusively, so it commits everything that finished and
    /// no side effect starts after it.
    gate: Arc<RwLock<()>>,
}

/// Proof that the partition is still ours while it is held.
pub type Guard = OwnedRwLockReadGuard<()>;

/// One message's hold on its partition: taken at its first side effect, kept until the worker
/// reported the message finished. Shared by the requests a release settles for it.
#[derive(Debug, Default, Clone)]
pub struct Hold(Arc<Mutex<Option<Guard>>>);

impl Hold {
    /// Whether the work may act (a side effect): true while holding, or once the hold is taken;
    /// false once the partition was revoked.
    pub async fn act(&self, owner: &Ownership) -> bool {
        // Work still holding after the revoke gave up waiting for it stops here too.
        if owner.is_revoked() {
            return false;
        }
        if self.0.lock().expect("hold lock").is_some() {
            return true;
        }
        match owner.guard().await {
            Some(g) => {
                *self.0.lock().expect("hold lock") = Some(g);
                true
            }
            None => false,
        }
    }

    /// The guard, for the worker to drop once it reported the message.
    pub fn take(&self) -> Option<Guard> {
        self.0.lock().expect("hold lock").take()
    }
}

impl Ownership {
    /// The ownership of work not consumed from a partition (the reaper, tools, tests): never
    /// revoked. Shared, so building an envelope allocates none.
    pub fn detached() -> Arc<Ownership> {
        static DETACHED: std::sync::LazyLock<Arc<Ownership>> =
            std::sync::LazyLock::new(Arc::default);
        DETACHED.clone()
    }

    pub fn of(topic: &str, partition: i32) -> Ownership {
        Ownership {
            partition: Some((topic.to_string(), partition)),
            ..Ownership::default()
        }
    }

    /// Whether a queued message of this partition may still start.
    pub fn may_start(&self) -> bool {
        !self.draining.load(Ordering::Acquire) && !self.revoked.load(Ordering::Acquire)
    }

    /// A guard for side effects, or None once the partition was revoked.
    pub async fn guard(&self) -> Option<Guard> {
        let g = self.gate.clone().read_owned().await;
        (!self.revoked.load(Ordering::Acquire)).then_some(g)
    }

    pub fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }

    /// The revoke begins: work may still run (and queued messages start) during its drain,
    /// but the partition is never claimed back.
    pub fn begin_revoke(&self) {
        self.revoking.store(true, Ordering::Release);
    }

    /// Whether a revoke of this assignment has begun (`close` implies it).
    pub fn is_revoking(&self) -> bool {
        self.revoking.load(Ordering::Acquire)
    }

    /// Records that this assignment claimed a generation.
    pub fn mark_claimed(&self) {
        self.claimed.store(true, Ordering::Release);
    }

    /// Whether a claim may begin: the assignment's first may, during a revoke's drain too (its
    /// queued messages still start); a claim back once the revoke began may not.
    pub fn may_claim(&self) -> bool {
        !(self.claimed.load(Ordering::Acquire) && self.is_revoking())
    }

    /// The revoke's drain is over: nothing queued starts any more.
    pub fn stop_queued(&self) {
        self.revoking.store(true, Ordering::Release);
        self.draining.store(true, Ordering::Release);
    }

    /// Marks the assignment revoked: no side effect starts from now on.
    pub fn close(&self) {
        self.stop_queued();
        self.revoked.store(true, Ordering::Release);
    }

    /// Waits until no work holds the assignment, or `deadline`; whether it got there. Runs on
    /// the poll thread (blocking).
    pub fn wait_idle(&self, deadline: Instant) -> bool {
        loop {
            if self.gate.try_write().is_ok() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn no_side_effect_starts_after_the_revoke() {
        let o = Ownership::default();
        assert!(o.may_start() && !o.is_revoking());
        assert!(o.guard().await.is_some());
        o.begin_revoke();
        assert!(o.may_start(), "queued messages start during the drain");
        assert!(o.is_revoking(), "never claimed back once the revoke began");
        assert!(o.may_claim(), "a first claim may begin during the drain");
        o.mark_claimed();
        assert!(!o.may_claim(), "a claim back may not");
        o.stop_queued();
        assert!(
            !o.may_start(),
            "after the drain, queued messages wait for the new owner"
        );
        assert!(
            o.guard().await.is_some(),
            "running work may finish during the drain"
        );
        o.close();
        assert!(o.wait_idle(Instant::now()));
        assert!(o.guard().await.is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_revoke_waits_for_a_side_effect_under_way() {
        let o = std::sync::Arc::new(Ownership::default());
        let g = o.guard().await.unwrap();
        let o2 = o.clone();
        o.close();
        let wait = Duration::from_millis(50);
        let revoke = tokio::task::spawn_blocking(move || o2.wait_idle(Instant::now() + wait));
        assert!(!revoke.await.unwrap(), "held past the wait");
        drop(g);
        assert!(o.wait_idle(Instant::now() + wait));
    }
}
