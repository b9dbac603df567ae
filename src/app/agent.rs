//! Wiring: builds the stages from configuration and runs them until shutdown.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio_util::sync::CancellationToken;

use crate::decode::schemas::SchemaRegistry;
use crate::decode::Decoder;
use crate::kafka::due::DueGate;
use crate::kafka::worker::worker;
use crate::kafka::{AgentContext, Limits, PollLoop, Shared};
use crate::ops::config::{ClientRole, RunArgs, DEFAULT_QUEUED_MAX_KBYTES};
use crate::ops::lifecycle::Lifecycle;
use crate::ops::metrics::Metrics;
use crate::ops::{errors, kafka_health};
use crate::persist::{BatchConfig, Persister};
use crate::pipeline::Pipeline;
use crate::route::producer;
use crate::route::results::ResultPublisher;
use crate::route::{Router, Topology};

/// A running agent. `shutdown` starts a graceful stop; `wait` returns when it finished.
pub struct Agent {
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    /// One per consumer: `main` (input topics) and/or `retry` (retry tiers), by `AGENT_ROLE`.
    pub consumers: Vec<Arc<Shared>>,
    pub pipeline: Arc<Pipeline>,
    /// Shutdown and fatal-error state, shared by every stage.
    pub life: Arc<Lifecycle>,
    polls: Vec<tokio::task::JoinHandle<()>>,
}

/// Dropping an agent (a panicking test, an aborted caller) stops its poll threads too.
impl Drop for Agent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Agent {
    pub async fn start(args: RunArgs, metrics: Arc<Metrics>) -> anyhow::Result<Agent> {
        // Stops with the agent, or at once when start-up fails.
        let probing = CancellationToken::new();
        let stop_probing = probing.clone().drop_guard();
        watch_kafka(&args, probing.clone());
        let target = errors::database_target(&args.db.database_url);
        let pool =
            crate::persist::db::pool(&args.db).with_context(|| format!("database at {target}"))?;
        if args.migrate_on_start {
            let applied = crate::persist::db::migrate(&pool)
                .await
                .with_context(|| format!("migrating the database at {target}"))?;
            tracing::info!(?applied, "migrations applied");
        }
        let topology = Topology::new(&args.retry)?;
        if args.retry.create_retry_topics {
            create_retry_topics(&args, &topology).await?;
        }
        let life = Lifecycle::new(metrics.clone());
        let pipeline = Arc::new(pipeline(
            &args,
            pool,
            topology.clone(),
            metrics.clone(),
            life.clone(),
        )?);
        let inputs = args.input_topics();
        anyhow::ensure!(!inputs.is_empty(), "KAFKA_INPUT_TOPICS names no topic");
        let mut plans: Vec<(&'static str, String, Vec<String>, Option<DueGate>)> = Vec::new();
        if args.retry.role.main() {
            plans.push(("main", args.kafka_group_id.clone(), inputs.clone(), None));
        }
        if args.retry.role.retry() && topology.tiers() > 0 {
            let tiers = topology.retry_topics(&inputs);
            let names = tiers.iter().map(|(t, _)| t.clone()).collect();
            plans.push((
                "retry",
                args.retry_group_id(),
                names,
                Some(DueGate::new(&tiers)),
            ));
        }
        let tasks = plans.len() * args.workers.max(1);
        // Batched, workers wait for their batch, not for a connection: only unbatched is it news.
        if args.batch_max == 1 && tasks > args.db.database_pool_size {
            tracing::info!(
                workers = tasks,
                pool = args.db.database_pool_size,
                "more workers than pooled connections: workers wait for a connection (not an \
                 outage); raise DATABASE_POOL_SIZE to run them all at once"
            );
        }
        // Lanes holding every connection leave none for a failed batch's requests (each written
        // alone), claims and parking: those wait out the pool's timeout instead.
        if args.batch_max > 1 && args.batch_concurrency >= args.db.database_pool_size {
            tracing::warn!(
                batch_concurrency = args.batch_concurrency,
                pool = args.db.database_pool_size,
                "batch transactions can hold every pooled connection; keep BATCH_CONCURRENCY \
                 below DATABASE_POOL_SIZE"
            );
        }
        // What the first requests would otherwise wait for: as many connections as the batch
        // lanes use, and one for claims and parking (or one per worker, unbatched), each with
        // its statements prepared. Not the whole pool: replicas would hold idle connections.
        let wanted = if args.batch_max > 1 {
            args.batch_concurrency + 1
        } else {
            tasks
        };
        let started = std::time::Instant::now();
        let warmed = pipeline.persister.warm(wanted).await;
        tracing::info!(connections = warmed, elapsed = ?started.elapsed(), "database connections warmed");
        if args.retry.order_by_key {
            tokio::spawn(reaper(
                pipeline.clone(),
                args.retry.parked_key_ttl,
                args.retry.reaper_interval,
            ));
        }
        let mut consumers = Vec::new();
        let mut polls = Vec::new();
        for (name, group, topics, gate) in plans {
            let (shared, poll) = start_consumer(&args, name, &group, &topics, gate, &pipeline)?;
            consumers.push(shared);
            polls.push(poll);
        }
        stop_probing.disarm();
        let shutdown = life.shutdown.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            probing.cancel();
        });
        Ok(Agent {
            metrics,
            shutdown: life.shutdown.clone(),
            consumers,
            pipeline,
            life,
            polls,
        })
    }

    /// Waits for the poll loops to finish (after `shutdown` or a fatal error).
    pub async fn wait(mut self) -> anyhow::Result<()> {
        for poll in std::mem::take(&mut self.polls) {
            poll.await?;
        }
        match self.life.fatal() {
            Some(reason) => anyhow::bail!("stopped on a fatal error: {reason}"),
            None => Ok(()),
        }
    }

    /// Whether every consumer has joined its group.
    pub fn joined(&self) -> bool {
        self.consumers
            .iter()
            .all(|c| c.joined.load(Ordering::Acquire))
    }
}

/// The consumers wait for Kafka without a word while an address accepts connections but never
/// answers, and say nothing when it comes back before they join: a probe beside them warns
/// within seconds, naming the address, and keeps probing until the brokers answer.
fn watch_kafka(args: &RunArgs, stop: CancellationToken) {
    let kafka = args.kafka.clone();
    tokio::spawn(async move {
        let mut warned = false;
        loop {
            let probe = kafka_health::probe(&kafka, kafka_health::PROBE_TIMEOUT);
            let answered = tokio::select! {
                _ = stop.cancelled() => return,
                r = probe => r,
            };
            match answered {
                Ok(()) => return kafka_health::healthy(),
                Err(e) if !warned => {
                    warned = true;
                    tracing::warn!(error = %e, "kafka does not answer yet; the agent keeps trying")
                }
                Err(_) => {}
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(kafka_health::PROBE_TIMEOUT) => {}
            }
        }
    });
}

/// Refreshes the parked-key gauges and releases keys whose head is lost, every `interval`
/// until shutdown.
async fn reaper(pipeline: Arc<Pipeline>, ttl: std::time::Duration, interval: std::time::Duration) {
    loop {
        match pipeline.reap_parked(ttl).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(keys = n, "released parked keys whose head was lost"),
            Err(f) => {
                tracing::debug!(class = f.class, error = %f.message, "parked-key reaper skipped a run")
            }
        }
        tokio::select! {
            _ = pipeline.life.shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// One consumer with its workers and poll thread.
fn start_consumer(
    args: &RunArgs,
    name: &'static str,
    group: &str,
    topics: &[String],
    gate: Option<DueGate>,
    pipeline: &Arc<Pipeline>,
) -> anyhow::Result<(Arc<Shared>, tokio::task::JoinHandle<()>)> {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let shared = Arc::new(Shared::new(
        name,
        done_rx,
        args.rebalance_drain_timeout,
        pipeline.metrics.clone(),
    ));
    let consumer = consumer(args, group, topics, shared.clone())?;
    let workers = (0..args.workers.max(1))
        .map(|_| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(worker(
                rx,
                pipeline.clone(),
                pipeline.life.clone(),
                shared.clone(),
                done_tx.clone(),
            ));
            tx
        })
        .collect();
    let limits = Limits {
        max_in_flight: args.max_in_flight,
        max_in_flight_bytes: args.max_in_flight_bytes,
        stall_pause_after: args.stall_pause_after,
        shutdown_timeout: args.shutdown_timeout,
    };
    let life = pipeline.life.clone();
    let poll_loop = PollLoop::new(consumer, shared.clone(), workers, life, limits, gate);
    tracing::info!(consumer = name, group, ?topics, "consumer starting");
    Ok((shared, tokio::task::spawn_blocking(move || poll_loop.run())))
}

/// Creates missing tier and dead-letter topics shaped like their input topic, so a key keeps
/// its partition number on every hop.
async fn create_retry_topics(args: &RunArgs, topology: &Topology) -> anyhow::Result<()> {
    let mut wanted = Vec::new();
    for input in args.input_topics() {
        let (partitions, replication) = crate::kafka::topics::shape(&args.kafka, &input)
            .map_err(|e| anyhow::anyhow!("input topic {input}: {e}"))?;
        let single = [input.clone()];
        let derived = topology
            .retry_topics(&single)
            .into_iter()
            .map(|(t, _)| t)
            .chain(topology.dlq_topics(&single));
        for t in derived {
            if !wanted.iter().any(|(w, _, _)| *w == t) {
                wanted.push((t, partitions, replication));
            }
        }
    }
    let created = crate::kafka::topics::create(&args.kafka, &wanted).await?;
    if !created.is_empty() {
        tracing::info!(?created, "retry and dead-letter topics created");
    }
    Ok(())
}

fn pipeline(
    args: &RunArgs,
    pool: deadpool_postgres::Pool,
    topology: Topology,
    metrics: Arc<Metrics>,
    life: Arc<Lifecycle>,
) -> anyhow::Result<Pipeline> {
    let registry = match &args.schema_registry_url {
        Some(url) if !url.is_empty() => SchemaRegistry::remote(url)?,
        _ => SchemaRegistry::local()?,
    };
    let backoff = args.txn_backoff.0.clone();
    let producer = producer::producer(&args.kafka)?;
    let topic = args.results_topic().map(str::to_string);
    let router = Router::new(
        producer::producer_with(&args.kafka, producer::ROUTE_PRODUCER)?,
        topology,
        args.kafka_group_id.clone(),
        args.retry.give_up_after,
    );
    Ok(Pipeline {
        decoder: Decoder::new(registry, args.max_message_bytes)?,
        persister: Persister::new(
            pool,
            args.statement_timeout,
            backoff.clone(),
            metrics.clone(),
            BatchConfig {
                max: args.batch_max,
                linger: args.batch_linger,
                concurrency: args.batch_concurrency,
            },
        ),
        results: ResultPublisher::new(producer, topic, args.results_format, metrics.clone())?,
        router,
        metrics,
        max_message_bytes: args.max_message_bytes,
        order_by_key: args.retry.order_by_key,
        trust: crate::message::envelope::Trust::new(args.input_topics()),
        life,
    })
}

fn consumer(
    args: &RunArgs,
    group: &str,
    topics: &[String],
    shared: Arc<Shared>,
) -> anyhow::Result<BaseConsumer<AgentContext>> {
    let defaults = [
        ("group.id", group),
        ("client.id", "persistence-agent"),
        ("enable.auto.commit", "true"),
        ("auto.commit.interval.ms", "5000"),
        ("auto.offset.reset", "earliest"),
        ("enable.partition.eof", "false"),
        ("statistics.interval.ms", "15000"),
        // librdkafka's prefetch queue, per consumer (its default is 64 MiB): with the agent's
        // own in-flight bound it caps the memory a backlog can take.
        ("queued.max.messages.kbytes", DEFAULT_QUEUED_MAX_KBYTES),
        // A subscribed topic created after the consumer started (a retry tier an operator
        // creates late) is assigned at the next metadata refresh: librdkafka's 5 min would
        // leave its copies unread that long.
        ("topic.metadata.refresh.interval.ms", "30000"),
    ];
    let mut cfg = args.kafka.client_config(ClientRole::Consumer, &defaults)?;
    // Not overridable: offsets are stored only once a message's outcome is durable.
    cfg.set("enable.auto.offset.store", "false");
    // The retry consumer's group is its own, whatever the pass-through says.
    cfg.set("group.id", group);
    let consumer: BaseConsumer<AgentContext> = cfg.create_with_context(AgentContext { shared })?;
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    Ok(consumer)
}
