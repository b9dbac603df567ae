//! The persistence-agent binary: the command line (run, migrate, produce, dlq, health,
//! topics) over the library.

use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use persistence_agent::app::agent::Agent;
use persistence_agent::app::http;
use persistence_agent::kafka::topics;
use persistence_agent::ops::config::{DatabaseArgs, KafkaArgs, LogFormat, RunArgs};
use persistence_agent::ops::metrics::Metrics;
use persistence_agent::ops::{errors, kafka_health};
use persistence_agent::persist::db;
use persistence_agent::tools::{dlq, produce};
use tracing_subscriber::EnvFilter;

/// Consumes persistence requests from Kafka and writes each to PostgreSQL in one serializable
/// transaction, effectively once.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format: `json` (one object per line) or `pretty`. Levels come from `RUST_LOG`.
    #[arg(
        long,
        env = "LOG_FORMAT",
        value_enum,
        default_value = "json",
        global = true
    )]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent until SIGTERM/SIGINT.
    Run(Box<RunArgs>),
    /// Apply pending database migrations and exit.
    Migrate {
        #[command(flatten)]
        db: DatabaseArgs,
        /// Also insert the 100-book sample catalogue used by `produce --sample`.
        #[arg(long)]
        sample_catalogue: bool,
    },
    /// Publish requests from JSON files, stdin, or a sample generator.
    Produce(produce::ProduceArgs),
    /// Inspect and replay the dead-letter topics.
    Dlq {
        #[command(subcommand)]
        command: dlq::DlqCommand,
    },
    /// Exit 0 when the agent at `--url` answers 200: a container health check that needs no
    /// shell or curl in the image.
    Health {
        #[arg(long, default_value = "http://127.0.0.1:8080/readyz")]
        url: String,
    },
    /// Create topics (existing ones are left alone).
    Topics {
        #[command(flatten)]
        kafka: KafkaArgs,
        #[arg(long, default_value_t = 6)]
        partitions: i32,
        #[arg(long, default_value_t = 1)]
        replication: i32,
        /// Topic names, e.g. `persistence.requests persistence.results`.
        #[arg(required = true)]
        topics: Vec<String>,
    },
}

fn init_logs(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,librdkafka=warn,rdkafka=warn,tokio_postgres=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Pretty => builder.init(),
    }
}

// glibc's malloc and free were about 29 % of the batched agent's CPU in a perf profile;
// jemalloc, as Vector ships, cut the agent's cores by about a sixth in alternating bench runs,
// peak RSS within the same range (BENCHMARKS.md, fourth session). Prefixed on Linux: only
// Rust allocations use it, librdkafka keeps glibc's malloc.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    // Before the runtime's threads exist: it sets environment variables.
    if let Err(e) = persistence_agent::ops::config::secret_files::resolve() {
        eprintln!("persistence-agent: {}", errors::render_anyhow(&e));
        return std::process::ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts")
        .block_on(agent_main(cli))
}

async fn agent_main(cli: Cli) -> std::process::ExitCode {
    init_logs(cli.log_format);
    match dispatch(cli.command).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(
                error = errors::render_anyhow(&e),
                "persistence-agent failed"
            );
            std::process::ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(args) => run(*args).await,
        Command::Migrate {
            db,
            sample_catalogue,
        } => {
            let target = errors::database_target(&db.database_url);
            let pool = db::pool(&db).with_context(|| format!("database at {target}"))?;
            let applied = db::migrate(&pool)
                .await
                .with_context(|| format!("migrating the database at {target}"))?;
            if sample_catalogue {
                db::insert_sample_catalogue(&pool).await?;
            }
            println!("migrations applied: {applied:?}");
            Ok(())
        }
        Command::Produce(args) => produce::run(args).await,
        Command::Dlq { command } => dlq::run(command).await,
        Command::Health { url } => health(&url).await,
        Command::Topics {
            kafka,
            partitions,
            replication,
            topics,
        } => create_topics(&kafka, &topics, partitions, replication).await,
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    tracing::info!(config = ?args, version = env!("CARGO_PKG_VERSION"), "starting");
    let metrics = Arc::new(Metrics::new());
    // Bound before the agent starts, so a taken port fails fast.
    let listener = http::bind(args.http_addr).await?;
    let agent = Agent::start(args.clone(), metrics).await?;
    let http_stop = tokio_util::sync::CancellationToken::new();
    let state = http::HttpState::of(&agent);
    let server = tokio::spawn(http::serve(listener, state, http_stop.clone()));
    let shutdown = agent.shutdown.clone();
    let signalled = tokio_util::sync::CancellationToken::new();
    let on_signal = signalled.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received: stopping consumption");
        on_signal.cancel();
        shutdown.cancel();
    });
    let outcome = agent.wait().await;
    // After a signal (even one during the drain) the orchestrator wants the process gone.
    if outcome.is_err() && !args.fatal_linger.is_zero() && !signalled.is_cancelled() {
        tracing::info!(linger = ?args.fatal_linger, "serving /metrics before exiting on the fatal error");
        tokio::select! {
            _ = tokio::time::sleep(args.fatal_linger) => {}
            _ = signalled.cancelled() => {}
        }
    }
    http_stop.cancel();
    if let Ok(Err(e)) = server.await {
        tracing::error!(error = %e, "http server failed");
    }
    outcome
}

async fn health(url: &str) -> anyhow::Result<()> {
    let resp = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(3))
        .build()?
        .get(url)
        .send()
        .await?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    anyhow::ensure!(status.is_success(), "{url}: {status} {}", body.trim());
    println!("{}", body.trim());
    Ok(())
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler installs");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

async fn create_topics(
    kafka: &KafkaArgs,
    topics: &[String],
    partitions: i32,
    replication: i32,
) -> anyhow::Result<()> {
    kafka_health::probe(kafka, kafka_health::PROBE_TIMEOUT).await?;
    let wanted: Vec<(String, i32, i32)> = topics
        .iter()
        .map(|t| (t.clone(), partitions, replication))
        .collect();
    let created = topics::create(kafka, &wanted).await?;
    for t in topics {
        match created.contains(t) {
            true => println!("created {t}"),
            false => println!("exists {t}"),
        }
    }
    Ok(())
}
