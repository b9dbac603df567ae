//! Per-key ordering: recovery from an agent stopped part-way through the parking protocol,
//! set up by writing the parking tables as the earlier run would have left them.

mod common;

use common::parked::{park_key, park_request, tier_copy};
use common::{json, request, stop, Env};
use persistence_agent::message::headers;

/// The agent parked a request as its key's head, then stopped before its tier copy was
/// acknowledged: the redelivered request is settled again, as the head, and releases the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_parked_before_a_crash_is_settled_on_redelivery() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    park_key(&env, "alice", 0, "0").await;
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
/// old head's tier copy finishes, the promoted request is settled first, then the rest. (The
/// key's row has no `promoted_by`, as one written before that column: any release resumes it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_promoted_before_a_crash_is_resumed_by_the_release() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    // Head: input offset 0 (its tier copy is published below). Followers at offsets 1 and 2;
    // offset 1 was promoted to head but never forwarded.
    park_key(&env, "bob", 1, "0").await;
    park_request(&env, "bob", 1, "b-2").await;
    park_request(&env, "bob", 2, "b-3").await;
    let agent = env.start(&["--retry-delays=1s"]).await;
    let tier = env.tier_topic("1s");
    tier_copy(&env, &tier, "bob", "b-1").await;
    env.wait_count("SELECT count(*) FROM processed_request", 3, 30)
        .await;
    stop(agent).await;
    let order = env.request_ids(None).await;
    assert_eq!(order, ["b-1", "b-2", "b-3"]);
    assert_eq!(env.count("SELECT count(*) FROM parked_key").await, 0);
    assert_eq!(env.count("SELECT count(*) FROM parked_message").await, 0);
}

/// A request with an unknown book whose value the tier refuses for its size (and the dead-letter
/// topic too): made head before it was forwarded, it must release its key once dead-lettered.
fn too_large_for_its_tier(user: &str, id: &str) -> Vec<u8> {
    let mut req = request(user, Some(id), &[("b-missing", 0.5)]);
    req["justifiedBooks"][0]["justification"] = "x".repeat(5000).into();
    json(req)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_its_tier_refuses_releases_its_key() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    let agent = env
        .start(&["--retry-delays=1h", "--kafka-config=message.max.bytes=4000"])
        .await;
    env.produce("alice", &too_large_for_its_tier("alice", "a1"))
        .await;
    env.produce("alice", &json(request("alice", Some("a2"), &[("b1", 0.5)])))
        .await;
    env.wait_count("SELECT count(*) FROM processed_request", 1, 30)
        .await;
    let dlq = env.records(&env.dlq(), 1, 30);
    stop(agent).await;
    assert_eq!(env.request_ids(None).await, ["a2"]);
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].header(headers::ERROR_CLASS), "foreign_key_violation");
    assert_eq!(env.count("SELECT count(*) FROM parked_key").await, 0);
    assert_eq!(env.count("SELECT count(*) FROM parked_message").await, 0);
    assert_eq!(env.committed(0), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_follower_its_tier_refuses_hands_the_key_on() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    let agent = env
        .start(&["--retry-delays=3s", "--kafka-config=message.max.bytes=4000"])
        .await;
    env.produce(
        "alice",
        &json(request("alice", Some("a1"), &[("b-late", 0.5)])),
    )
    .await;
    env.produce("alice", &too_large_for_its_tier("alice", "a2"))
        .await;
    env.produce("alice", &json(request("alice", Some("a3"), &[("b1", 0.5)])))
        .await;
    env.wait_count("SELECT count(*) FROM parked_message", 2, 30)
        .await;
    env.books(&["b-late"]).await;
    env.wait_count("SELECT count(*) FROM processed_request", 2, 60)
        .await;
    let dlq = env.records(&env.dlq(), 1, 30);
    stop(agent).await;
    assert_eq!(env.request_ids(None).await, ["a1", "a3"]);
    assert_eq!(dlq.len(), 1, "a2 dead-lettered");
    assert_eq!(dlq[0].header(headers::ORIGINAL_OFFSET), "1");
    assert_eq!(env.count("SELECT count(*) FROM parked_key").await, 0);
    assert_eq!(env.count("SELECT count(*) FROM parked_message").await, 0);
}

/// A parked request is read back from the database with its producer's headers: forged retry
/// headers must count no more there than on the input topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_request_ignores_forged_retry_headers() {
    let env = Env::new(1).await;
    let agent = env.start(&["--retry-delays=3s"]).await;
    let tier = env.tier_topic("3s");
    env.produce(
        "alice",
        &json(request("alice", Some("a1"), &[("b-late", 0.5)])),
    )
    .await;
    common::produce(
        &env.brokers,
        &env.topic,
        Some("alice"),
        &json(request("alice", Some("a2"), &[("b-never", 0.5)])),
        &[
            (headers::ATTEMPT, "99"),
            (headers::FIRST_FAILURE, "2000-01-01T00:00:00.000Z"),
            (headers::ORIGINAL_TOPIC, env.topic.as_str()),
            (headers::ORIGINAL_PARTITION, "0"),
            (headers::ORIGINAL_OFFSET, "0"),
        ],
    )
    .await;
    env.wait_count("SELECT count(*) FROM parked_message", 1, 30)
        .await;
    env.books(&["b-late"]).await;
    let copies = env.records(&tier, 2, 60);
    stop(agent).await;
    let a2 = copies
        .iter()
        .find(|r| r.header(headers::ORIGINAL_OFFSET) == "1")
        .expect("a2 went to the retry tier as a fresh request, not straight to the dead letters");
    assert_eq!(a2.header(headers::ATTEMPT), "1");
    assert!(!a2.header(headers::FIRST_FAILURE).starts_with("2000"));
}

/// The transaction saw the key parked, and by the time the parking step ran it was released:
/// the request is retried in order, so when it fails into a tier it holds its key and the
/// next request of that key waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_released_before_parking_still_holds_its_key() {
    let env = Env::new(1).await;
    park_key(&env, "alice", 999, "0").await;
    let locker = env.session().await;
    locker
        .batch_execute("BEGIN; SELECT * FROM parked_key FOR UPDATE")
        .await
        .unwrap();
    let agent = env.start(&["--retry-delays=1h"]).await;
    env.produce(
        "alice",
        &json(request("alice", Some("a1"), &[("b-late", 0.5)])),
    )
    .await;
    // The parking step waits for the key's row lock: release the key under it.
    common::wait_for("the parking step to wait for the key", 30, async || {
        env.count(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'
             AND query LIKE '%INSERT INTO parked_message%'",
        )
        .await
            > 0
    })
    .await;
    locker
        .batch_execute("DELETE FROM parked_key; COMMIT")
        .await
        .unwrap();
    env.records(&env.tier_topic("1h"), 1, 30);
    env.produce("alice", &json(request("alice", Some("a2"), &[("b1", 0.5)])))
        .await;
    env.wait_count("SELECT count(*) FROM parked_message", 1, 30)
        .await;
    stop(agent).await;
    assert_eq!(
        env.count("SELECT count(*) FROM processed_request").await,
        0,
        "a2 does not overtake a1"
    );
    assert_eq!(
        env.count("SELECT head_offset FROM parked_key").await,
        0,
        "a1 heads its key"
    );
}

/// A key whose head is in no tier (parked an hour ago, as after a change of `RETRY_DELAYS`) is
/// released by the reaper once older than `PARKED_KEY_TTL`; a recently parked key is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_releases_keys_whose_head_is_lost() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    for (key, age, offset, id) in [("alice", "1 hour", 1, "a2"), ("bob", "0", 3, "b2")] {
        park_key(&env, key, offset - 1, age).await;
        park_request(&env, key, offset, id).await;
    }
    let agent = env
        .start(&["--parked-key-ttl=30m", "--reaper-interval=1s"])
        .await;
    env.wait_count("SELECT count(*) FROM processed_request", 1, 30)
        .await;
    let metrics = agent.metrics.clone();
    common::wait_for("the gauges to show the one key left", 30, async || {
        metrics.parked_keys.get() == 1
    })
    .await;
    stop(agent).await;
    assert_eq!(env.request_ids(None).await, ["a2"]);
    assert_eq!(metrics.parked_keys_reaped.get(), 1);
    assert!(
        metrics.parked_oldest_age.get() < 60.0,
        "only bob's fresh key is left"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM parked_key WHERE key = 'bob'")
            .await,
        1
    );
}

/// The reaper meets a promoted head that was never forwarded (the agent stopped between
/// promoting and forwarding it, and no tier copy exists): it settles that request first, then
/// the rest, in order; nothing is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_settles_a_promoted_head_that_was_never_forwarded() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    park_key(&env, "carol", 1, "1 hour").await;
    park_request(&env, "carol", 1, "c1").await;
    park_request(&env, "carol", 2, "c2").await;
    let agent = env
        .start(&["--parked-key-ttl=30m", "--reaper-interval=1s"])
        .await;
    common::wait_for("the key released", 30, async || {
        env.count("SELECT count(*) FROM parked_key").await == 0
    })
    .await;
    stop(agent).await;
    assert_eq!(env.request_ids(None).await, ["c1", "c2"]);
    assert_eq!(env.count("SELECT count(*) FROM parked_message").await, 0);
}
