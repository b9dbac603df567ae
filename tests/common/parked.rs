//! The parking tables as an earlier run would have left them, for the tests of per-key order
//! recovering from an agent stopped part-way through the parking protocol.

#![allow(dead_code)]

use persistence_agent::message::headers;

use super::{json, request, Env};

/// Writes `parked_key` as an earlier run would have left it: `key` of partition 0 held by the
/// head at input offset `head` since `age` ago (a PostgreSQL interval).
pub async fn park_key(env: &Env, key: &str, head: i64, age: &str) {
    let sql = format!(
        "INSERT INTO parked_key (topic, partition, key, head_offset, parked_at)
         VALUES ($1, 0, $2, $3, now() - interval '{age}')"
    );
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
        [&env.topic, &key.as_bytes(), &head];
    env.pg.execute(&sql, &params).await.unwrap();
}

/// A request `id` of user `key` (also its message key), parked at input offset `offset`.
pub async fn park_request(env: &Env, key: &str, offset: i64, id: &str) {
    park_value(
        env,
        key,
        offset,
        &json(request(key, Some(id), &[("b1", 0.5)])),
    )
    .await;
}

/// A message `value` with key `key`, parked at input offset `offset`.
pub async fn park_value(env: &Env, key: &str, offset: i64, value: &[u8]) {
    env.pg
        .execute(
            "INSERT INTO parked_message (topic, partition, key, source_offset, value, header_names, header_values)
             VALUES ($1, 0, $2, $3, $4, '{}', '{}')",
            &[&env.topic, &key.as_bytes(), &offset, &value],
        )
        .await
        .unwrap();
}

/// The ledger row a request written at input offset `offset` of partition 0 left.
pub async fn written_before(env: &Env, id: &str, offset: i64) {
    env.pg
        .execute(
            "INSERT INTO processed_request (request_id, recommendation_id, user_id, source_topic, source_partition, source_offset)
             VALUES ($1, gen_random_uuid(), 'alice', $2, 0, $3)",
            &[&id, &env.topic, &offset],
        )
        .await
        .unwrap();
}

/// Records that the release run by the consumed record `by` ("topic:partition:offset")
/// promoted `key`'s current head.
pub async fn promoted_by(env: &Env, key: &str, by: &str) {
    env.pg
        .execute(
            "UPDATE parked_key SET promoted_by = $2, promoted_head = head_offset WHERE key = $1",
            &[&key.as_bytes(), &by],
        )
        .await
        .unwrap();
}

/// The id of the parked request at input offset `offset`.
pub async fn parked_id(env: &Env, offset: i64) -> i64 {
    env.pg
        .query_one(
            "SELECT id FROM parked_message WHERE source_offset = $1",
            &[&offset],
        )
        .await
        .unwrap()
        .get(0)
}

/// Publishes to `tier` the first tier copy of `user`'s request `id` (one book, b1), whose input
/// offset was 0 of partition 0, as the agent would have forwarded it; due at once.
pub async fn tier_copy(env: &Env, tier: &str, user: &str, id: &str) {
    super::produce(
        &env.brokers,
        tier,
        Some(user),
        &json(request(user, Some(id), &[("b1", 0.5)])),
        &[
            (headers::ORIGINAL_TOPIC, env.topic.as_str()),
            (headers::ORIGINAL_PARTITION, "0"),
            (headers::ORIGINAL_OFFSET, "0"),
            (headers::ATTEMPT, "1"),
            (headers::FIRST_FAILURE, "2026-01-01T00:00:00.000Z"),
            (headers::DUE, "2026-01-01T00:00:01.000Z"),
        ],
    )
    .await;
}
