//! librdkafka's in-process mock cluster as a stand-alone broker, for `scripts/bench.sh`'s
//! `latency-mock` run: a broker that answers a fetch as soon as it holds data, where tansu holds
//! every fetch until `fetch.wait.max.ms` runs out. Not a broker to test against (the suite's
//! broker is tansu): it keeps only the last 5 MB of each partition, in memory, has no
//! CreateTopics, and a fetch that finds no data waits out the whole `fetch.wait.max.ms`, even
//! when data arrives meanwhile, as tansu's does.
//!
//!     cargo run --release --example mock_broker -- TOPIC:PARTITIONS...
//!
//! Creates the topics (the mock cluster has no CreateTopics), prints its bootstrap address on
//! one line, and serves until killed.

use std::io::Write;

use rdkafka::mocking::MockCluster;

fn main() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    for spec in std::env::args().skip(1) {
        let (topic, partitions) = spec
            .rsplit_once(':')
            .and_then(|(t, p)| Some((t, p.parse::<i32>().ok()?)))
            .unwrap_or_else(|| panic!("{spec}: expected TOPIC:PARTITIONS"));
        cluster
            .create_topic(topic, partitions, 1)
            .unwrap_or_else(|e| panic!("creating {topic}: {e}"));
    }
    let mut out = std::io::stdout();
    writeln!(out, "{}", cluster.bootstrap_servers()).expect("stdout");
    out.flush().expect("stdout");
    // The cluster serves from librdkafka's own thread while this one holds it.
    loop {
        std::thread::park();
    }
}
