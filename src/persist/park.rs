//! Per-key ordering across retry tiers. While a request (the head) waits in a retry tier, later
//! requests with the same key from the same input partition are parked in PostgreSQL instead of
//! overtaking it; when the head finally succeeds or is dead-lettered, its handler releases them
//! in order. The key's row is locked by every statement that parks or releases, so a request
//! arriving during a release either joins the queue or runs after it, never beside it.

use deadpool_postgres::Pool;

use crate::classify::Failure;
use crate::message::envelope::{Envelope, Trust};
use crate::message::headers::RawHeaders;

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

/// The consumed record a release runs for, as `parked_key.promoted_by` names it.
pub fn releaser(env: &Envelope) -> String {
    format!("{}:{}:{}", env.topic, env.partition, env.offset)
}

/// A parked request, in the order it arrived.
pub struct Follower {
    pub id: i64,
    pub envelope: Envelope,
}

const PARK_SQL: &str = r#"
WITH k AS (
    SELECT head_offset, CASE WHEN promoted_head = head_offset THEN promoted_by END AS promoted_by
    FROM parked_key
    WHERE topic = $1 AND partition = $2 AND key = $3
    FOR SHARE
), ins AS (
    INSERT INTO parked_message (topic, partition, key, source_offset, value, header_names, header_values, message_timestamp)
    SELECT $1, $2, $3, $4, $5, $6, $7, $8 FROM k
    WHERE k.head_offset <> $4 AND k.promoted_by IS DISTINCT FROM $9
    ON CONFLICT (topic, partition, source_offset) DO NOTHING
    RETURNING 1
)
SELECT (SELECT head_offset FROM k), (SELECT promoted_by FROM k)
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
    let me = releaser(env);
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
                &me,
            ],
        )
        .await?;
    let promoted_by: Option<String> = row.get(1);
    Ok(match row.get::<_, Option<i64>>(0) {
        None => Gate::Free,
        Some(head) if head == o.offset => Gate::Head,
        // Its release promoted the head and stopped before forwarding it: settled again as
        // the head it was, this message resumes that release.
        Some(_) if promoted_by == Some(me) => Gate::Head,
        Some(_) => Gate::Parked,
    })
}

/// Records `env` as its key's head, before it is forwarded to a retry tier, so its tier copy
/// always finds the key held for it. A key already parked keeps its head (this request is that
/// head, redelivered).
pub async fn park_head(pool: &Pool, env: &Envelope) -> Result<(), Failure> {
    let Some(k) = ParkKey::of(env) else {
        return Ok(());
    };
    let c = pool.get().await.map_err(|e| Failure::from(&e))?;
    c.execute(
        "INSERT INTO parked_key (topic, partition, key, head_offset) VALUES ($1, $2, $3, $4)
         ON CONFLICT (topic, partition, key) DO NOTHING",
        &[&k.topic, &k.partition, &k.key, &env.origin.offset],
    )
    .await?;
    Ok(())
}

/// What a release does next.
pub enum Next {
    /// The oldest parked request, to settle now.
    Follower(Follower),
    /// A follower made head whose own outcome was never recorded (the agent stopped between
    /// promoting and forwarding it): settle it again.
    Resume(Follower),
    /// Nothing left: the key was released (or was not held by this head).
    Done,
}

const FOLLOWER_COLUMNS: &str =
    "id, source_offset, value, header_names, header_values, message_timestamp";

/// The next step of releasing the key whose current head is the request at offset `head`.
/// When no follower is left the key is released in the same transaction. A parked request is
/// read back through `trust` like any consumed one: its stored headers carry no retry state.
/// `settled_head`: the head itself was just settled (its own message, or a follower this
/// release settled), so a queue entry of its own is obsolete; otherwise (the reaper) such an
/// entry is a promoted head that may never have been forwarded, and is settled first.
pub async fn next_follower(
    pool: &Pool,
    key: &ParkKey,
    (head, releaser): (i64, &str),
    settled_head: bool,
    trust: &Trust,
) -> Result<Next, Failure> {
    let mut c = pool.get().await.map_err(|e| Failure::from(&e))?;
    let tx = c.transaction().await?;
    let keyp: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
        [&key.topic, &key.partition, &key.key];
    let owner = tx
        .query_opt(
            "SELECT head_offset, CASE WHEN promoted_head = head_offset THEN promoted_by END
             FROM parked_key WHERE topic = $1 AND partition = $2 AND key = $3 FOR UPDATE",
            &keyp,
        )
        .await?
        .map(|r| (r.get::<_, i64>(0), r.get::<_, Option<String>>(1)));
    let Some((owner, promoted_by)) = owner else {
        return Ok(Next::Done);
    };
    if owner != head {
        // Another head holds the key: resumed only by the release that promoted it (NULL: a
        // promotion by an agent from before `promoted_by`, resumed by any release, as then).
        if promoted_by.is_some_and(|by| by != releaser) {
            tx.commit().await?;
            return Ok(Next::Done);
        }
        let promoted = tx
            .query_opt(
                &format!(
                    "SELECT {FOLLOWER_COLUMNS} FROM parked_message
                     WHERE topic = $1 AND partition = $2 AND key = $3 AND source_offset = $4"
                ),
                &[&key.topic, &key.partition, &key.key, &owner],
            )
            .await?;
        tx.commit().await?;
        return Ok(promoted.map_or(Next::Done, |r| Next::Resume(follower(key, &r, trust))));
    }
    let own = [
        &key.topic as &(dyn tokio_postgres::types::ToSql + Sync),
        &key.partition,
        &key.key,
        &head,
    ];
    if settled_head {
        // A promoted head's own queue entry, should its first release still be waiting for its
        // confirmation: the head is settled, so it must not come back as its own follower.
        tx.execute(
            "DELETE FROM parked_message WHERE topic = $1 AND partition = $2 AND key = $3 AND source_offset = $4",
            &own,
        )
        .await?;
    } else {
        let entry = format!(
            "SELECT {FOLLOWER_COLUMNS} FROM parked_message
             WHERE topic = $1 AND partition = $2 AND key = $3 AND source_offset = $4"
        );
        if let Some(row) = tx.query_opt(&entry, &own).await? {
            tx.commit().await?;
            return Ok(Next::Resume(follower(key, &row, trust)));
        }
    }
    let next = tx
        .query_opt(
            &format!(
                "SELECT {FOLLOWER_COLUMNS} FROM parked_message
                 WHERE topic = $1 AND partition = $2 AND key = $3 ORDER BY id LIMIT 1"
            ),
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
        return Ok(Next::Done);
    };
    tx.commit().await?;
    Ok(Next::Follower(follower(key, &row, trust)))
}

fn follower(key: &ParkKey, row: &tokio_postgres::Row, trust: &Trust) -> Follower {
    let names: Vec<String> = row.get(3);
    let values: Vec<Option<Vec<u8>>> = row.get(4);
    let headers: RawHeaders = names.into_iter().zip(values).collect();
    let envelope = Envelope::new(
        (key.topic.clone(), key.partition, row.get(1)),
        Some(key.key.clone()),
        row.get(2),
        headers,
        row.get(5),
        trust,
    );
    Follower {
        id: row.get(0),
        envelope,
    }
}

/// A follower finished (persisted or dead-lettered): drop it from the queue.
pub async fn finished(pool: &Pool, follower: &Follower) -> Result<(), Failure> {
    let c = pool.get().await.map_err(|e| Failure::from(&e))?;
    c.execute("DELETE FROM parked_message WHERE id = $1", &[&follower.id])
        .await?;
    Ok(())
}

/// A follower about to go to a retry tier becomes the head the rest wait for. Done before it
/// is forwarded, so its tier copy always finds itself the head; its queue entry is removed
/// (`finished`) only once the forward was acknowledged. False when the key's head is no longer
/// the one this release took the follower up under: another release (a tier copy and its
/// redelivered input, say) settled or promoted it first, and this one must stop, or it would
/// hand the key back to a request already behind it. `released_by`: the key's head when the
/// release took the follower up, and the record running that release (`releaser`): the one
/// is checked, the other recorded.
pub async fn promote(
    pool: &Pool,
    follower: &Follower,
    (head, by): (i64, &str),
) -> Result<bool, Failure> {
    let Some(k) = ParkKey::of(&follower.envelope) else {
        return Ok(true);
    };
    let c = pool.get().await.map_err(|e| Failure::from(&e))?;
    // Its queue entry gone, another release settled it already.
    let promoted = c
        .execute(
            "UPDATE parked_key SET head_offset = $4, promoted_by = $6, promoted_head = $4,
                 parked_at = now()
             WHERE topic = $1 AND partition = $2 AND key = $3 AND head_offset = $5
               AND EXISTS (SELECT 1 FROM parked_message WHERE id = $7)",
            &[
                &k.topic,
                &k.partition,
                &k.key,
                &follower.envelope.origin.offset,
                &head,
                &by,
                &follower.id,
            ],
        )
        .await?;
    Ok(promoted == 1)
}
