//! Per-key ordering: recovery from an agent stopped part-way through the parking protocol,
//! set up by writing the parking tables as the earlier run would have left them.

mod common;

use common::{json, request, stop, Env};
use persistence_agent::envelope::header;

/// The agent parked a request as its key's head, then stopped before its tier copy was
/// acknowledged: the redelivered request is settled again, as the head, and releases the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_parked_before_a_crash_is_settled_on_redelivery() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    env.pg
        .execute(
            "INSERT INTO parked_key (topic, partition, key, head_offset) VALUES ($1, 0, 'alice', 0)",
            &[&env.topic],
        )
        .await
        .unwrap();
    let agent = env.start(&["--retry-delays=1h"]).await;
    env.produce("alice", &json(request("alice", Some("a1"), &[("b1", 0.5)])))
        .await;
    env.produce("alice", &json(request("alice", Some("a2"), &[("b1", 0.6)])))
        .await;
    env.wait_count("SELECT count(*) FROM processed_request", 2, 30)
        .await;
    stop(agent).await;
    assert_eq!(
        env.count("SELECT count(*) FROM parked_key").await,
        0,
        "key released"
    );
    let order = env.request_ids(None).await;
    assert_eq!(order, ["a1", "a2"]);
    assert_eq!(env.committed(0), Some(2));
}

/// The agent promoted a parked request to head, then stopped before forwarding it: when the
/// old head's tier copy finishes, the promoted request is settled first, then the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_promoted_before_a_crash_is_resumed_by_the_release() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    // Head: input offset 0 (its tier copy is published below). Followers at offsets 1 and 2;
    // offset 1 was promoted to head but never forwarded.
    env.pg
        .execute(
            "INSERT INTO parked_key (topic, partition, key, head_offset) VALUES ($1, 0, 'bob', 1)",
            &[&env.topic],
        )
        .await
        .unwrap();
    for (offset, id) in [(1i64, "b-2"), (2, "b-3")] {
        let value = json(request("bob", Some(id), &[("b1", 0.5)]));
        env.pg
            .execute(
                "INSERT INTO parked_message (topic, partition, key, source_offset, value, header_names, header_values)
                 VALUES ($1, 0, 'bob', $2, $3, '{}', '{}')",
                &[&env.topic, &offset, &value],
            )
            .await
            .unwrap();
    }
    let agent = env.start(&["--retry-delays=1s"]).await;
    let tier = env.tier_topic("1s");
    common::produce(
        &env.brokers,
        &tier,
        Some("bob"),
        &json(request("bob", Some("b-1"), &[("b1", 0.5)])),
        &[
            (header::ORIGINAL_TOPIC, env.topic.as_str()),
            (header::ORIGINAL_PARTITION, "0"),
            (header::ORIGINAL_OFFSET, "0"),
            (header::ATTEMPT, "1"),
            (header::FIRST_FAILURE, "2026-01-01T00:00:00.000Z"),
            (header::DUE, "2026-01-01T00:00:01.000Z"),
        ],
    )
    .await;
    env.wait_count("SELECT count(*) FROM processed_request", 3, 30)
        .await;
    stop(agent).await;
    let order = env.request_ids(None).await;
    assert_eq!(order, ["b-1", "b-2", "b-3"]);
    assert_eq!(env.count("SELECT count(*) FROM parked_key").await, 0);
    assert_eq!(env.count("SELECT count(*) FROM parked_message").await, 0);
}
