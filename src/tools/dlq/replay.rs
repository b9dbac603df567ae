//! `dlq replay`: re-publishes chosen dead letters to their original topic with fresh retry
//! state, at most once each (an audit row under a unique index commits only after the broker
//! acknowledged the copy).

use std::collections::HashMap;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};

use super::{reader, scan, DeadLetter, ReplayArgs};
use crate::message::headers;
use crate::route::send_acked;

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
        let keep = !k.starts_with(headers::PREFIX) || k.starts_with("pa.original.");
        if keep {
            hs = hs.insert(Header {
                key: k,
                value: v.as_deref(),
            });
        }
    }
    let from = d.coordinates();
    hs.insert(Header {
        key: headers::REPLAYED_FROM,
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
    let producer = crate::route::producer::producer_with(
        &args.topics.kafka,
        crate::route::producer::ROUTE_PRODUCER,
    )?;
    let pool = crate::persist::db::pool(&args.db)?;
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
                d.header(headers::ORIGINAL_TOPIC)
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
    producer: &crate::route::producer::FutureProducer,
    d: &DeadLetter,
) -> anyhow::Result<Replayed> {
    let Some(target) = d.header(headers::ORIGINAL_TOPIC) else {
        eprintln!(
            "{}: no pa.original.topic header; left in place",
            d.coordinates()
        );
        return Ok(Replayed::NoOrigin);
    };
    if let Some(why) = d.header(headers::VALUE_DROPPED) {
        eprintln!(
            "{}: its value was dropped ({why}); left in place",
            d.coordinates()
        );
        return Ok(Replayed::NoOrigin);
    }
    let tx = db.transaction().await?;
    let detail = serde_json::json!({
        "replayedTo": target,
        "originalPartition": d.header(headers::ORIGINAL_PARTITION),
        "originalOffset": d.header(headers::ORIGINAL_OFFSET),
        "errorClass": d.header(headers::ERROR_CLASS),
        "errorCode": d.header(headers::ERROR_CODE),
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
