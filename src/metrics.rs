//! Every metric the agent exports, declared once. Label values are bounded: topics come from
//! configuration, outcomes/results/classes from fixed sets; never a user id, request id or raw
//! error message.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub const NAMESPACE: &str = "persistence_agent";

/// ((topic, partition), messages behind).
pub type PartitionLag = ((String, i32), i64);

/// `outcome` label values: the final outcome of a message.
pub mod outcome {
    pub const PERSISTED: &str = "persisted";
    pub const DUPLICATE: &str = "duplicate";
    /// Not persisted and not routed. No longer produced (every failure is routed), kept in
    /// the SLO rules so dashboards over older data stay right.
    pub const FAILED: &str = "failed";
    /// Sent to a delayed retry tier: not final, so outside the SLO.
    pub const RETRY_SCHEDULED: &str = "retry_scheduled";
    pub const DEAD_LETTERED: &str = "dead_lettered";
    /// Held back behind an earlier request of the same key that waits in a retry tier; its
    /// final outcome is counted when it is released.
    pub const PARKED: &str = "parked";
}

/// `result` label values of transaction attempts besides the failure classes.
pub mod attempt {
    pub const COMMITTED: &str = "committed";
    pub const DUPLICATE: &str = "duplicate";
    /// Nothing written: the request's key is parked (per-key ordering).
    pub const BLOCKED: &str = "blocked";
    /// Nothing written: another owner claimed the partition (stale work fenced).
    pub const FENCED: &str = "fenced";
}

pub struct Metrics {
    registry: Registry,
    pub messages_consumed: IntCounterVec,
    pub outcomes: IntCounterVec,
    pub txn_attempts: IntCounterVec,
    pub txn_duration: Histogram,
    pub end_to_end_latency: HistogramVec,
    pub failures: IntCounterVec,
    pub in_flight: IntGaugeVec,
    pub paused_partitions: IntGaugeVec,
    pub delayed_partitions: IntGauge,
    pub database_outage: IntGauge,
    pub results_published: IntCounterVec,
    pub commits: IntCounterVec,
    pub pool_size: IntGauge,
    pub pool_available: IntGauge,
    pub pool_waiting: IntGauge,
    pub build_info: IntGaugeVec,
    pub consumer_lag: IntGaugeVec,
    pub dead_letters: IntCounterVec,
    pub retry_routed: IntCounterVec,
    pub time_to_success: HistogramVec,
    pub headers_clamped: IntCounterVec,
    pub parked_keys: IntGauge,
    pub parked_oldest_age: prometheus::Gauge,
    pub parked_keys_reaped: prometheus::IntCounter,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(NAMESPACE)
}

fn hopts(name: &str, help: &str, buckets: Vec<f64>) -> HistogramOpts {
    HistogramOpts::new(name, help)
        .namespace(NAMESPACE)
        .buckets(buckets)
}

/// A transaction is a handful of statements on one connection: milliseconds normally, the
/// 5 s statement timeout at worst.
const TXN_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];
/// Produce-to-commit spans in-process retries (seconds) and, with retry tiers, up to hours.
const E2E_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 30.0, 300.0, 1800.0, 7200.0,
];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let m = Self {
            messages_consumed: IntCounterVec::new(
                opts("messages_consumed_total", "Messages fetched from Kafka, by topic."),
                &["topic"],
            )
            .unwrap(),
            outcomes: IntCounterVec::new(
                opts(
                    "outcomes_total",
                    "Outcomes of messages by input topic and outcome: final (persisted, duplicate, \
                     dead_lettered) or not (retry_scheduled, parked). The success-rate SLO is \
                     (persisted + duplicate) / (persisted + duplicate + dead_lettered + failed).",
                ),
                &["topic", "outcome"],
            )
            .unwrap(),
            txn_attempts: IntCounterVec::new(
                opts(
                    "transaction_attempts_total",
                    "Database transaction attempts by result (committed, duplicate, or the failure class).",
                ),
                &["result"],
            )
            .unwrap(),
            txn_duration: Histogram::with_opts(hopts(
                "transaction_duration_seconds",
                "Duration of one database transaction attempt, BEGIN to COMMIT or ROLLBACK.",
                TXN_BUCKETS.to_vec(),
            ))
            .unwrap(),
            end_to_end_latency: HistogramVec::new(
                hopts(
                    "end_to_end_latency_seconds",
                    "Kafka message timestamp to final outcome, by outcome.",
                    E2E_BUCKETS.to_vec(),
                ),
                &["outcome"],
            )
            .unwrap(),
            failures: IntCounterVec::new(
                opts("failures_total", "Failed messages by error class."),
                &["class"],
            )
            .unwrap(),
            in_flight: IntGaugeVec::new(
                opts("in_flight_messages", "Messages fetched and not yet finished, by consumer (main, retry)."),
                &["consumer"],
            )
            .unwrap(),
            paused_partitions: IntGaugeVec::new(
                opts(
                    "paused_partitions",
                    "Assigned partitions paused for backpressure or a database outage, by consumer (main, retry).",
                ),
                &["consumer"],
            )
            .unwrap(),
            delayed_partitions: IntGauge::with_opts(opts(
                "retry_delayed_partitions",
                "Retry-tier partitions paused until their next message is due.",
            ))
            .unwrap(),
            database_outage: IntGauge::with_opts(opts(
                "database_outage",
                "1 while the database is unreachable and messages wait for it, else 0.",
            ))
            .unwrap(),
            results_published: IntCounterVec::new(
                opts("results_published_total", "Result events published, by delivery (ok, error)."),
                &["delivery"],
            )
            .unwrap(),
            commits: IntCounterVec::new(
                opts("offset_commits_total", "Synchronous offset commits, by reason (revoke, shutdown) and result."),
                &["reason", "result"],
            )
            .unwrap(),
            pool_size: IntGauge::with_opts(opts("db_pool_connections", "Connections currently open in the pool.")).unwrap(),
            pool_available: IntGauge::with_opts(opts("db_pool_available", "Idle connections in the pool.")).unwrap(),
            pool_waiting: IntGauge::with_opts(opts("db_pool_waiting", "Tasks waiting for a pool connection.")).unwrap(),
            build_info: IntGaugeVec::new(
                opts("build_info", "Always 1; labels carry the version and git commit."),
                &["version", "git_sha"],
            )
            .unwrap(),
            consumer_lag: IntGaugeVec::new(
                opts(
                    "consumer_lag_messages",
                    "Messages behind the partition's end, from librdkafka statistics, by consumer \
                     (main, retry: retry-tier lag includes messages waiting to be due).",
                ),
                &["consumer", "topic", "partition"],
            )
            .unwrap(),
            dead_letters: IntCounterVec::new(
                opts("dead_letters_total", "Messages routed to the dead-letter topic, by error class."),
                &["class"],
            )
            .unwrap(),
            retry_routed: IntCounterVec::new(
                opts("retry_routed_total", "Messages routed to a delayed retry tier, by tier (e.g. 5m, 30m, 2h)."),
                &["tier"],
            )
            .unwrap(),
            time_to_success: HistogramVec::new(
                hopts(
                    "retry_time_to_success_seconds",
                    "First failure to successful persistence of messages that succeeded from a retry tier, by tier.",
                    E2E_BUCKETS.to_vec(),
                ),
                &["tier"],
            )
            .unwrap(),
            headers_clamped: IntCounterVec::new(
                opts(
                    "untrusted_headers_clamped_total",
                    "Retry headers whose value was out of bounds (a due time past the tier's delay, \
                     a first failure in the future, an attempt count past the limit) and was \
                     clamped, by header.",
                ),
                &["header"],
            )
            .unwrap(),
            parked_keys: IntGauge::with_opts(opts(
                "parked_keys",
                "Keys whose requests are held behind a head waiting in a retry tier.",
            ))
            .unwrap(),
            parked_oldest_age: prometheus::Gauge::with_opts(opts(
                "parked_key_oldest_age_seconds",
                "Age of the oldest parked key (since its head entered a retry tier), 0 when none.",
            ))
            .unwrap(),
            parked_keys_reaped: prometheus::IntCounter::with_opts(opts(
                "parked_keys_reaped_total",
                "Parked keys whose head could no longer be in any retry tier, released by the reaper.",
            ))
            .unwrap(),
            registry,
        };
        m.register_all();
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), env!("GIT_SHA")])
            .set(1);
        m
    }

    fn register_all(&self) {
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(self.messages_consumed.clone()),
            Box::new(self.outcomes.clone()),
            Box::new(self.txn_attempts.clone()),
            Box::new(self.txn_duration.clone()),
            Box::new(self.end_to_end_latency.clone()),
            Box::new(self.failures.clone()),
            Box::new(self.in_flight.clone()),
            Box::new(self.paused_partitions.clone()),
            Box::new(self.delayed_partitions.clone()),
            Box::new(self.database_outage.clone()),
            Box::new(self.results_published.clone()),
            Box::new(self.commits.clone()),
            Box::new(self.pool_size.clone()),
            Box::new(self.pool_available.clone()),
            Box::new(self.pool_waiting.clone()),
            Box::new(self.build_info.clone()),
            Box::new(self.consumer_lag.clone()),
            Box::new(self.dead_letters.clone()),
            Box::new(self.retry_routed.clone()),
            Box::new(self.time_to_success.clone()),
            Box::new(self.headers_clamped.clone()),
            Box::new(self.parked_keys.clone()),
            Box::new(self.parked_oldest_age.clone()),
            Box::new(self.parked_keys_reaped.clone()),
        ];
        for c in collectors {
            self.registry.register(c).expect("metric names are unique");
        }
    }

    pub fn observe_pool(&self, status: deadpool_postgres::Status) {
        self.pool_size.set(status.size as i64);
        self.pool_available.set(status.available as i64);
        self.pool_waiting.set(status.waiting as i64);
    }

    /// Replaces the lag gauges, so partitions no longer assigned disappear.
    pub fn observe_lag(&self, consumers: &[(&str, Vec<PartitionLag>)]) {
        self.consumer_lag.reset();
        for (consumer, lag) in consumers {
            for ((topic, partition), value) in lag {
                self.consumer_lag
                    .with_label_values(&[*consumer, topic.as_str(), &partition.to_string()])
                    .set(*value);
            }
        }
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding never fails");
        String::from_utf8(buf).expect("text exposition is UTF-8")
    }

    pub fn outcome_count(&self, topic: &str, outcome: &str) -> u64 {
        self.outcomes.with_label_values(&[topic, outcome]).get()
    }

    pub fn attempt_count(&self, result: &str) -> u64 {
        self.txn_attempts.with_label_values(&[result]).get()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
