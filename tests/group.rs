//! Consumer groups whose members join and leave while transactions are under way. With no drain
//! time, every revoke finds work in flight that outlives it: every request is written once and
//! confirmed, and a request confirmed twice (read again because an earlier offset of its
//! partition was unfinished at a revoke) repeats the same confirmation. With a drain, a join
//! hands nothing finished to the next owner again, and a drain that runs out commits up to
//! the oldest unfinished message and loses nothing. (The fence itself is proven message by
//! message in `tests/fencing.rs`.)

mod common;

use std::collections::HashMap;

use common::{json, request, stop, Env};
use persistence_agent::app::agent::Agent;
use persistence_agent::ops::metrics::outcome;

const REQUESTS: usize = 240;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalances_under_load_write_each_request_once() {
    let env = Env::new(6).await;
    env.books(&["b1"]).await;
    // Each transaction takes 50 ms, so a revoke always finds some in flight.
    env.slow_transactions(0.05).await;
    let args = [
        "--rebalance-drain-timeout=0s",
        "--retry-delays=1h",
        "--workers=4",
    ];
    let mut agents = vec![env.start(&args).await];
    for i in 0..REQUESTS {
        let req = request(&format!("u{i}"), Some(&format!("r{i}")), &[("b1", 0.5)]);
        env.produce(&format!("u{i}"), &json(req)).await;
    }
    let persisted = "SELECT count(*) FROM processed_request";
    // Members join and one leaves, each while requests are being written.
    for step in 1..=3 {
        let at = (REQUESTS * step / 5) as i64;
        common::wait_for("progress before the next rebalance", 120, async || {
            env.count(persisted).await >= at
        })
        .await;
        match step {
            3 => stop(agents.remove(0)).await,
            _ => agents.push(env.start(&args).await),
        }
    }
    env.wait_count(persisted, REQUESTS as i64, 180).await;
    let results = env.records(&env.results, REQUESTS, 120);
    let mut routed = 0;
    for agent in agents {
        for o in [outcome::RETRY_SCHEDULED, outcome::DEAD_LETTERED] {
            routed += agent.metrics.outcome_count(&env.topic, o);
        }
        stop(agent).await;
    }
    assert_eq!(routed, 0);
    let mut confirmations: HashMap<String, String> = HashMap::new();
    for r in &results {
        let event: serde_json::Value = serde_json::from_slice(&r.value).unwrap();
        let rec = event["recommendationId"].as_str().unwrap().to_string();
        let first = confirmations.entry(r.key.clone().unwrap_or_default());
        let seen = first.or_insert_with(|| rec.clone());
        assert_eq!(
            *seen, rec,
            "a repeated confirmation names the same recommendation"
        );
    }
    assert_eq!(confirmations.len(), REQUESTS, "every request confirmed");
    for table in ["recommendation", "recommendation_book", "audit_log"] {
        let n = env.count(&format!("SELECT count(*) FROM {table}")).await;
        assert_eq!(n, REQUESTS as i64, "{table}: one row per request");
    }
    let committed: i64 = (0..6).map(|p| env.committed(p).unwrap_or(0)).sum();
    assert_eq!(committed, REQUESTS as i64, "every offset committed");
}

/// A member joins while one key's transaction waits on a lock and that key's next request waits
/// in its worker's queue, behind it, while later requests of other keys finish. The revoke's
/// drain lets the queued request start once the lock goes, so the offset committed is past
/// everything finished and the next owner gets nothing again. (When queued messages were
/// handed over unstarted, the committed offset stopped at the queued one, and every request
/// finished above it came back as a duplicate.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_redelivers_nothing_its_last_owner_finished() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    // A drain longer than the lock, within the harness's max.poll.interval.ms (15 s).
    let args = held_key_args("--rebalance-drain-timeout=12s");
    // Long enough for the second member's join (2-4 s on tansu) to begin while it is held; a
    // join slower than that would let this pass on the old behaviour too (it failed there
    // with 17 duplicates).
    let (first, lock) = held_key_backlog(&env, &args, 10).await;
    let second = env.start(&args).await;
    lock.await.unwrap();
    env.wait_count(PERSISTED, 27, 120).await;
    common::wait_for("every offset committed", 60, async || {
        env.committed(0) == Some(27)
    })
    .await;
    let mut duplicates = 0;
    for agent in [first, second] {
        duplicates += agent.metrics.outcome_count(&env.topic, outcome::DUPLICATE);
        stop(agent).await;
    }
    assert_eq!(
        duplicates, 0,
        "nothing finished was handed to the next owner again"
    );
    env.assert_written_once(27).await;
}

/// A drain that runs out lets the rebalance go on without the work still under way: the
/// revoke commits up to the oldest unfinished message, and its queued successor is left to the
/// next owner, whatever the stale work does once its lock is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_that_runs_out_commits_below_the_unfinished_and_loses_nothing() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    let args = held_key_args("--rebalance-drain-timeout=1s");
    // No auto-commit during the test: the offset committed at the revoke is the revoke's own.
    let first_args = [
        &args[..],
        &["--kafka-config=auto.commit.interval.ms=120000"],
    ]
    .concat();
    let (first, lock) = held_key_backlog(&env, &first_args, 20).await;
    let revokes = |result| {
        first
            .metrics
            .commits
            .with_label_values(&["revoke", result])
            .get()
    };
    // The first join's revoke (of no partition) committed nothing.
    let before = revokes("ok");
    let second = env.start(&args).await;
    // The drain (1 s) and the wait for work that acted (2 s) are over long before the lock.
    common::wait_for("the first member's revoke commit", 15, async || {
        revokes("ok") > before || revokes("error") > 0
    })
    .await;
    assert_eq!(revokes("error"), 0, "the revoke's commit failed");
    assert!(!lock.is_finished(), "the revoke did not wait for the lock");
    assert_eq!(
        env.committed(0),
        Some(1),
        "committed up to s1, unfinished: not past it (lost), not below it"
    );
    lock.await.unwrap();
    env.wait_count(PERSISTED, 27, 120).await;
    // The first member may own the partition again: its shutdown commits what is left.
    for agent in [first, second] {
        stop(agent).await;
    }
    assert_eq!(env.committed(0), Some(27), "every offset committed");
    env.assert_written_once(27).await;
}

const PERSISTED: &str = "SELECT count(*) FROM processed_request";

/// One transaction per request, a statement timeout longer than any lock, no tier consumer
/// (its revokes would count as the main consumer's), and `drain` (a
/// `--rebalance-drain-timeout`).
fn held_key_args(drain: &'static str) -> [&'static str; 6] {
    [
        "--batch-max=1",
        "--workers=4",
        "--statement-timeout=30s",
        "--retry-delays=1h",
        "--role=main",
        drain,
    ]
}

/// Starts the first member and leaves partition 0 at: s0 written (offset 0), s1 waiting on
/// a row lock held `secs` (offset 1), s2 queued behind it on its worker (offset 2), and most
/// of 24 requests of other keys (offsets 3-26) written; those sharing s1's worker wait too.
async fn held_key_backlog(
    env: &Env,
    args: &[&str],
    secs: u64,
) -> (Agent, tokio::task::JoinHandle<()>) {
    let req = |user: &str, id: &str| json(request(user, Some(id), &[("b1", 0.5)]));
    let first = env.start(args).await;
    env.produce("slow", &req("slow", "s0")).await;
    env.wait_count(PERSISTED, 1, 60).await;
    let lock = env
        .lock_reader("slow", std::time::Duration::from_secs(secs))
        .await;
    env.produce("slow", &req("slow", "s1")).await;
    env.produce("slow", &req("slow", "s2")).await;
    for i in 0..24 {
        env.produce(&format!("u{i}"), &req(&format!("u{i}"), &format!("r{i}")))
            .await;
    }
    common::wait_for("most requests of other keys written", 60, async || {
        env.count(PERSISTED).await >= 13
    })
    .await;
    assert!(
        env.count("SELECT count(*) FROM processed_request WHERE request_id = 's1'")
            .await
            == 0,
        "s1 still waits on the lock"
    );
    (first, lock)
}
