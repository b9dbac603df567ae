//! `dlq list`: per dead-letter topic and error class, how many, routed when, with which codes.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::{reader, scan, ListArgs};
use crate::message::headers::{self, format_time};

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
            let code = d.header(headers::ERROR_CODE).unwrap_or_default();
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
