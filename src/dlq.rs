//! Dead-letter tools. `dlq list` summarises what is in the dead-letter topics by error class;
//! `dlq replay` re-publishes chosen dead letters to their original topic with fresh retry state.
//!
//! Replay is at most once per dead letter: each one gets an audit row under a unique index,
//! written in a transaction that commits only after the broker acknowledged the re-published
//! copy, and the replay group's committed offsets skip the prefix already handled.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::{ClientRole, DatabaseArgs, KafkaArgs, DEFAULT_GROUP_ID, DEFAULT_INPUT_TOPICS};
use crate::envelope::{format_time, header, parse_time, read_headers, RawHeaders};
use crate::route::send_acked;

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
struct DeadLetter {
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
        self.header(header::ERROR_CLASS)
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

fn reader(kafka: &KafkaArgs, group: &str) -> anyhow::Result<BaseConsumer> {
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
fn scan(
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

fn committed(consumer: &BaseConsumer, topic: &str, p: i32) -> anyhow::Result<Option<i64>> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, p);
    let got = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok(match got.find_partition(topic, p).map(|e| e.offset()) {
        Some(Offset::Offset(o)) => Some(o),
        _ => None,
    })
}

#[derive(Default)]
struct ClassSummary {
    count: u64,
    oldest: Option<DateTime<Utc>>,
    newest: Option<DateTime<Utc>>,
    codes: BTreeMap<String, u64>,
}

/// Per topic and error class: how many, routed when, with which codes.
pub fn list(args: &ListArgs) -> anyhow::Result<String> {
    let consumer = reader(
        &args.topics.kafka,
        &format!("persistence-agent.dlq-list.{}", std::process::id()),
    )?;
    let mut out = String::new();
    for topic in args.topics.names() {
        let mut classes: BTreeMap<String, ClassSummary> = BTreeMap::new();
        scan(&consumer, &topic, false, |d| {
            let s = classes.entry(d.class()).or_default();
            s.count += 1;
            if let Some(at) = d.routed_at() {
                s.oldest = Some(s.oldest.map_or(at, |o| o.min(at)));
                s.newest = Some(s.newest.map_or(at, |n| n.max(at)));
            }
            let code = d.header(header::ERROR_CODE).unwrap_or_default();
            *s.codes.entry(code).or_default() += 1;
            Ok(true)
        })?;
        let total: u64 = classes.values().map(|s| s.count).sum();
        out += &format!("{topic}: {total} dead letters\n");
        for (class, s) in &classes {
            let codes: Vec<String> = s.codes.iter().map(|(c, n)| format!("{c}×{n}")).collect();
            let when = |t: Option<DateTime<Utc>>| t.map(format_time).unwrap_or_default();
            out += &format!(
                "  {class:<28} {:>6}  {} .. {}  codes: {}\n",
                s.count,
                when(s.oldest),
                when(s.newest),
                codes.join(", ")
            );
        }
    }
    Ok(out)
}

impl ReplayArgs {
    fn matches(&self, d: &DeadLetter) -> bool {
        let class_ok = self.classes.is_empty() || self.classes.contains(&d.class());
        let at = d.routed_at();
        let since_ok = self.since.is_none_or(|s| at.is_some_and(|a| a >= s));
        let until_ok = self.until.is_none_or(|u| at.is_some_and(|a| a < u));
        let key_ok = self
            .key
            .as_ref()
            .is_none_or(|k| d.msg.key() == Some(k.as_bytes()));
        class_ok && since_ok && until_ok && key_ok
    }
}

/// Headers of the replayed copy: the message's own, its origin, and where it was replayed
/// from; retry state (attempt, first failure, due time, error) starts afresh.
fn replay_headers(d: &DeadLetter) -> OwnedHeaders {
    let mut hs = OwnedHeaders::new();
    for (k, v) in &d.headers {
        let keep = !k.starts_with(header::PREFIX) || k.starts_with("pa.original.");
        if keep {
            hs = hs.insert(Header {
                key: k,
                value: v.as_deref(),
            });
        }
    }
    let from = d.coordinates();
    hs.insert(Header {
        key: header::REPLAYED_FROM,
        value: Some(from.as_bytes()),
    })
}

#[derive(Default)]
struct Tally {
    replayed: usize,
    already: usize,
    skipped: usize,
    unroutable: usize,
}

/// Replays matching dead letters; returns a summary line.
pub async fn replay(args: &ReplayArgs) -> anyhow::Result<String> {
    let group = format!("{}.dlq-replay", args.kafka_group_id);
    let consumer = reader(&args.topics.kafka, &group)?;
    let producer =
        crate::results::producer_with(&args.topics.kafka, crate::results::ROUTE_PRODUCER)?;
    let pool = crate::db::pool(&args.db)?;
    let mut db = pool.get().await?;
    let mut tally = Tally::default();
    for topic in args.topics.names() {
        let mut picked: Vec<DeadLetter> = Vec::new();
        // Offsets to commit: per partition, the first dead letter not replayed (a filtered-out
        // one stays replayable by a later run with other filters).
        let mut first_kept: HashMap<i32, i64> = HashMap::new();
        let mut last_seen: HashMap<i32, i64> = HashMap::new();
        scan(&consumer, &topic, true, |d| {
            let p = d.msg.partition();
            last_seen.insert(p, d.msg.offset());
            let room = args.limit.is_none_or(|l| tally.replayed + picked.len() < l);
            if room && args.matches(&d) {
                picked.push(d);
            } else {
                tally.skipped += 1;
                first_kept.entry(p).or_insert(d.msg.offset());
            }
            Ok(true)
        })?;
        for d in &picked {
            let line = format!(
                "{} key={} class={} → {}",
                d.coordinates(),
                d.msg.key().map(String::from_utf8_lossy).unwrap_or_default(),
                d.class(),
                d.header(header::ORIGINAL_TOPIC)
                    .unwrap_or_else(|| "?".into())
            );
            if args.dry_run {
                println!("would replay {line}");
                tally.replayed += 1;
                continue;
            }
            match replay_one(&mut db, &producer, d).await? {
                Replayed::Done => {
                    println!("replayed {line}");
                    tally.replayed += 1;
                }
                Replayed::Already => tally.already += 1,
                Replayed::NoOrigin => {
                    tally.unroutable += 1;
                    first_kept
                        .entry(d.msg.partition())
                        .or_insert(d.msg.offset());
                }
            }
        }
        if !args.dry_run {
            commit_progress(&consumer, &topic, &first_kept, &last_seen)?;
        }
    }
    Ok(format!(
        "{} {}, {} already replayed earlier, {} not matching, {} not replayable (no pa.original.topic, or value dropped)",
        if args.dry_run {
            "would replay"
        } else {
            "replayed"
        },
        tally.replayed,
        tally.already,
        tally.skipped,
        tally.unroutable
    ))
}

enum Replayed {
    Done,
    Already,
    NoOrigin,
}

async fn replay_one(
    db: &mut deadpool_postgres::Object,
    producer: &rdkafka::producer::FutureProducer,
    d: &DeadLetter,
) -> anyhow::Result<Replayed> {
    let Some(target) = d.header(header::ORIGINAL_TOPIC) else {
        eprintln!(
            "{}: no pa.original.topic header; left in place",
            d.coordinates()
        );
        return Ok(Replayed::NoOrigin);
    };
    if let Some(why) = d.header(header::VALUE_DROPPED) {
        eprintln!(
            "{}: its value was dropped ({why}); left in place",
            d.coordinates()
        );
        return Ok(Replayed::NoOrigin);
    }
    let tx = db.transaction().await?;
    let detail = serde_json::json!({
        "replayedTo": target,
        "originalPartition": d.header(header::ORIGINAL_PARTITION),
        "originalOffset": d.header(header::ORIGINAL_OFFSET),
        "errorClass": d.header(header::ERROR_CLASS),
        "errorCode": d.header(header::ERROR_CODE),
    });
    let inserted = tx
        .execute(
            "INSERT INTO audit_log (entity_type, entity_id, action, new_data)
             VALUES ('dead_letter', $1, 'replayed', $2)
             ON CONFLICT (entity_id) WHERE entity_type = 'dead_letter' AND action = 'replayed' DO NOTHING",
            &[&d.coordinates(), &detail],
        )
        .await?;
    if inserted == 0 {
        return Ok(Replayed::Already);
    }
    let mut record = FutureRecord::to(&target)
        .payload(d.msg.payload().unwrap_or_default())
        .headers(replay_headers(d));
    if let Some(k) = d.msg.key() {
        record = record.key(k);
    }
    send_acked(producer, record)
        .await
        .map_err(|e| anyhow::anyhow!("re-publishing {} to {target}: {e}", d.coordinates()))?;
    tx.commit().await?;
    Ok(Replayed::Done)
}

fn commit_progress(
    consumer: &BaseConsumer,
    topic: &str,
    first_kept: &HashMap<i32, i64>,
    last_seen: &HashMap<i32, i64>,
) -> anyhow::Result<()> {
    let mut tpl = TopicPartitionList::new();
    for (p, last) in last_seen {
        let next = first_kept.get(p).copied().unwrap_or(last + 1);
        tpl.add_partition_offset(topic, *p, Offset::Offset(next))?;
    }
    if tpl.count() > 0 {
        consumer.commit(&tpl, CommitMode::Sync)?;
    }
    Ok(())
}
