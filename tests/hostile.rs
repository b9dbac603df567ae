//! Hostile input through the running agent: every hostile kind is dead-lettered with its class
//! and code while the valid requests behind it on the same partition are persisted, and retry
//! headers out of bounds on a tier topic neither crash the agent nor hold its partition.

mod common;

use std::time::Duration;

use common::{hostile, json, request, stop, Env};
use persistence_agent::message::headers;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_every_hostile_kind_and_keeps_the_partition_flowing() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    let agent = env.start(&["--retry-delays=1h"]).await;
    let kinds = hostile::kinds();
    for (i, (_, payload, _, _)) in kinds.iter().enumerate() {
        env.produce(&format!("k{i}"), payload).await;
        let ok = request(&format!("u{i}"), Some(&format!("ok-{i}")), &[("b1", 0.5)]);
        env.produce(&format!("k{i}"), &json(ok)).await;
    }
    let sql_user = "'; DROP TABLE book; -- \\ $1";
    env.produce("sql", &json(request(sql_user, Some("sql"), &[("b1", 0.5)])))
        .await;
    env.wait_count(
        "SELECT count(*) FROM processed_request",
        kinds.len() as i64 + 1,
        60,
    )
    .await;
    let dlq = env.records(&env.dlq(), kinds.len(), 60);
    let fatal = agent.life.fatal().map(str::to_string);
    stop(agent).await;
    assert_eq!(fatal, None, "the agent did not stop on any of them");
    assert_eq!(dlq.len(), kinds.len(), "one dead letter each");
    for (i, (name, _, class, code)) in kinds.iter().enumerate() {
        let key = format!("k{i}");
        let d = dlq
            .iter()
            .find(|r| r.key.as_deref() == Some(key.as_str()))
            .unwrap_or_else(|| panic!("{name}: no dead letter"));
        assert_eq!(d.header(headers::ERROR_CLASS), *class, "{name}");
        assert_eq!(d.header(headers::ERROR_CODE), *code, "{name}");
    }
    let stored: String = env
        .pg
        .query_one(
            "SELECT user_id FROM reader_context WHERE user_id LIKE '''%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, sql_user, "stored verbatim");
    assert_eq!(env.count("SELECT count(*) FROM book").await, 1);
    assert_eq!(env.committed(0), Some(2 * kinds.len() as i64 + 1));
}

/// A tier copy whose headers and timestamp are out of any bound: a garbled far-future due time,
/// a first failure in the future, an attempt count at `u32::MAX`, a far-future record timestamp.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_headers_out_of_bounds_neither_crash_nor_hold_the_tier() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    let agent = env.start(&["--retry-delays=2s"]).await;
    let tier = env.tier_topic("2s");
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .create()
        .unwrap();
    let hostile_headers = [
        (headers::DUE, "9999-12-31T23:59:59.999Z"),
        (headers::FIRST_FAILURE, "9999-01-01T00:00:00Z"),
        (headers::ATTEMPT, "4294967295"),
        (headers::ORIGINAL_TOPIC, env.topic.as_str()),
        (headers::ORIGINAL_PARTITION, "-7"),
        (headers::ORIGINAL_OFFSET, "99999999999999999999"),
        (headers::ORIGINAL_TIMESTAMP, "-262143-01-01T00:00:00Z"),
    ];
    // The latest millisecond chrono can represent: adding any delay to it overflows.
    let far_future = chrono::DateTime::<chrono::Utc>::MAX_UTC.timestamp_millis();
    for (i, ts) in [(0, None), (1, Some(far_future))] {
        let mut hs = OwnedHeaders::new();
        for (k, v) in hostile_headers.iter().skip(usize::from(ts.is_some())) {
            hs = hs.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        let payload = json(request(
            &format!("u{i}"),
            Some(&format!("t{i}")),
            &[("b1", 0.5)],
        ));
        let mut record = FutureRecord::to(&tier)
            .key("k")
            .payload(&payload)
            .headers(hs);
        if let Some(ts) = ts {
            record = record.timestamp(ts);
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    env.wait_count("SELECT count(*) FROM processed_request", 2, 30)
        .await;
    let fatal = agent.life.fatal().map(str::to_string);
    let metrics = agent.metrics.clone();
    stop(agent).await;
    assert_eq!(fatal, None);
    let clamped = |h: &str| metrics.headers_clamped.with_label_values(&[h]).get();
    assert!(clamped(headers::DUE) >= 1, "the due time was clamped");
    assert!(clamped(headers::ATTEMPT) >= 1);
    assert!(clamped(headers::FIRST_FAILURE) >= 1);
    let sources: Vec<(String, i32)> = env
        .pg
        .query(
            "SELECT source_topic, source_partition FROM processed_request ORDER BY request_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        sources,
        [(tier.clone(), 0), (tier.clone(), 0)],
        "an origin out of bounds is not believed"
    );
}
