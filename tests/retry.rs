//! Retry tiers, the dead-letter topic, parking and replay, with tier delays in seconds.

mod common;

use std::time::Duration;

use common::{json, request, stop, wait_for, Env, Record};
use persistence_agent::message::headers::{self, parse_time};
use persistence_agent::ops::metrics::outcome;

fn due_ms(r: &Record) -> i64 {
    parse_time(r.header(headers::DUE))
        .expect("pa.due is RFC 3339")
        .timestamp_millis()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_each_disposition_with_headers() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    let agent = env.start(&["--retry-delays=1h,2h"]).await;
    common::produce(
        &env.brokers,
        &env.topic,
        Some("u1"),
        &json(request("u1", Some("fk-1"), &[("unknown-book", 0.5)])),
        &[("trace-id", "abc")],
    )
    .await;
    env.produce("u2", b"{\"userId\": ").await;
    env.produce(
        "u3",
        &json(request("u3", Some("bad-score"), &[("b1", 3.0)])),
    )
    .await;
    env.produce("u4", &json(request("u4", Some("ok"), &[("b1", 0.5)])))
        .await;

    let mut results = env.results(4);
    results.sort_by(|a, b| a.request_id.cmp(&b.request_id));
    let statuses: Vec<(&str, &str)> = results
        .iter()
        .map(|r| (r.request_id.as_str(), r.persistence_status.as_str()))
        .collect();
    let derived = format!("kafka:{}:0:1", env.topic);
    let mut want = vec![
        ("bad-score", "dead_lettered"),
        ("fk-1", "retry_scheduled"),
        (derived.as_str(), "dead_lettered"),
        ("ok", "success"),
    ];
    want.sort();
    assert_eq!(statuses, want);
    let fk = results.iter().find(|r| r.request_id == "fk-1").unwrap();
    let routing = fk.routing.as_ref().expect("routing");
    assert_eq!(routing.tier.as_deref(), Some("1h"));
    assert_eq!(routing.topic, env.tier_topic("1h"));
    assert!(routing.due_at.is_some());

    let tier = env.records(&env.tier_topic("1h"), 1, 30);
    assert_eq!(tier.len(), 1);
    let r = &tier[0];
    assert_eq!(r.key.as_deref(), Some("u1"));
    assert_eq!(r.header("trace-id"), "abc", "own headers travel unchanged");
    assert_eq!(r.header(headers::ATTEMPT), "1");
    assert_eq!(r.header(headers::ORIGINAL_TOPIC), env.topic);
    assert_eq!(r.header(headers::ORIGINAL_PARTITION), "0");
    assert_eq!(r.header(headers::ORIGINAL_OFFSET), "0");
    assert_eq!(r.header(headers::ERROR_CLASS), "foreign_key_violation");
    assert_eq!(r.header(headers::ERROR_CODE), "23503");
    assert_eq!(r.header(headers::CONSUMER_GROUP), env.group);
    assert!(parse_time(r.header(headers::ORIGINAL_TIMESTAMP)).is_some());
    assert!(parse_time(r.header(headers::FIRST_FAILURE)).is_some());
    assert!(r
        .header(headers::AGENT_VERSION)
        .starts_with(env!("CARGO_PKG_VERSION")));
    let delay = due_ms(r) - r.timestamp_ms;
    assert!(
        (3_599_000..=3_601_000).contains(&delay),
        "due 1h after entry: {delay}"
    );

    let mut dlq = env.records(&env.dlq(), 2, 30);
    dlq.sort_by_key(|r| r.header(headers::ORIGINAL_OFFSET).to_string());
    let classes: Vec<(&str, &str)> = dlq
        .iter()
        .map(|r| {
            (
                r.header(headers::ERROR_CLASS),
                r.header(headers::ERROR_CODE),
            )
        })
        .collect();
    assert_eq!(
        classes,
        [
            ("decode", "invalid_json"),
            ("validation", "score_out_of_range")
        ]
    );
    assert!(dlq.iter().all(|r| !r.headers.contains_key(headers::DUE)));
    assert_eq!(dlq[0].value, b"{\"userId\": ", "value forwarded unchanged");

    let metrics = agent.metrics.clone();
    stop(agent).await;
    assert_eq!(env.committed(0), Some(4), "routed messages are committed");
    assert_eq!(metrics.retry_routed.with_label_values(&["1h"]).get(), 1);
    assert_eq!(metrics.dead_letters.with_label_values(&["decode"]).get(), 1);
    assert_eq!(
        metrics
            .dead_letters
            .with_label_values(&["validation"])
            .get(),
        1
    );
    assert_eq!(env.count("SELECT count(*) FROM recommendation").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn succeeds_from_tier_two_once_the_book_appears() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    let agent = env.start(&["--retry-delays=2s,3s,30s"]).await;
    env.produce(
        "u1",
        &json(request(
            "u1",
            Some("late-book"),
            &[("b1", 0.5), ("b-late", 0.7)],
        )),
    )
    .await;

    // Failed in tier 1 too: now waiting in tier 2. The catalogue catches up meanwhile.
    let second = env.records(&env.tier_topic("3s"), 1, 60);
    assert_eq!(second[0].header(headers::ATTEMPT), "2");
    env.books(&["b-late"]).await;
    env.wait_count("SELECT count(*) FROM recommendation_book", 2, 60)
        .await;

    let results = env.results(3);
    let statuses: Vec<&str> = results
        .iter()
        .map(|r| r.persistence_status.as_str())
        .collect();
    assert_eq!(statuses, ["retry_scheduled", "retry_scheduled", "success"]);
    let metrics = agent.metrics.clone();
    stop(agent).await;
    assert_eq!(
        metrics
            .time_to_success
            .with_label_values(&["3s"])
            .get_sample_count(),
        1
    );
    let waited = metrics
        .time_to_success
        .with_label_values(&["3s"])
        .get_sample_sum();
    assert!(waited >= 5.0, "2 s + 3 s of tiers at least, got {waited}");
    assert_eq!(metrics.outcome_count(&env.topic, outcome::PERSISTED), 1);
    assert_eq!(env.committed(0), Some(1));
    let retry_group = env.retry_group();
    for (label, want) in [("2s", Some(1)), ("3s", Some(1))] {
        let got = common::committed(&env.brokers, &retry_group, &env.tier_topic(label), 0);
        assert_eq!(got, want, "tier {label} committed past its message");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walks_every_tier_then_dead_letters_never_before_due() {
    let env = Env::new(1).await;
    let agent = env.start(&["--retry-delays=1s,2s,3s"]).await;
    env.produce(
        "u1",
        &json(request("u1", Some("never"), &[("missing", 0.5)])),
    )
    .await;

    let dlq = env.records(&env.dlq(), 1, 90);
    let hops: Vec<Record> = ["1s", "2s", "3s"]
        .iter()
        .map(|l| env.records(&env.tier_topic(l), 1, 10).remove(0))
        .collect();
    // Each hop's record is written when the previous tier's copy was processed: never before
    // that copy was due.
    for pair in hops.windows(2) {
        assert!(
            pair[1].timestamp_ms >= due_ms(&pair[0]),
            "tier processed {} ms early",
            due_ms(&pair[0]) - pair[1].timestamp_ms
        );
    }
    assert!(dlq[0].timestamp_ms >= due_ms(&hops[2]));
    for (i, (hop, delay)) in hops.iter().zip([1000, 2000, 3000]).enumerate() {
        assert_eq!(hop.header(headers::ATTEMPT), (i + 1).to_string());
        assert_eq!(due_ms(hop) - hop.timestamp_ms, delay);
        // Origin headers are written once; error headers are replaced, not repeated.
        assert_eq!(hop.header(headers::ORIGINAL_OFFSET), "0");
        assert_eq!(
            hop.header(headers::FIRST_FAILURE),
            hops[0].header(headers::FIRST_FAILURE)
        );
    }
    let d = &dlq[0];
    assert_eq!(d.header(headers::ATTEMPT), "4");
    assert_eq!(d.header(headers::ERROR_CLASS), "foreign_key_violation");
    assert_eq!(
        d.headers.keys().filter(|k| k.starts_with("pa.")).count(),
        11
    );

    let results = env.results(4);
    assert_eq!(results[3].persistence_status, "dead_lettered");
    let metrics = agent.metrics.clone();
    stop(agent).await;
    for tier in ["1s", "2s", "3s"] {
        assert_eq!(metrics.retry_routed.with_label_values(&[tier]).get(), 1);
    }
    assert_eq!(
        metrics
            .dead_letters
            .with_label_values(&["foreign_key_violation"])
            .get(),
        1
    );
    assert_eq!(metrics.outcome_count(&env.topic, outcome::DEAD_LETTERED), 1);
    assert_eq!(
        env.count("SELECT count(*) FROM parked_key").await,
        0,
        "key released"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gives_up_after_the_configured_age() {
    let env = Env::new(1).await;
    let agent = env
        .start(&["--retry-delays=1s,6s,6s", "--give-up-after=4s"])
        .await;
    env.produce("u1", &json(request("u1", Some("old"), &[("missing", 0.5)])))
        .await;
    let dlq = env.records(&env.dlq(), 1, 60);
    stop(agent).await;
    // Tier 1 fails at about 1 s (under 4 s old: on to tier 2), tier 2 at about 7 s: older
    // than 4 s, so the third tier is skipped.
    assert_eq!(dlq[0].header(headers::ATTEMPT), "3");
    assert_eq!(env.records(&env.tier_topic("6s"), 1, 10).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_key_order_while_a_request_is_parked() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    let agent = env.start(&["--retry-delays=4s"]).await;
    env.produce(
        "alice",
        &json(request("alice", Some("a1"), &[("b-late", 0.5)])),
    )
    .await;
    env.produce("alice", &json(request("alice", Some("a2"), &[("b1", 0.5)])))
        .await;
    env.produce("bob", &json(request("bob", Some("b1"), &[("b1", 0.5)])))
        .await;
    env.produce("alice", &json(request("alice", Some("a3"), &[("b1", 0.6)])))
        .await;

    // bob is not held up; alice's later requests wait behind a1.
    env.wait_count(
        "SELECT count(*) FROM processed_request WHERE user_id = 'bob'",
        1,
        30,
    )
    .await;
    env.wait_count("SELECT count(*) FROM parked_message", 2, 30)
        .await;
    assert_eq!(
        env.count("SELECT count(*) FROM processed_request WHERE user_id = 'alice'")
            .await,
        0,
        "nothing of alice's overtakes a1"
    );
    env.books(&["b-late"]).await;
    env.wait_count(
        "SELECT count(*) FROM processed_request WHERE user_id = 'alice'",
        3,
        60,
    )
    .await;
    let order = env.request_ids(Some("alice")).await;
    assert_eq!(order, ["a1", "a2", "a3"]);
    let moods: Vec<String> = env
        .pg
        .query_one(
            "SELECT previous_moods FROM reader_context WHERE user_id = 'alice'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(moods.len(), 3);
    let metrics = agent.metrics.clone();
    stop(agent).await;
    assert_eq!(metrics.outcome_count(&env.topic, outcome::PARKED), 2);
    assert_eq!(env.count("SELECT count(*) FROM parked_key").await, 0);
    assert_eq!(env.count("SELECT count(*) FROM parked_message").await, 0);
    assert_eq!(env.committed(0), Some(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_retry_consumer_recomputes_due_times() {
    let env = Env::new(1).await;
    let agent = env.start(&["--retry-delays=45s"]).await;
    env.produce(
        "u1",
        &json(request("u1", Some("restart"), &[("b-late", 0.5)])),
    )
    .await;
    let waiting = env.records(&env.tier_topic("45s"), 1, 30).remove(0);
    stop(agent).await;
    env.books(&["b-late"]).await;
    // The delay is long next to a restart (seconds): a retry consumer that ignored due times
    // after a restart would persist it well before it is due.
    let now_ms = chrono::Utc::now().timestamp_millis();
    assert!(
        due_ms(&waiting) - now_ms > 8_000,
        "restarted too late to tell"
    );

    // A separate retry-only deployment takes over the waiting message.
    let agent = env.start(&["--retry-delays=45s", "--role=retry"]).await;
    env.wait_count("SELECT count(*) FROM recommendation", 1, 60)
        .await;
    let persisted_ms: f64 = env
        .pg
        .query_one(
            "SELECT extract(epoch FROM processed_at)::float8 * 1000 FROM processed_request",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    stop(agent).await;
    assert!(
        persisted_ms as i64 >= due_ms(&waiting),
        "persisted {} ms before due",
        due_ms(&waiting) - persisted_ms as i64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pauses_for_a_database_outage_and_dead_letters_nothing() {
    let cluster = common::TestCluster::start_new();
    let env = Env::with_database(cluster.url(), 1).await;
    env.books(&["b1"]).await;
    let agent = env
        .start(&["--retry-delays=1s", "--txn-backoff=10ms"])
        .await;
    produce_range(&env, 0..5).await;
    env.wait_count("SELECT count(*) FROM recommendation", 5, 30)
        .await;
    cluster.stop();
    produce_range(&env, 5..20).await;
    wait_for("consumption paused during the outage", 60, async || {
        agent
            .metrics
            .paused_partitions
            .with_label_values(&["main"])
            .get()
            > 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.start();
    wait_for("everything persisted after the outage", 90, async || {
        env.count_fresh("SELECT count(*) FROM recommendation").await == 20
    })
    .await;
    let metrics = agent.metrics.clone();
    stop(agent).await;
    assert_eq!(metrics.outcome_count(&env.topic, outcome::PERSISTED), 20);
    for o in [
        outcome::DEAD_LETTERED,
        outcome::RETRY_SCHEDULED,
        outcome::FAILED,
    ] {
        assert_eq!(metrics.outcome_count(&env.topic, o), 0, "{o}");
    }
    assert_eq!(env.committed(0), Some(20));
    // Every offset is committed, so every outcome is final: the topics' lengths are exact.
    assert_eq!(env.topic_len(&env.dlq()), 0, "nothing dead-lettered");
    assert_eq!(
        env.topic_len(&env.tier_topic("1s")),
        0,
        "nothing sent to a tier"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_a_fixed_dead_letter_exactly_once() {
    let env = Env::new(1).await;
    let agent = env.start(&["--retry-delays=1s"]).await;
    env.produce(
        "u1",
        &json(request("u1", Some("replay-me"), &[("b-fixed", 0.5)])),
    )
    .await;
    env.produce("u2", b"not json").await;
    env.records(&env.dlq(), 2, 60);

    let list = persistence_agent::tools::dlq::list(&dlq_args::<
        persistence_agent::tools::dlq::ListArgs,
    >(&env, &[]))
    .unwrap();
    assert!(list.contains(": 2 dead letters"), "{list}");
    assert!(list.contains("foreign_key_violation"), "{list}");
    assert!(list.contains("decode"), "{list}");

    env.books(&["b-fixed"]).await;
    let dry = dlq_args::<persistence_agent::tools::dlq::ReplayArgs>(
        &env,
        &["--class=foreign_key_violation", "--dry-run"],
    );
    let summary = persistence_agent::tools::dlq::replay(&dry).await.unwrap();
    assert!(summary.starts_with("would replay 1,"), "{summary}");
    assert_eq!(
        env.count("SELECT count(*) FROM audit_log WHERE entity_type = 'dead_letter'")
            .await,
        0
    );

    let args = dlq_args::<persistence_agent::tools::dlq::ReplayArgs>(
        &env,
        &["--class=foreign_key_violation"],
    );
    let summary = persistence_agent::tools::dlq::replay(&args).await.unwrap();
    assert!(summary.starts_with("replayed 1,"), "{summary}");
    env.wait_count("SELECT count(*) FROM recommendation", 1, 30)
        .await;
    // Run again: the group's progress and the audit row both say it is done.
    let again = persistence_agent::tools::dlq::replay(&args).await.unwrap();
    assert!(again.starts_with("replayed 0,"), "{again}");

    let input = env.records(&env.topic, 3, 10);
    let replayed: Vec<&Record> = input
        .iter()
        .filter(|r| r.headers.contains_key(headers::REPLAYED_FROM))
        .collect();
    assert_eq!(replayed.len(), 1);
    assert!(replayed[0]
        .header(headers::REPLAYED_FROM)
        .starts_with(&env.dlq()));
    assert!(
        !replayed[0].headers.contains_key(headers::ATTEMPT),
        "fresh retry state"
    );
    let metrics = agent.metrics.clone();
    stop(agent).await;
    assert_eq!(
        env.count("SELECT count(*) FROM processed_request WHERE request_id = 'replay-me'")
            .await,
        1
    );
    assert_eq!(
        env.count("SELECT count(*) FROM audit_log WHERE entity_type = 'dead_letter' AND action = 'replayed'").await,
        1
    );
    assert_eq!(metrics.outcome_count(&env.topic, outcome::PERSISTED), 1);
}

fn dlq_args<T: clap::Args + clap::FromArgMatches>(env: &Env, extra: &[&str]) -> T {
    #[derive(clap::Parser)]
    struct Wrap<A: clap::Args + clap::FromArgMatches> {
        #[command(flatten)]
        inner: A,
    }
    let mut argv = vec![
        "dlq".to_string(),
        format!("--kafka-brokers={}", env.brokers),
        format!("--kafka-input-topics={}", env.topic),
    ];
    if std::any::type_name::<T>().ends_with("ReplayArgs") {
        argv.push(format!("--database-url={}", env.db_url));
        argv.push(format!("--database-schema={}", env.schema));
        argv.push(format!("--kafka-group-id={}", env.group));
    }
    argv.extend(extra.iter().map(|s| s.to_string()));
    <Wrap<T> as clap::Parser>::try_parse_from(argv)
        .expect("dlq arguments parse")
        .inner
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_retry_headers_on_the_input_topic_are_ignored() {
    let env = Env::new(1).await;
    let agent = env.start(&["--retry-delays=1h"]).await;
    common::produce(
        &env.brokers,
        &env.topic,
        Some("u1"),
        &json(request("u1", Some("forged"), &[("missing", 0.5)])),
        &[
            (headers::ORIGINAL_TOPIC, "someone-elses-topic"),
            (headers::ORIGINAL_PARTITION, "7"),
            (headers::ORIGINAL_OFFSET, "99"),
            (headers::ATTEMPT, "3"),
            (headers::FIRST_FAILURE, "2020-01-01T00:00:00.000Z"),
        ],
    )
    .await;
    let hop = env.records(&env.tier_topic("1h"), 1, 30).remove(0);
    stop(agent).await;
    assert_eq!(hop.header(headers::ORIGINAL_TOPIC), env.topic);
    assert_eq!(hop.header(headers::ORIGINAL_OFFSET), "0");
    assert_eq!(
        hop.header(headers::ATTEMPT),
        "1",
        "a fresh request starts at tier 1"
    );
    assert_ne!(
        hop.header(headers::FIRST_FAILURE),
        "2020-01-01T00:00:00.000Z"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_a_header_name_that_is_not_utf8() {
    use rdkafka::bindings::{rd_kafka_header_add, rd_kafka_headers_t};
    use rdkafka::message::{BorrowedHeaders, Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    let agent = env.start(&[]).await;
    let headers = OwnedHeaders::new().insert(Header {
        key: "ok",
        value: Some("1"),
    });
    let name = b"bad\xff";
    // SAFETY: the list behind `headers` is ours and alive; librdkafka copies name and value.
    unsafe {
        let native = headers.as_borrowed() as *const BorrowedHeaders as *mut rd_kafka_headers_t;
        rd_kafka_header_add(
            native,
            name.as_ptr().cast(),
            name.len() as isize,
            b"v".as_ptr().cast(),
            1,
        );
    }
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .create()
        .unwrap();
    let payload = json(request("u1", Some("odd-header"), &[("b1", 0.5)]));
    producer
        .send(
            FutureRecord::to(&env.topic)
                .key("u1")
                .payload(&payload)
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    env.wait_count("SELECT count(*) FROM recommendation", 1, 30)
        .await;
    stop(agent).await;
    assert_eq!(env.committed(0), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_the_headers_when_the_value_is_refused() {
    let env = Env::new(1).await;
    // The brokers' (here: the producer's own) size limit is below this message's value.
    let agent = env.start(&["--kafka-config=message.max.bytes=4000"]).await;
    env.produce("u1", &vec![b'x'; 6000]).await;
    let dlq = env.records(&env.dlq(), 1, 30);
    stop(agent).await;
    assert!(dlq[0].value.is_empty(), "the value is dropped");
    assert!(dlq[0]
        .header(headers::VALUE_DROPPED)
        .starts_with("6000 bytes refused"));
    assert_eq!(dlq[0].header(headers::ERROR_CLASS), "decode");
    assert_eq!(env.committed(0), Some(1), "the partition moves on");
}

/// Valid requests `o-<i>` for users `u<i>`, all with key `k`.
async fn produce_range(env: &Env, range: std::ops::Range<i32>) {
    for i in range {
        let req = request(&format!("u{i}"), Some(&format!("o-{i}")), &[("b1", 0.5)]);
        env.produce("k", &json(req)).await;
    }
}
