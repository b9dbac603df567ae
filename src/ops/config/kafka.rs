//! Kafka client settings: the brokers, and the `KAFKA_CONFIG_*` pass-through to librdkafka,
//! split by what a consumer or a producer understands.

use std::collections::BTreeMap;

use clap::Args;

/// Prefix of environment variables passed verbatim to librdkafka:
/// `KAFKA_CONFIG_security.protocol=SASL_SSL` sets `security.protocol`;
/// `KAFKA_CONFIG_sasl.password_FILE=/path` reads `sasl.password` from a file.
pub const KAFKA_PASSTHROUGH_PREFIX: &str = "KAFKA_CONFIG_";

/// Kafka connection settings shared by every subcommand that talks to the brokers.
#[derive(Args, Clone)]
pub struct KafkaArgs {
    /// Bootstrap brokers, `host:port` comma list (required).
    #[arg(long, env = "KAFKA_BROKERS")]
    pub kafka_brokers: String,

    /// Extra librdkafka settings as `key=value`; repeatable. Environment variables named
    /// `KAFKA_CONFIG_<librdkafka key>` are added too (for TLS/SASL clusters).
    #[arg(long = "kafka-config", value_name = "KEY=VALUE")]
    pub kafka_config: Vec<String>,
}

impl KafkaArgs {
    /// librdkafka settings from `--kafka-config` and `KAFKA_CONFIG_*`, the flag winning.
    pub fn passthrough(&self) -> anyhow::Result<BTreeMap<String, String>> {
        let mut out: BTreeMap<String, String> = std::env::vars()
            .filter_map(|(k, v)| {
                k.strip_prefix(KAFKA_PASSTHROUGH_PREFIX)
                    .map(|key| (key.to_string(), v))
            })
            // `KAFKA_CONFIG_<key>_FILE` names a file for `<key>` (`secret_files`), not a setting.
            .filter(|(k, _)| !k.ends_with(super::secret_files::FILE_SUFFIX))
            .collect();
        for kv in &self.kafka_config {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--kafka-config expects key=value, got {kv:?}"))?;
            out.insert(k.trim().to_string(), v.to_string());
        }
        Ok(out)
    }

    /// Client settings: `defaults`, then the pass-through, which may override them. Settings
    /// that only the other kind of client understands are left out, so one pass-through serves
    /// both without librdkafka warnings.
    pub fn client_config(
        &self,
        role: ClientRole,
        defaults: &[(&str, &str)],
    ) -> anyhow::Result<rdkafka::ClientConfig> {
        let mut cfg = rdkafka::ClientConfig::new();
        cfg.set("bootstrap.servers", &self.kafka_brokers);
        for (k, v) in defaults {
            cfg.set(*k, *v);
        }
        for (k, v) in self.passthrough()? {
            if role.accepts(&k) {
                cfg.set(k, v);
            }
        }
        Ok(cfg)
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ClientRole {
    Consumer,
    Producer,
    Admin,
}

/// librdkafka settings only a consumer understands (prefixes).
const CONSUMER_ONLY: &[&str] = &[
    "group.",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "max.poll.interval.ms",
    "auto.commit.",
    "enable.auto.",
    "auto.offset.reset",
    "partition.assignment.strategy",
    "fetch.",
    "isolation.level",
    "enable.partition.eof",
    "check.crcs",
    "queued.",
    "consume.callback.max.messages",
    "coordinator.query.interval.ms",
];
/// librdkafka settings only a producer understands (prefixes).
const PRODUCER_ONLY: &[&str] = &[
    "acks",
    "request.required.acks",
    "linger.ms",
    "queue.buffering.",
    "batch.",
    "compression.",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "enable.idempotence",
    "transactional.id",
    "transaction.timeout.ms",
    "retries",
    "message.send.max.retries",
    "partitioner",
    "sticky.partitioning.linger.ms",
    "request.timeout.ms",
    "enable.gapless.guarantee",
    "queue.buffering.max.ms",
];

impl ClientRole {
    pub(crate) fn accepts(self, key: &str) -> bool {
        let any = |list: &[&str]| list.iter().any(|p| key.starts_with(p));
        match self {
            Self::Consumer => !any(PRODUCER_ONLY),
            Self::Producer => !any(CONSUMER_ONLY),
            Self::Admin => !any(PRODUCER_ONLY) && !any(CONSUMER_ONLY),
        }
    }
}
