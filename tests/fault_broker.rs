//! Fault suite, scenario 3: the broker in trouble while a stream is being written. (a) The
//! broker gone for 20 s mid-stream (every connection dropped, new ones refused) and back; (b)
//! bursts of retriable request errors on Produce, Fetch and OffsetCommit (librdkafka's mock
//! cluster). Every message ends written once or dead-lettered; confirmations may repeat.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::faults::{self, spawn_agent, Workload};
use common::Env;
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use tokio::sync::watch;

const PARTITIONS: i32 = 6;
const OUTAGE: Duration = Duration::from_secs(20);

/// A tansu broker of the test's own (the shared one must never stop), killed when the test
/// ends. It advertises `advertised`, the proxy in front of it, so every client goes through it.
struct Tansu {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
}

impl Tansu {
    fn start(advertised: u16) -> Tansu {
        let bin = std::env::var("TANSU").unwrap_or_else(|_| {
            format!(
                "{}/.cargo/bin/tansu",
                std::env::var("HOME").unwrap_or_default()
            )
        });
        let port = common::free_port();
        let log = std::env::temp_dir().join(format!("{}.log", common::unique("tansu")));
        let child = Command::new(&bin)
            .args([
                "broker",
                &format!("--listener-url=tcp://127.0.0.1:{port}"),
                &format!("--advertised-listener-url=tcp://127.0.0.1:{advertised}"),
                "--storage-engine=memory://tansu/",
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("start {bin} (cargo install tansu@0.6.0): {e}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "tansu listens within 30s");
            std::thread::sleep(Duration::from_millis(100));
        }
        Tansu { child, port, log }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Link {
    Up,
    Down,
    Gone,
}

/// A TCP proxy in front of the broker, on a runtime of its own (the test's workers block in
/// rdkafka calls). `down` drops every connection and refuses new ones, as a stopped broker.
struct Proxy {
    port: u16,
    link: watch::Sender<Link>,
}

impl Proxy {
    fn start(port: u16, target: u16) -> Proxy {
        let (link, rx) = watch::channel(Link::Up);
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(serve(port, target, rx));
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "proxy listens within 10s");
            std::thread::sleep(Duration::from_millis(50));
        }
        Proxy { port, link }
    }

    fn set(&self, link: Link) {
        self.link.send_replace(link);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.set(Link::Gone);
    }
}

async fn serve(port: u16, target: u16, mut link: watch::Receiver<Link>) {
    loop {
        let now = *link.borrow_and_update();
        match now {
            Link::Gone => return,
            Link::Down => {
                if link.changed().await.is_err() {
                    return;
                }
                continue;
            }
            Link::Up => {}
        }
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        // The port is bound again after each outage, with connections of the last in TIME_WAIT.
        socket.set_reuseaddr(true).unwrap();
        socket
            .bind(([127, 0, 0, 1], port).into())
            .expect("proxy port");
        let listener = socket.listen(1024).unwrap();
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    if let Ok((client, _)) = accepted {
                        conns.spawn(pipe(client, target));
                    }
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                _ = link.changed() => break,
            }
        }
        conns.abort_all();
    }
}

async fn pipe(mut client: tokio::net::TcpStream, target: u16) {
    if let Ok(mut broker) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_gone_for_twenty_seconds_mid_stream_loses_and_duplicates_nothing() {
    let proxy_port = common::free_port();
    let tansu = Tansu::start(proxy_port);
    let proxy = Proxy::start(proxy_port, tansu.port);
    let brokers = format!("127.0.0.1:{}", proxy.port);
    let env = Env::with(common::database_url(), brokers, PARTITIONS).await;
    let wl = Arc::new(Workload::new(faults::size()));
    wl.prepare(&env).await;
    let n = wl.msgs.len();
    // Copies and confirmations time out within the outage (the agent's default is 30 s), so
    // the agent meets refused deliveries, not only slow ones.
    let settings = [("KAFKA_CONFIG_message.timeout.ms", "5000")];
    let mut agent = spawn_agent(&env, &settings);
    wl.publish(&env.brokers, &env.topic, 0..n / 2).await;
    faults::writing_past(&env, 0).await;
    tokio::time::sleep(Duration::from_millis(faults::random_range(50..1500))).await;
    proxy.set(Link::Down);
    // The rest is published into the outage: the publisher holds it until the broker is back.
    let publishing = {
        let (wl, brokers, topic) = (wl.clone(), env.brokers.clone(), env.topic.clone());
        tokio::spawn(async move { wl.publish(&brokers, &topic, n / 2..n).await })
    };
    tokio::time::sleep(OUTAGE).await;
    proxy.set(Link::Up);
    let since = Instant::now();
    faults::add_late_book(&env).await;
    publishing.await.expect("the rest is published");
    // As an orchestrator does, start the agent again when it exits: after its records timed
    // out, tansu (no KIP-360) fences its idempotent producer, and a fenced producer is fatal.
    let mut exit_codes = vec![];
    let settled = faults::wait_settled(&env, &wl, PARTITIONS, 300);
    tokio::pin!(settled);
    let recover = loop {
        tokio::select! {
            _ = &mut settled => break since.elapsed(),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if !agent.running() {
                    exit_codes.push(agent.wait_exit(1));
                    agent = spawn_agent(&env, &settings);
                }
            }
        }
    };
    exit_codes.push(agent.term(60));
    let v = faults::verdict(&env, &wl).await;
    faults::report("broker gone 20 s", &v, recover, &exit_codes);
    v.assert_clean();
    assert_eq!(
        exit_codes.last(),
        Some(&0),
        "SIGTERM exits 0 after the outage"
    );
    // A fenced producer exits 1 (FAILURE), never by a crash.
    assert!(
        exit_codes.iter().all(|c| [0, 1].contains(c)),
        "{exit_codes:?}"
    );
}

/// Retriable errors only: each is answered by librdkafka with a retry (a new leader or
/// coordinator lookup first), never by giving the record up.
const PRODUCE_ERRORS: &[RDKafkaRespErr] = &[
    RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
    RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
    RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
];
const FETCH_ERRORS: &[RDKafkaRespErr] = &[
    RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
    RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
];
const COMMIT_ERRORS: &[RDKafkaRespErr] = &[
    RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
    RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS,
    RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_request_errors_lose_and_duplicate_nothing() {
    // Dropped last (after the agent and the environment): librdkafka crashes on a mock cluster
    // that goes away under its clients.
    let cluster = MockCluster::new(3).unwrap();
    let env = Env::without_topics(common::database_url(), cluster.bootstrap_servers()).await;
    cluster.create_topic(&env.results, 1, 1).unwrap();
    let tiers = ["2s", "10s", "1m"].map(|t| env.tier_topic(t));
    for t in [&env.topic, &env.dlq()].into_iter().chain(&tiers) {
        cluster.create_topic(t, PARTITIONS, 1).unwrap();
    }
    let wl = Arc::new(Workload::new(faults::size()));
    wl.prepare(&env).await;
    let agent = env
        .start(&[
            "--create-retry-topics=false",
            "--retry-delays=2s,10s,60s",
            // The mock cluster can lose an acknowledgement with more than one request in flight.
            "--kafka-config=max.in.flight.requests.per.connection=1",
            "--kafka-config=session.timeout.ms=30000",
            "--kafka-config=max.poll.interval.ms=60000",
            "--kafka-config=fetch.wait.max.ms=100",
        ])
        .await;
    let publishing = {
        let (wl, brokers, topic) = (wl.clone(), env.brokers.clone(), env.topic.clone());
        // One request in flight: the mock cluster can lose an acknowledged record otherwise.
        let one = [("max.in.flight.requests.per.connection", "1")];
        tokio::spawn(async move {
            let all = 0..wl.msgs.len();
            wl.publish_with(&brokers, &topic, all, &one).await
        })
    };
    // Bursts while the stream is published and for a while after, one API at a time.
    let since = Instant::now();
    let mut bursts = 0;
    while !publishing.is_finished() || since.elapsed() < Duration::from_secs(20) {
        let (api, errors) = match bursts % 3 {
            0 => (RDKafkaApiKey::Produce, PRODUCE_ERRORS),
            1 => (RDKafkaApiKey::Fetch, FETCH_ERRORS),
            _ => (RDKafkaApiKey::OffsetCommit, COMMIT_ERRORS),
        };
        cluster.request_errors(api, errors);
        bursts += 1;
        if bursts == 15 {
            faults::add_late_book(&env).await;
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    publishing.await.expect("the stream is published");
    let calm = Instant::now();
    faults::wait_settled(&env, &wl, PARTITIONS, 300).await;
    let recover = calm.elapsed();
    common::stop(agent).await;
    let v = faults::verdict(&env, &wl).await;
    eprintln!("{bursts} error bursts injected");
    faults::report("broker request errors", &v, recover, &[]);
    v.assert_clean();
}
