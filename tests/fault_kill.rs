//! Fault suite, scenario 1: the agent SIGKILLed five times at random moments while a stream is
//! being written, and started again each time, with batching on and off. Every message ends
//! written once or dead-lettered, and each user's requests are written in order.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::faults::{self, spawn_agent, Workload};
use common::Env;

const PARTITIONS: i32 = 6;
const KILLS: usize = 5;

async fn killed_repeatedly(scenario: &str, settings: &[(&str, &str)]) {
    let env = Env::new(PARTITIONS).await;
    let wl = Arc::new(Workload::new(faults::size()));
    wl.prepare(&env).await;
    let n = wl.msgs.len();
    let mut agent = spawn_agent(&env, settings);
    let mut exit_codes = vec![];
    let written = "SELECT count(*) FROM processed_request";
    for k in 0..KILLS {
        wl.publish(&env.brokers, &env.topic, n * k / KILLS..n * (k + 1) / KILLS)
            .await;
        // Let it get under way, then kill it mid-batch at a random moment.
        let before = env.count(written).await;
        faults::writing_past(&env, before).await;
        tokio::time::sleep(Duration::from_millis(faults::random_range(50..1500))).await;
        exit_codes.push(agent.kill());
        // Restarted at once, the lone agent joins a group the broker still thinks the killed
        // one leads, and may be given no partitions (tansu 0.6): wait out its session.
        tokio::time::sleep(faults::SESSION_EXPIRY).await;
        if k == KILLS / 2 {
            faults::add_late_book(&env).await;
        }
        agent = spawn_agent(&env, settings);
    }
    let since = Instant::now();
    faults::wait_settled(&env, &wl, PARTITIONS, 300).await;
    let recover = since.elapsed();
    exit_codes.push(agent.term(60));
    let v = faults::verdict(&env, &wl).await;
    faults::report(scenario, &v, recover, &exit_codes);
    v.assert_clean();
    assert_eq!(exit_codes.last(), Some(&0), "SIGTERM exits 0");
    assert!(
        exit_codes[..KILLS].iter().all(|c| *c == 137),
        "{exit_codes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_five_times_batched_loses_and_duplicates_nothing() {
    killed_repeatedly("sigkill x5, batched", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_five_times_unbatched_loses_and_duplicates_nothing() {
    killed_repeatedly(
        "sigkill x5, unbatched",
        &[("BATCH_MAX", "1"), ("WORKERS", "16")],
    )
    .await;
}
