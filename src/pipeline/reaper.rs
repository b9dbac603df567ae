//! The parked-key reaper: refreshes the parked-key gauges and releases keys whose head can no
//! longer be in any retry tier (parked longer than `PARKED_KEY_TTL`).

use super::Pipeline;
use crate::classify::Failure;
use crate::message::envelope::Envelope;

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
            let mut env = Envelope::new(
                (topic, partition, head),
                Some(key),
                vec![],
                vec![],
                None,
                &self.trust,
            );
            // Its promotions must not name the head's own input record (`park::releaser`),
            // whose redelivery would then take itself for their releaser: no topic has
            // parentheses in its name.
            env.topic = "(reaper)".into();
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
