//! Waiting out what is down instead of failing the message: the schema registry, a busy pool,
//! the database (probed at least once a second until it takes writes again).

use std::sync::Arc;
use std::time::Duration;

use super::Pipeline;
use crate::classify::{Disposition, Failure};
use crate::decode::DecodeError;
use crate::message::envelope::Source;
use crate::message::model::PersistenceRequest;
use crate::ops::events::{Dependency, Emit, HeldForOutage};
use crate::persist::Persisted;

/// Backoff while holding a message for a dependency that is down (database, schema registry,
/// the brokers taking a forwarded message).
pub(super) const FIRST_HOLD: Duration = Duration::from_millis(200);
const MAX_HOLD: Duration = Duration::from_secs(30);
/// Probing a database that is down is one cheap connection attempt: probe often, so writing
/// resumes within about a second of its return.
pub(super) const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(1);

const WRITABLE_SQL: &str =
    "SELECT NOT pg_is_in_recovery() AND current_setting('transaction_read_only') = 'off'";

impl Pipeline {
    /// Reports the message held for `dependency`, then waits as `hold` does.
    pub(super) async fn held(
        &self,
        dependency: Dependency,
        delay: &mut Duration,
        error: &str,
    ) -> bool {
        let retry_in = *delay;
        HeldForOutage {
            dependency,
            retry_in,
            error,
        }
        .emit(&self.metrics);
        self.hold(delay).await
    }

    /// Waits `delay` (then doubles it, up to `MAX_HOLD`), or returns false once shutdown begins.
    pub(super) async fn hold(&self, delay: &mut Duration) -> bool {
        tokio::select! {
            _ = self.life.shutdown.cancelled() => return false,
            _ = tokio::time::sleep(*delay) => {}
        }
        *delay = (*delay * 2).min(MAX_HOLD);
        true
    }

    /// Decodes; while the schema registry is unreachable the message waits (capped backoff)
    /// rather than failing, and is abandoned (not committed) only at shutdown.
    pub(super) async fn decode(&self, payload: &[u8]) -> Result<PersistenceRequest, Failure> {
        let mut delay = FIRST_HOLD;
        loop {
            match self.decoder.decode(payload).await {
                Ok((req, _encoding)) => return Ok(req),
                Err(e @ DecodeError::RegistryUnavailable(_)) => {
                    let error = e.to_string();
                    if !self
                        .held(Dependency::SchemaRegistry, &mut delay, &error)
                        .await
                    {
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
    pub(super) async fn persist(
        &self,
        req: &Arc<PersistenceRequest>,
        request_id: &str,
        source: &Source,
    ) -> Result<Persisted, Failure> {
        let mut busy = FIRST_HOLD;
        loop {
            let outcome = self.persister.persist(req, request_id, source).await;
            if let Some(f) = outcome.as_ref().err().filter(|f| f.waits_for_connection()) {
                if !self
                    .held(Dependency::Connection, &mut busy, &f.message)
                    .await
                {
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
    pub(super) async fn wait_for_database(&self) -> bool {
        self.life.outage_began();
        let mut delay = FIRST_HOLD;
        let up = loop {
            if !self.hold(&mut delay).await {
                break false;
            }
            delay = delay.min(MAX_PROBE_INTERVAL);
            if self.database_answers().await {
                break true;
            }
            let (dependency, error) = (Dependency::Database, "database unavailable");
            HeldForOutage {
                dependency,
                retry_in: delay,
                error,
            }
            .emit(&self.metrics);
        };
        self.life.outage_ended();
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
}
