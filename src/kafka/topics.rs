//! Topic administration: `persistence-agent topics` and the start-up creation of missing
//! retry-tier and dead-letter topics.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

use crate::ops::config::{ClientRole, KafkaArgs};
use crate::ops::kafka_health::QuietContext;

/// Creates `topics` (name, partitions, replication); existing ones are left alone. Returns
/// the names created.
pub async fn create(
    kafka: &KafkaArgs,
    topics: &[(String, i32, i32)],
) -> anyhow::Result<Vec<String>> {
    if topics.is_empty() {
        return Ok(vec![]);
    }
    let admin: AdminClient<QuietContext> = kafka
        .client_config(ClientRole::Admin, &[])?
        .create_with_context(QuietContext)?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|(t, p, r)| NewTopic::new(t, *p, TopicReplication::Fixed(*r)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let mut created = Vec::new();
    for result in admin.create_topics(&new, &opts).await? {
        match result {
            Ok(t) => created.push(t),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => anyhow::bail!("cannot create topic {t}: {e}"),
        }
    }
    Ok(created)
}

/// Partition count and replication factor of an existing topic.
pub fn shape(kafka: &KafkaArgs, topic: &str) -> anyhow::Result<(i32, i32)> {
    let client: BaseConsumer<QuietContext> = kafka
        .client_config(ClientRole::Admin, &[])?
        .create_with_context(QuietContext)?;
    let md = client.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(|| anyhow::anyhow!("topic {topic} not in metadata"))?;
    if let Some(e) = t.error() {
        anyhow::bail!("topic {topic}: {:?}", RDKafkaErrorCode::from(e));
    }
    let partitions = t.partitions().len() as i32;
    anyhow::ensure!(partitions > 0, "topic {topic} has no partitions");
    let replication = t.partitions()[0].replicas().len().max(1) as i32;
    Ok((partitions, replication))
}
