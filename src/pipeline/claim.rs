//! The database side of fencing: a new owner of a consumed partition claims the next
//! generation before its first write, and every transaction carries its owner's generation.

use super::waits::MAX_PROBE_INTERVAL;
use super::Pipeline;
use crate::classify::Failure;
use crate::message::envelope::Envelope;
use crate::message::envelope::Fence;
use crate::persist::CLAIM_SQL;

/// An earlier owner's transaction holds its share lock for seconds at most; a connection of it
/// that went half-open holds it until the server notices (`idle_in_transaction_session_timeout`).
const CLAIM_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '10s'";

impl Pipeline {
    /// The consumed partition and this owner's generation, claimed on first use; None when the
    /// message is not tied to a partition. Err(()) at shutdown or once the partition was revoked.
    pub(super) async fn fence(&self, env: &Envelope) -> Result<Option<Fence>, ()> {
        let Some((topic, partition)) = env.owner.partition.clone() else {
            return Ok(None);
        };
        // Held while claiming: the partition's other workers wait for the one claim.
        let mut generation = env.owner.generation.lock().await;
        if let Some(g) = *generation {
            return Ok(Some((topic, partition, g)));
        }
        // Fenced and revoked since: the partition is the next owner's, never claimed back.
        if !env.owner.may_claim() {
            return Err(());
        }
        let g = self.claim(env, &topic, partition).await?;
        env.owner.mark_claimed();
        *generation = Some(g);
        Ok(Some((topic, partition, g)))
    }

    /// Another owner claimed the partition while this consumer still has it assigned: either
    /// this one is stale and about to hear of it (then the work stops), or a stale owner's
    /// claim landed late. After a pause, claim it again (false: revoked or shutdown meanwhile).
    pub(super) async fn fenced(&self, env: &Envelope, generation: i64) -> bool {
        tracing::info!(topic = %env.topic, partition = env.partition, offset = env.offset, generation, "fenced: another owner claimed the partition");
        // A partition being revoked (or lost) is the new owner's: never claimed back, though
        // its queued messages may still start during the revoke's drain.
        if env.owner.is_revoking() {
            return false;
        }
        if *env.owner.generation.lock().await != Some(generation) {
            return true; // another worker of this assignment claimed it again already
        }
        let mut delay = MAX_PROBE_INTERVAL;
        if !self.hold(&mut delay).await {
            return false;
        }
        let mut current = env.owner.generation.lock().await;
        // The revoke may have begun during the pause, or while a sibling's claim held the lock.
        if env.owner.is_revoking() {
            return false;
        }
        if *current == Some(generation) {
            tracing::warn!(topic = %env.topic, partition = env.partition, generation, "partition claimed by another owner while assigned here: claiming it again");
            *current = None;
        }
        true
    }

    /// Claims the next generation, waiting out the database like any write; Err(()) when the
    /// partition is revoked (or shutdown begins) first, or while the claim was under way.
    async fn claim(&self, env: &Envelope, topic: &str, partition: i32) -> Result<i64, ()> {
        let pool = self.persister.pool();
        let claimed = || async move {
            let mut c = pool.get().await.map_err(|e| Failure::from(&e))?;
            let tx = c.transaction().await?;
            tx.batch_execute(CLAIM_LOCK_TIMEOUT).await?;
            let row = tx.query_one(CLAIM_SQL, &[&topic, &partition]).await?;
            tx.commit().await?;
            Ok::<i64, Failure>(row.get(0))
        };
        let may_go_on = || std::future::ready(!env.owner.is_revoked() && !self.life.stopping());
        let generation = self.retry_db("claim", may_go_on, claimed).await.ok_or(())?;
        // A claim landing after the revoke must not count as this owner's.
        if env.owner.is_revoked() {
            return Err(());
        }
        tracing::debug!(topic, partition, generation, "partition claimed");
        Ok(generation)
    }
}
