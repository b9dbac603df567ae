//! Fault suite, scenario 7: SIGTERM under load. Each stop drains what is in flight, commits and
//! exits 0, so the agent started after it handles nothing twice: not one confirmation beyond
//! one per publish, and every message written once or dead-lettered.

mod common;

use std::time::{Duration, Instant};

use common::faults::{self, spawn_agent, Workload};
use common::Env;

const PARTITIONS: i32 = 6;
const STOPS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_under_load_exits_zero_and_handles_nothing_twice() {
    let env = Env::new(PARTITIONS).await;
    let wl = Workload::new(faults::size());
    wl.prepare(&env).await;
    faults::add_late_book(&env).await;
    let n = wl.msgs.len();
    // A slow transaction keeps work in flight at each stop, so the drain has something to do.
    env.slow_transactions(0.01).await;
    let mut agent = spawn_agent(&env, &[]);
    let mut exit_codes = vec![];
    let written = "SELECT count(*) FROM processed_request";
    for k in 0..STOPS {
        wl.publish(&env.brokers, &env.topic, n * k / STOPS..n * (k + 1) / STOPS)
            .await;
        let before = env.count(written).await;
        faults::writing_past(&env, before).await;
        tokio::time::sleep(Duration::from_millis(faults::random_range(50..800))).await;
        exit_codes.push(agent.term(60));
        agent = spawn_agent(&env, &[]);
    }
    let since = Instant::now();
    faults::wait_settled(&env, &wl, PARTITIONS, 300).await;
    let recover = since.elapsed();
    exit_codes.push(agent.term(60));
    let v = faults::verdict(&env, &wl).await;
    faults::report("sigterm x3 under load", &v, recover, &exit_codes);
    v.assert_clean();
    assert!(exit_codes.iter().all(|c| *c == 0), "{exit_codes:?}");
    assert_eq!(
        v.confirmation_repeats, 0,
        "a message handled again after a graceful stop"
    );
    assert_eq!(v.dead_letter_repeats, 0, "a message routed again");
}
