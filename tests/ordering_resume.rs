//! Per-key order when a head's release was cut short (a kill, a graceful stop, a revoke) after
//! its outcome was durable: the head's next delivery finishes the release, and nothing else
//! does. Set up by writing the parking tables as the earlier run would have left them.

mod common;

use common::parked::{park_key, park_request, promoted_by, written_before};
use common::{json, request, stop, Env};

/// A head redelivered after a crash was written, and the agent was killed again before its
/// release: its next delivery finds the request in the ledger, and must still release the key
/// (the fault suite's long run left a key parked this way, its followers never written).
async fn head_written_before_a_crash(extra: &[&str]) {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    park_key(&env, "alice", 0, "0").await;
    park_request(&env, "alice", 1, "a2").await;
    written_before(&env, "a1", 0).await;
    run_over(
        &env,
        &[("alice", "a1"), ("alice", "a2"), ("alice", "a3")],
        extra,
    )
    .await;
    assert_eq!(env.request_ids(None).await, ["a1", "a2", "a3"]);
    assert_eq!(env.count("SELECT count(*) FROM parked_key").await, 0);
    assert_eq!(env.count("SELECT count(*) FROM parked_message").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_written_before_a_crash_releases_its_key_on_redelivery() {
    head_written_before_a_crash(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_written_before_a_crash_releases_its_key_on_redelivery_unbatched() {
    head_written_before_a_crash(&["--batch-max=1"]).await;
}

/// As above, but the cut release had promoted the first follower (its tier would take it) and
/// was killed before forwarding it: the head's next delivery resumes that follower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_written_before_a_crash_resumes_the_follower_it_promoted() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    park_key(&env, "alice", 1, "0").await;
    promoted_by(&env, "alice", 0).await;
    park_request(&env, "alice", 1, "a2").await;
    written_before(&env, "a1", 0).await;
    // a2 was committed when it was parked: another user's request takes its offset here.
    run_over(
        &env,
        &[("alice", "a1"), ("zed", "z1"), ("alice", "a3")],
        &[],
    )
    .await;
    assert_eq!(env.request_ids(Some("alice")).await, ["a1", "a2", "a3"]);
    assert_eq!(env.count("SELECT count(*) FROM parked_key").await, 0);
    assert_eq!(env.count("SELECT count(*) FROM parked_message").await, 0);
}

/// As above, but the head was not written (it was dead-lettered, say, when its tier refused its
/// size): its next delivery is not parked behind the follower it promoted, but settled again
/// as the head and resumes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_not_written_resumes_the_follower_its_release_promoted() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    park_key(&env, "alice", 1, "0").await;
    promoted_by(&env, "alice", 0).await;
    park_request(&env, "alice", 1, "a2").await;
    run_over(
        &env,
        &[("alice", "a1"), ("zed", "z1"), ("alice", "a3")],
        &[],
    )
    .await;
    assert_eq!(env.request_ids(Some("alice")).await, ["a1", "a2", "a3"]);
    assert_eq!(env.count("SELECT count(*) FROM parked_key").await, 0);
    assert_eq!(env.count("SELECT count(*) FROM parked_message").await, 0);
}

/// A request found in the ledger whose key another message's release promoted a follower of
/// (that release may be running right now) leaves the follower alone: settling it beside the
/// live release could hand the key back to a request already behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_leaves_a_follower_another_release_promoted_alone() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    park_key(&env, "alice", 1, "0").await;
    promoted_by(&env, "alice", 7).await;
    park_request(&env, "alice", 1, "a2").await;
    written_before(&env, "a1", 0).await;
    run_over(
        &env,
        &[("alice", "a1"), ("zed", "z1"), ("alice", "a3")],
        &[],
    )
    .await;
    env.wait_committed(1, 3, 30).await;
    assert_eq!(env.request_ids(Some("alice")).await, ["a1"]);
    assert_eq!(env.count("SELECT head_offset FROM parked_key").await, 1);
    assert_eq!(
        env.count("SELECT count(*) FROM parked_message").await,
        2,
        "a2 and a3 wait"
    );
}

/// Runs the agent over alice's and others' requests `msgs` (user, request id: input offsets 0,
/// 1, ...) until each has its outcome (committed), then stops it.
async fn run_over(env: &Env, msgs: &[(&str, &str)], extra: &[&str]) {
    let agent = env.start(&[&["--retry-delays=1h"], extra].concat()).await;
    for (user, id) in msgs {
        env.produce(user, &json(request(user, Some(id), &[("b1", 0.5)])))
            .await;
    }
    env.wait_committed(1, msgs.len() as i64, 30).await;
    stop(agent).await;
}

/// Two releases of one key (a tier copy and its redelivered input, say) take up the same
/// follower; the one whose promotion comes second finds the head moved on and changes nothing,
/// so the key never goes back to a request already behind the head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_under_a_head_that_moved_on_changes_nothing() {
    use persistence_agent::message::envelope::{Envelope, Trust};
    use persistence_agent::persist::park::{self, Follower};
    let env = Env::new(1).await;
    park_key(&env, "alice", 2, "0").await;
    let pool = persistence_agent::persist::db::pool(&env.run_args(&[]).db).unwrap();
    let follower = |offset: i64, released_by| Follower {
        id: 0,
        envelope: Envelope::new(
            (env.topic.clone(), 0, offset),
            Some(b"alice".to_vec()),
            vec![],
            vec![],
            None,
            &Trust::new([env.topic.clone()]),
        ),
        released_by,
    };
    let head = "SELECT head_offset FROM parked_key";
    // Released under head 0, which another release already moved on to 2.
    assert!(!park::promote(&pool, &follower(1, (0, 0))).await.unwrap());
    assert_eq!(env.count(head).await, 2);
    assert!(park::promote(&pool, &follower(3, (2, 2))).await.unwrap());
    assert_eq!(env.count(head).await, 3);
    let by = "SELECT promoted_by FROM parked_key";
    assert_eq!(env.count(by).await, 2);
}
