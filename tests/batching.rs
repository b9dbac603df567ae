//! Micro-batching: requests of distinct users share one transaction, every guarantee of the
//! single-request path holds (written once, per-key order, re-publishes found in the ledger,
//! offsets after durability), a batch that loses a serialization conflict goes again whole (and
//! has its requests written alone once the conflicts outlast its retries), and a request that
//! fails its batch fails alone.

mod common;

use std::collections::HashMap;

use common::{json, request, stop, Env};
use persistence_agent::app::agent::Agent;
use persistence_agent::ops::metrics::{outcome, Metrics};

/// (batches, requests in them, batch attempts that failed other than by a conflict) so far.
fn batches(agent: &Agent) -> (u64, f64, u64) {
    let m = &agent.metrics;
    let other: u64 = m
        .batch_transactions
        .collect()
        .iter()
        .flat_map(|f| f.get_metric())
        .filter(|s| {
            let result = s.get_label().iter().find(|l| l.name() == "result");
            let result = result.map(|l| l.value()).unwrap_or_default();
            !["committed", "serialization_failure", "deadlock"].contains(&result)
        })
        .map(|s| s.get_counter().get_value() as u64)
        .sum();
    (
        m.batch_requests.get_sample_count(),
        m.batch_requests.get_sample_sum(),
        other,
    )
}

use prometheus::core::Collector;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_distinct_users_and_keeps_every_guarantee() {
    let env = Env::new(3).await;
    env.books(&["b1", "b2"]).await;
    // 600 requests of 60 users (10 each, in order), then 60 exact re-publishes.
    let (users, per_user) = (60, 10);
    let mut sent: HashMap<String, Vec<String>> = HashMap::new();
    for i in 0..per_user {
        for u in 0..users {
            let user = format!("u{u}");
            let mut req = request(
                &user,
                Some(&format!("r{u}-{i}")),
                &[("b1", 0.5), ("b2", 0.4)],
            );
            req["context"]["mood"] = format!("m{i}").into();
            sent.entry(user.clone()).or_default().push(format!("m{i}"));
            env.produce(&user, &json(req)).await;
        }
    }
    for u in 0..users {
        let user = format!("u{u}");
        let req = request(&user, Some(&format!("r{u}-0")), &[("b1", 0.5), ("b2", 0.4)]);
        env.produce(&user, &json(req)).await;
    }
    // 200 more of 10 users, each under its own key: one reader's requests on many workers
    // at once, which one batch must not hold together.
    for i in 0..200 {
        let id = format!("x{i}");
        let req = request(&format!("x{}", i % 10), Some(&id), &[("b1", 0.5)]);
        env.produce(&id, &json(req)).await;
    }
    let total = (users * per_user + 200) as i64;
    let agent = env
        .start(&[
            "--workers=64",
            "--batch-max=16",
            "--batch-concurrency=2",
            "--batch-linger=20ms",
            // A conflict that outlasts the in-process retries goes to a tier (rare, but seen
            // on a loaded machine): short tiers let it end written within the test.
            "--retry-delays=1s,2s,3s",
        ])
        .await;
    env.wait_committed(3, total + users as i64, 120).await;
    env.wait_count("SELECT count(*) FROM processed_request", total, 60)
        .await;
    let (count, sum, failed) = batches(&agent);
    let metrics = agent.metrics.clone();
    stop(agent).await;

    env.assert_written_once(total).await;
    assert_eq!(
        env.count("SELECT count(*) FROM recommendation_book").await,
        2 * total - 200
    );
    let tiers = ["1s", "2s", "3s"].map(|t| env.tier_topic(t));
    let persisted: u64 = std::iter::once(&env.topic)
        .chain(&tiers)
        .map(|t| metrics.outcome_count(t, outcome::PERSISTED))
        .sum();
    assert_eq!(persisted, total as u64);
    assert_eq!(
        metrics.outcome_count(&env.topic, outcome::DUPLICATE),
        users as u64
    );
    assert!(
        count > 0 && sum / count as f64 >= 2.0,
        "batched: {count} batches, {sum} requests"
    );
    // Two rows of one reader in a batch would fail it (a conflict is retried, not counted).
    assert_eq!(
        failed,
        0,
        "batches failed: {}",
        metrics
            .render()
            .lines()
            .filter(|l| l.contains("batch_transactions_total{"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // Per-key order: each reader's moods in the order its requests were published.
    for (user, moods) in sent {
        let got: Vec<String> = env
            .pg
            .query_one(
                "SELECT previous_moods FROM reader_context WHERE user_id = $1",
                &[&user],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(got, moods, "moods of {user}");
    }
    // A result event per message (re-publishes included), each once.
    let results = env.results(total as usize + users);
    assert_eq!(results.len(), total as usize + users);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_fails_its_batch_goes_to_its_tier_alone() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    let n = 200;
    for i in 0..n {
        let user = format!("u{i}");
        // Every 50th request names a book the catalogue lacks: a foreign-key violation.
        let book = if i % 50 == 25 { "not-yet" } else { "b1" };
        let req = request(&user, Some(&format!("r{i}")), &[(book, 0.5)]);
        env.produce(&user, &json(req)).await;
    }
    let agent = env
        .start(&[
            "--workers=64",
            "--batch-max=32",
            "--batch-concurrency=1",
            "--batch-linger=50ms",
            "--retry-delays=1h",
        ])
        .await;
    env.wait_committed(1, n, 120).await;
    let m = agent.metrics.clone();
    let split = batch_results(&m, "foreign_key_violation");
    stop(agent).await;

    assert!(split >= 1, "a batch held a bad request and failed");
    env.assert_written_once(n - 4).await;
    assert_eq!(m.outcome_count(&env.topic, outcome::RETRY_SCHEDULED), 4);
    assert_eq!(m.outcome_count(&env.topic, outcome::DEAD_LETTERED), 0);
    let tier = env.records(&env.tier_topic("1h"), 4, 30);
    let mut ids: Vec<String> = tier.iter().map(|r| r.key.clone().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, ["u125", "u175", "u25", "u75"]);
    // Each was tried once in its batch and once alone, as unbatched: no in-process retries
    // for a foreign-key violation.
    assert_eq!(m.attempt_count("foreign_key_violation"), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_loses_a_conflict_goes_again_whole_and_fails_no_neighbour() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    let agent = env.start(ONE_LANE).await;
    // The hot reader's row exists before the batch: its upsert then waits for a row lock.
    let first = request("hot", Some("hot-0"), &[("b1", 0.5)]);
    env.produce("hot", &json(first)).await;
    env.wait_committed(1, 1, 60).await;

    // Another session updates the hot reader and holds the lock until the batch waits for it;
    // its commit then lands after the batch's snapshot: under SERIALIZABLE, a conflict
    // (40001, "concurrent update") for the batch, whoever else is in it.
    let rival = env.session().await;
    rival.batch_execute("BEGIN").await.unwrap();
    let updated = rival
        .execute(
            "UPDATE reader_context SET mood = 'rival' WHERE user_id = 'hot'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(updated, 1, "the hot reader's row is there to hold");
    let rival_pid: i32 = rival
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    // The hot request first: the batch's linger runs from it, and its neighbours join.
    env.produce("hot", &json(request("hot", Some("hot-1"), &[("b1", 0.5)])))
        .await;
    let others = neighbours(&env).await;
    let blocked = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE {rival_pid} = ANY(pg_blocking_pids(pid))"
    );
    env.wait_count(&blocked, 1, 60).await;
    rival.batch_execute("COMMIT").await.unwrap();

    let total = 2 + others as i64;
    env.wait_committed(1, total, 60).await;
    let m = agent.metrics.clone();
    stop(agent).await;

    assert!(
        batch_results(&m, "serialization_failure") >= 1,
        "the batch lost a conflict"
    );
    // Every batch ended committed: none was split into requests written alone.
    assert_eq!(
        batch_results(&m, "committed"),
        m.batch_requests.get_sample_count()
    );
    assert_all_persisted(&env, &m, total).await;
    // The hot request committed in one transaction with its neighbours, after the rival.
    let shared = sharing_transaction(&env, "hot-1").await;
    assert!(
        shared >= 1,
        "the hot request shared its transaction: {shared}"
    );
    let row = env
        .pg
        .query_one(
            "SELECT mood, previous_moods FROM reader_context WHERE user_id = 'hot'",
            &[],
        )
        .await
        .unwrap();
    let (mood, moods): (String, Vec<String>) = (row.get(0), row.get(1));
    assert_ne!(
        mood, "rival",
        "the hot request's mood came after the rival's"
    );
    assert_eq!(moods.len(), 2, "both hot requests written once: {moods:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_that_outlasts_the_batch_retries_has_its_requests_written_alone() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    // The hot request's ledger insert loses three conflicts (a sequence counts across the
    // rollbacks): its batch's first attempt and both retries; alone, it then goes through.
    env.pg
        .batch_execute(&format!(
            "CREATE SEQUENCE hot_conflicts;
             CREATE FUNCTION hot_conflict() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               -- Nested: only the hot request's inserts may count.
               IF NEW.request_id = 'hot' THEN
                 IF nextval('{0}.hot_conflicts') <= 3 THEN
                   RAISE EXCEPTION 'staged conflict' USING ERRCODE = 'serialization_failure';
                 END IF;
               END IF;
               RETURN NEW;
             END $$;
             CREATE TRIGGER hot_conflict BEFORE INSERT ON processed_request
               FOR EACH ROW EXECUTE FUNCTION hot_conflict();",
            env.schema
        ))
        .await
        .unwrap();
    env.produce("hot", &json(request("hot", Some("hot"), &[("b1", 0.5)])))
        .await;
    let others = neighbours(&env).await;
    let agent = env.start(ONE_LANE).await;
    let total = 1 + others as i64;
    env.wait_committed(1, total, 60).await;
    let m = agent.metrics.clone();
    stop(agent).await;

    // An attempt and two retries (more only should a later batch meet a real conflict with
    // the requests written alone meanwhile).
    let conflicts = batch_results(&m, "serialization_failure");
    assert!(conflicts >= 3, "{conflicts} batch conflicts");
    // The hot request's batch split; any other batch committed.
    assert_eq!(
        batch_results(&m, "committed"),
        m.batch_requests.get_sample_count() - 1
    );
    assert_all_persisted(&env, &m, total).await;
    // Three staged conflicts, then the write alone (and any real conflict alone: requests
    // written one by one at once still conflict now and then, and retry in-process).
    let tries = env.count("SELECT last_value FROM hot_conflicts").await;
    assert!(
        tries >= 4,
        "the hot request's ledger insert ran {tries} times"
    );
    let shared = sharing_transaction(&env, "hot").await;
    assert_eq!(shared, 0, "the hot request was written alone");
}

/// One batch lane that waits a second for company: the requests produced together share it.
/// Six in-process retries: requests written alone at once conflict now and then, and none may
/// reach the tier, which would hold it past the test (and count it as routed).
const ONE_LANE: &[&str] = &[
    "--workers=64",
    "--batch-max=32",
    "--batch-concurrency=1",
    "--batch-linger=1s",
    "--txn-backoff=20ms,50ms,100ms,200ms,500ms,1s",
    "--retry-delays=1h",
];

/// Batch transaction attempts that ended with `result` (`committed`, a failure class).
fn batch_results(m: &Metrics, result: &str) -> u64 {
    m.batch_transactions.with_label_values(&[result]).get()
}

/// Produces one request each for 20 other readers; returns how many.
async fn neighbours(env: &Env) -> usize {
    let n = 20;
    for i in 0..n {
        let user = format!("u{i}");
        let req = request(&user, Some(&format!("r{i}")), &[("b1", 0.5)]);
        env.produce(&user, &json(req)).await;
    }
    n
}

/// Each of the `total` requests written once and persisted, none routed.
async fn assert_all_persisted(env: &Env, m: &Metrics, total: i64) {
    env.assert_written_once(total).await;
    assert_eq!(
        m.outcome_count(&env.topic, outcome::PERSISTED),
        total as u64
    );
    assert_eq!(m.outcome_count(&env.topic, outcome::RETRY_SCHEDULED), 0);
    assert_eq!(m.outcome_count(&env.topic, outcome::DEAD_LETTERED), 0);
}

/// How many other requests committed in the transaction that wrote `request_id`.
async fn sharing_transaction(env: &Env, request_id: &str) -> i64 {
    env.pg
        .query_one(
            "SELECT count(*) FROM processed_request p JOIN processed_request h
               USING (transaction_id)
             WHERE h.request_id = $1 AND p.request_id <> $1",
            &[&request_id],
        )
        .await
        .unwrap()
        .get(0)
}
