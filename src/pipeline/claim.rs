//! The database side of fencing: a new owner of a consumed partition claims the next
//! generation before its first write, and every transaction carries its owner's generation.

use super::{Pipeline, FIRST_HOLD};
use crate::classify::Failure;
use crate::envelope::Envelope;
use crate::persist::CLAIM_SQL;

impl Pipeline {
    /// The consumed partition and this owner's generation, claimed on first use; None when the
    /// message is not tied to a partition. Err(()) at shutdown or once the partition was revoked.
    pub(super) async fn fence(&self, env: &Envelope) -> Result<Option<(String, i32, i64)>, ()> {
        let Some((topic, partition)) = env.owner.partition.clone() else {
            return Ok(None);
        };
        let generation = env
            .owner
            .generation
            .get_or_try_init(|| self.claim(env, &topic, partition))
            .await?;
        Ok(Some((topic, partition, *generation)))
    }

    /// Claims the next generation, waiting out the database like any write; Err(()) when the
    /// partition is revoked (or shutdown begins) first.
    async fn claim(&self, env: &Envelope, topic: &str, partition: i32) -> Result<i64, ()> {
        let mut delay = FIRST_HOLD;
        loop {
            if env.owner.is_revoked() || self.shutdown.is_cancelled() {
                return Err(());
            }
            let claimed = async {
                let c = self
                    .persister
                    .pool()
                    .get()
                    .await
                    .map_err(|e| Failure::from(&e))?;
                let row = c.query_one(CLAIM_SQL, &[&topic, &partition]).await?;
                Ok::<i64, Failure>(row.get(0))
            };
            let f = match claimed.await {
                Ok(generation) => {
                    tracing::debug!(topic, partition, generation, "partition claimed");
                    return Ok(generation);
                }
                Err(f) => f,
            };
            tracing::warn!(topic, partition, class = f.class, error = %f.message, "cannot claim the partition; retrying");
            let waited = match f.waits_for_database() {
                true => self.wait_for_database().await,
                false => self.hold(&mut delay).await,
            };
            if !waited {
                return Err(());
            }
        }
    }
}
