//! The retry tiers and dead-letter topics: their names (`<input>.retry.5m`, `<input>.dlq`, or
//! the configured overrides) and delays.

use std::time::Duration;

use crate::ops::config::RetryArgs;

/// Names of the retry-tier and dead-letter topics.
#[derive(Debug, Clone)]
pub struct Topology {
    delays: Vec<Duration>,
    retry_override: Vec<String>,
    dlq_override: Option<String>,
}

/// `5m`, `30m`, `2h`, `10s`, `1500ms`: the tier's name in topics and metric labels.
pub fn tier_label(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        _ if ms > 0 && ms.is_multiple_of(3_600_000) => format!("{}h", ms / 3_600_000),
        _ if ms > 0 && ms.is_multiple_of(60_000) => format!("{}m", ms / 60_000),
        _ if ms.is_multiple_of(1000) => format!("{}s", ms / 1000),
        _ => format!("{ms}ms"),
    }
}

impl Topology {
    pub fn new(args: &RetryArgs) -> anyhow::Result<Topology> {
        let retry_override: Vec<String> = args
            .retry_topics
            .iter()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect();
        anyhow::ensure!(
            retry_override.is_empty() || retry_override.len() == args.retry_delays.0.len(),
            "RETRY_TOPICS names {} topics but RETRY_DELAYS has {} tiers",
            retry_override.len(),
            args.retry_delays.0.len()
        );
        Ok(Topology {
            delays: args.retry_delays.0.clone(),
            retry_override,
            dlq_override: args.dlq_topic.clone().filter(|t| !t.trim().is_empty()),
        })
    }

    pub fn tiers(&self) -> usize {
        self.delays.len()
    }

    pub fn delay(&self, tier: usize) -> Duration {
        self.delays[tier]
    }

    pub fn label(&self, tier: usize) -> String {
        tier_label(self.delays[tier])
    }

    pub fn tier_topic(&self, original: &str, tier: usize) -> String {
        match self.retry_override.get(tier) {
            Some(t) => t.clone(),
            None => format!("{original}.retry.{}", self.label(tier)),
        }
    }

    pub fn dlq_topic(&self, original: &str) -> String {
        dlq_topic(self.dlq_override.as_deref(), original)
    }

    /// Every tier topic of `inputs`, with its delay (deduplicated: overrides are shared).
    pub fn retry_topics(&self, inputs: &[String]) -> Vec<(String, Duration)> {
        let mut out: Vec<(String, Duration)> = Vec::new();
        for input in inputs {
            for tier in 0..self.tiers() {
                let t = self.tier_topic(input, tier);
                if !out.iter().any(|(o, _)| *o == t) {
                    out.push((t, self.delay(tier)));
                }
            }
        }
        out
    }

    pub fn dlq_topics(&self, inputs: &[String]) -> Vec<String> {
        dlq_topics(self.dlq_override.as_deref(), inputs)
    }
}

/// The dead-letter topic of `original`: `DLQ_TOPIC` when set, else `<original>.dlq`.
pub fn dlq_topic(dlq_override: Option<&str>, original: &str) -> String {
    match dlq_override {
        Some(t) => t.to_string(),
        None => format!("{original}.dlq"),
    }
}

/// The dead-letter topics of `inputs`, deduplicated (an override is shared by all).
pub fn dlq_topics(dlq_override: Option<&str>, inputs: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for t in inputs.iter().map(|i| dlq_topic(dlq_override, i)) {
        if !out.contains(&t) {
            out.push(t);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_tiers_after_their_delays() {
        let labels: Vec<String> = [300, 1800, 7200, 2]
            .iter()
            .map(|s| tier_label(Duration::from_secs(*s)))
            .collect();
        assert_eq!(labels, ["5m", "30m", "2h", "2s"]);
        assert_eq!(tier_label(Duration::from_millis(1500)), "1500ms");
    }
}
