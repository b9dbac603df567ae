//! Fault suite, scenario 4: a consumer group of three agent processes whose members are stopped
//! (SIGTERM), killed (SIGKILL) and replaced under load, while requests wait in retry tiers for a
//! book the catalogue gets only mid-run and later requests of their users are parked behind
//! them. Every rebalance moves partitions (input and tiers) with work in flight. Every message
//! ends written once or dead-lettered, each user's requests are written in publish order, and
//! once everything settled no key is left parked.

mod common;

use std::time::{Duration, Instant};

use common::faults::{self, spawn_agent, AgentProc, Workload};
use common::Env;

const PARTITIONS: i32 = 6;
const MEMBERS: usize = 3;
const ROUNDS: usize = 8;
/// The catalogue gets `LATE_BOOK` before this round: late enough that the requests needing it
/// walk the tiers (and park their users' later requests) through half the member changes, early
/// enough that the first of them are still in the last tier (2 s + 10 s + 60 s) when it comes.
const LATE_BOOK_ROUND: usize = 4;
const WRITTEN: &str = "SELECT count(*) FROM processed_request";
const PARKED_KEYS: &str = "SELECT count(*) FROM parked_key";
const PARKED_MESSAGES: &str = "SELECT count(*) FROM parked_message";

async fn members_replaced(scenario: &str, settings: &[(&str, &str)]) {
    let env = Env::new(PARTITIONS).await;
    let wl = Workload::new(faults::size());
    wl.prepare(&env).await;
    let n = wl.msgs.len();
    // Slow transactions keep work in flight at each signal, and a revoke that does not wait
    // for it hands that work to the next owner at every rebalance. Frequent commits mean a
    // kill finds the latest completions committed, beside work still in flight.
    env.slow_transactions(0.02).await;
    let scenario_settings = [
        ("REBALANCE_DRAIN_TIMEOUT", "0s"),
        ("KAFKA_CONFIG_auto.commit.interval.ms", "200"),
        ("KAFKA_CONFIG_heartbeat.interval.ms", "1000"),
        // Two of these tests run at once in the suite: 6 agents within the shared server's 100
        // connections.
        ("DATABASE_POOL_SIZE", "8"),
    ];
    let settings = [&scenario_settings, settings].concat();
    let settings = settings.as_slice();
    let mut group: Vec<AgentProc> = (0..MEMBERS).map(|_| spawn_agent(&env, settings)).collect();
    let mut exit_codes = vec![];
    let mut signals = vec![];
    let mut most_parked = 0;
    let first_tier = env.tier_topic("2s");
    for k in 0..ROUNDS {
        if k == LATE_BOOK_ROUND {
            let copies = env.topic_len(&first_tier);
            assert!(copies > 0, "no retry-tier copy before the late book came");
            faults::add_late_book(&env).await;
        }
        wl.publish(
            &env.brokers,
            &env.topic,
            n * k / ROUNDS..n * (k + 1) / ROUNDS,
        )
        .await;
        let before = env.count(WRITTEN).await;
        faults::writing_past(&env, before).await;
        tokio::time::sleep(Duration::from_millis(faults::random_range(0..400))).await;
        most_parked = most_parked.max(env.count(PARKED_KEYS).await);
        // Alternately a graceful stop and a kill of a random member, replaced at once after a stop
        // and once the broker expired a killed one.
        let victim = faults::random_range(0..MEMBERS);
        let (signal, code) = match k % 2 {
            0 => ("TERM", group[victim].term(60)),
            _ => {
                faults::members_known(&env, MEMBERS).await;
                let code = group[victim].kill();
                faults::members_known(&env, MEMBERS - 1).await;
                ("KILL", code)
            }
        };
        signals.push(signal);
        exit_codes.push(code);
        group[victim] = spawn_agent(&env, settings);
    }
    let since = Instant::now();
    faults::wait_settled(&env, &wl, PARTITIONS, 300).await;
    let recover = since.elapsed();
    // A head's release deletes its key just after the last follower's write: a moment later.
    common::wait_for("no key left parked", 30, async || {
        env.count(PARKED_KEYS).await + env.count(PARKED_MESSAGES).await == 0
    })
    .await;
    for member in &mut group {
        signals.push("TERM");
        exit_codes.push(member.term(60));
    }
    let v = faults::verdict(&env, &wl).await;
    faults::report(scenario, &v, recover, &exit_codes);
    v.assert_clean();
    assert!(most_parked > 0, "no key was parked while members changed");
    for (signal, code) in signals.iter().zip(&exit_codes) {
        let want = if *signal == "TERM" { 0 } else { 137 };
        assert_eq!(*code, want, "SIG{signal}: {signals:?} {exit_codes:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_members_stopped_killed_and_replaced_batched_keep_order_and_lose_nothing() {
    members_replaced("group of 3, members replaced x8, batched", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_members_stopped_killed_and_replaced_unbatched_keep_order_and_lose_nothing() {
    members_replaced(
        "group of 3, members replaced x8, unbatched",
        &[("BATCH_MAX", "1"), ("WORKERS", "16")],
    )
    .await;
}
