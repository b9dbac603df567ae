//! The SQL of one batched attempt: the single-request statement's five steps over arrays (one
//! element per request, books flattened with the index of their request), with the same
//! per-request fencing, parked-key and ledger checks, and the confirmations written back in
//! one statement.

use std::time::{Duration, Instant};

use serde_json::Value as Json;
use tokio_postgres::types::{Json as PgJson, ToSql};

use super::super::sql::{begin_sql, confirmation, from_ledger, NewRows};
use super::super::{Persisted, Written};
use super::Member;
use crate::classify::Failure;
use crate::message::model::{round2, PersistenceResult};

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
    INSERT INTO processed_request (request_id, recommendation_id, user_id, source_topic, source_partition, source_offset)
    SELECT request_id, gen_random_uuid(), user_id, topic, part, off FROM state
    WHERE NOT fenced AND NOT blocked
    ORDER BY request_id
    ON CONFLICT (request_id) DO NOTHING
    RETURNING request_id, recommendation_id
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
    RETURNING recommendation_id
), audit AS (
    INSERT INTO audit_log (entity_type, entity_id, action, user_id, request_id, new_data)
    SELECT 'recommendation', rec.id::text, 'created', s.user_id, s.request_id,
           jsonb_build_object('contextId', rec.context_id, 'bookCount', s.n_books, 'totalScore', s.total_score)
    FROM rec JOIN state s USING (request_id)
    RETURNING 1
), counted AS (
    SELECT recommendation_id, count(*)::int4 AS n FROM books GROUP BY recommendation_id
)
SELECT s.i::int4, rec.id::text, rec.context_id::text, COALESCE(c.n, 0), txid_current()::text,
       COALESCE(ctx.inserted, false), s.fenced, s.blocked,
       -- Looked up only for requests the ledger insert skipped (the snapshot predates it: a
       -- row found was recorded before), one index probe each: a scan of the ledger would
       -- take a predicate lock on all of it, which every concurrent insert conflicts with.
       CASE WHEN rec.id IS NULL AND NOT s.fenced THEN
           (SELECT COALESCE(p.confirmation, '{}'::jsonb) FROM processed_request p
            WHERE p.request_id = s.request_id)
       END
FROM state s
LEFT JOIN rec ON rec.request_id = s.request_id
LEFT JOIN ctx ON ctx.id = rec.context_id
LEFT JOIN counted c ON c.recommendation_id = rec.id
ORDER BY s.i
"#;

const BATCH_CONFIRM_SQL: &str = "UPDATE processed_request p SET confirmation = c.confirmation
     FROM unnest($1::text[], $2::jsonb[]) AS c(request_id, confirmation)
     WHERE p.request_id = c.request_id";

/// The statements of one batched attempt, BEGIN to COMMIT: one outcome per member, in order.
pub(super) async fn statements(
    client: &deadpool_postgres::Object,
    members: &[Member],
    timeout: Duration,
    started: Instant,
) -> Result<Vec<Persisted>, Failure> {
    let p = Params::new(members);
    let refs = p.as_refs();
    let begin = begin_sql(timeout);
    // As in the single path: BEGIN first, so a first prepare runs under the statement timeout;
    // the UPDATE is prepared before the query, as an unprepared one would run after COMMIT.
    let (began, prepared) = tokio::join!(biased; client.batch_execute(&begin), async {
        let stmt = client.prepare_cached(BATCH_SQL).await?;
        let confirm = client.prepare_cached(BATCH_CONFIRM_SQL).await?;
        let rows = client.query(&stmt, &refs).await?;
        Ok::<_, tokio_postgres::Error>((rows, confirm))
    });
    began?;
    let (rows, confirm) = prepared?;
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
        out.push(outcome(row, m, started)?);
    }
    // Serialized straight into the statement's parameters, with no JSON tree built between.
    let (ids, confirmations): (Vec<&str>, Vec<PgJson<&PersistenceResult>>) = out
        .iter()
        .zip(members)
        .filter(|(p, _)| p.written == Written::New)
        .map(|(p, m)| (m.request_id.as_str(), PgJson(&p.result)))
        .unzip();
    if ids.is_empty() {
        client.batch_execute("COMMIT").await?;
        return Ok(out);
    }
    let params: [&(dyn ToSql + Sync); 2] = [&ids, &confirmations];
    let (confirmed, committed) = tokio::join!(
        client.execute(&confirm, &params),
        client.batch_execute("COMMIT")
    );
    // COMMIT of an aborted transaction "succeeds" as a rollback: check the update first.
    confirmed?;
    committed?;
    Ok(out)
}

/// One member's outcome, in the single statement's order of precedence: fenced, written,
/// recorded before (duplicate), blocked.
fn outcome(row: &tokio_postgres::Row, m: &Member, started: Instant) -> Result<Persisted, Failure> {
    let (fenced, blocked): (bool, bool) = (row.get(6), row.get(7));
    let persisted = |result, written| Persisted {
        result,
        written,
        attempts: 1,
    };
    let bare = || super::super::sql::bare_result(&m.request_id);
    if fenced {
        return Ok(persisted(bare(), Written::Fenced));
    }
    if let Some(recommendation_id) = row.get::<_, Option<String>>(1) {
        let rows = NewRows {
            recommendation_id,
            context_id: row.get(2),
            books: row.get(3),
            transaction_id: row.get(4),
            context_created: row.get(5),
        };
        let result = confirmation(&m.req, &m.request_id, &rows, started);
        return Ok(persisted(result, Written::New));
    }
    match (row.get::<_, Option<Json>>(8), blocked) {
        (Some(stored), _) => Ok(persisted(
            from_ledger(stored, &m.request_id),
            Written::Duplicate,
        )),
        (None, true) => Ok(persisted(bare(), Written::Blocked)),
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

    fn as_refs(&self) -> [&(dyn ToSql + Sync); 26] {
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
        ]
    }
}
