//! The agent in-process: its settings for an `Env`, start with or without its HTTP endpoints,
//! stop; and reading those endpoints (GET, Prometheus samples).

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use persistence_agent::app::agent::Agent;
use persistence_agent::ops::config::RunArgs;
use persistence_agent::ops::metrics::Metrics;

use super::Env;

impl Env {
    /// Agent settings for this environment; `extra` are further `--flag value` pairs.
    pub fn run_args(&self, extra: &[&str]) -> RunArgs {
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            run: RunArgs,
        }
        let mut argv = vec![
            "test".to_string(),
            format!("--kafka-brokers={}", self.brokers),
            format!("--database-url={}", self.db_url),
            format!("--database-schema={}", self.schema),
            format!("--kafka-group-id={}", self.group),
            format!("--kafka-input-topics={}", self.topic),
            format!("--kafka-results-topic={}", self.results),
            "--http-addr=127.0.0.1:0".into(),
            "--shutdown-timeout=20s".into(),
            "--kafka-config=auto.commit.interval.ms=500".into(),
            "--kafka-config=session.timeout.ms=10000".into(),
            // Also the rebalance timeout: how long a join may wait for a member that died.
            "--kafka-config=max.poll.interval.ms=15000".into(),
        ];
        // A flag given in `extra` replaces the harness's default (pass-through settings add up).
        let flag = |a: &str| a.split('=').next().unwrap_or_default().to_string();
        let given: Vec<String> = extra.iter().map(|a| flag(a)).collect();
        argv.retain(|a| {
            a == "test" || a.starts_with("--kafka-config") || !given.contains(&flag(a))
        });
        argv.extend(extra.iter().map(|s| s.to_string()));
        Wrap::try_parse_from(argv)
            .expect("test arguments parse")
            .run
    }

    pub async fn start(&self, extra: &[&str]) -> Agent {
        Agent::start(self.run_args(extra), Arc::new(Metrics::new()))
            .await
            .expect("agent starts")
    }

    /// Starts the agent with its HTTP endpoints on a free port; returns the base URL too.
    pub async fn start_with_http(&self, extra: &[&str]) -> (Agent, String) {
        start_with_http(self.run_args(extra)).await
    }
}

/// Starts an agent from `args` with its HTTP endpoints on a free port; returns the base URL too.
pub async fn start_with_http(args: RunArgs) -> (Agent, String) {
    let agent = Agent::start(args, Arc::new(Metrics::new()))
        .await
        .expect("agent starts");
    let listener = persistence_agent::app::http::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let state = persistence_agent::app::http::HttpState::of(&agent);
    tokio::spawn(persistence_agent::app::http::serve(
        listener,
        state,
        agent.shutdown.clone(),
    ));
    (agent, url)
}

pub async fn stop(agent: Agent) {
    agent.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(60), agent.wait())
        .await
        .expect("agent stops within 60s")
        .expect("agent stops cleanly");
}

/// GET `url`: (status, body).
pub async fn http_get(url: &str) -> (u16, String) {
    let resp = reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// The value of sample `name` with exactly `labels` in a Prometheus text exposition, if present.
pub fn sample(exposition: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    want.sort();
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
            let mut got: Vec<String> = rest
                .trim_end_matches('}')
                .split(',')
                .filter(|p| !p.is_empty())
                .map(str::to_string)
                .collect();
            got.sort();
            (n == name && got == want).then(|| value.parse().unwrap())
        })
}
