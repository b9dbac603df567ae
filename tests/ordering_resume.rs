//! Per-key order when a head's release was cut short (a kill, a graceful stop, a revoke) after
//! its outcome was durable: the head's next delivery finishes the release, and nothing else
//! does. Set up by writing the parking tables as the earlier run would have left them.

mod common;

use common::parked::{
    park_key, park_request, park_value, parked_id, promoted_by, tier_copy, written_before,
};
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
    let promoter = format!("{}:0:0", env.topic);
    let order = after_a_cut_promotion(&env, &promoter, Promoted::Now, true).await;
    assert_eq!(order, ["a1", "a2", "a3"]);
    assert_eq!(env.count("SELECT count(*) FROM parked_key").await, 0);
    assert_eq!(env.count("SELECT count(*) FROM parked_message").await, 0);
}

/// As above, but the head is not in the ledger (it was dead-lettered, say, when its tier
/// refused its size): its next delivery is not parked behind the follower its release promoted,
/// but settled again as the head (here it is written; a dead-lettered one would be
/// dead-lettered again), and resumes that follower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_not_written_resumes_the_follower_its_release_promoted() {
    let env = Env::new(1).await;
    let promoter = format!("{}:0:0", env.topic);
    let order = after_a_cut_promotion(&env, &promoter, Promoted::Now, false).await;
    assert_eq!(order, ["a1", "a2", "a3"]);
    assert_eq!(env.count("SELECT count(*) FROM parked_key").await, 0);
    assert_eq!(env.count("SELECT count(*) FROM parked_message").await, 0);
}

/// A request found in the ledger whose key's head another record's release promoted (here the
/// tier copy of the same request, whose release may be running right now) leaves that head
/// alone: settling it beside the live release would start a second tier chain for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_leaves_a_follower_another_release_promoted_alone() {
    let env = Env::new(1).await;
    let promoter = format!("{}:0:0", env.tier_topic("1h"));
    let order = after_a_cut_promotion(&env, &promoter, Promoted::Now, true).await;
    assert_eq!(order, ["a1"]);
    assert_eq!(env.count("SELECT head_offset FROM parked_key").await, 1);
    let waiting = env.count("SELECT count(*) FROM parked_message").await;
    assert_eq!(waiting, 2, "a2 and a3 wait");
}

/// A head promoted by an agent from before `promoted_by` (it moved `head_offset` alone, so the
/// recorded promoter is a stale one) is resumed by any release, as such agents did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_by_an_older_agent_is_resumed_by_any_release() {
    let env = Env::new(1).await;
    let promoter = format!("{}:0:0", env.tier_topic("1h"));
    let order = after_a_cut_promotion(&env, &promoter, Promoted::ByAnOlderAgent, true).await;
    assert_eq!(order, ["a1", "a2", "a3"]);
    assert_eq!(env.count("SELECT count(*) FROM parked_key").await, 0);
}

/// The reaper releases a key whose head is in no tier, in the head's name but not as its input
/// record: a promotion it makes names no record a consumer could read, so the head's input,
/// should it come again, is not taken for the releaser of the request the reaper promoted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_by_the_reaper_names_no_consumed_record() {
    let env = Env::new(1).await;
    park_key(&env, "carol", 4, "1 hour").await;
    let late = json(request("carol", Some("c2"), &[("b-late", 0.5)]));
    park_value(&env, "carol", 5, &late).await;
    let agent = env
        .start(&[
            "--parked-key-ttl=30m",
            "--reaper-interval=1s",
            "--retry-delays=1h",
        ])
        .await;
    env.records(&env.tier_topic("1h"), 1, 30);
    env.wait_count("SELECT count(*) FROM parked_message", 0, 30)
        .await;
    stop(agent).await;
    let row = env
        .pg
        .query_one("SELECT head_offset, promoted_by FROM parked_key", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 5, "c2 heads the key");
    assert_eq!(
        row.get::<_, Option<String>>(1).as_deref(),
        Some("(reaper):0:4")
    );
}

/// Whether the recorded promoter belongs to the key's current head.
#[derive(PartialEq)]
enum Promoted {
    Now,
    /// Recorded for an earlier head: an agent from before `promoted_by` moved the head since.
    ByAnOlderAgent,
}

/// Leaves alice's key as a cut release would have: head a2 (input offset 1, still queued),
/// promoted by `promoter`'s release, and a1 (offset 0) in the ledger when `a1_written`. Then
/// runs the agent over a1, z1 (a2 was committed when it was parked: another user's request
/// takes its offset) and a3, and returns alice's requests in the order written.
async fn after_a_cut_promotion(
    env: &Env,
    promoter: &str,
    promoted: Promoted,
    a1_written: bool,
) -> Vec<String> {
    env.books(&["b1"]).await;
    park_key(env, "alice", 1, "0").await;
    promoted_by(env, "alice", promoter).await;
    if promoted == Promoted::ByAnOlderAgent {
        let stale = "UPDATE parked_key SET promoted_head = 0";
        env.pg.execute(stale, &[]).await.unwrap();
    }
    park_request(env, "alice", 1, "a2").await;
    if a1_written {
        written_before(env, "a1", 0).await;
    }
    let msgs = [("alice", "a1"), ("zed", "z1"), ("alice", "a3")];
    run_over(env, &msgs, &[]).await;
    env.request_ids(Some("alice")).await
}

/// A promotion names the record whose release made it: a tier copy, not the input message it
/// is a copy of (the two can run at once, and only the releasing one may resume its release).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_names_the_tier_copy_that_released_the_key() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    park_key(&env, "alice", 0, "0").await;
    let late = json(request("alice", Some("a2"), &[("b-late", 0.5)]));
    park_value(&env, "alice", 1, &late).await;
    let agent = env.start(&["--retry-delays=1s,1h"]).await;
    let tier = env.tier_topic("1s");
    tier_copy(&env, &tier, "alice", "a1").await;
    env.records(&env.tier_topic("1h"), 1, 30);
    env.wait_count("SELECT count(*) FROM parked_message", 0, 30)
        .await;
    stop(agent).await;
    let row = env
        .pg
        .query_one("SELECT head_offset, promoted_by FROM parked_key", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 1, "a2 heads the key");
    assert_eq!(row.get::<_, Option<String>>(1), Some(format!("{tier}:0:0")));
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
    let follower = |id: i64, offset: i64| Follower {
        id,
        envelope: Envelope::new(
            (env.topic.clone(), 0, offset),
            Some(b"alice".to_vec()),
            vec![],
            vec![],
            None,
            &Trust::new([env.topic.clone()]),
        ),
    };
    park_request(&env, "alice", 1, "a2").await;
    park_request(&env, "alice", 3, "a4").await;
    let (a2, a4) = (parked_id(&env, 1).await, parked_id(&env, 3).await);
    let head = "SELECT head_offset FROM parked_key";
    // Released under head 0, which another release already moved on to 2.
    assert!(!park::promote(&pool, &follower(a2, 1), (0, "t:0:0"))
        .await
        .unwrap());
    assert_eq!(env.count(head).await, 2);
    // Settled by another release already: its queue entry is gone.
    env.pg
        .execute("DELETE FROM parked_message WHERE id = $1", &[&a4])
        .await
        .unwrap();
    assert!(!park::promote(&pool, &follower(a4, 3), (2, "t:0:2"))
        .await
        .unwrap());
    assert_eq!(env.count(head).await, 2);
    park_request(&env, "alice", 3, "a4").await;
    let a4 = parked_id(&env, 3).await;
    assert!(park::promote(&pool, &follower(a4, 3), (2, "t:0:2"))
        .await
        .unwrap());
    assert_eq!(env.count(head).await, 3);
    let by = env
        .pg
        .query_one("SELECT promoted_by, promoted_head FROM parked_key", &[])
        .await
        .unwrap();
    assert_eq!(by.get::<_, Option<String>>(0).as_deref(), Some("t:0:2"));
    assert_eq!(by.get::<_, Option<i64>>(1), Some(3));
}
