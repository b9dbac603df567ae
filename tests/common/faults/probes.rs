//! Probes for the database-fault scenarios (2, 6): what the retry tiers hold, and the agent's
//! metrics.

use std::collections::HashMap;
use std::time::Duration;

use super::super::Env;
use super::verdict::{read_all, report, verdict};
use super::Workload;

/// The tier labels of `spawn_agent`'s `RETRY_DELAYS`.
pub const TIER_LABELS: [&str; 3] = ["2s", "10s", "60s"];

/// Records in the retry tiers, by `pa.error.class` and `pa.error.code` ("class/code").
pub fn tier_routes(env: &Env) -> HashMap<String, usize> {
    let mut out: HashMap<String, usize> = HashMap::new();
    for label in TIER_LABELS {
        for r in read_all(env, &env.tier_topic(label), Duration::from_secs(1)) {
            let why = format!(
                "{}/{}",
                r.header("pa.error.class"),
                r.header("pa.error.code")
            );
            *out.entry(why).or_default() += 1;
        }
    }
    out
}

/// Conflicts that outlast the in-process retries go to a tier by design (docs/failures.md);
/// a burst of writes after a fault makes a few likelier, whatever the fault.
pub const CONFLICTS: [&str; 2] = ["serialization_failure", "deadlock"];

/// Tier records whose class is neither one of `allowed` nor a conflict.
pub fn routed_unless(routes: &HashMap<String, usize>, allowed: &[&str]) -> Vec<String> {
    let allowed: Vec<&str> = allowed.iter().chain(&CONFLICTS).copied().collect();
    routes
        .iter()
        .filter(|(why, _)| !allowed.iter().any(|a| why.split('/').next() == Some(*a)))
        .map(|(why, n)| format!("{n} x {why}"))
        .collect()
}

/// An `HTTP_ADDR` for `spawn_agent` the test can read `/metrics` from.
pub fn http_addr() -> String {
    format!("127.0.0.1:{}", super::super::free_port())
}

/// A sample of the agent's `/metrics` at `addr` (0 when absent or the agent does not answer).
pub async fn metric(addr: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let url = format!("http://{addr}/metrics");
    let Ok(resp) = reqwest::get(&url).await else {
        return 0.0;
    };
    let text = resp.text().await.unwrap_or_default();
    super::super::sample(&text, &format!("persistence_agent_{name}"), labels).unwrap_or(0.0)
}

/// The verdict of a database scenario: every message's outcome, SIGTERM's exit 0, and nothing in
/// the retry tiers but `allowed` classes (and conflicts); `what` opens the routing failure.
pub async fn judge_with_tiers(
    scenario: &str,
    env: &Env,
    wl: &Workload,
    recover: Duration,
    exit: i32,
    allowed: &[&str],
    what: &str,
) {
    let v = verdict(env, wl).await;
    report(scenario, &v, recover, &[exit]);
    v.assert_clean();
    assert_eq!(exit, 0, "SIGTERM exits 0");
    let routes = tier_routes(env);
    eprintln!("retry tiers hold: {routes:?}");
    let wrong = routed_unless(&routes, allowed);
    assert!(wrong.is_empty(), "{what}: {wrong:?}");
}
