//! Per-key ordering across retry tiers. While a request (the head) waits in a retry tier, later
//! requests with the same key from the same input partition are parked in PostgreSQL instead of
//! overtaking it; when the head finally succeeds or is dead-lettered, its handler releases them
//! in order. The key's row is locked by every statement that parks or releases, so a request
//! arriving during a release either joins the queue or runs after it, never beside it.

use deadpool_postgres::Pool;

use crate::classify::Failure;
use crate::envelope::{Envelope, RawHeaders};

/// A key of one input partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkKey {
    pub topic: String,
    pub partition: i32,
    pub key: Vec<u8>,
}

/// Longer keys are not parked: a B-tree index entry holds about 2.7 kB, and no real user id
/// comes near this.
pub const MAX_PARKED_KEY_BYTES: usize = 1024;

impl ParkKey {
    /// Keyless messages are not parked: they have no per-key order to keep.
    pub fn of(env: &Envelope) -> Option<ParkKey> {
        let key = env
            .key
            .clone()
            .filter(|k| k.len() <= MAX_PARKED_KEY_BYTES)?;
        Some(ParkKey {
            topic: env.origin.topic.clone(),
            partition: env.origin.partition,
            key,
        })
    }
}

/// What the gate said about a fresh request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Nothing waits for this key: process it.
    Free,
    /// Another request of this key waits in a retry tier: this one is parked behind it.
    Parked,
    /// This request is itself the waiting head (redelivered after it was routed): done.
    Head,
}

/// A parked request, in the order it arrived.
pub struct Follower {
    pub id: i64,
    pub envelope: Envelope,
}

const PARK_SQL: &str = r#"
WITH k AS (
    SELECT head_offset FROM parked_key
    WHERE topic = $1 AND partition = $2 AND key = $3
    FOR SHARE
), ins AS (
    INSERT INTO parked_message (topic, partition, key, source_offset, value, header_names, header_values, message_timestamp)
    SELECT $1, $2, $3, $4, $5, $6, $7, $8 FROM k WHERE k.head_offset <> $4
    ON CONFLICT (topic, partition, source_offset) DO NOTHING
    RETURNING 1
)
SELECT (SELECT head_offset FROM k)
"#;

/// Parks `env` if its key has a head waiting in a retry tier; one statement, autocommitted.
pub async fn gate(pool: &Pool, env: &Envelope) -> Result<Gate, Failure> {
    let Some(k) = ParkKey::of(env) else {
        return Ok(Gate::Free);
    };
    let c = pool.get().await.map_err(|e| Failure::from(&e))?;
    let stmt = c.prepare_cached(PARK_SQL).await?;
    let (names, values): (Vec<&str>, Vec<Option<&[u8]>>) = env
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_deref()))
        .unzip();
    let o = &env.origin;
    let row = c
        .query_one(
            &stmt,
            &[
                &k.topic,
                &k.partition,
                &k.key,
                &o.offset,
                &env.payload,
                &names,
                &values,
                &o.timestamp_ms,
            ],
        )
        .await?;
    Ok(match row.get::<_, Option<i64>>(0) {
        None => Gate::Free,
        Some(head) if head == o.offset => Gate::Head,
        Some(_) => Gate::Parked,
    })
}

/// Records `env` as its key's head after it was routed to a retry tier. A key already parked
/// keeps its head: this request was a later hop of it, or a redelivered duplicate. A request the
/// ledger already holds is not parked: its tier copy succeeded before this step ran (a stalled
/// database and short tier delays), and nothing would ever release the key.
pub async fn park_head(pool: &Pool, env: &Envelope, request_id: &str) -> Result<(), Failure> {
    let Some(k) = ParkKey::of(env) else {
        return Ok(());
    };
    let c = pool.get().await.map_err(|e| Failure::from(&e))?;
    c.execute(
        "INSERT INTO parked_key (topic, partition, key, head_offset)
         SELECT $1, $2, $3, $4
         WHERE NOT EXISTS (SELECT 1 FROM processed_request WHERE request_id = $5)
         ON CONFLICT (topic, partition, key) DO NOTHING",
        &[
            &k.topic,
            &k.partition,
            &k.key,
            &env.origin.offset,
            &request_id,
        ],
    )
    .await?;
    Ok(())
}

/// The next parked request of the key whose head is `head`, or None once the queue is empty, in
/// which case the key is released in the same transaction. Also None when `head` is not the
/// key's head (nothing of ours to release).
pub async fn next_follower(pool: &Pool, head: &Envelope) -> Result<Option<Follower>, Failure> {
    let Some(k) = ParkKey::of(head) else {
        return Ok(None);
    };
    let mut c = pool.get().await.map_err(|e| Failure::from(&e))?;
    let tx = c.transaction().await?;
    let keyp: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&k.topic, &k.partition, &k.key];
    let owner = tx
        .query_opt(
            "SELECT head_offset FROM parked_key WHERE topic = $1 AND partition = $2 AND key = $3 FOR UPDATE",
            &keyp,
        )
        .await?;
    if owner.map(|r| r.get::<_, i64>(0)) != Some(head.origin.offset) {
        return Ok(None);
    }
    let next = tx
        .query_opt(
            "SELECT id, source_offset, value, header_names, header_values, message_timestamp
             FROM parked_message WHERE topic = $1 AND partition = $2 AND key = $3
             ORDER BY id LIMIT 1",
            &keyp,
        )
        .await?;
    let Some(row) = next else {
        tx.execute(
            "DELETE FROM parked_key WHERE topic = $1 AND partition = $2 AND key = $3",
            &keyp,
        )
        .await?;
        tx.commit().await?;
        return Ok(None);
    };
    tx.commit().await?;
    let names: Vec<String> = row.get(3);
    let values: Vec<Option<Vec<u8>>> = row.get(4);
    let headers: RawHeaders = names.into_iter().zip(values).collect();
    let envelope = Envelope::new(
        (k.topic, k.partition, row.get(1)),
        Some(k.key),
        row.get(2),
        headers,
        row.get(5),
    );
    Ok(Some(Follower {
        id: row.get(0),
        envelope,
    }))
}

/// A follower finished (persisted or dead-lettered): drop it from the queue.
pub async fn finished(pool: &Pool, follower: &Follower) -> Result<(), Failure> {
    let c = pool.get().await.map_err(|e| Failure::from(&e))?;
    c.execute("DELETE FROM parked_message WHERE id = $1", &[&follower.id])
        .await?;
    Ok(())
}

/// A follower went to a retry tier itself: it becomes the head the rest wait for.
pub async fn promote(pool: &Pool, follower: &Follower) -> Result<(), Failure> {
    let Some(k) = ParkKey::of(&follower.envelope) else {
        return Ok(());
    };
    let mut c = pool.get().await.map_err(|e| Failure::from(&e))?;
    let tx = c.transaction().await?;
    tx.execute(
        "UPDATE parked_key SET head_offset = $4, parked_at = now()
         WHERE topic = $1 AND partition = $2 AND key = $3",
        &[
            &k.topic,
            &k.partition,
            &k.key,
            &follower.envelope.origin.offset,
        ],
    )
    .await?;
    tx.execute("DELETE FROM parked_message WHERE id = $1", &[&follower.id])
        .await?;
    tx.commit().await?;
    Ok(())
}
