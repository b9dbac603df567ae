//! Result-event delivery under broker faults, injected with librdkafka's mock cluster: a failed
//! delivery holds the message's offset and is sent again (confirmations are at least once), and
//! a fatal producer error stops the agent with nothing unfinished committed.

mod common;

use common::{http_get, json, request, wait_for, Env};
use persistence_agent::app::agent::Agent;
use persistence_agent::app::http::{bind, serve, HttpState};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use tokio_util::sync::CancellationToken;

const ARGS: &[&str] = &["--retry-delays=1h", "--create-retry-topics=false"];

type Cluster = MockCluster<'static, rdkafka::producer::DefaultProducerContext>;

/// An environment on the mock cluster, with one request `r1` of user `u1` for `book`.
async fn env_on(cluster: &Cluster, book: &str) -> Env {
    let env = Env::without_topics(common::database_url(), cluster.bootstrap_servers()).await;
    for t in [&env.topic, &env.results, &env.dlq(), &env.tier_topic("1h")] {
        cluster.create_topic(t, 1, 1).unwrap();
    }
    env.books(&["b1"]).await;
    env.produce("u1", &json(request("u1", Some("r1"), &[(book, 0.5)])))
        .await;
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_result_delivery_holds_the_offset_and_is_sent_again() {
    let cluster = MockCluster::new(1).unwrap();
    let env = env_on(&cluster, "b1").await;
    // The next three produce requests (all the results producer's) are refused for good.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 3],
    );
    let agent = env.start(ARGS).await;
    let results = env.records(&env.results, 1, 60);
    let metrics = agent.metrics.clone();
    common::stop(agent).await;
    assert!(results.iter().any(|r| r.key.as_deref() == Some("r1")));
    let errors = metrics
        .results_published
        .with_label_values(&["error"])
        .get();
    assert!(errors >= 1, "the refused deliveries were counted: {errors}");
    assert_eq!(env.committed(0), Some(1));
}

/// An idempotent producer cannot recover from a broken sequence: librdkafka's fatal error.
fn break_sequences(cluster: &Cluster) {
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER; 5],
    );
}

/// Serves the agent's endpoints until the test ends, as the binary does while it drains after a
/// fatal error (the agent's own shutdown does not stop them).
async fn endpoints(agent: &Agent) -> (String, CancellationToken) {
    let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(serve(listener, HttpState::of(agent), stop.clone()));
    (url, stop)
}

/// Waits for the agent to stop by itself; returns the error it exited with.
async fn fatal_exit(agent: Agent) -> String {
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(60), agent.wait())
        .await
        .expect("the agent stops by itself");
    stopped
        .expect_err("a fatal error is an error exit")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_results_producer_stops_the_agent_with_nothing_committed() {
    let cluster = MockCluster::new(1).unwrap();
    let env = env_on(&cluster, "b1").await;
    break_sequences(&cluster);
    let agent = env.start(ARGS).await;
    let (url, _stop) = endpoints(&agent).await;
    env.wait_count("SELECT count(*) FROM processed_request", 1, 30)
        .await;
    // Health reports the stop at once, so an orchestrator restarts it even mid-drain.
    wait_for("healthz reports the fatal stop", 60, async || {
        http_get(&format!("{url}/healthz")).await.0 == 503
    })
    .await;
    let (status, body) = http_get(&format!("{url}/readyz")).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("fatal"), "{body}");
    let fatal = agent
        .metrics
        .fatal_errors
        .with_label_values(&["producer_error"]);
    assert_eq!(
        fatal.get(),
        1,
        "one fatal stop counted, as a producer error"
    );
    let err = fatal_exit(agent).await;
    assert!(err.contains("fatal"), "{err}");
    assert_eq!(
        env.committed(0),
        None,
        "the unconfirmed request is not committed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_forwarding_producer_stops_the_agent_with_nothing_committed() {
    let cluster = MockCluster::new(1).unwrap();
    // An unknown book: the request goes to a retry tier, and that forward fails fatally.
    let env = env_on(&cluster, "b-unknown").await;
    break_sequences(&cluster);
    let err = fatal_exit(env.start(ARGS).await).await;
    assert!(err.contains("forwarding producer"), "{err}");
    assert_eq!(
        env.committed(0),
        None,
        "the unrouted request is not committed"
    );
}
