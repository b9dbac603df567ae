//! Warming the pool before the first message: connections opened and the persist statements
//! prepared on each, so the first requests after a start (a deploy, a scale-out) do not each
//! wait for a new connection's handshake and the parse of a large statement.

use std::time::Duration;

use deadpool_postgres::{Object, Pool};
use futures_util::future::join_all;

/// Added to the statement timeout for the whole warm-up: a connection that neither answers nor
/// fails must not hold up the start.
const MARGIN: Duration = Duration::from_secs(5);

/// Opens `connections` connections at once (no more than the pool holds) and prepares
/// `statements` on each; returns how many were warmed. One that fails is left for the pool to
/// open, or report, on first use: warming only saves time, it is never a reason not to start.
pub async fn warm(
    pool: &Pool,
    connections: usize,
    statements: &[&str],
    timeout: Duration,
) -> usize {
    let n = connections.min(pool.status().max_size);
    // Each is held until all are done, so the pool opens `n` distinct connections.
    let all = join_all((0..n).map(|_| async {
        let client = pool.get().await.ok()?;
        match prepare(&client, statements, timeout).await {
            Ok(()) => Some(client),
            Err(e) => {
                tracing::debug!(error = %e, "warming a database connection failed");
                None
            }
        }
    }));
    match tokio::time::timeout(timeout + MARGIN, all).await {
        Ok(held) => held.iter().flatten().count(),
        Err(_) => 0,
    }
}

/// Prepares `statements` (each cached for the connection's later checkouts) inside a
/// transaction, so its timeout applies to this parse alone: parsing waits for the tables'
/// locks, such as another replica's migration.
async fn prepare(
    client: &Object,
    statements: &[&str],
    timeout: Duration,
) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "BEGIN; SET LOCAL statement_timeout = {}",
            timeout.as_millis().max(1)
        ))
        .await?;
    let mut prepared = Ok(());
    for sql in statements {
        if let Err(e) = client.prepare_cached(sql).await {
            prepared = Err(e);
            break;
        }
    }
    // Of an aborted transaction, COMMIT rolls back: either way the session is idle again.
    client.batch_execute("COMMIT").await?;
    prepared
}
