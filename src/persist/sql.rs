//! The SQL of one persist attempt: the five steps as one statement of chained CTEs that also
//! assembles the request's confirmation, its parameters, and reading the row it returns.

use std::time::{Duration, Instant};

use serde_json::Value as Json;
use tokio_postgres::types::{Json as PgJson, ToSql};
use tokio_postgres::Row;

use super::{Persisted, Written};
use crate::classify::Failure;
use crate::message::envelope::Source;
use crate::message::headers::format_time;
use crate::message::model::{round2, status, PersistenceRequest, PersistenceResult};

pub(super) const PERSIST_SQL: &str = r#"
WITH owner AS (
    -- The share lock makes a new owner's claim wait for this transaction, and this one see a
    -- claim committed before it (40001 under SERIALIZABLE, then retried and fenced).
    SELECT generation FROM partition_owner
    WHERE $21::text IS NOT NULL AND topic = $21 AND partition = $22
    FOR SHARE
), fenced AS (
    SELECT $21::text IS NOT NULL AND NOT EXISTS (SELECT 1 FROM owner WHERE generation = $23) AS yes
), blocked AS (
    SELECT 1 FROM parked_key
    WHERE $20::bytea IS NOT NULL AND topic = $3 AND partition = $4 AND key = $20::bytea
), led AS (
    -- The ledger row is written once: the confirmation's fields known now, the rest in the
    -- audit row (migrations/0005_confirmation.sql).
    INSERT INTO processed_request (request_id, recommendation_id, user_id, source_topic, source_partition, source_offset, confirmation)
    SELECT $1::text, gen_random_uuid(), $2::text, $3::text, $4::int4, $5::int8,
           jsonb_build_object('requestId', $1::text, 'userId', $2::text,
               'bookCount', cardinality($15::text[]), 'persistenceStatus', 'success',
               'timestamp', $24::text, 'error', NULL,
               'persistenceMetadata', jsonb_build_object('transactionId', txid_current()::text,
                   'booksLinked', cardinality($15::text[])))
    WHERE NOT EXISTS (SELECT 1 FROM blocked) AND NOT (SELECT yes FROM fenced)
    ON CONFLICT (request_id) DO NOTHING
    RETURNING recommendation_id, confirmation
), ctx AS (
    INSERT INTO reader_context AS rc (user_id, mood, reader_profile, interests, intent, preferences, previous_moods)
    SELECT $2, $6, $7, $8, $9, $10, ARRAY[$6::text] FROM led
    ON CONFLICT (user_id) DO UPDATE SET
        mood = EXCLUDED.mood,
        reader_profile = EXCLUDED.reader_profile,
        interests = EXCLUDED.interests,
        intent = EXCLUDED.intent,
        preferences = COALESCE(EXCLUDED.preferences, rc.preferences),
        previous_moods = (rc.previous_moods || EXCLUDED.mood)[greatest(cardinality(rc.previous_moods) - 18, 1):],
        updated_at = now()
    RETURNING rc.id, (rc.xmax = 0) AS inserted
), rec AS (
    INSERT INTO recommendation (id, context_id, request_id, total_score, processing_time, agents_used, errors)
    SELECT led.recommendation_id, ctx.id, $1, $11, $12, $13, $14 FROM led, ctx
    RETURNING id, context_id
), books AS (
    INSERT INTO recommendation_book (recommendation_id, book_id, score, score_breakdown, justification, key_reasons, rank)
    SELECT rec.id, b.book_id, b.score, b.breakdown, b.justification,
           ARRAY(SELECT jsonb_array_elements_text(b.reasons)), b.rank::int
    FROM rec, unnest($15::text[], $16::float8[], $17::jsonb[], $18::text[], $19::jsonb[])
         WITH ORDINALITY AS b(book_id, score, breakdown, justification, reasons, rank)
), audit AS (
    -- persistenceTime: the client's wait before the statement ($25, ms) and the statement's
    -- own time up to here, after the reader and recommendation rows.
    INSERT INTO audit_log (entity_type, entity_id, action, user_id, request_id, new_data)
    SELECT 'recommendation', rec.id::text, 'created', $2, $1,
           jsonb_build_object('contextId', rec.context_id, 'bookCount', cardinality($15::text[]),
               'totalScore', $11::float8, 'contextCreated', ctx.inserted,
               'persistenceTime', $25::int8
                   + (extract(epoch FROM clock_timestamp() - statement_timestamp()) * 1000)::int8)
    FROM rec, ctx
    RETURNING new_data
)
SELECT persistence_confirmation(led.confirmation, led.recommendation_id, audit.new_data),
       NULL::jsonb, 0
FROM led, audit
UNION ALL
-- A duplicate: the snapshot predates the ledger insert, so a row found was recorded before.
SELECT NULL, COALESCE(persistence_confirmation(p.confirmation, p.recommendation_id, a.new_data),
           '{}'::jsonb), 0
FROM processed_request p
LEFT JOIN LATERAL (SELECT new_data FROM audit_log WHERE entity_type = 'recommendation'
    AND entity_id = p.recommendation_id::text AND action = 'created' LIMIT 1) a ON true
WHERE p.request_id = $1 AND NOT EXISTS (SELECT 1 FROM led) AND NOT (SELECT yes FROM fenced)
UNION ALL
SELECT NULL, NULL, 0
WHERE EXISTS (SELECT 1 FROM blocked) AND NOT (SELECT yes FROM fenced)
  AND NOT EXISTS (SELECT 1 FROM processed_request WHERE request_id = $1)
UNION ALL
SELECT NULL, NULL, -1
WHERE (SELECT yes FROM fenced)
"#;

/// Claims the next generation of a consumed partition for a new owner; waits for transactions
/// of earlier owners that hold their share lock.
pub const CLAIM_SQL: &str =
    "INSERT INTO partition_owner AS o (topic, partition, generation) VALUES ($1, $2, 1)
     ON CONFLICT (topic, partition) DO UPDATE SET generation = o.generation + 1, claimed_at = now()
     RETURNING generation";

/// BEGIN of a SERIALIZABLE transaction with the attempt's statement timeout.
pub(super) fn begin_sql(timeout: Duration) -> String {
    // A transaction whose client vanished (a half-open socket) would hold its share lock on
    // the partition's owner row until the server's own keepalive gives up, hours later.
    format!(
        "BEGIN ISOLATION LEVEL SERIALIZABLE; SET LOCAL statement_timeout = {}; \
             SET LOCAL idle_in_transaction_session_timeout = '60s'",
        timeout.as_millis().max(1)
    )
}

/// The statements of one attempt on a checked-out connection, BEGIN to COMMIT.
pub(super) async fn statements(
    client: &deadpool_postgres::Object,
    p: &Params<'_>,
    timeout: Duration,
    started: Instant,
) -> Result<Persisted, Failure> {
    let stamp = Stamp::new(started);
    let refs = p.as_refs(&stamp);
    let rows = transaction(client, PERSIST_SQL, &refs, timeout).await?;
    // One row always: the new recommendation, the ledger's record of the duplicate, or none.
    let Some(row) = rows.first() else {
        return Err(Failure::unexpected("persist statement returned no row"));
    };
    let persisted = |result, written| Persisted {
        result,
        written,
        attempts: 0,
    };
    if row.get::<_, i32>(2) < 0 {
        return Ok(persisted(bare_result(p.request_id), Written::Fenced));
    }
    if let Some(result) = written_result(row, 0, p.request_id)? {
        return Ok(persisted(result, Written::New));
    }
    Ok(match stored_result(row, 1, p.request_id) {
        Some(result) => persisted(result, Written::Duplicate),
        None => persisted(bare_result(p.request_id), Written::Blocked),
    })
}

/// BEGIN, the statement and COMMIT in one round trip; the statement's rows. Polled together in
/// order, tokio-postgres sends each request before reading any reply. Whatever fails, the
/// transaction is over when this returns (COMMIT of an aborted one rolls it back), or the
/// connection is broken: no ROLLBACK is needed after it.
pub(super) async fn transaction(
    client: &deadpool_postgres::Object,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    timeout: Duration,
) -> Result<Vec<Row>, Failure> {
    let begin = begin_sql(timeout);
    // BEGIN goes first, so a statement new to this connection is prepared inside the
    // transaction, under its statement timeout (parsing waits for the tables' locks).
    let (began, ran) = tokio::join!(biased; client.batch_execute(&begin), async {
        let stmt = client.prepare_cached(sql).await?;
        Ok::<_, tokio_postgres::Error>(tokio::join!(biased;
            client.query(&stmt, params),
            client.batch_execute("COMMIT")
        ))
    });
    let (rows, committed) = match ran {
        Ok(ran) => ran,
        Err(e) => {
            // The prepare failed before COMMIT was sent: end the transaction here. ROLLBACK
            // fails only on a broken connection, which the pool discards.
            let _ = client.batch_execute("ROLLBACK").await;
            began?;
            return Err(e.into());
        }
    };
    // BEGIN itself cannot fail on a live connection; a SET LOCAL after it can, which aborts
    // the transaction: the statement then fails (25P02) and COMMIT rolls back.
    began?;
    // COMMIT of an aborted transaction "succeeds" as a rollback: the statement's error first.
    let rows = rows?;
    committed?;
    Ok(rows)
}

/// The confirmation's time fields, taken as the statement is sent: the ledger stores them, so
/// a duplicate gets the same.
pub(super) struct Stamp {
    pub timestamp: String,
    pub elapsed_ms: i64,
}

impl Stamp {
    pub(super) fn new(started: Instant) -> Self {
        Self {
            timestamp: format_time(chrono::Utc::now()),
            elapsed_ms: i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX),
        }
    }
}

/// The confirmation the statement assembled for a request it wrote (column `idx`). Read after
/// COMMIT: should it not parse, the request is written, and its retry answers as a duplicate.
pub(super) fn written_result(
    row: &Row,
    idx: usize,
    request_id: &str,
) -> Result<Option<PersistenceResult>, Failure> {
    confirmation_at(row, idx).map_err(|e| {
        tracing::error!(request_id, error = %e, "confirmation written unreadable");
        Failure::unexpected("persist statement returned an unreadable confirmation")
    })
}

/// The confirmation a duplicate gets back (column `idx`); one stored by an older release that no
/// longer parses comes back bare.
pub(super) fn stored_result(row: &Row, idx: usize, request_id: &str) -> Option<PersistenceResult> {
    confirmation_at(row, idx).unwrap_or_else(|e| {
        tracing::warn!(request_id, error = %e, "stored confirmation unreadable");
        Some(bare_result(request_id))
    })
}

/// Column `idx` (jsonb) parsed straight into a confirmation, with no JSON tree between.
fn confirmation_at(
    row: &Row,
    idx: usize,
) -> Result<Option<PersistenceResult>, tokio_postgres::Error> {
    row.try_get::<_, Option<PgJson<PersistenceResult>>>(idx)
        .map(|json| json.map(|j| j.0))
}

/// A success result carrying only the request id: for a blocked request (never published: it
/// is parked instead) and for a stored confirmation that no longer parses.
pub(super) fn bare_result(request_id: &str) -> PersistenceResult {
    PersistenceResult {
        request_id: request_id.to_string(),
        user_id: None,
        recommendation_id: None,
        context_id: None,
        book_count: 0,
        persistence_status: status::SUCCESS.to_string(),
        timestamp: chrono::Utc::now().to_rfc3339(),
        persistence_metadata: None,
        error: None,
        routing: None,
    }
}

/// Statement parameters, owned so references to them live as long as the query.
pub(super) struct Params<'a> {
    request_id: &'a str,
    user_id: &'a str,
    topic: &'a str,
    partition: i32,
    offset: i64,
    req: &'a PersistenceRequest,
    total_score: f64,
    errors: Vec<String>,
    book_ids: Vec<&'a str>,
    scores: Vec<f64>,
    breakdowns: Vec<Option<&'a Json>>,
    justifications: Vec<&'a str>,
    reasons: Vec<Json>,
    order_key: Option<&'a [u8]>,
    fence_topic: Option<&'a str>,
    fence_partition: Option<i32>,
    fence_generation: Option<i64>,
}

impl<'a> Params<'a> {
    pub(super) fn new(
        req: &'a PersistenceRequest,
        request_id: &'a str,
        source: &'a Source,
    ) -> Self {
        let books = &req.justified_books;
        Self {
            request_id,
            user_id: &req.user_id,
            topic: &source.topic,
            partition: source.partition,
            offset: source.offset,
            req,
            total_score: req.total_score(),
            errors: req.metadata.errors.clone().unwrap_or_default(),
            book_ids: books.iter().map(|b| b.book_id.as_str()).collect(),
            scores: books.iter().map(|b| round2(b.score)).collect(),
            breakdowns: books.iter().map(|b| b.score_breakdown.as_ref()).collect(),
            justifications: books.iter().map(|b| b.justification.as_str()).collect(),
            reasons: books
                .iter()
                .map(|b| Json::from(b.key_reasons.clone()))
                .collect(),
            order_key: source.order_key.as_deref(),
            fence_topic: source.fence.as_ref().map(|f| f.0.as_str()),
            fence_partition: source.fence.as_ref().map(|f| f.1),
            fence_generation: source.fence.as_ref().map(|f| f.2),
        }
    }

    fn as_refs<'s>(&'s self, stamp: &'s Stamp) -> [&'s (dyn ToSql + Sync); 25] {
        let c = &self.req.context;
        [
            &self.request_id,
            &self.user_id,
            &self.topic,
            &self.partition,
            &self.offset,
            &c.mood,
            &c.profile,
            &c.interests,
            &c.intent,
            &c.preferences,
            &self.total_score,
            &self.req.metadata.processing_time,
            &self.req.metadata.agents_used,
            &self.errors,
            &self.book_ids,
            &self.scores,
            &self.breakdowns,
            &self.justifications,
            &self.reasons,
            &self.order_key,
            &self.fence_topic,
            &self.fence_partition,
            &self.fence_generation,
            &stamp.timestamp,
            &stamp.elapsed_ms,
        ]
    }
}
