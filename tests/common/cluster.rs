//! PostgreSQL clusters of a test's own, which it may stop, crash and start again.

use super::{free_port, unique};

/// A PostgreSQL cluster of the test's own, which it may stop and start (the shared server on
/// 5432 must never be stopped). Deleted on drop.
pub struct TestCluster {
    dir: std::path::PathBuf,
    bindir: std::path::PathBuf,
    pub port: u16,
    /// Extra `postgres` options, e.g. `-c ssl=on -c ssl_cert_file=…`.
    opts: String,
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false)
}

impl TestCluster {
    pub fn start_new() -> TestCluster {
        Self::start_new_with("")
    }

    /// A cluster started with extra `postgres` options (`-c ssl=on …`).
    pub fn start_new_with(opts: &str) -> TestCluster {
        let bindir = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path().join("bin"))
                    .filter(|b| b.join("initdb").exists())
                    .max()
            })
            .expect(
                "PostgreSQL server binaries under /usr/lib/postgresql: apt-get install postgresql",
            );
        let port = free_port();
        let dir = std::env::temp_dir().join(unique("pa-cluster"));
        std::fs::create_dir_all(&dir).unwrap();
        if is_root() {
            assert!(std::process::Command::new("chown")
                .arg("postgres")
                .arg(&dir)
                .status()
                .unwrap()
                .success());
        }
        let opts = opts.to_string();
        let c = TestCluster {
            dir,
            bindir,
            port,
            opts,
        };
        let data = c.dir.join("data");
        c.pg(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
            ],
        )
        .unwrap();
        c.start();
        c
    }

    /// Runs a server binary as its owner (initdb refuses root).
    fn pg(&self, bin: &str, args: &[&str]) -> Result<(), String> {
        let path = self.bindir.join(bin);
        let mut cmd = if is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            std::process::Command::new(&path)
        };
        let out = cmd.args(args).output().map_err(|e| e.to_string())?;
        match out.status.success() {
            true => Ok(()),
            false => Err(format!(
                "{bin} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            )),
        }
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn start(&self) {
        let data = self.dir.join("data");
        let log = self.dir.join("server.log");
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off {}",
            self.port,
            self.dir.display(),
            self.opts
        );
        self.pg(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-o",
                &opts,
                "start",
            ],
        )
        .unwrap();
    }

    pub fn stop(&self) {
        self.stop_mode("fast");
    }

    fn stop_mode(&self, mode: &str) {
        let data = self.dir.join("data");
        self.pg(
            "pg_ctl",
            &["-D", data.to_str().unwrap(), "-m", mode, "-w", "stop"],
        )
        .unwrap();
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = self.pg(
            "pg_ctl",
            &["-D", data.to_str().unwrap(), "-m", "immediate", "stop"],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---- Fault suite, scenario 2 (database crash): a cluster stopped without a shutdown. ----

impl TestCluster {
    /// `pg_ctl stop -m immediate`: the server is gone at once, as in a crash (no checkpoint,
    /// connections cut without a goodbye); `start` runs crash recovery.
    pub fn crash(&self) {
        self.stop_mode("immediate");
    }
}
