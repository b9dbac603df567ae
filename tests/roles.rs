//! Least privilege: the whole pipeline runs under a role granted only `scripts/agent-role.sql`
//! (after migrating as the owner), and a write outside those rights is refused.

mod common;

use common::{json, request, stop, Env};

/// A login role of the test's own (roles are cluster-wide), dropped at the end.
struct Role {
    name: String,
    owner_url: String,
}

impl Role {
    async fn granted(env: &Env) -> Role {
        let name = common::unique("pa_agent");
        env.pg
            .batch_execute(&format!("CREATE ROLE \"{name}\" LOGIN"))
            .await
            .unwrap();
        let role = Role {
            name,
            owner_url: env.db_url.clone(),
        };
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/agent-role.sql");
        let out = std::process::Command::new("psql")
            .arg(&env.db_url)
            .args(["-q", "-v", &format!("role={}", role.name)])
            .args(["-v", &format!("schema={}", env.schema), "-f", script])
            .output()
            .expect("psql runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        role
    }

    /// The owner's URL with this role as the user (the test servers trust local connections).
    fn url(&self) -> String {
        let (scheme, rest) = self.owner_url.split_once("://").unwrap();
        let host = rest.split_once('@').map_or(rest, |(_, h)| h);
        format!("{scheme}://{}@{host}", self.name)
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let (url, name) = (self.owner_url.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
                tokio::spawn(conn);
                c.batch_execute(&format!("DROP OWNED BY \"{name}\"; DROP ROLE \"{name}\""))
                    .await
            })
        });
        if let Ok(Err(e)) = dropped.join() {
            eprintln!("cleanup: role {} left behind: {e}", self.name);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_runs_under_the_agent_role_which_cannot_write_outside_it() {
    let env = Env::new(1).await;
    env.books(&["b1"]).await;
    let role = Role::granted(&env).await;
    let mut args = env.run_args(&["--migrate-on-start=false", "--retry-delays=1s"]);
    args.db.database_url = role.url();
    let (agent, _) = common::start_with_http(args).await;
    // bob's first request waits in the tier for a book not in the catalogue yet, so his second
    // parks behind it and is released once the first is written: every table the agent uses.
    env.produce(
        "alice",
        &json(request("alice", Some("a-1"), &[("b1", 0.5)])),
    )
    .await;
    env.produce(
        "bob",
        &json(request("bob", Some("b-1"), &[("b-late", 0.5)])),
    )
    .await;
    env.produce("bob", &json(request("bob", Some("b-2"), &[("b1", 0.5)])))
        .await;
    env.wait_count("SELECT count(*) FROM parked_message", 1, 30)
        .await;
    env.books(&["b-late"]).await;
    env.wait_count("SELECT count(*) FROM processed_request", 3, 60)
        .await;
    stop(agent).await;
    assert_eq!(env.request_ids(Some("bob")).await, ["b-1", "b-2"]);
    assert_eq!(env.count("SELECT count(*) FROM parked_key").await, 0);
    assert_eq!(env.count("SELECT count(*) FROM parked_message").await, 0);

    let (agent_pg, conn) = tokio_postgres::connect(&role.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let set_path = format!("SET search_path = \"{}\"", env.schema);
    agent_pg.batch_execute(&set_path).await.unwrap();
    for refused in [
        "DELETE FROM book",
        "INSERT INTO book (id, title, author) VALUES ('x', 'x', 'x')",
        "DELETE FROM processed_request",
        "UPDATE processed_request SET confirmation = NULL",
        "UPDATE recommendation SET total_score = 0",
        "CREATE TABLE intruder (id int)",
        "DROP TABLE audit_log",
    ] {
        let err = agent_pg.batch_execute(refused).await.unwrap_err();
        let code = err.code().map(|c| c.code().to_string());
        // 42501 insufficient_privilege; DROP of another role's table is 42501 as well.
        assert_eq!(code.as_deref(), Some("42501"), "{refused}: {err}");
    }
}
