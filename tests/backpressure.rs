//! Backpressure: at the in-flight bounds (count and bytes) the poll loop takes a message only
//! when one finishes, without pausing (a pause drops librdkafka's fetched messages and leaves
//! the workers waiting for a fetch); a bound that holds with nothing finishing pauses the
//! partitions so the group is still served. Nothing is lost or written twice either way.

mod common;

use std::time::Duration;

use common::{json, request, stop, Env};
use persistence_agent::app::agent::Agent;
use persistence_agent::ops::metrics::outcome;

/// Highest values of the consumer's gauges until `n` requests are persisted.
#[derive(Debug, Default)]
struct Peaks {
    in_flight: i64,
    bytes: i64,
    paused: i64,
}

/// Starts an agent with `args` and samples its gauges until the `n` requests on the topic are
/// persisted.
async fn run_until_persisted(env: &Env, n: u64, args: &[&str]) -> (Agent, Peaks) {
    let agent = env.start(args).await;
    let (metrics, topic) = (agent.metrics.clone(), env.topic.clone());
    let sampler = tokio::spawn(async move {
        let mut peaks = Peaks::default();
        let gauge = |g: &prometheus::IntGaugeVec| g.with_label_values(&["main"]).get();
        while metrics.outcome_count(&topic, outcome::PERSISTED) < n {
            peaks.in_flight = peaks.in_flight.max(gauge(&metrics.in_flight));
            peaks.bytes = peaks.bytes.max(gauge(&metrics.in_flight_bytes));
            peaks.paused = peaks.paused.max(gauge(&metrics.paused_partitions));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        peaks
    });
    env.wait_count("SELECT count(*) FROM recommendation", n as i64, 120)
        .await;
    let peaks = tokio::time::timeout(Duration::from_secs(60), sampler)
        .await
        .expect("every request counted as persisted once its row is there")
        .unwrap();
    (agent, peaks)
}

/// Publishes `n` one-book requests of `users` users, ids `{prefix}-{i}`.
async fn produce_requests(env: &Env, n: usize, users: usize, prefix: &str) {
    for i in 0..n {
        let user = format!("u{}", i % users);
        let req = request(&user, Some(&format!("{prefix}-{i}")), &[("b1", 0.5)]);
        env.produce(&user, &json(req)).await;
    }
}

async fn finish(env: &Env, agent: Agent, partitions: i32, n: i64) {
    let metrics = agent.metrics.clone();
    stop(agent).await;
    assert_eq!(
        metrics.outcome_count(&env.topic, outcome::PERSISTED),
        n as u64,
        "each exactly once"
    );
    env.wait_committed(partitions, n, 30).await;
    env.assert_written_once(n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_in_flight_bound_it_waits_without_pausing_and_loses_nothing() {
    let env = Env::new(2).await;
    env.books(&["b1"]).await;
    produce_requests(&env, 400, 40, "bp").await;
    // A stall pause is ruled out (a slow first transaction on a busy machine could cause one):
    // this test is about the bound when work flows.
    let args = [
        "--max-in-flight=20",
        "--workers=4",
        "--stall-pause-after=60s",
    ];
    let (agent, p) = run_until_persisted(&env, 400, &args).await;
    assert!(p.in_flight <= 20, "{p:?}: bound 20");
    assert!(p.in_flight >= 10, "{p:?}: the bound was never approached");
    assert!(p.bytes > 0, "{p:?}: in-flight bytes never counted");
    assert_eq!(p.paused, 0, "{p:?}: a busy bound pauses nothing");
    finish(&env, agent, 2, 400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_byte_bound_holds_large_messages_back() {
    let env = Env::new(2).await;
    env.books(&["b1", "b2", "b3"]).await;
    let long = "x".repeat(9_000);
    let mut size = 0;
    for i in 0..60 {
        let user = format!("u{i}");
        let mut req = request(
            &user,
            Some(&format!("big-{i}")),
            &[("b1", 0.5), ("b2", 0.5), ("b3", 0.5)],
        );
        for b in req["justifiedBooks"].as_array_mut().unwrap() {
            b["justification"] = long.clone().into();
        }
        let payload = req.to_string();
        size = payload.len() + user.len();
        env.produce(&user, payload.as_bytes()).await;
    }
    // About four messages' worth: the count bound (2,048) is never the one that holds.
    let bound = 4 * size;
    let bytes = format!("--max-in-flight-bytes={bound}");
    let args = [bytes.as_str(), "--workers=8", "--stall-pause-after=60s"];
    let (agent, p) = run_until_persisted(&env, 60, &args).await;
    // A message is taken while the bytes are below the bound: at most one more on top.
    assert!(
        p.bytes as usize <= bound + size,
        "{p:?}: bound {bound} + one of {size}"
    );
    assert!(
        p.in_flight <= 5,
        "{p:?}: at most five of {size} bytes under {bound}"
    );
    assert!(p.in_flight >= 2, "{p:?}: the bound was never approached");
    finish(&env, agent, 2, 60).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_that_holds_with_nothing_finishing_pauses_and_resumes() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    // Each transaction takes 3 s: two in flight hold the bound past the 300 ms stall limit.
    env.slow_transactions(3.0).await;
    produce_requests(&env, 6, 6, "st").await;
    let args = [
        "--max-in-flight=2",
        "--workers=2",
        "--stall-pause-after=300ms",
    ];
    let (agent, p) = run_until_persisted(&env, 6, &args).await;
    assert_eq!(p.paused, 1, "{p:?}: the stalled partition paused");
    assert!(p.in_flight <= 2, "{p:?}");
    let paused = agent.metrics.paused_partitions.with_label_values(&["main"]);
    common::wait_for("the partition resumed", 30, async || paused.get() == 0).await;
    finish(&env, agent, 1, 6).await;
}
