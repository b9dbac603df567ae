//! Fault suite, scenario 6: the database is slow, not down. Statements that run out their
//! `STATEMENT_TIMEOUT` behind a lock are transient (retried, or sent through the retry tiers)
//! and end written once; a pool too small for the load makes requests wait for a connection,
//! which is neither an outage nor a failure: nothing is routed for it.

mod common;

use std::time::{Duration, Instant};

use common::faults::{self, spawn_agent, Workload};
use common::Env;

const PARTITIONS: i32 = 6;

/// Longer than the client-side deadline of a transaction (2 x `STATEMENT_TIMEOUT` + 5 s): a
/// wait for a lock must end as a statement timeout, not look like a hung connection.
const LOCKED: Duration = Duration::from_secs(9);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_timeouts_behind_a_lock_end_written_once_and_are_no_outage() {
    let env = Env::new(PARTITIONS).await;
    let wl = Workload::new(faults::size());
    wl.prepare(&env).await;
    let http = faults::http_addr();
    let settings = [("HTTP_ADDR", http.as_str()), ("STATEMENT_TIMEOUT", "1s")];
    let mut agent = spawn_agent(&env, &settings);
    faults::under_way(&env, &wl).await;
    // Every write goes through the ledger: behind this lock each one runs out its timeout.
    let (locker, conn) = tokio_postgres::connect(&env.db_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let lock = format!(
        "BEGIN; LOCK TABLE \"{}\".processed_request IN ACCESS EXCLUSIVE MODE",
        env.schema
    );
    locker.batch_execute(&lock).await.unwrap();
    let locked = Instant::now();
    let n = wl.msgs.len();
    wl.publish(&env.brokers, &env.topic, n / 3..n).await;
    let mut outage = false;
    while locked.elapsed() < LOCKED {
        outage |= faults::metric(&http, "database_outage", &[]).await == 1.0;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    locker.batch_execute("COMMIT").await.unwrap();
    let since = Instant::now();
    faults::add_late_book(&env).await;
    faults::wait_settled(&env, &wl, PARTITIONS, 300).await;
    let recover = since.elapsed();
    let attempts = async |result| {
        let labels = [("result", result)];
        faults::metric(&http, "transaction_attempts_total", &labels).await
    };
    let (timeouts, hung) = (attempts("timeout").await, attempts("database_outage").await);
    let exit = agent.term(60);
    eprintln!("statement timeouts: {timeouts}, outage attempts: {hung}");
    assert!(timeouts > 0.0, "no statement ran out its timeout");
    assert!(
        !outage && hung == 0.0,
        "a lock taken for an outage (gauge: {outage}, attempts: {hung})"
    );
    let transient = ["foreign_key_violation", "timeout", "lock_timeout"];
    faults::judge_with_tiers(
        "statement timeouts (lock 9s)",
        &env,
        &wl,
        recover,
        exit,
        &transient,
        "routed",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_pool_makes_requests_wait_and_routes_none() {
    let env = Env::new(PARTITIONS).await;
    let wl = Workload::new(faults::size());
    wl.prepare(&env).await;
    // Each transaction holds one of the two connections for 0.3 s, so with a worker per user
    // a request waits longer than the pool's 10 s wait timeout.
    env.slow_transactions(0.3).await;
    let http = faults::http_addr();
    let settings = [
        ("HTTP_ADDR", http.as_str()),
        ("DATABASE_POOL_SIZE", "2"),
        ("BATCH_MAX", "1"),
    ];
    let mut agent = spawn_agent(&env, &settings);
    let n = wl.msgs.len();
    wl.publish(&env.brokers, &env.topic, 0..n).await;
    let pool_timeouts = async || {
        let result = [("result", "pool_timeout")];
        faults::metric(&http, "transaction_attempts_total", &result).await
    };
    common::wait_for("a request waiting out the pool", 120, async || {
        pool_timeouts().await > 0.0
    })
    .await;
    // Long enough for a request to spend its in-process retries on pool waits (four waits of
    // 10 s and the backoff): only the pipeline's own wait keeps it from a tier then.
    tokio::time::sleep(Duration::from_secs(50)).await;
    let waited = pool_timeouts().await;
    // The fault ends: the rest goes at full speed.
    env.pg
        .batch_execute("DROP TRIGGER slow ON processed_request")
        .await
        .unwrap();
    let since = Instant::now();
    faults::add_late_book(&env).await;
    faults::wait_settled(&env, &wl, PARTITIONS, 300).await;
    let recover = since.elapsed();
    let waited = waited.max(pool_timeouts().await);
    let exit = agent.term(60);
    eprintln!("pool wait timeouts: {waited}");
    faults::judge_with_tiers(
        "pool of 2 exhausted",
        &env,
        &wl,
        recover,
        exit,
        &["foreign_key_violation"],
        "routed",
    )
    .await;
}
