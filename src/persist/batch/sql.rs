//! The SQL of one batched attempt: the single-request statement's five steps over arrays (one
//! element per request, books flattened with the index of their request), with the same
//! per-request fencing, parked-key and ledger checks, and each request's confirmation.

use std::time::{Duration, Instant};

use serde_json::Value as Json;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::super::sql::{bare_result, stored_result, transaction, written_result, Stamp};
use super::super::{Persisted, Written};
use super::Member;
use crate::classify::Failure;
use crate::message::model::round2;

pub const BATCH_SQL: &str = r#"
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int4[], $5::int8[], $6::text[],
        $7::text[], $8::jsonb[], $9::text[], $10::jsonb[], $11::float8[], $12::int8[], $13::jsonb[],
        $14::jsonb[], $15::bytea[], $16::text[], $17::int4[], $18::int8[], $26::int4[])
    WITH ORDINALITY AS r(request_id, user_id, topic, part, off, mood, profile, interests, intent,
        prefs, total_score, ptime, agents, errors, order_key, f_topic, f_part, f_gen, n_books, i)
), owner AS (
    -- As in the single statement: a new owner's claim waits for this transaction, and this
    -- one sees a claim committed before it (40001, then retried and fenced).
    SELECT o.topic, o.partition, o.generation FROM partition_owner o
    WHERE (o.topic, o.partition) IN (SELECT f_topic, f_part FROM input WHERE f_topic IS NOT NULL)
    FOR SHARE
), state AS (
    SELECT r.*,
        (r.f_topic IS NOT NULL AND NOT EXISTS (SELECT 1 FROM owner o
            WHERE o.topic = r.f_topic AND o.partition = r.f_part AND o.generation = r.f_gen)) AS fenced,
        (r.order_key IS NOT NULL AND EXISTS (SELECT 1 FROM parked_key k
            WHERE k.topic = r.topic AND k.partition = r.part AND k.key = r.order_key)) AS blocked
    FROM input r
), led AS (
    -- Written once, as in the single statement: the rest of the confirmation is in the audit row.
    INSERT INTO processed_request (request_id, recommendation_id, user_id, source_topic, source_partition, source_offset, confirmation)
    SELECT request_id, gen_random_uuid(), user_id, topic, part, off,
           jsonb_build_object('requestId', request_id, 'userId', user_id, 'bookCount', n_books,
               'persistenceStatus', 'success', 'timestamp', $27::text, 'error', NULL,
               'persistenceMetadata', jsonb_build_object('transactionId', txid_current()::text,
                   'booksLinked', n_books))
    FROM state
    WHERE NOT fenced AND NOT blocked
    ORDER BY request_id
    ON CONFLICT (request_id) DO NOTHING
    RETURNING request_id, recommendation_id, confirmation
), ctx AS (
    INSERT INTO reader_context AS rc (user_id, mood, reader_profile, interests, intent, preferences, previous_moods)
    SELECT s.user_id, s.mood, s.profile, ARRAY(SELECT jsonb_array_elements_text(s.interests)),
           s.intent, s.prefs, ARRAY[s.mood]
    FROM state s JOIN led USING (request_id)
    -- Concurrent batches lock their readers in one order: fewer deadlocks between them.
    ORDER BY s.user_id
    ON CONFLICT (user_id) DO UPDATE SET
        mood = EXCLUDED.mood,
        reader_profile = EXCLUDED.reader_profile,
        interests = EXCLUDED.interests,
        intent = EXCLUDED.intent,
        preferences = COALESCE(EXCLUDED.preferences, rc.preferences),
        previous_moods = (rc.previous_moods || EXCLUDED.mood)[greatest(cardinality(rc.previous_moods) - 18, 1):],
        updated_at = now()
    RETURNING rc.id, rc.user_id, (rc.xmax = 0) AS inserted
), rec AS (
    INSERT INTO recommendation (id, context_id, request_id, total_score, processing_time, agents_used, errors)
    SELECT led.recommendation_id, ctx.id, s.request_id, s.total_score, s.ptime,
           ARRAY(SELECT jsonb_array_elements_text(s.agents)), ARRAY(SELECT jsonb_array_elements_text(s.errors))
    FROM state s JOIN led USING (request_id) JOIN ctx ON ctx.user_id = s.user_id
    RETURNING id, context_id, request_id
), books AS (
    INSERT INTO recommendation_book (recommendation_id, book_id, score, score_breakdown, justification, key_reasons, rank)
    SELECT rec.id, b.book_id, b.score, b.breakdown, b.justification,
           ARRAY(SELECT jsonb_array_elements_text(b.reasons)), b.rank
    FROM unnest($19::int4[], $20::text[], $21::float8[], $22::jsonb[], $23::text[], $24::jsonb[], $25::int4[])
         AS b(req, book_id, score, breakdown, justification, reasons, rank)
    JOIN state s ON s.i = b.req JOIN rec ON rec.request_id = s.request_id
), audit AS (
    INSERT INTO audit_log (entity_type, entity_id, action, user_id, request_id, new_data)
    SELECT 'recommendation', rec.id::text, 'created', s.user_id, s.request_id,
           jsonb_build_object('contextId', rec.context_id, 'bookCount', s.n_books,
               'totalScore', s.total_score, 'contextCreated', ctx.inserted,
               'persistenceTime', $28::int8
                   + (extract(epoch FROM clock_timestamp() - statement_timestamp()) * 1000)::int8)
    FROM rec JOIN state s USING (request_id) JOIN ctx ON ctx.user_id = s.user_id
    RETURNING request_id, new_data
)
SELECT s.i::int4,
       persistence_confirmation(led.confirmation, led.recommendation_id, audit.new_data),
       s.fenced, s.blocked,
       -- Looked up only for requests the ledger insert skipped (the snapshot predates it: a
       -- row found was recorded before), one index probe each: a scan of the ledger would
       -- take a predicate lock on all of it, which every concurrent insert conflicts with.
       CASE WHEN led.request_id IS NULL AND NOT s.fenced THEN
           (SELECT COALESCE(persistence_confirmation(p.confirmation, p.recommendation_id, a.new_data),
                '{}'::jsonb)
            FROM processed_request p
            LEFT JOIN LATERAL (SELECT new_data FROM audit_log WHERE entity_type = 'recommendation'
                AND entity_id = p.recommendation_id::text AND action = 'created' LIMIT 1) a ON true
            WHERE p.request_id = s.request_id)
       END
FROM state s
LEFT JOIN led ON led.request_id = s.request_id
LEFT JOIN audit ON audit.request_id = s.request_id
ORDER BY s.i
"#;

/// The statements of one batched attempt, BEGIN to COMMIT: one outcome per member, in order.
pub(super) async fn statements(
    client: &deadpool_postgres::Object,
    members: &[Member],
    timeout: Duration,
    started: Instant,
) -> Result<Vec<Persisted>, Failure> {
    let p = Params::new(members);
    let stamp = Stamp::new(started);
    let refs = p.as_refs(&stamp);
    let rows = transaction(client, BATCH_SQL, &refs, timeout).await?;
    if rows.len() != members.len() {
        return Err(Failure::unexpected(
            "batch statement returned a row count unlike its input",
        ));
    }
    let mut out = Vec::with_capacity(members.len());
    for (i, (row, m)) in rows.iter().zip(members).enumerate() {
        // Rows come back in input order (ORDER BY the ordinality): check, not assume.
        if row.get::<_, i32>(0) as usize != i + 1 {
            return Err(Failure::unexpected(
                "batch statement returned rows out of order",
            ));
        }
        out.push(outcome(row, m)?);
    }
    Ok(out)
}

/// One member's outcome, in the single statement's order of precedence: fenced, written,
/// recorded before (duplicate), blocked.
fn outcome(row: &Row, m: &Member) -> Result<Persisted, Failure> {
    let (fenced, blocked): (bool, bool) = (row.get(2), row.get(3));
    let persisted = |result, written| Persisted {
        result,
        written,
        attempts: 1,
    };
    if fenced {
        return Ok(persisted(bare_result(&m.request_id), Written::Fenced));
    }
    if let Some(result) = written_result(row, 1, &m.request_id)? {
        return Ok(persisted(result, Written::New));
    }
    match (stored_result(row, 4, &m.request_id), blocked) {
        (Some(stored), _) => Ok(persisted(stored, Written::Duplicate)),
        (None, true) => Ok(persisted(bare_result(&m.request_id), Written::Blocked)),
        (None, false) => Err(Failure::unexpected(
            "batch statement neither wrote nor found a request",
        )),
    }
}

/// The statement's parameters: one array element per member, books flattened.
struct Params<'a> {
    request_ids: Vec<&'a str>,
    user_ids: Vec<&'a str>,
    topics: Vec<&'a str>,
    partitions: Vec<i32>,
    offsets: Vec<i64>,
    moods: Vec<&'a str>,
    profiles: Vec<&'a str>,
    interests: Vec<Json>,
    intents: Vec<&'a str>,
    preferences: Vec<Option<&'a Json>>,
    total_scores: Vec<f64>,
    processing_times: Vec<Option<i64>>,
    agents: Vec<Json>,
    errors: Vec<Json>,
    order_keys: Vec<Option<&'a [u8]>>,
    fence_topics: Vec<Option<&'a str>>,
    fence_partitions: Vec<Option<i32>>,
    fence_generations: Vec<Option<i64>>,
    book_counts: Vec<i32>,
    books: Books<'a>,
}

#[derive(Default)]
struct Books<'a> {
    request: Vec<i32>,
    ids: Vec<&'a str>,
    scores: Vec<f64>,
    breakdowns: Vec<Option<&'a Json>>,
    justifications: Vec<&'a str>,
    reasons: Vec<Json>,
    ranks: Vec<i32>,
}

impl<'a> Params<'a> {
    fn new(members: &'a [Member]) -> Self {
        let n = members.len();
        let mut p = Params {
            request_ids: Vec::with_capacity(n),
            user_ids: Vec::with_capacity(n),
            topics: Vec::with_capacity(n),
            partitions: Vec::with_capacity(n),
            offsets: Vec::with_capacity(n),
            moods: Vec::with_capacity(n),
            profiles: Vec::with_capacity(n),
            interests: Vec::with_capacity(n),
            intents: Vec::with_capacity(n),
            preferences: Vec::with_capacity(n),
            total_scores: Vec::with_capacity(n),
            processing_times: Vec::with_capacity(n),
            agents: Vec::with_capacity(n),
            errors: Vec::with_capacity(n),
            order_keys: Vec::with_capacity(n),
            fence_topics: Vec::with_capacity(n),
            fence_partitions: Vec::with_capacity(n),
            fence_generations: Vec::with_capacity(n),
            book_counts: Vec::with_capacity(n),
            books: Books::default(),
        };
        for (i, m) in members.iter().enumerate() {
            p.push(i as i32 + 1, m);
        }
        p
    }

    fn push(&mut self, index: i32, m: &'a Member) {
        let (req, source, c) = (&m.req, &m.source, &m.req.context);
        self.request_ids.push(&m.request_id);
        self.user_ids.push(&req.user_id);
        self.topics.push(&source.topic);
        self.partitions.push(source.partition);
        self.offsets.push(source.offset);
        self.moods.push(&c.mood);
        self.profiles.push(&c.profile);
        self.interests.push(Json::from(c.interests.clone()));
        self.intents.push(&c.intent);
        self.preferences.push(c.preferences.as_ref());
        self.total_scores.push(req.total_score());
        self.processing_times.push(req.metadata.processing_time);
        self.agents
            .push(Json::from(req.metadata.agents_used.clone()));
        self.errors
            .push(Json::from(req.metadata.errors.clone().unwrap_or_default()));
        self.order_keys.push(source.order_key.as_deref());
        self.fence_topics
            .push(source.fence.as_ref().map(|f| f.0.as_str()));
        self.fence_partitions
            .push(source.fence.as_ref().map(|f| f.1));
        self.fence_generations
            .push(source.fence.as_ref().map(|f| f.2));
        self.book_counts.push(req.justified_books.len() as i32);
        for (rank, b) in req.justified_books.iter().enumerate() {
            let books = &mut self.books;
            books.request.push(index);
            books.ids.push(&b.book_id);
            books.scores.push(round2(b.score));
            books.breakdowns.push(b.score_breakdown.as_ref());
            books.justifications.push(&b.justification);
            books.reasons.push(Json::from(b.key_reasons.clone()));
            books.ranks.push(rank as i32 + 1);
        }
    }

    fn as_refs<'s>(&'s self, stamp: &'s Stamp) -> [&'s (dyn ToSql + Sync); 28] {
        let b = &self.books;
        [
            &self.request_ids,
            &self.user_ids,
            &self.topics,
            &self.partitions,
            &self.offsets,
            &self.moods,
            &self.profiles,
            &self.interests,
            &self.intents,
            &self.preferences,
            &self.total_scores,
            &self.processing_times,
            &self.agents,
            &self.errors,
            &self.order_keys,
            &self.fence_topics,
            &self.fence_partitions,
            &self.fence_generations,
            &b.request,
            &b.ids,
            &b.scores,
            &b.breakdowns,
            &b.justifications,
            &b.reasons,
            &b.ranks,
            &self.book_counts,
            &stamp.timestamp,
            &stamp.elapsed_ms,
        ]
    }
}
