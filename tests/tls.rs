//! TLS to PostgreSQL as `DATABASE_URL`'s `sslmode` says, against throwaway clusters with and
//! without `ssl=on` and certificates made here with the openssl CLI.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::TestCluster;
use persistence_agent::ops::config::DatabaseArgs;
use persistence_agent::ops::errors;

/// A CA, a server certificate it signed for `localhost` and 127.0.0.1, and a second CA that
/// signed nothing the server holds.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn new() -> Certs {
        let dir = std::env::temp_dir().join(common::unique("pa-tls"));
        std::fs::create_dir_all(&dir).unwrap();
        let c = Certs { dir };
        c.ca("ca");
        c.ca("other-ca");
        std::fs::write(
            c.path("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        c.openssl(
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
            ]
            .iter()
            .chain(&[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ])
            .copied()
            .collect::<Vec<_>>(),
        );
        c.openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ]);
        // The server reads its key as its own user and refuses one others can read.
        if is_root() {
            for p in [&c.dir, &c.path("server.key"), &c.path("server.pem")] {
                assert!(Command::new("chown")
                    .arg("postgres")
                    .arg(p)
                    .status()
                    .unwrap()
                    .success());
            }
        }
        c
    }

    fn ca(&self, name: &str) {
        common::pki::ca(&self.dir, name);
    }

    fn openssl(&self, args: &[&str]) {
        common::pki::openssl(&self.dir, args);
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A cluster serving TLS with these certificates.
    fn cluster(&self) -> TestCluster {
        std::fs::set_permissions(
            self.path("server.key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        TestCluster::start_new_with(&format!(
            "-c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
            self.path("server.pem").display(),
            self.path("server.key").display()
        ))
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false)
}

/// Whether a connection made with `url` is encrypted, or the error getting one, rendered as the
/// agent logs it.
async fn connect(url: &str) -> Result<bool, String> {
    let args = DatabaseArgs {
        database_url: url.to_string(),
        database_schema: String::new(),
        database_pool_size: 1,
    };
    let pool =
        persistence_agent::persist::db::pool(&args).map_err(|e| errors::render_anyhow(&e))?;
    let client = pool.get().await.map_err(|e| errors::render(&e))?;
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| errors::render(&e))?;
    Ok(row.get(0))
}

fn url(host: &str, port: u16, query: &str) -> String {
    format!("postgres://postgres@{host}:{port}/postgres?{query}")
}

fn root(path: &Path) -> String {
    format!("sslrootcert={}", path.display())
}

#[tokio::test]
async fn verify_full_connects_encrypted_to_a_server_its_ca_signed() {
    let certs = Certs::new();
    let pg = certs.cluster();
    let ca = root(&certs.path("ca.pem"));
    for host in ["127.0.0.1", "localhost"] {
        let got = connect(&url(host, pg.port, &format!("sslmode=verify-full&{ca}"))).await;
        assert_eq!(got, Ok(true), "verify-full to {host}");
    }
}

#[tokio::test]
async fn verify_full_refuses_a_wrong_host_name_that_verify_ca_accepts() {
    let certs = Certs::new();
    let pg = certs.cluster();
    let ca = root(&certs.path("ca.pem"));
    // The right address under a name the certificate does not hold.
    let wrong = |mode: &str| {
        url(
            "db.wrong.example",
            pg.port,
            &format!("hostaddr=127.0.0.1&sslmode={mode}&{ca}"),
        )
    };
    let err = connect(&wrong("verify-full")).await.unwrap_err();
    assert!(
        err.contains("certificate") && err.contains("db.wrong.example"),
        "{err}"
    );
    assert_eq!(connect(&wrong("verify-ca")).await, Ok(true));
}

#[tokio::test]
async fn verify_full_and_verify_ca_refuse_a_certificate_of_another_ca() {
    let certs = Certs::new();
    let pg = certs.cluster();
    let other = root(&certs.path("other-ca.pem"));
    for mode in ["verify-full", "verify-ca", "require"] {
        let err = connect(&url(
            "127.0.0.1",
            pg.port,
            &format!("sslmode={mode}&{other}"),
        ))
        .await
        .unwrap_err();
        assert!(
            err.contains("invalid peer certificate: UnknownIssuer"),
            "{mode}: {err}"
        );
    }
}

#[tokio::test]
async fn require_encrypts_without_a_root_certificate_and_prefer_is_the_default() {
    let certs = Certs::new();
    let pg = certs.cluster();
    assert_eq!(
        connect(&url("127.0.0.1", pg.port, "sslmode=require")).await,
        Ok(true)
    );
    assert_eq!(
        connect(&url("127.0.0.1", pg.port, "")).await,
        Ok(true),
        "prefer encrypts when offered"
    );
    let err = connect(&url("127.0.0.1", pg.port, "sslmode=verify-full"))
        .await
        .unwrap_err();
    assert!(err.contains("needs sslrootcert"), "{err}");
}

#[tokio::test]
async fn require_refuses_a_server_without_tls_that_prefer_and_disable_accept() {
    let pg = TestCluster::start_new();
    let err = connect(&url("127.0.0.1", pg.port, "sslmode=require"))
        .await
        .unwrap_err();
    assert!(err.contains("server does not support TLS"), "{err}");
    assert_eq!(connect(&url("127.0.0.1", pg.port, "")).await, Ok(false));
    assert_eq!(
        connect(&url("127.0.0.1", pg.port, "sslmode=disable")).await,
        Ok(false)
    );
}
