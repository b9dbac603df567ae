//! Runtime configuration. Every setting is an environment variable with an equivalent `--flag`;
//! docs/configuration.md's table mirrors the doc comments here.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, ValueEnum};

mod database;
mod kafka;
pub mod secret_files;
pub use database::{parse as parse_database_url, DatabaseTls, SslMode};
pub use kafka::{ClientRole, KafkaArgs, KAFKA_PASSTHROUGH_PREFIX};

pub const DEFAULT_GROUP_ID: &str = "persistence-agent";
pub const DEFAULT_INPUT_TOPICS: &str = "persistence.requests";
pub const DEFAULT_RESULTS_TOPIC: &str = "persistence.results";
pub const DEFAULT_POOL_SIZE: usize = 16;
pub const DEFAULT_STATEMENT_TIMEOUT: &str = "5s";
pub const DEFAULT_TXN_BACKOFF: &str = "100ms,500ms,2000ms";
pub const DEFAULT_HTTP_ADDR: &str = "0.0.0.0:8080";
/// Six times `DEFAULT_BATCH_MAX`: workers wait for their batch, so they are what fills the
/// batches in flight and the next ones (with 384, three lanes sent batches of about 50).
pub const DEFAULT_WORKERS: usize = 768;
pub const DEFAULT_BATCH_MAX: usize = 128;
pub const DEFAULT_BATCH_LINGER: &str = "2ms";
/// Three batches at once: one batch's COMMIT and round trip leave the database idle, and with
/// each ledger row written once concurrent batches rarely conflict. Three, fed by the workers
/// and in-flight bound below, wrote 8-13 % more than two did with 384 and 1,024 (two paired runs,
/// BENCHMARKS.md); three with 384 and 1,024 wrote no more than two.
pub const DEFAULT_BATCH_CONCURRENCY: usize = 3;
/// Enough fetched work for `DEFAULT_WORKERS` workers to fill three lanes' batches.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 2048;
pub const DEFAULT_MAX_IN_FLIGHT_BYTES: usize = 16 * 1024 * 1024;
/// Short next to `max.poll.interval.ms` (300 s) and a rebalance, long next to a transaction.
pub const DEFAULT_STALL_PAUSE_AFTER: &str = "2s";
/// librdkafka's prefetch queue per consumer (`KAFKA_CONFIG_queued.max.messages.kbytes`).
pub const DEFAULT_QUEUED_MAX_KBYTES: &str = "16384";
pub const DEFAULT_SHUTDOWN_TIMEOUT: &str = "30s";
/// Two scrapes at the chart's 15 s interval: the fatal-stop counter is seen before the exit.
pub const DEFAULT_FATAL_LINGER: &str = "30s";
pub const DEFAULT_REBALANCE_DRAIN_TIMEOUT: &str = "10s";
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;
pub const DEFAULT_RETRY_DELAYS: &str = "5m,30m,2h";
pub const DEFAULT_GIVE_UP_AFTER: &str = "24h";
/// `GIVE_UP_AFTER` plus the longest default tier: no head waits longer with default settings.
pub const DEFAULT_PARKED_KEY_TTL: &str = "26h";
pub const DEFAULT_REAPER_INTERVAL: &str = "60s";

/// PostgreSQL settings shared by `run` and `migrate`.
#[derive(Args, Clone)]
pub struct DatabaseArgs {
    /// PostgreSQL connection URL (required), libpq's TLS settings included (`sslmode`,
    /// `sslrootcert`, `sslcert`, `sslkey`). Never logged: it may hold a password.
    /// `DATABASE_URL_FILE` names a file holding it instead (read in `secret_files`).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// Schema to create tables in and write to (sets `search_path`); empty uses the server's.
    #[arg(long, env = "DATABASE_SCHEMA", default_value = "")]
    pub database_schema: String,

    /// Maximum connections in the pool (seed 000 asks for 10-20).
    #[arg(long, env = "DATABASE_POOL_SIZE", default_value_t = DEFAULT_POOL_SIZE)]
    pub database_pool_size: usize,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum ResultsFormat {
    Json,
    Avro,
}

/// Which topics a process consumes.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// The input topics only.
    Main,
    /// The retry-tier topics only (a separate deployment for delayed retries).
    Retry,
    /// Both, with one consumer group each.
    All,
}

impl Role {
    pub fn main(self) -> bool {
        self != Role::Retry
    }
    pub fn retry(self) -> bool {
        self != Role::Main
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// Settings of `persistence-agent run`.
#[derive(Args, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,

    #[command(flatten)]
    pub db: DatabaseArgs,

    /// Consumer group; every replica with the same id shares the partitions.
    #[arg(long, env = "KAFKA_GROUP_ID", default_value = DEFAULT_GROUP_ID)]
    pub kafka_group_id: String,

    /// Topics carrying persistence requests, comma list.
    #[arg(long, env = "KAFKA_INPUT_TOPICS", default_value = DEFAULT_INPUT_TOPICS, value_delimiter = ',')]
    pub kafka_input_topics: Vec<String>,

    /// Topic for confirmations; empty disables publishing them.
    #[arg(long, env = "KAFKA_RESULTS_TOPIC", default_value = DEFAULT_RESULTS_TOPIC)]
    pub kafka_results_topic: String,

    /// Encoding of confirmations: `json`, or `avro` (single-object encoding of
    /// schemas/persistence_result.avsc).
    #[arg(long, env = "RESULTS_FORMAT", value_enum, default_value = "json")]
    pub results_format: ResultsFormat,

    /// Confluent-compatible Schema Registry for Avro schema ids; unset uses schemas/ids.json.
    /// `SCHEMA_REGISTRY_URL_FILE` names a file holding it instead (it may hold basic auth).
    #[arg(long, env = "SCHEMA_REGISTRY_URL")]
    pub schema_registry_url: Option<String>,

    /// Per-statement timeout inside each transaction; a timeout is retried once with double.
    #[arg(long, env = "STATEMENT_TIMEOUT", default_value = DEFAULT_STATEMENT_TIMEOUT, value_parser = parse_statement_timeout)]
    pub statement_timeout: Duration,

    /// Delays between in-process transaction retries, comma list; jitter of ±50 % is applied.
    #[arg(long, env = "TXN_BACKOFF", default_value = DEFAULT_TXN_BACKOFF, value_parser = parse_duration_list)]
    pub txn_backoff: DurationList,

    /// Address of the metrics and health endpoints.
    #[arg(long, env = "HTTP_ADDR", default_value = DEFAULT_HTTP_ADDR)]
    pub http_addr: SocketAddr,

    /// Transactions run at once; requests with the same key always run one after another.
    #[arg(long, env = "WORKERS", default_value_t = DEFAULT_WORKERS)]
    pub workers: usize,

    /// Most requests written in one transaction (micro-batching); `1` turns batching off.
    /// Requests of distinct users gathered from the workers share a SERIALIZABLE transaction;
    /// a batch that fails is written again one request per transaction.
    #[arg(long, env = "BATCH_MAX", default_value_t = DEFAULT_BATCH_MAX, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))]
    pub batch_max: usize,

    /// How long a request waits for others to share its transaction once a batch connection
    /// is free (while all are busy, requests gather anyway).
    #[arg(long, env = "BATCH_LINGER", default_value = DEFAULT_BATCH_LINGER, value_parser = humantime::parse_duration)]
    pub batch_linger: Duration,

    /// Batched transactions at once (each on its own pooled connection).
    #[arg(long, env = "BATCH_CONCURRENCY", default_value_t = DEFAULT_BATCH_CONCURRENCY)]
    pub batch_concurrency: usize,

    /// Messages handed to the workers and not yet finished, per consumer: at the bound the
    /// poll loop takes the next message only when one finishes (backpressure).
    #[arg(long, env = "MAX_IN_FLIGHT", default_value_t = DEFAULT_MAX_IN_FLIGHT)]
    pub max_in_flight: usize,

    /// The same bound in bytes (keys and values), so large messages cannot take the memory
    /// that `MAX_IN_FLIGHT` small ones would.
    #[arg(long, env = "MAX_IN_FLIGHT_BYTES", default_value_t = DEFAULT_MAX_IN_FLIGHT_BYTES)]
    pub max_in_flight_bytes: usize,

    /// How long an in-flight bound may hold with no message finishing before the partitions
    /// are paused (which keeps serving rebalances and `max.poll.interval.ms`, but drops what
    /// librdkafka fetched ahead).
    #[arg(long, env = "STALL_PAUSE_AFTER", default_value = DEFAULT_STALL_PAUSE_AFTER, value_parser = humantime::parse_duration)]
    pub stall_pause_after: Duration,

    /// Larger message values are rejected as oversize without being decoded.
    #[arg(long, env = "MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,

    /// How long SIGTERM/SIGINT waits for in-flight messages before committing and exiting.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = DEFAULT_SHUTDOWN_TIMEOUT, value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,

    /// After a fatal stop, how long `/metrics`, `/healthz` and `/readyz` keep answering (503 for
    /// the probes) before the process exits non-zero, so Prometheus scrapes the fatal-stop
    /// counter; a signal ends it early. `0s` exits at once.
    #[arg(long, env = "FATAL_LINGER", default_value = DEFAULT_FATAL_LINGER, value_parser = humantime::parse_duration)]
    pub fatal_linger: Duration,

    /// How long a partition revoke waits for that partition's messages, running and queued;
    /// with the 2 s wait for work still holding it, keep it below `max.poll.interval.ms`.
    #[arg(long, env = "REBALANCE_DRAIN_TIMEOUT", default_value = DEFAULT_REBALANCE_DRAIN_TIMEOUT, value_parser = humantime::parse_duration)]
    pub rebalance_drain_timeout: Duration,

    /// Apply pending migrations at start-up (safe with several replicas: advisory lock).
    #[arg(long, env = "MIGRATE_ON_START", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate_on_start: bool,

    #[command(flatten)]
    pub retry: RetryArgs,
}

/// Delayed retry tiers and the dead-letter topic.
#[derive(Args, Clone, Debug)]
pub struct RetryArgs {
    /// What this process consumes: `main` (input topics), `retry` (retry tiers) or `all`.
    #[arg(long, env = "AGENT_ROLE", value_enum, default_value = "all")]
    pub role: Role,

    /// Delay of each retry tier, comma list; the number of tiers follows the list. Tier topics
    /// are named `<input topic>.retry.<delay>` (e.g. `persistence.requests.retry.5m`).
    #[arg(long, env = "RETRY_DELAYS", default_value = DEFAULT_RETRY_DELAYS, value_parser = parse_duration_list)]
    pub retry_delays: DurationList,

    /// Tier topic names overriding the derived ones, comma list, one per `RETRY_DELAYS` entry;
    /// shared by every input topic.
    #[arg(long, env = "RETRY_TOPICS", value_delimiter = ',')]
    pub retry_topics: Vec<String>,

    /// Dead-letter topic overriding the derived `<input topic>.dlq`.
    #[arg(long, env = "DLQ_TOPIC")]
    pub dlq_topic: Option<String>,

    /// A message whose first failure is older than this goes to the dead-letter topic.
    #[arg(long, env = "GIVE_UP_AFTER", default_value = DEFAULT_GIVE_UP_AFTER, value_parser = humantime::parse_duration)]
    pub give_up_after: Duration,

    /// A key parked longer than this has lost its head (its tier was renamed by a changed
    /// `RETRY_DELAYS`, or its topic deleted): the reaper releases the requests parked behind it.
    /// Keep it above `GIVE_UP_AFTER` plus the longest tier delay.
    #[arg(long, env = "PARKED_KEY_TTL", default_value = DEFAULT_PARKED_KEY_TTL, value_parser = humantime::parse_duration)]
    pub parked_key_ttl: Duration,

    /// How often the parked-key gauges are refreshed and the reaper runs.
    #[arg(long, env = "REAPER_INTERVAL", default_value = DEFAULT_REAPER_INTERVAL, value_parser = humantime::parse_duration)]
    pub reaper_interval: Duration,

    /// Consumer group of the retry-tier consumers; defaults to `<KAFKA_GROUP_ID>.retry`.
    #[arg(long, env = "KAFKA_RETRY_GROUP_ID")]
    pub kafka_retry_group_id: Option<String>,

    /// Keep one key's requests in order while one of them waits in a retry tier (parking).
    #[arg(long, env = "ORDER_BY_KEY", default_value_t = true, action = clap::ArgAction::Set)]
    pub order_by_key: bool,

    /// Create missing retry-tier and dead-letter topics at start-up, with the input topic's
    /// partition count (so a key keeps its partition number).
    #[arg(long, env = "CREATE_RETRY_TOPICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub create_retry_topics: bool,
}

impl RunArgs {
    pub fn results_topic(&self) -> Option<&str> {
        Some(self.kafka_results_topic.trim()).filter(|t| !t.is_empty())
    }

    pub fn input_topics(&self) -> Vec<String> {
        self.kafka_input_topics
            .iter()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect()
    }

    pub fn retry_group_id(&self) -> String {
        self.retry
            .kafka_retry_group_id
            .clone()
            .filter(|g| !g.is_empty())
            .unwrap_or_else(|| format!("{}.retry", self.kafka_group_id))
    }
}

/// Settings that are not secret, for the start-up log line.
impl fmt::Debug for RunArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let passthrough_keys: Vec<String> = self
            .kafka
            .passthrough()
            .map(|m| m.into_keys().collect())
            .unwrap_or_default();
        f.debug_struct("RunArgs")
            .field("kafka_brokers", &self.kafka.kafka_brokers)
            .field("kafka_config_keys", &passthrough_keys)
            .field("group_id", &self.kafka_group_id)
            .field("input_topics", &self.kafka_input_topics)
            .field("results_topic", &self.kafka_results_topic)
            .field("results_format", &self.results_format)
            .field("schema_registry", &self.schema_registry_url.is_some())
            .field("database_schema", &self.db.database_schema)
            .field("pool_size", &self.db.database_pool_size)
            .field("statement_timeout", &self.statement_timeout)
            .field("txn_backoff", &self.txn_backoff.0)
            .field("workers", &self.workers)
            .field("batch_max", &self.batch_max)
            .field("batch_linger", &self.batch_linger)
            .field("batch_concurrency", &self.batch_concurrency)
            .field("max_in_flight", &self.max_in_flight)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DurationList(pub Vec<Duration>);

/// PostgreSQL takes 0 as "no timeout" and caps the setting near 24 days (doubled on retry):
/// accept 1 ms to 1 h.
pub fn parse_statement_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    match d >= Duration::from_millis(1) && d <= Duration::from_secs(3600) {
        true => Ok(d),
        false => Err(format!("{s:?} is outside 1ms..1h")),
    }
}

pub fn parse_duration_list(s: &str) -> Result<DurationList, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| humantime::parse_duration(p).map_err(|e| format!("{p:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()
        .map(DurationList)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passthrough_reaches_only_clients_that_understand_it() {
        assert!(ClientRole::Consumer.accepts("security.protocol"));
        assert!(ClientRole::Producer.accepts("sasl.password"));
        assert!(!ClientRole::Producer.accepts("session.timeout.ms"));
        assert!(!ClientRole::Consumer.accepts("compression.type"));
        assert!(ClientRole::Consumer.accepts("auto.commit.interval.ms"));
    }

    #[test]
    fn parses_backoff_list() {
        let l = parse_duration_list("100ms, 500ms,2s").unwrap();
        assert_eq!(
            l.0,
            vec![
                Duration::from_millis(100),
                Duration::from_millis(500),
                Duration::from_secs(2)
            ]
        );
        assert!(parse_duration_list("100 parsecs").is_err());
        assert!(parse_statement_timeout("0s").is_err());
        assert!(parse_statement_timeout("30d").is_err());
        assert_eq!(parse_statement_timeout("5s"), Ok(Duration::from_secs(5)));
    }
}
