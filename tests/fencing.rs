//! Work that outlives its partition's revoke is fenced: once the revoke is decided it may not
//! forward, park or publish, and its message is left to the new owner. A consumer group of three
//! agents, one partition and one key, so the partition's messages finish in order and only a
//! stale owner could confirm a request twice. Owners leave with no shutdown drain: the
//! transaction under way outlives the revoke of the member's close. (Leaving, rather than
//! joining, triggers the rebalance: a join's revoke drains first, up to
//! `REBALANCE_DRAIN_TIMEOUT`, so the transaction under way would finish inside it;
//! `tests/group.rs` covers joins.)

mod common;

use std::collections::HashMap;

use common::{json, request, stop, Env};

const REQUESTS: usize = 24;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_outliving_a_revoke_never_confirms_or_forwards() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    // Each transaction takes 300 ms, so every revoke finds one in flight.
    env.slow_transactions(0.3).await;
    let args = ["--shutdown-timeout=0s", "--retry-delays=1h", "--role=main"];
    let mut agents = Vec::new();
    for _ in 0..3 {
        agents.push(env.start(&args).await);
    }
    common::wait_for("the group to settle on one owner", 60, async || {
        let owners = agents
            .iter()
            .filter(|a| a.consumers[0].assigned() > 0)
            .count();
        owners == 1 && agents.iter().all(|a| a.joined())
    })
    .await;
    for i in 0..REQUESTS {
        let req = request("alice", Some(&format!("r{i}")), &[("b1", 0.5)]);
        env.produce("alice", &json(req)).await;
    }
    let persisted = "SELECT count(*) FROM processed_request";
    // The owner leaves twice, each time with a transaction under way.
    for step in 1..=2 {
        let at = (REQUESTS * step / 3) as i64;
        common::wait_for("progress before the owner leaves", 120, async || {
            env.count(persisted).await >= at
        })
        .await;
        let mut owner = None;
        common::wait_for("a member to own the partition", 60, async || {
            owner = agents.iter().position(|a| a.consumers[0].assigned() > 0);
            owner.is_some()
        })
        .await;
        let owner = owner.unwrap();
        stop(agents.remove(owner)).await;
    }
    env.wait_count(persisted, REQUESTS as i64, 120).await;
    let results = env.records(&env.results, REQUESTS, 60);
    for agent in agents {
        stop(agent).await;
    }
    let mut confirmations: HashMap<String, usize> = HashMap::new();
    for r in &results {
        *confirmations
            .entry(r.key.clone().unwrap_or_default())
            .or_default() += 1;
    }
    let twice: Vec<_> = confirmations.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "confirmed by a stale owner too: {twice:?}"
    );
    assert_eq!(confirmations.len(), REQUESTS, "every request confirmed");
    env.assert_written_once(REQUESTS as i64).await;
    assert_eq!(env.committed(0), Some(REQUESTS as i64));
}

/// The database fence: once another owner claimed the partition (as a member that took it over
/// while this one stalled, unheard, would have), a transaction under the older generation writes
/// nothing. The agent, still assigned the partition, claims it again after a pause (a stale claim
/// that landed late must not wedge the rightful owner) and writes the request once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_under_an_older_generation_writes_nothing() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    let args = ["--retry-delays=1h", "--role=main"];
    let agent = env.start(&args).await;
    env.produce("alice", &json(request("alice", Some("r0"), &[("b1", 0.5)])))
        .await;
    env.wait_count("SELECT count(*) FROM processed_request", 1, 30)
        .await;
    // Another owner's claim.
    env.pg
        .execute(
            "UPDATE partition_owner SET generation = generation + 1 WHERE topic = $1",
            &[&env.topic],
        )
        .await
        .unwrap();
    env.produce("alice", &json(request("alice", Some("r1"), &[("b1", 0.5)])))
        .await;
    env.wait_count("SELECT count(*) FROM processed_request", 2, 30)
        .await;
    let fenced = agent
        .metrics
        .attempt_count(persistence_agent::ops::metrics::attempt::FENCED);
    stop(agent).await;
    assert!(fenced >= 1, "r1's first transaction was fenced");
    assert_eq!(env.request_ids(None).await, ["r0", "r1"]);
    let generation = env.count("SELECT generation FROM partition_owner").await;
    assert_eq!(generation, 3, "claimed, taken over, claimed again");
    assert_eq!(env.committed(0), Some(2));
    let results = env.records(&env.results, 2, 30);
    assert_eq!(results.len(), 2, "each confirmed once");
}
