//! TLS to PostgreSQL as `DATABASE_URL`'s `sslmode` says, against throwaway clusters with and
//! without `ssl=on` and certificates made here with the openssl CLI.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::TestCluster;
use persistence_agent::ops::config::DatabaseArgs;
use persistence_agent::ops::errors;

/// A CA, a server certificate it signed for `localhost` and 127.0.0.1, a client certificate it
/// signed for the user `postgres`, and a second CA that signed only a client certificate.
struct Certs {
    dir: PathBuf,
}

const SERVER_EXT: &str = "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
                          keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n";
const CLIENT_EXT: &str =
    "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n";

impl Certs {
    fn new() -> Certs {
        let dir = std::env::temp_dir().join(common::unique("pa-tls"));
        std::fs::create_dir_all(&dir).unwrap();
        let c = Certs { dir };
        common::pki::ca(&c.dir, "ca");
        common::pki::ca(&c.dir, "other-ca");
        common::pki::signed(&c.dir, "ca", "server", "localhost", SERVER_EXT);
        // PostgreSQL's `cert` method maps the certificate's CN to the user name.
        common::pki::signed(&c.dir, "ca", "client", "postgres", CLIENT_EXT);
        common::pki::signed(&c.dir, "other-ca", "stranger", "postgres", CLIENT_EXT);
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

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A cluster serving TLS with these certificates.
    fn cluster(&self) -> TestCluster {
        self.cluster_with("")
    }

    /// A cluster whose pg_hba.conf lets TCP clients in only with a certificate of `ca.pem`.
    fn cluster_requiring_client_certificates(&self) -> TestCluster {
        // `local` stays open: pg_ctl's start-up wait connects over the socket.
        let hba = self.path("pg_hba.conf");
        std::fs::write(
            &hba,
            "local all all trust\nhostssl all all 127.0.0.1/32 cert\n",
        )
        .unwrap();
        self.cluster_with(&format!(
            "-c ssl_ca_file={} -c hba_file={}",
            self.path("ca.pem").display(),
            hba.display()
        ))
    }

    fn cluster_with(&self, opts: &str) -> TestCluster {
        std::fs::set_permissions(
            self.path("server.key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        TestCluster::start_new_with(&format!(
            "-c ssl=on -c ssl_cert_file={} -c ssl_key_file={} {opts}",
            self.path("server.pem").display(),
            self.path("server.key").display()
        ))
    }

    /// `sslcert` and `sslkey` of the client certificate `name`.
    fn client(&self, name: &str) -> String {
        format!(
            "sslcert={}&sslkey={}",
            self.path(&format!("{name}.pem")).display(),
            self.path(&format!("{name}.key")).display()
        )
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

#[tokio::test]
async fn a_client_certificate_of_the_servers_ca_logs_in_where_pg_hba_requires_one() {
    let certs = Certs::new();
    let pg = certs.cluster_requiring_client_certificates();
    let args = DatabaseArgs {
        database_url: url(
            "127.0.0.1",
            pg.port,
            &format!(
                "sslmode=verify-full&{}&{}",
                root(&certs.path("ca.pem")),
                certs.client("client")
            ),
        ),
        database_schema: String::new(),
        database_pool_size: 2,
    };
    let pool = persistence_agent::persist::db::pool(&args).unwrap();
    let applied = persistence_agent::persist::db::migrate(&pool)
        .await
        .map_err(|e| errors::render_anyhow(&e))
        .expect("migrate over a certificate login");
    assert!(!applied.is_empty());
    let client = pool.get().await.unwrap();
    let row = client
        .query_one(
            "SELECT client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, Option<String>>(0).as_deref(),
        Some("/CN=postgres")
    );
}

#[tokio::test]
async fn without_a_client_certificate_or_with_one_of_another_ca_the_login_is_refused() {
    let certs = Certs::new();
    let pg = certs.cluster_requiring_client_certificates();
    let base = format!("sslmode=verify-full&{}", root(&certs.path("ca.pem")));
    let err = connect(&url("127.0.0.1", pg.port, &base))
        .await
        .unwrap_err();
    assert!(
        err.contains("connection requires a valid client certificate"),
        "{err}"
    );
    let stranger = format!("{base}&{}", certs.client("stranger"));
    let err = connect(&url("127.0.0.1", pg.port, &stranger))
        .await
        .unwrap_err();
    assert!(err.contains("UnknownCA"), "{err}");
}
