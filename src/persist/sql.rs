//! The SQL of one persist attempt: the five steps as one statement of chained CTEs, its
//! parameters, the confirmation written back to the ledger, and reading the rows it returns.

use std::time::{Duration, Instant};

use serde_json::Value as Json;

use super::{Persisted, Written};
use crate::classify::Failure;
use crate::message::envelope::Source;
use crate::message::model::{
    round2, status, PersistenceMetadata, PersistenceRequest, PersistenceResult,
};

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
    INSERT INTO processed_request (request_id, recommendation_id, user_id, source_topic, source_partition, source_offset)
    SELECT $1::text, gen_random_uuid(), $2::text, $3::text, $4::int4, $5::int8
    WHERE NOT EXISTS (SELECT 1 FROM blocked) AND NOT (SELECT yes FROM fenced)
    ON CONFLICT (request_id) DO NOTHING
    RETURNING recommendation_id
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
    RETURNING 1
), audit AS (
    INSERT INTO audit_log (entity_type, entity_id, action, user_id, request_id, new_data)
    SELECT 'recommendation', rec.id::text, 'created', $2, $1,
           jsonb_build_object('contextId', rec.context_id, 'bookCount', cardinality($15::text[]), 'totalScore', $11::float8)
    FROM rec
    RETURNING 1
)
SELECT rec.id::text, rec.context_id::text, (SELECT count(*) FROM books)::int4, txid_current()::text,
       ctx.inserted, NULL::jsonb
FROM rec, ctx
UNION ALL
SELECT p.recommendation_id::text, NULL, 0, p.transaction_id::text, false, COALESCE(p.confirmation, '{}'::jsonb)
FROM processed_request p
WHERE p.request_id = $1 AND NOT EXISTS (SELECT 1 FROM led) AND NOT (SELECT yes FROM fenced)
UNION ALL
SELECT NULL, NULL, 0, NULL, false, NULL
WHERE EXISTS (SELECT 1 FROM blocked) AND NOT (SELECT yes FROM fenced)
  AND NOT EXISTS (SELECT 1 FROM processed_request WHERE request_id = $1)
UNION ALL
SELECT NULL, NULL, -1, NULL, false, NULL
WHERE (SELECT yes FROM fenced)
"#;

/// Claims the next generation of a consumed partition for a new owner; waits for transactions
/// of earlier owners that hold their share lock.
pub const CLAIM_SQL: &str =
    "INSERT INTO partition_owner AS o (topic, partition, generation) VALUES ($1, $2, 1)
     ON CONFLICT (topic, partition) DO UPDATE SET generation = o.generation + 1, claimed_at = now()
     RETURNING generation";

pub(super) const CONFIRM_SQL: &str =
    "UPDATE processed_request SET confirmation = $2 WHERE request_id = $1";

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
    let (req, request_id) = (p.req, p.request_id);
    let begin = begin_sql(timeout);
    let refs = p.as_refs();
    // Polled together, tokio-postgres sends BEGIN and the query before reading either reply:
    // one round trip. BEGIN goes first, so a statement new to this connection is prepared
    // inside the transaction, under its statement timeout: parsing takes the tables' locks.
    let (began, prepared) = tokio::join!(biased; client.batch_execute(&begin), async {
        let stmt = client.prepare_cached(PERSIST_SQL).await?;
        // Prepared before the query: an unprepared UPDATE would be parsed first and executed
        // only after the pipelined COMMIT, outside the transaction.
        let confirm = client.prepare_cached(CONFIRM_SQL).await?;
        let rows = client.query(&stmt, &refs).await?;
        Ok::<_, tokio_postgres::Error>((rows, confirm))
    });
    began?;
    let (rows, confirm) = prepared?;
    // One row always: the new recommendation, or the ledger's record of the duplicate.
    let Some(row) = rows.first() else {
        return Err(Failure::unexpected("persist statement returned no row"));
    };
    // Nothing written: another owner has the partition, or the key is parked.
    let nothing = match row.get::<_, i32>(2) < 0 {
        true => Some(Written::Fenced),
        false => row
            .get::<_, Option<String>>(0)
            .is_none()
            .then_some(Written::Blocked),
    };
    if let Some(written) = nothing {
        client.batch_execute("COMMIT").await?;
        return Ok(Persisted {
            result: bare_result(request_id),
            written,
            attempts: 0,
        });
    }
    let result = match row.get::<_, Option<Json>>(5) {
        Some(confirmation) => {
            client.batch_execute("COMMIT").await?;
            return Ok(Persisted {
                result: from_ledger(confirmation, request_id),
                written: Written::Duplicate,
                attempts: 0,
            });
        }
        None => confirmation(req, request_id, &NewRows::from_row(row), started),
    };
    let json = tokio_postgres::types::Json(&result);
    let confirm_params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&request_id, &json];
    let (confirmed, committed) = tokio::join!(
        client.execute(&confirm, &confirm_params),
        client.batch_execute("COMMIT")
    );
    // COMMIT of an aborted transaction "succeeds" as a rollback: check the update first.
    confirmed?;
    committed?;
    Ok(Persisted {
        result,
        written: Written::New,
        attempts: 0,
    })
}

/// What a transaction returned for a request it wrote.
pub(super) struct NewRows {
    pub recommendation_id: String,
    pub context_id: String,
    pub books: i32,
    pub transaction_id: String,
    pub context_created: bool,
}

impl NewRows {
    fn from_row(row: &tokio_postgres::Row) -> Self {
        Self {
            recommendation_id: row.get(0),
            context_id: row.get(1),
            books: row.get(2),
            transaction_id: row.get(3),
            context_created: row.get(4),
        }
    }
}

pub(super) fn confirmation(
    req: &PersistenceRequest,
    request_id: &str,
    rows: &NewRows,
    started: Instant,
) -> PersistenceResult {
    let books = rows.books;
    PersistenceResult {
        request_id: request_id.to_string(),
        user_id: Some(req.user_id.clone()),
        recommendation_id: Some(rows.recommendation_id.clone()),
        context_id: Some(rows.context_id.clone()),
        book_count: books,
        persistence_status: status::SUCCESS.to_string(),
        timestamp: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        persistence_metadata: Some(PersistenceMetadata {
            transaction_id: rows.transaction_id.clone(),
            persistence_time: started.elapsed().as_millis() as i64,
            records_created: 1 + books + i32::from(rows.context_created),
            books_linked: books,
        }),
        error: None,
        routing: None,
    }
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

pub(super) fn from_ledger(confirmation: Json, request_id: &str) -> PersistenceResult {
    serde_json::from_value(confirmation).unwrap_or_else(|e| {
        tracing::warn!(request_id, error = %e, "stored confirmation unreadable");
        bare_result(request_id)
    })
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

    fn as_refs(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 23] {
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
        ]
    }
}
