//! Work that outlives its partition's revoke is fenced: once the revoke is decided it may not
//! forward, park or publish, and its message is left to the new owner. A consumer group of three
//! agents, one partition and one key, so the partition's messages finish in order and only a
//! stale owner could confirm a request twice. Owners leave with no shutdown drain: the
//! transaction under way outlives the revoke of the member's close. (Leaving, rather than
//! joining, triggers the rebalance: tansu does not rebalance live members when one joins, and
//! librdkafka's mock coordinator refuses offset commits once a rebalance is pending.)

mod common;

use std::collections::HashMap;

use common::{json, request, stop, Env};

const REQUESTS: usize = 24;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_outliving_a_revoke_never_confirms_or_forwards() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    // Each transaction takes 300 ms, so every revoke finds one in flight.
    env.pg
        .batch_execute(
            "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN PERFORM pg_sleep(0.3); RETURN NEW; END $$;
             CREATE TRIGGER slow BEFORE INSERT ON processed_request
               FOR EACH ROW EXECUTE FUNCTION slow();",
        )
        .await
        .unwrap();
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
    assert_eq!(env.request_ids(None).await.len(), REQUESTS);
    assert_eq!(env.committed(0), Some(REQUESTS as i64));
}

/// An owner that lost its partition without hearing of it (its session expired while it was
/// stalled: no revoke callback yet) is fenced by the database: once another owner claimed the
/// partition, its transactions write nothing and it confirms nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_whose_partition_was_claimed_writes_nothing() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    let args = ["--retry-delays=1h", "--role=main"];
    let stale = env.start(&args).await;
    env.produce("alice", &json(request("alice", Some("r0"), &[("b1", 0.5)])))
        .await;
    env.wait_count("SELECT count(*) FROM processed_request", 1, 30)
        .await;
    // Another owner's claim, as a member that took the partition over would make.
    env.pg
        .execute(
            "UPDATE partition_owner SET generation = generation + 1 WHERE topic = $1",
            &[&env.topic],
        )
        .await
        .unwrap();
    env.produce("alice", &json(request("alice", Some("r1"), &[("b1", 0.5)])))
        .await;
    common::wait_for("the stale owner to try r1", 30, async || {
        stale
            .metrics
            .attempt_count(persistence_agent::metrics::attempt::FENCED)
            > 0
    })
    .await;
    let metrics = stale.metrics.clone();
    stop(stale).await;
    assert_eq!(env.request_ids(None).await, ["r0"], "r1 not written");
    assert_eq!(env.committed(0), Some(1), "r1 not committed");
    assert_eq!(
        metrics.results_published.with_label_values(&["ok"]).get(),
        1,
        "r1 not confirmed"
    );
    let next = env.start(&args).await;
    env.wait_count("SELECT count(*) FROM processed_request", 2, 30)
        .await;
    stop(next).await;
    assert_eq!(env.request_ids(None).await, ["r0", "r1"]);
    assert_eq!(env.committed(0), Some(2));
    let results = env.records(&env.results, 2, 30);
    assert_eq!(results.len(), 2, "each confirmed once");
}
