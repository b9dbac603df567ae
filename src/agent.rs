//! Wiring: builds the stages from configuration and runs them until shutdown.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio_util::sync::CancellationToken;

use crate::config::{ClientRole, RunArgs};
use crate::consume::{self, AgentContext, PollLoop, Shared};
use crate::decode::Decoder;
use crate::metrics::Metrics;
use crate::persist::Persister;
use crate::pipeline::Pipeline;
use crate::results::{self, ResultPublisher};
use crate::schemas::SchemaRegistry;

/// A running agent. `shutdown` starts a graceful stop; `wait` returns when it finished.
pub struct Agent {
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    pub shared: Arc<Shared>,
    pub pipeline: Arc<Pipeline>,
    fatal: Arc<OnceLock<String>>,
    poll: Option<tokio::task::JoinHandle<()>>,
}

/// Dropping an agent (a panicking test, an aborted caller) stops its poll thread too.
impl Drop for Agent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Agent {
    pub async fn start(args: RunArgs, metrics: Arc<Metrics>) -> anyhow::Result<Agent> {
        let pool = crate::db::pool(&args.db)?;
        if args.migrate_on_start {
            let applied = crate::db::migrate(&pool).await?;
            tracing::info!(?applied, "migrations applied");
        }
        let shutdown = CancellationToken::new();
        let fatal = Arc::new(OnceLock::new());
        let pipeline = Arc::new(pipeline(
            &args,
            pool,
            metrics.clone(),
            shutdown.clone(),
            fatal.clone(),
        )?);

        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let shared = Arc::new(Shared::new(
            done_rx,
            args.rebalance_drain_timeout,
            metrics.clone(),
        ));
        let consumer = consumer(&args, shared.clone())?;
        let workers = (0..args.workers.max(1))
            .map(|_| {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                tokio::spawn(consume::worker(
                    rx,
                    pipeline.clone(),
                    shared.clone(),
                    done_tx.clone(),
                ));
                tx
            })
            .collect();
        let poll_loop = PollLoop {
            consumer: Arc::new(consumer),
            shared: shared.clone(),
            workers,
            shutdown: shutdown.clone(),
            max_in_flight: args.max_in_flight.max(1),
            shutdown_timeout: args.shutdown_timeout,
            fatal: fatal.clone(),
        };
        let poll = tokio::task::spawn_blocking(move || poll_loop.run());
        Ok(Agent {
            metrics,
            shutdown,
            shared,
            pipeline,
            fatal,
            poll: Some(poll),
        })
    }

    /// Waits for the poll loop to finish (after `shutdown` or a fatal error).
    pub async fn wait(mut self) -> anyhow::Result<()> {
        if let Some(poll) = self.poll.take() {
            poll.await?;
        }
        match self.fatal.get() {
            Some(reason) => anyhow::bail!("stopped on a fatal error: {reason}"),
            None => Ok(()),
        }
    }

    pub fn joined(&self) -> bool {
        self.shared.joined.load(Ordering::Acquire)
    }
}

fn pipeline(
    args: &RunArgs,
    pool: deadpool_postgres::Pool,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    fatal: Arc<OnceLock<String>>,
) -> anyhow::Result<Pipeline> {
    let registry = match &args.schema_registry_url {
        Some(url) if !url.is_empty() => SchemaRegistry::remote(url)?,
        _ => SchemaRegistry::local()?,
    };
    let backoff = args.txn_backoff.0.clone();
    let producer = results::producer(&args.kafka)?;
    let topic = args.results_topic().map(str::to_string);
    Ok(Pipeline {
        decoder: Decoder::new(registry)?,
        persister: Persister::new(
            pool,
            args.statement_timeout,
            backoff.clone(),
            metrics.clone(),
        ),
        results: ResultPublisher::new(producer, topic, args.results_format, metrics.clone())?,
        metrics,
        max_message_bytes: args.max_message_bytes,
        shutdown,
        fatal,
        outage_waiters: Default::default(),
    })
}

fn consumer(args: &RunArgs, shared: Arc<Shared>) -> anyhow::Result<BaseConsumer<AgentContext>> {
    let defaults = [
        ("group.id", args.kafka_group_id.as_str()),
        ("client.id", "persistence-agent"),
        ("enable.auto.commit", "true"),
        ("auto.commit.interval.ms", "5000"),
        ("auto.offset.reset", "earliest"),
        ("enable.partition.eof", "false"),
        ("statistics.interval.ms", "15000"),
    ];
    let mut cfg = args.kafka.client_config(ClientRole::Consumer, &defaults)?;
    // Not overridable: offsets are stored only once a message's outcome is durable.
    cfg.set("enable.auto.offset.store", "false");
    let consumer: BaseConsumer<AgentContext> = cfg.create_with_context(AgentContext { shared })?;
    let topics: Vec<&str> = args
        .kafka_input_topics
        .iter()
        .map(String::as_str)
        .filter(|t| !t.is_empty())
        .collect();
    anyhow::ensure!(!topics.is_empty(), "KAFKA_INPUT_TOPICS names no topic");
    consumer.subscribe(&topics)?;
    Ok(consumer)
}
