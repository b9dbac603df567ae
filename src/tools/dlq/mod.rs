//! Dead-letter tools. `dlq list` summarises what is in the dead-letter topics by error class;
//! `dlq replay` re-publishes chosen dead letters to their original topic with fresh retry state.
//!
//! Replay is at most once per dead letter: each one gets an audit row under a unique index,
//! written in a transaction that commits only after the broker acknowledged the re-published
//! copy, and the replay group's committed offsets skip the prefix already handled.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};

use crate::message::headers::{self, parse_time, read_headers, RawHeaders};
use crate::ops::config::{
    ClientRole, DatabaseArgs, KafkaArgs, DEFAULT_GROUP_ID, DEFAULT_INPUT_TOPICS,
};

#[derive(Subcommand)]
pub enum DlqCommand {
    /// What the dead-letter topics hold, grouped by error class.
    List(ListArgs),
    /// Re-publish dead letters to their original topic.
    Replay(ReplayArgs),
}

/// Which dead-letter topics: `--topic`, or those derived from the input topics.
#[derive(Args, Clone)]
pub struct DlqTopics {
    #[command(flatten)]
    pub kafka: KafkaArgs,

    /// Input topics whose dead-letter topics to read (`<topic>.dlq`, or `DLQ_TOPIC`).
    #[arg(long, env = "KAFKA_INPUT_TOPICS", default_value = DEFAULT_INPUT_TOPICS, value_delimiter = ',')]
    pub kafka_input_topics: Vec<String>,

    /// Dead-letter topic overriding the derived names (as for `run`).
    #[arg(long, env = "DLQ_TOPIC")]
    pub dlq_topic: Option<String>,

    /// Read these dead-letter topics instead; repeatable.
    #[arg(long = "topic")]
    pub topics: Vec<String>,
}

impl DlqTopics {
    fn names(&self) -> Vec<String> {
        if !self.topics.is_empty() {
            return self.topics.clone();
        }
        let inputs: Vec<String> = self
            .kafka_input_topics
            .iter()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect();
        let dlq_override = self.dlq_topic.as_deref().filter(|t| !t.trim().is_empty());
        crate::route::dlq_topics(dlq_override, &inputs)
    }
}

#[derive(Args, Clone)]
pub struct ListArgs {
    #[command(flatten)]
    pub topics: DlqTopics,
}

#[derive(Args, Clone)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub topics: DlqTopics,

    #[command(flatten)]
    pub db: DatabaseArgs,

    /// Agent consumer group; the replay group is `<group>.dlq-replay`.
    #[arg(long, env = "KAFKA_GROUP_ID", default_value = DEFAULT_GROUP_ID)]
    pub kafka_group_id: String,

    /// Only dead letters of these error classes (`pa.error.class`); repeatable.
    #[arg(long = "class")]
    pub classes: Vec<String>,

    /// Only dead letters routed at or after this time: RFC 3339, or a duration ago (`2h`).
    #[arg(long, value_parser = parse_when)]
    pub since: Option<DateTime<Utc>>,

    /// Only dead letters routed before this time: RFC 3339, or a duration ago.
    #[arg(long, value_parser = parse_when)]
    pub until: Option<DateTime<Utc>>,

    /// Only dead letters with this message key.
    #[arg(long)]
    pub key: Option<String>,

    /// Replay at most this many.
    #[arg(long)]
    pub limit: Option<usize>,

    /// Print what would be replayed; publish, audit and commit nothing.
    #[arg(long)]
    pub dry_run: bool,
}

fn parse_when(s: &str) -> Result<DateTime<Utc>, String> {
    if let Some(t) = parse_time(s) {
        return Ok(t);
    }
    let ago = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?}: not RFC 3339 nor a duration ({e})"))?;
    Ok(Utc::now() - chrono::Duration::from_std(ago).map_err(|e| e.to_string())?)
}

pub async fn run(cmd: DlqCommand) -> anyhow::Result<()> {
    match cmd {
        DlqCommand::List(a) => list(&a).map(|s| print!("{s}")),
        DlqCommand::Replay(a) => replay(&a).await.map(|s| println!("{s}")),
    }
}

/// One dead letter as read.
pub(crate) struct DeadLetter {
    msg: OwnedMessage,
    /// Read once: every filter and the replayed copy look at them.
    headers: RawHeaders,
}

impl DeadLetter {
    fn new(msg: OwnedMessage) -> DeadLetter {
        let headers = msg
            .headers()
            .map(|hs| read_headers(hs.as_borrowed()))
            .unwrap_or_default();
        DeadLetter { msg, headers }
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    fn class(&self) -> String {
        self.header(headers::ERROR_CLASS)
            .unwrap_or_else(|| "unknown".into())
    }

    fn routed_at(&self) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp_millis(self.msg.timestamp().to_millis()?)
    }

    fn coordinates(&self) -> String {
        format!(
            "{}/{}/{}",
            self.msg.topic(),
            self.msg.partition(),
            self.msg.offset()
        )
    }
}

pub(crate) fn reader(kafka: &KafkaArgs, group: &str) -> anyhow::Result<BaseConsumer> {
    let defaults = [
        ("group.id", group),
        ("enable.auto.commit", "false"),
        ("enable.partition.eof", "false"),
    ];
    let mut cfg = kafka.client_config(ClientRole::Consumer, &defaults)?;
    cfg.set("group.id", group);
    Ok(cfg.create()?)
}

/// Reads every partition of `topic` from `start` (the group's committed offsets, or the
/// beginning) up to the end as of now, calling `each` in offset order per partition.
pub(crate) fn scan(
    consumer: &BaseConsumer,
    topic: &str,
    from_committed: bool,
    mut each: impl FnMut(DeadLetter) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
        return Ok(());
    };
    let mut ends: HashMap<i32, i64> = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in t.partitions() {
        let (low, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
        let start = match from_committed {
            true => committed(consumer, topic, p.id())?.unwrap_or(low).max(low),
            false => low,
        };
        if start < high {
            ends.insert(p.id(), high);
            tpl.add_partition_offset(topic, p.id(), Offset::Offset(start))?;
        }
    }
    if ends.is_empty() {
        return Ok(());
    }
    consumer.assign(&tpl)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !ends.is_empty() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "reading {topic} timed out with {} partitions unfinished",
            ends.len()
        );
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m?.detach();
        let (p, o) = (m.partition(), m.offset());
        if ends.get(&p).is_some_and(|end| o + 1 >= *end) {
            ends.remove(&p);
        }
        if !each(DeadLetter::new(m))? {
            break;
        }
    }
    consumer.unassign()?;
    Ok(())
}

pub(crate) fn committed(
    consumer: &BaseConsumer,
    topic: &str,
    p: i32,
) -> anyhow::Result<Option<i64>> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, p);
    let got = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok(match got.find_partition(topic, p).map(|e| e.offset()) {
        Some(Offset::Offset(o)) => Some(o),
        _ => None,
    })
}

mod list;
mod replay;

pub use list::list;
pub use replay::replay;
