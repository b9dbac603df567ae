//! End to end: produce → rows in PostgreSQL → committed offset → confirmation on the results topic.

mod common;

use common::{request, stop, Env};
use persistence_agent::message::model::PersistenceResult;
use persistence_agent::ops::metrics::outcome;
use persistence_agent::tools::produce::{encode_avro, WireFormat};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persists_json_request_end_to_end() {
    let env = Env::new(1).await;
    env.books(&["book-101", "book-102"]).await;
    let agent = env.start(&[]).await;
    let req = request(
        "user-123",
        Some("req-456"),
        &[("book-101", 0.944), ("book-102", 0.5)],
    );
    env.produce("user-123", req.to_string().as_bytes()).await;

    env.wait_count("SELECT count(*) FROM recommendation", 1, 30)
        .await;
    let row = env
        .pg
        .query_one(
            "SELECT r.total_score, r.processing_time, r.agents_used, c.user_id, c.mood, c.previous_moods
             FROM recommendation r JOIN reader_context c ON c.id = r.context_id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, f64>(0),
        0.72,
        "mean of 0.944 and 0.5, rounded to 2 decimals"
    );
    assert_eq!(row.get::<_, Option<i64>>(1), Some(8500));
    assert_eq!(row.get::<_, Vec<String>>(2), vec!["context", "scoring"]);
    assert_eq!(row.get::<_, String>(3), "user-123");
    assert_eq!(row.get::<_, Vec<String>>(5), vec!["reflexivo"]);
    let books = env
        .pg
        .query(
            "SELECT book_id, score, rank, key_reasons FROM recommendation_book ORDER BY rank",
            &[],
        )
        .await
        .unwrap();
    let books: Vec<(String, f64, i32, Vec<String>)> = books
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        books,
        vec![
            (
                "book-101".into(),
                0.94,
                1,
                vec!["depth".into(), "style".into()]
            ),
            (
                "book-102".into(),
                0.5,
                2,
                vec!["depth".into(), "style".into()]
            ),
        ]
    );
    assert_eq!(
        env.count("SELECT count(*) FROM audit_log WHERE entity_type = 'recommendation'")
            .await,
        1
    );
    env.assert_written_once(1).await;
    assert_eq!(
        env.count("SELECT count(*) FROM recommendation WHERE request_id = 'req-456'")
            .await,
        1
    );

    let results = env.results(1);
    let r = &results[0];
    assert_eq!(
        (
            r.request_id.as_str(),
            r.persistence_status.as_str(),
            r.book_count
        ),
        ("req-456", "success", 2)
    );
    let meta = r.persistence_metadata.as_ref().unwrap();
    assert_eq!(
        (meta.books_linked, meta.records_created),
        (2, 4),
        "recommendation + 2 books + new context"
    );
    let rec_id: String = env
        .pg
        .query_one("SELECT id::text FROM recommendation", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(r.recommendation_id.as_deref(), Some(rec_id.as_str()));

    let metrics = agent.metrics.clone();
    stop(agent).await;
    assert_eq!(
        env.committed(0),
        Some(1),
        "offset committed after the transaction"
    );
    assert_eq!(metrics.outcome_count(&env.topic, outcome::PERSISTED), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persists_both_avro_framings_and_older_schema_versions() {
    let env = Env::new(1).await;
    env.books(&["b1", "b2"]).await;
    let agent = env.start(&[]).await;
    let current = persistence_agent::decode::schemas::request_reader_schema().unwrap();
    let v1 = apache_avro::Schema::parse_str(persistence_agent::decode::schemas::REQUEST_SCHEMA_V1)
        .unwrap();

    let mut with_prefs = request("u-confluent", Some("avro-1"), &[("b1", 0.9)]);
    with_prefs["context"]["preferences"] = serde_json::json!({"language": "es"});
    with_prefs["justifiedBooks"][0]["scoreBreakdown"] = serde_json::json!({"relevance": 0.8});
    let confluent = encode_avro(&with_prefs, &current, WireFormat::AvroConfluent, 2).unwrap();
    let single = encode_avro(
        &request("u-single", Some("avro-2"), &[("b2", 0.7)]),
        &current,
        WireFormat::AvroSingle,
        0,
    )
    .unwrap();
    // Producers still on version 1 of the schema, in both framings (ids.json maps id 1 to it).
    let old_single = encode_avro(
        &request("u-v1", Some("avro-3"), &[("b1", 0.5)]),
        &v1,
        WireFormat::AvroSingle,
        0,
    )
    .unwrap();
    let old_confluent = encode_avro(
        &request("u-v1c", Some("avro-4"), &[("b2", 0.6)]),
        &v1,
        WireFormat::AvroConfluent,
        1,
    )
    .unwrap();
    for (key, payload) in [
        ("a", &confluent),
        ("b", &single),
        ("c", &old_single),
        ("d", &old_confluent),
    ] {
        env.produce(key, payload).await;
    }

    env.wait_count("SELECT count(*) FROM recommendation", 4, 30)
        .await;
    let prefs: serde_json::Value = env
        .pg
        .query_one(
            "SELECT preferences FROM reader_context WHERE user_id = 'u-confluent'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(prefs, serde_json::json!({"language": "es"}));
    let breakdown: serde_json::Value = env
        .pg
        .query_one(
            "SELECT score_breakdown FROM recommendation_book WHERE book_id = 'b1' AND score = 0.9",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(breakdown, serde_json::json!({"relevance": 0.8}));
    let mut ids: Vec<String> = env.results(4).into_iter().map(|r| r.request_id).collect();
    ids.sort();
    assert_eq!(ids, ["avro-1", "avro-2", "avro-3", "avro-4"]);
    stop(agent).await;
    assert_eq!(env.committed(0), Some(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_request_delivered_twice_writes_once() {
    duplicate_writes_once_and_repeats_the_stored_confirmation(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_request_delivered_twice_writes_once_unbatched() {
    duplicate_writes_once_and_repeats_the_stored_confirmation(&["--batch-max=1"]).await;
}

/// The confirmation must name the rows written, be the one the ledger stores, and come back
/// verbatim for a duplicate.
async fn duplicate_writes_once_and_repeats_the_stored_confirmation(extra: &[&str]) {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    let agent = env.start(extra).await;
    let req = request("u1", Some("dup-1"), &[("b1", 0.8)]).to_string();
    env.produce("u1", req.as_bytes()).await;
    env.produce("u1", req.as_bytes()).await;
    // And a request without requestId redelivered as the same Kafka record is covered by the
    // restart test; here the id is explicit.
    let results = env.results(2);
    assert_eq!(
        results[0], results[1],
        "a duplicate returns the original confirmation verbatim"
    );
    let row = env
        .pg
        .query_one(
            "SELECT r.id::text, r.context_id::text, p.transaction_id::text,
                    persistence_confirmation(p.confirmation, p.recommendation_id, a.new_data)
             FROM recommendation r JOIN processed_request p USING (request_id)
             JOIN audit_log a ON a.entity_id = r.id::text AND a.action = 'created'",
            &[],
        )
        .await
        .unwrap();
    let r = &results[0];
    let meta = r.persistence_metadata.as_ref().unwrap();
    assert_eq!(
        (
            r.recommendation_id.clone(),
            r.context_id.clone(),
            meta.transaction_id.clone()
        ),
        (Some(row.get(0)), Some(row.get(1)), row.get(2)),
        "the confirmation names the rows and the transaction that wrote them"
    );
    let stored: PersistenceResult = serde_json::from_value(row.get(3)).unwrap();
    assert_eq!(
        &stored, r,
        "the ledger and audit rows hold the confirmation published"
    );
    assert_eq!(
        (r.user_id.as_deref(), r.book_count, meta.records_created),
        (Some("u1"), 1, 3)
    );
    assert_eq!(env.count("SELECT count(*) FROM recommendation").await, 1);
    assert_eq!(
        env.count("SELECT count(*) FROM recommendation_book").await,
        1
    );
    assert_eq!(env.count("SELECT count(*) FROM audit_log").await, 1);
    assert_eq!(
        env.count("SELECT cardinality(previous_moods)::int8 FROM reader_context")
            .await,
        1
    );
    let metrics = agent.metrics.clone();
    stop(agent).await;
    assert_eq!(metrics.outcome_count(&env.topic, outcome::DUPLICATE), 1);
    assert_eq!(env.committed(0), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_for_one_user_lose_no_update() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    // Keys differ so the 20 requests run on 20 workers at once against the same reader_context
    // row; generous backoff so every conflict is retried to success in-process.
    let agent = env
        // One request per transaction: batching never lets two transactions of one reader
        // run at once, and this is about those that do.
        .start(&["--workers=20", "--batch-max=1", "--txn-backoff=20ms,50ms,100ms,200ms,300ms,400ms,500ms,500ms,500ms,500ms,1s,1s,1s,1s,1s"])
        .await;
    for i in 0..20 {
        let mut req = request("hot-user", Some(&format!("c-{i}")), &[("b1", 0.5)]);
        req["context"]["mood"] = format!("mood-{i:02}").into();
        env.produce(&format!("k{i}"), req.to_string().as_bytes())
            .await;
    }
    env.wait_count("SELECT count(*) FROM recommendation", 20, 60)
        .await;
    let moods: Vec<String> = env
        .pg
        .query_one("SELECT previous_moods FROM reader_context", &[])
        .await
        .unwrap()
        .get(0);
    let mut sorted = moods.clone();
    sorted.sort();
    let want: Vec<String> = (0..20).map(|i| format!("mood-{i:02}")).collect();
    assert_eq!(
        sorted, want,
        "every one of the 20 concurrent updates kept its mood"
    );

    // Five more, one after another: the oldest five fall out, the newest are last, in order.
    for i in 20..25 {
        let mut req = request("hot-user", Some(&format!("c-{i}")), &[("b1", 0.5)]);
        req["context"]["mood"] = format!("mood-{i:02}").into();
        env.produce("same-key", req.to_string().as_bytes()).await;
        env.wait_count("SELECT count(*) FROM recommendation", i + 1, 30)
            .await;
    }
    let after: Vec<String> = env
        .pg
        .query_one("SELECT previous_moods FROM reader_context", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(after.len(), 20);
    assert_eq!(after[..15], moods[5..]);
    assert_eq!(
        after[15..],
        (20..25).map(|i| format!("mood-{i:02}")).collect::<Vec<_>>()
    );
    let metrics = agent.metrics.clone();
    stop(agent).await;
    assert_eq!(metrics.outcome_count(&env.topic, outcome::PERSISTED), 25);
    let retries =
        metrics.attempt_count("serialization_failure") + metrics.attempt_count("deadlock");
    assert!(
        retries > 0,
        "20 concurrent writers of one row must have conflicted"
    );
    println!("serialization/deadlock retries: {retries}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_input_does_not_stall_the_partition() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    let agent = env.start(&["--max-message-bytes=4096"]).await;
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", vec![0xff, 0xfe, 0x01]),
        ("not-json", b"{\"userId\": ".to_vec()),
        ("unknown-schema-id", vec![0, 0, 0, 0, 77, 2, 2]),
        (
            "score",
            request("u", Some("bad-score"), &[("b1", 1.5)])
                .to_string()
                .into_bytes(),
        ),
        (
            "no-books",
            request("u", Some("no-books"), &[]).to_string().into_bytes(),
        ),
        (
            "dup-books",
            request("u", Some("dup-books"), &[("b1", 0.1), ("b1", 0.2)])
                .to_string()
                .into_bytes(),
        ),
        (
            "no-user",
            request("", Some("no-user"), &[("b1", 0.1)])
                .to_string()
                .into_bytes(),
        ),
        (
            "unknown-book",
            request("u", Some("unknown-book"), &[("nope", 0.1)])
                .to_string()
                .into_bytes(),
        ),
        ("oversize", vec![b' '; 5000]),
    ];
    for (key, payload) in &bad {
        env.produce(key, payload).await;
    }
    env.produce(
        "good",
        request("u-good", Some("good"), &[("b1", 0.3)])
            .to_string()
            .as_bytes(),
    )
    .await;

    env.wait_count("SELECT count(*) FROM recommendation", 1, 30)
        .await;
    let results = env.results(bad.len() + 1);
    let mut failed: Vec<(String, String, String)> = results
        .iter()
        .filter(|r| r.persistence_status != "success")
        .map(|r| {
            (
                r.error.as_ref().unwrap().class.clone(),
                r.error.as_ref().unwrap().code.clone(),
                r.persistence_status.clone(),
            )
        })
        .collect();
    // Different keys run concurrently, so results arrive in any order.
    failed.sort();
    let dl = "dead_lettered";
    let mut want = [
        ("decode", "unknown_encoding", dl),
        ("decode", "invalid_json", dl),
        ("schema", "unknown_schema_id", dl),
        ("validation", "score_out_of_range", dl),
        ("validation", "no_books", dl),
        ("validation", "duplicate_book", dl),
        ("validation", "missing_field", dl),
        // The catalogue may catch up: a delayed retry, not a dead letter.
        ("foreign_key_violation", "23503", "retry_scheduled"),
        ("oversize", "oversize", dl),
    ]
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()));
    want.sort();
    assert_eq!(failed, want);
    assert_eq!(
        results
            .iter()
            .filter(|r| r.persistence_status == "success")
            .count(),
        1
    );
    let metrics = agent.metrics.clone();
    stop(agent).await;
    assert_eq!(
        env.committed(0),
        Some(bad.len() as i64 + 1),
        "nothing blocks the partition"
    );
    assert_eq!(
        metrics.outcome_count(&env.topic, outcome::DEAD_LETTERED),
        bad.len() as u64 - 1
    );
    assert_eq!(
        metrics.outcome_count(&env.topic, outcome::RETRY_SCHEDULED),
        1
    );
    assert_eq!(
        env.count("SELECT count(*) FROM processed_request").await,
        1,
        "failures leave no rows"
    );
}
