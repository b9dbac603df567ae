//! Warming the pool before the first message: connections opened and the persist statements
//! prepared on each, so the first requests after a start (a deploy, a scale-out) do not each
//! wait for a new connection's handshake and the parse of a large statement.

use std::time::Duration;

use deadpool_postgres::{Object, Pool};
use futures_util::future::join_all;

use super::sql::begin_sql;
use super::Checkout;

/// Each connection's whole warm-up (open, parse, commit): a server that accepts connections
/// but does not answer must not hold up the start for long.
const BUDGET: Duration = Duration::from_secs(10);
/// The parse's own statement timeout, at most: parsing waits for the tables' locks (another
/// replica's migration).
const PARSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens `connections` connections at once (no more than the pool holds) and prepares
/// `statements` on each; returns how many were warmed. One that fails is left for the pool to
/// open, or report, on first use: warming only saves time, it is never a reason not to start.
pub async fn warm(
    pool: &Pool,
    connections: usize,
    statements: &[&str],
    statement_timeout: Duration,
) -> usize {
    let n = connections.min(pool.status().max_size);
    let timeout = statement_timeout.min(PARSE_TIMEOUT);
    // Each is held until all are done, so the pool opens `n` distinct connections.
    let held = join_all((0..n).map(|_| async move {
        tokio::time::timeout(BUDGET, warm_one(pool, statements, timeout))
            .await
            .ok()
            .flatten()
    }))
    .await;
    held.iter().flatten().filter(|(_, warmed)| *warmed).count()
}

/// One connection, and whether its statements were prepared; None when it was discarded.
async fn warm_one(pool: &Pool, statements: &[&str], timeout: Duration) -> Option<(Object, bool)> {
    // Discarded, not pooled, unless its transaction is seen to end: a warm-up cut short (the
    // budget, a lost answer) never lends out an open one.
    let client = match Checkout::get(pool).await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(class = e.class, code = %e.code, error = %e.message, "opening a database connection to warm failed");
            return None;
        }
    };
    match prepare(client.client(), statements, timeout).await {
        Ok(warmed) => Some((client.release(), warmed)),
        Err(e) => {
            tracing::debug!(error = %e, "warming a database connection failed");
            None
        }
    }
}

/// Prepares `statements` (each cached for the connection's later checkouts) in a transaction
/// begun as the hot path begins its own, so its timeouts bound this parse alone. Ok(false): a
/// parse failed and the transaction was ended; Err: whether it ended is unknown.
async fn prepare(
    client: &Object,
    statements: &[&str],
    timeout: Duration,
) -> Result<bool, tokio_postgres::Error> {
    let began = client.batch_execute(&begin_sql(timeout)).await;
    let mut prepared = began.is_ok();
    for sql in statements {
        if !prepared {
            break;
        }
        if let Err(e) = client.prepare_cached(sql).await {
            tracing::debug!(error = %e, "preparing a statement while warming failed");
            prepared = false;
        }
    }
    // Always: of an aborted transaction COMMIT rolls back, and a BEGIN that failed left none.
    client.batch_execute("COMMIT").await?;
    Ok(prepared)
}
