//! The README's Python example works as a newcomer runs it: published to the test broker with a
//! running agent, twice in a row, each run printing its confirmation. Only the broker address,
//! the topic names and the group are the test's own.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

/// The fenced python block after the README's "Publishing a request yourself" heading.
fn snippet() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md reads");
    let section = readme
        .split("## Publishing a request yourself")
        .nth(1)
        .expect("the README has a \"Publishing a request yourself\" section");
    let start = section.find("```python\n").expect("a python block") + "```python\n".len();
    let len = section[start..].find("```").expect("the block ends");
    section[start..start + len].to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn readme_python_example_publishes_and_reads_its_confirmation_twice_in_a_row() {
    let env = common::Env::new(1).await;
    env.books(&["book-001"]).await;
    let agent = env.start(&["--create-retry-topics=false"]).await;
    let code = snippet()
        .replace("127.0.0.1:9092", &env.brokers)
        .replace("persistence.requests", &env.topic)
        .replace("persistence.results", &env.results)
        .replace("readme-reader", &common::unique("readme-reader"));
    for run in 1..=2 {
        let started = Instant::now();
        let code = code.clone();
        let out = tokio::task::spawn_blocking(move || {
            Command::new("python3")
                .arg("-c")
                .arg(code)
                .output()
                .expect("python3 runs (pip install confluent-kafka)")
        })
        .await
        .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            out.status.success(),
            "run {run} failed:\n{stdout}\n{stderr}"
        );
        assert!(
            stdout.contains("\"requestId\":\"req-readme-1\"")
                && stdout.contains("\"persistenceStatus\":\"success\""),
            "run {run} printed no confirmation: {stdout}"
        );
        eprintln!("run {run}: {:.1} s", started.elapsed().as_secs_f64());
        assert!(started.elapsed() < Duration::from_secs(40));
    }
    common::stop(agent).await;
    assert_eq!(env.count("SELECT count(*) FROM recommendation").await, 1);
}
