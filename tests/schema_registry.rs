//! Confluent-framed Avro whose schema ids resolve through a Schema Registry: a minimal HTTP
//! server here serves `GET /schemas/ids/{id}`, the one endpoint the agent uses.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::Json;
use common::{request, stop, wait_for, Env};
use persistence_agent::tools::produce::{encode_avro, WireFormat};

/// Version 3: a producer ahead of the agent, with a field the agent does not know.
fn newer_schema() -> String {
    let mut v: serde_json::Value =
        serde_json::from_str(persistence_agent::decode::schemas::REQUEST_SCHEMA).unwrap();
    v["fields"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"name": "channel", "type": "string", "default": "web"}));
    v.to_string()
}

/// The schemas served by id, and how many requests the registry answered.
type Registry = (Arc<Vec<(u32, String)>>, Arc<AtomicUsize>, Arc<AtomicBool>);

/// Serves `schemas`; answers 503 while the returned flag is set.
async fn registry(schemas: Vec<(u32, String)>) -> (String, Arc<AtomicUsize>, Arc<AtomicBool>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let down = Arc::new(AtomicBool::new(false));
    let app = axum::Router::new()
        .route(
            "/schemas/ids/{id}",
            get(
                |State((schemas, hits, down)): State<Registry>, Path(id): Path<u32>| async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    if down.load(Ordering::SeqCst) {
                        return Err((
                            StatusCode::SERVICE_UNAVAILABLE,
                            Json(serde_json::json!({"error_code": 50301})),
                        ));
                    }
                    match schemas.iter().find(|(i, _)| *i == id) {
                        Some((_, s)) => Ok(Json(serde_json::json!({"schema": s}))),
                        None => Err((
                            StatusCode::NOT_FOUND,
                            Json(serde_json::json!({"error_code": 40403})),
                        )),
                    }
                },
            ),
        )
        .with_state((Arc::new(schemas), hits.clone(), down.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, hits, down)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_confluent_avro_from_a_newer_writer_schema_through_the_registry() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    let newer = newer_schema();
    let (url, hits, _down) = registry(vec![(42, newer.clone())]).await;
    let agent = env.start(&[&format!("--schema-registry-url={url}")]).await;

    let writer = apache_avro::Schema::parse_str(&newer).unwrap();
    for i in 0..3 {
        let mut req = request(&format!("u{i}"), Some(&format!("reg-{i}")), &[("b1", 0.5)]);
        req["channel"] = "mobile".into();
        env.produce(
            "k",
            &encode_avro(&req, &writer, WireFormat::AvroConfluent, 42).unwrap(),
        )
        .await;
    }
    // An id the registry does not know fails that message alone.
    let unknown = encode_avro(
        &request("u9", Some("reg-unknown"), &[("b1", 0.5)]),
        &writer,
        WireFormat::AvroConfluent,
        7,
    );
    env.produce("k", &unknown.unwrap()).await;

    let results = env.results(4);
    // One key, so one worker: results come in produce order.
    let statuses: Vec<(&str, &str)> = results
        .iter()
        .map(|r| (r.request_id.as_str(), r.persistence_status.as_str()))
        .collect();
    assert_eq!(
        statuses[..3],
        [
            ("reg-0", "success"),
            ("reg-1", "success"),
            ("reg-2", "success")
        ]
    );
    assert_eq!(statuses[3].1, "dead_lettered");
    assert_eq!(results[3].error.as_ref().unwrap().code, "unknown_schema_id");
    assert_eq!(env.count("SELECT count(*) FROM recommendation").await, 3);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        2,
        "id 42 fetched once and cached; id 7 asked once"
    );
    stop(agent).await;
    assert_eq!(env.committed(0), Some(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_messages_while_the_registry_is_down_and_persists_them_after() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    let (url, hits, down) = registry(vec![(42, newer_schema())]).await;
    down.store(true, Ordering::SeqCst);
    let agent = env.start(&[&format!("--schema-registry-url={url}")]).await;
    let writer = apache_avro::Schema::parse_str(&newer_schema()).unwrap();
    let req = request("u1", Some("held-1"), &[("b1", 0.5)]);
    env.produce(
        "k",
        &encode_avro(&req, &writer, WireFormat::AvroConfluent, 42).unwrap(),
    )
    .await;

    wait_for("the agent keeps asking the registry", 30, async || {
        hits.load(Ordering::SeqCst) >= 3
    })
    .await;
    assert_eq!(
        agent.metrics.outcome_count(&env.topic, "dead_lettered"),
        0,
        "a registry outage fails nothing"
    );
    assert_eq!(env.count("SELECT count(*) FROM recommendation").await, 0);

    down.store(false, Ordering::SeqCst);
    env.wait_count("SELECT count(*) FROM recommendation", 1, 60)
        .await;
    stop(agent).await;
    assert_eq!(env.committed(0), Some(1));
}
