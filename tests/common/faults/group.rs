//! The broker's view of the agents' consumer groups, for the scenarios that kill agents (1, 4):
//! tansu 0.6 expires a dead member only when a live one calls, and without a new generation, so
//! a replacement must not join while the dead member still counts.

use std::time::Duration;

use super::super::{wait_for, Env};

/// `spawn_agent`'s session timeout (6 s) and a second more: a killed agent's member has then
/// expired at the broker's next look, so the first join of a lone replacement drops it.
pub const SESSION_EXPIRY: Duration = Duration::from_secs(7);

/// Waits until the broker counts `n` members in both of the agents' groups. A killed member's
/// replacement in a group starts once the broker expired it (its 6 s session and a heartbeat
/// of the survivors, 1 s in scenario 4): tansu expires a member without starting a new
/// generation, so the survivors keep partitions assigned beside the dead member's, which nobody
/// owns until the next join. The replacement's join after the expiry starts that generation
/// (Apache Kafka rebalances every survivor itself). Counted before the kill too, so a
/// replacement still joining is not mistaken for the expiry. A lone agent has no survivor to
/// make the broker look: `SESSION_EXPIRY` is waited out instead.
pub async fn members_known(env: &Env, n: usize) {
    for group in [env.group.clone(), env.retry_group()] {
        let what = format!("{n} members in {group}");
        wait_for(&what, 60, async || members(&env.brokers, &group) == Some(n)).await;
    }
}

/// How many members the broker lists in `group` (0 for a group it does not know).
fn members(brokers: &str, group: &str) -> Option<usize> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .ok()?;
    let list = c
        .fetch_group_list(Some(group), Duration::from_secs(5))
        .ok()?;
    Some(list.groups().first().map_or(0, |g| g.members().len()))
}
