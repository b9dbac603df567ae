//! Every metric the agent exports, declared once. Label values are bounded: topics come from
//! configuration, outcomes/results/classes from fixed sets; never a user id, request id or raw
//! error message.

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
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

/// A transaction is a handful of statements on one connection: milliseconds normally, the
/// 5 s statement timeout at worst.
const TXN_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
/// Produce-to-commit spans in-process retries (seconds) and, with retry tiers, up to hours.
const E2E_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 30.0, 300.0, 1800.0, 7200.0,
];

/// Builds one metric of its type from its declaration, in the agent's namespace.
trait Declare: Collector + Clone + 'static {
    fn declare(name: &str, help: &str, labels: &[&str], buckets: Option<&[f64]>) -> Self;
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(NAMESPACE)
}

fn hopts(name: &str, help: &str, buckets: Option<&[f64]>) -> HistogramOpts {
    let o = HistogramOpts::new(name, help).namespace(NAMESPACE);
    match buckets {
        Some(b) => o.buckets(b.to_vec()),
        None => o,
    }
}

macro_rules! declare_plain {
    ($($ty:ty),*) => {$(
        impl Declare for $ty {
            fn declare(name: &str, help: &str, _: &[&str], _: Option<&[f64]>) -> Self {
                <$ty>::with_opts(opts(name, help)).expect("valid metric declaration")
            }
        }
    )*};
}
macro_rules! declare_vec {
    ($($ty:ty),*) => {$(
        impl Declare for $ty {
            fn declare(name: &str, help: &str, labels: &[&str], _: Option<&[f64]>) -> Self {
                <$ty>::new(opts(name, help), labels).expect("valid metric declaration")
            }
        }
    )*};
}
declare_plain!(IntCounter, IntGauge, Gauge);
declare_vec!(IntCounterVec, IntGaugeVec);

impl Declare for Histogram {
    fn declare(name: &str, help: &str, _: &[&str], buckets: Option<&[f64]>) -> Self {
        Histogram::with_opts(hopts(name, help, buckets)).expect("valid metric declaration")
    }
}

impl Declare for HistogramVec {
    fn declare(name: &str, help: &str, labels: &[&str], buckets: Option<&[f64]>) -> Self {
        HistogramVec::new(hopts(name, help, buckets), labels).expect("valid metric declaration")
    }
}

/// Declares every metric once: the field, its name, help text, labels and buckets. The macro
/// builds and registers each, so a metric cannot be declared and left unregistered.
macro_rules! metrics {
    ($(
        $field:ident: $ty:ty = $name:literal, $help:expr
        $(, labels [$($label:literal),*])? $(, buckets $buckets:expr)?;
    )*) => {
        pub struct Metrics {
            registry: Registry,
            /// The full name of every metric the registry accepted.
            registered: Vec<String>,
            $(pub $field: $ty,)*
        }

        impl Metrics {
            pub fn new() -> Self {
                let registry = Registry::new();
                let mut registered = Vec::new();
                $(
                    let labels: &[&str] = &[$($($label),*)?];
                    let buckets: Option<&[f64]> = None $(.or(Some($buckets)))?;
                    let $field = <$ty as Declare>::declare($name, $help, labels, buckets);
                    registry
                        .register(Box::new($field.clone()))
                        .expect("metric names are unique");
                    registered.extend($field.desc().iter().map(|d| d.fq_name.clone()));
                )*
                let m = Self { registry, registered, $($field,)* };
                m.build_info
                    .with_label_values(&[env!("CARGO_PKG_VERSION"), env!("GIT_SHA")])
                    .set(1);
                m
            }

            /// The full name of every metric the registry accepted, observed yet or not.
            pub fn names(&self) -> &[String] {
                &self.registered
            }
        }
    };
}

metrics! {
    messages_consumed: IntCounterVec = "messages_consumed_total",
        "Messages fetched from Kafka, by topic.", labels ["topic"];
    outcomes: IntCounterVec = "outcomes_total",
        "Outcomes of messages by input topic and outcome: final (persisted, duplicate, \
         dead_lettered) or not (retry_scheduled, parked). The success-rate SLO is \
         (persisted + duplicate) / (persisted + duplicate + dead_lettered + failed).",
        labels ["topic", "outcome"];
    txn_attempts: IntCounterVec = "transaction_attempts_total",
        "Database transaction attempts by result (committed, duplicate, blocked, fenced, or the \
         failure class).",
        labels ["result"];
    txn_duration: Histogram = "transaction_duration_seconds",
        "Duration of one database transaction attempt, BEGIN to COMMIT or ROLLBACK.",
        buckets TXN_BUCKETS;
    batch_requests: Histogram = "batch_requests",
        "Requests per batched transaction (micro-batching, BATCH_MAX).",
        buckets BATCH_BUCKETS;
    batch_transactions: IntCounterVec = "batch_transactions_total",
        "Batched transactions by result: committed, or the failure class (its requests were \
         then written one per transaction, with their own retries).",
        labels ["result"];
    end_to_end_latency: HistogramVec = "end_to_end_latency_seconds",
        "Kafka message timestamp to its outcome being decided (written, found in the ledger, parked \
         or routed; a head's release of its parked followers comes after), by outcome.",
        labels ["outcome"], buckets E2E_BUCKETS;
    failures: IntCounterVec = "failures_total",
        "Failed messages by error class.", labels ["class"];
    in_flight: IntGaugeVec = "in_flight_messages",
        "Messages fetched and not yet finished, by consumer (main, retry).", labels ["consumer"];
    in_flight_bytes: IntGaugeVec = "in_flight_bytes",
        "Bytes (keys and values) of the messages fetched and not yet finished, by consumer.",
        labels ["consumer"];
    paused_partitions: IntGaugeVec = "paused_partitions",
        "Assigned partitions paused for a database outage or a stall (an in-flight bound held \
         for STALL_PAUSE_AFTER with nothing finishing), by consumer (main, retry).",
        labels ["consumer"];
    delayed_partitions: IntGauge = "retry_delayed_partitions",
        "Retry-tier partitions paused until their next message is due.";
    database_outage: IntGauge = "database_outage",
        "1 while the database is unreachable and messages wait for it, else 0.";
    results_published: IntCounterVec = "results_published_total",
        "Result events published, by delivery (ok, error).", labels ["delivery"];
    commits: IntCounterVec = "offset_commits_total",
        "Synchronous offset commits, by reason (revoke, shutdown) and result.",
        labels ["reason", "result"];
    pool_size: IntGauge = "db_pool_connections", "Connections currently open in the pool.";
    pool_available: IntGauge = "db_pool_available", "Idle connections in the pool.";
    pool_waiting: IntGauge = "db_pool_waiting", "Tasks waiting for a pool connection.";
    build_info: IntGaugeVec = "build_info",
        "Always 1; labels carry the version and git commit.", labels ["version", "git_sha"];
    consumer_lag: IntGaugeVec = "consumer_lag_messages",
        "Messages behind the partition's end, from librdkafka statistics, by consumer \
         (main, retry: retry-tier lag includes messages waiting to be due).",
        labels ["consumer", "topic", "partition"];
    dead_letters: IntCounterVec = "dead_letters_total",
        "Messages routed to the dead-letter topic, by error class.", labels ["class"];
    retry_routed: IntCounterVec = "retry_routed_total",
        "Messages routed to a delayed retry tier, by tier (e.g. 5m, 30m, 2h).", labels ["tier"];
    time_to_success: HistogramVec = "retry_time_to_success_seconds",
        "First failure to successful persistence of messages that succeeded from a retry tier, by tier.",
        labels ["tier"], buckets E2E_BUCKETS;
    headers_clamped: IntCounterVec = "untrusted_headers_clamped_total",
        "Retry headers whose value was out of bounds (a due time past the tier's delay, a first \
         failure in the future, an attempt count past the limit) and was clamped, by header.",
        labels ["header"];
    parked_keys: IntGauge = "parked_keys",
        "Keys whose requests are held behind a head waiting in a retry tier.";
    parked_oldest_age: Gauge = "parked_key_oldest_age_seconds",
        "Age of the oldest parked key (since its head entered a retry tier), 0 when none.";
    parked_keys_reaped: IntCounter = "parked_keys_reaped_total",
        "Parked keys whose head could no longer be in any retry tier, released by the reaper.";
    fatal_errors: IntCounterVec = "fatal_errors_total",
        "Fatal stops of the agent (it exits non-zero and commits nothing unfinished), by the \
         class of the first fatal error: deployment_error, producer_error or internal_error.",
        labels ["class"];
}

impl Metrics {
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
