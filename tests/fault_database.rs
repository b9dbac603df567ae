//! Fault suite, scenario 2: the database fails under a stream, for longer than the in-process
//! retries last. A crash (`pg_ctl stop -m immediate`, then crash recovery) and a switch to
//! read-only are both outages: the agent holds the messages and waits for a database that
//! takes writes, routes none of them to a retry tier or the dead-letter topic for it, and
//! writes everything once when the database is back. Each runs on a cluster of its own.

mod common;

use std::time::{Duration, Instant};

use common::faults::{self, spawn_agent, AgentProc, Workload};
use common::{Env, TestCluster};

const PARTITIONS: i32 = 6;
/// Longer than the in-process retries (`TXN_BACKOFF` 100 ms, 500 ms, 2 s, jittered up to +50 %),
/// so the outage is the pipeline's to wait out, not the retry loop's.
const DOWN: Duration = Duration::from_secs(9);
/// Besides a conflict, the only reason a valid request may sit in a retry tier here: its book
/// is not in the catalogue yet. An outage class (`database_outage`, `connection_error`, or
/// whatever a misclassified read-only error becomes) must never be there.
const ALLOWED_TIERS: [&str; 1] = ["foreign_key_violation"];

/// `faults::under_way`, then a random moment: the fault meets transactions at any stage.
async fn under_way(env: &Env, wl: &Workload) {
    faults::under_way(env, wl).await;
    tokio::time::sleep(Duration::from_millis(faults::random_range(0..300))).await;
}

/// Publishes the rest during the fault, and watches the agent's outage gauge until `DOWN` has
/// passed since `began`: whether the agent saw the outage (paused and waited for it).
async fn rest_during(env: &Env, wl: &Workload, http: &str, began: Instant) -> bool {
    let publish = wl.publish(&env.brokers, &env.topic, wl.msgs.len() / 3..wl.msgs.len());
    // Sampled while publishing too: a long stream may take longer than the outage to publish.
    let sample = async {
        let mut seen = false;
        while began.elapsed() < DOWN {
            seen |= faults::metric(http, "database_outage", &[]).await == 1.0;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        seen
    };
    tokio::join!(publish, sample).1
}

/// Waits until every message has its outcome, stops the agent, and checks the outcome of each
/// and what the tiers hold; `since` is the moment the database took writes again.
async fn settle_and_check(
    scenario: &str,
    env: &Env,
    wl: &Workload,
    mut agent: AgentProc,
    since: Instant,
) {
    faults::add_late_book(env).await;
    faults::wait_settled(env, wl, PARTITIONS, 300).await;
    let recover = since.elapsed();
    let exit = agent.term(60);
    let why = "routed for the outage";
    faults::judge_with_tiers(scenario, env, wl, recover, exit, &ALLOWED_TIERS, why).await;
}

/// A throwaway cluster of the scenario's own, the workload's catalogue, slow transactions (in
/// flight when the fault comes), and the agent writing the first third of the stream.
async fn started() -> (TestCluster, Env, Workload, String, AgentProc) {
    let cluster = TestCluster::start_new();
    let env = Env::with_database(cluster.url(), PARTITIONS).await;
    let wl = Workload::new(faults::size());
    wl.prepare(&env).await;
    env.slow_transactions(0.005).await;
    let http = faults::http_addr();
    let agent = spawn_agent(&env, &[("HTTP_ADDR", &http)]);
    under_way(&env, &wl).await;
    (cluster, env, wl, http, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_crash_holds_messages_and_writes_each_once_after_restart() {
    let (cluster, env, wl, http, agent) = started().await;
    cluster.crash();
    let seen = rest_during(&env, &wl, &http, Instant::now()).await;
    cluster.start();
    let since = Instant::now();
    assert!(seen, "the agent never reported the outage");
    settle_and_check("database crash 9s", &env, &wl, agent, since).await;
}

/// Turns read-only on or off for every session of the cluster, the agent's pooled ones too (a
/// reload reaches idle sessions before their next statement).
async fn read_only(url: &str, on: bool) {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the throwaway cluster");
    tokio::spawn(conn);
    let set = match on {
        true => "ALTER SYSTEM SET default_transaction_read_only = on",
        false => "ALTER SYSTEM RESET default_transaction_read_only",
    };
    // One statement per call: ALTER SYSTEM refuses the implicit transaction of a multi-statement
    // query.
    for sql in [
        "SET default_transaction_read_only = off",
        set,
        "SELECT pg_reload_conf()",
    ] {
        c.batch_execute(sql).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_database_pauses_and_routes_nothing() {
    let (cluster, env, wl, http, agent) = started().await;
    read_only(&cluster.url(), true).await;
    let seen = rest_during(&env, &wl, &http, Instant::now()).await;
    read_only(&cluster.url(), false).await;
    let since = Instant::now();
    let refused = faults::metric(
        &http,
        "transaction_attempts_total",
        &[("result", "database_outage")],
    )
    .await;
    settle_and_check("database read-only 9s", &env, &wl, agent, since).await;
    assert!(
        seen && refused > 0.0,
        "the agent never met the read-only database (outage seen: {seen}, refused: {refused})"
    );
}
