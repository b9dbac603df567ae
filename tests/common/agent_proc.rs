//! The agent as a real process, for the tests that kill it: its log goes to a file (printed when
//! the test fails), and a process still running when the test ends is killed, so none outlives
//! its test.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::Env;

pub struct AgentProc {
    pub child: Child,
    pub log: PathBuf,
}

/// Starts `persistence-agent run` on `env` with the suite's settings (short tiers and session
/// timeout, so a killed member is replaced in seconds); `extra` overrides or adds variables.
pub fn spawn_agent(env: &Env, extra: &[(&str, &str)]) -> AgentProc {
    let log = std::env::temp_dir().join(format!("{}.log", super::unique("pa-agent")));
    let file = std::fs::File::create(&log).expect("agent log file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_persistence-agent"));
    cmd.arg("run")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("KAFKA_BROKERS", &env.brokers)
        .env("DATABASE_URL", &env.db_url)
        .env("DATABASE_SCHEMA", &env.schema)
        .env("KAFKA_GROUP_ID", &env.group)
        .env("KAFKA_INPUT_TOPICS", &env.topic)
        .env("KAFKA_RESULTS_TOPIC", &env.results)
        .env("HTTP_ADDR", "127.0.0.1:0")
        .env("RETRY_DELAYS", "2s,10s,60s")
        .env("FATAL_LINGER", "0s")
        // Below max.poll.interval.ms: a drain that outlasts it drops the member from the
        // group, its last commit fails, and the next owner handles the drained work again.
        .env("SHUTDOWN_TIMEOUT", "12s")
        .env("LOG_FORMAT", "pretty")
        .env("RUST_LOG", "warn")
        .env("KAFKA_CONFIG_session.timeout.ms", "6000")
        .env("KAFKA_CONFIG_max.poll.interval.ms", "15000")
        .env("KAFKA_CONFIG_fetch.wait.max.ms", "100")
        .stdout(Stdio::null())
        .stderr(file);
    for (name, value) in log_settings() {
        cmd.env(name, value);
    }
    for (k, v) in extra {
        cmd.env(k, v);
    }
    AgentProc {
        child: cmd.spawn().expect("agent binary starts"),
        log,
    }
}

/// What the agents may be told from the test's environment, as `FAULT_AGENT_<name>`: how much
/// they log, never what they do (a scenario's settings stay its own).
const LOG_SETTINGS: [&str; 3] = ["RUST_LOG", "LOG_FORMAT", "KAFKA_CONFIG_debug"];

/// The log settings the test's environment gives its agents, said once per test process.
fn log_settings() -> Vec<(&'static str, std::ffi::OsString)> {
    static SAID: std::sync::Once = std::sync::Once::new();
    let set: Vec<_> = LOG_SETTINGS
        .iter()
        .filter_map(|n| Some((*n, std::env::var_os(format!("FAULT_AGENT_{n}"))?)))
        .collect();
    if !set.is_empty() {
        SAID.call_once(|| eprintln!("agents get {set:?} from FAULT_AGENT_*"));
    }
    set
}

impl AgentProc {
    /// SIGKILL: no drain, no commit. Returns the exit code as a shell shows it (137).
    pub fn kill(&mut self) -> i32 {
        self.signal("KILL");
        self.wait_exit(10)
    }

    /// SIGTERM: drain and commit; waits up to `secs` for the exit code.
    pub fn term(&mut self, secs: u64) -> i32 {
        self.signal("TERM");
        self.wait_exit(secs)
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill -{sig} {}", self.child.id());
    }

    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// The exit code (128 + signal for a signalled process), within `secs`.
    pub fn wait_exit(&mut self, secs: u64) -> i32 {
        use std::os::unix::process::ExitStatusExt;
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0));
            }
            if Instant::now() > deadline {
                panic!("agent did not exit within {secs}s; log: {}", self.tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of its log.
    pub fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("agent log {}:\n{}", self.log.display(), self.tail());
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}
