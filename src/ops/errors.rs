//! Error text for operators: an error with its causes, each said once, and the address a
//! client tried, never its password.

use std::error::Error;

/// The error followed by each cause whose text the line does not hold yet: many libraries
/// (tokio-postgres, deadpool, rdkafka) already print their cause in their own message, so
/// printing the whole chain repeats it.
pub fn render(err: &(dyn Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut cause = err.source();
    while let Some(e) = cause {
        let text = e.to_string();
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = e.source();
    }
    line
}

/// `render` for an `anyhow::Error` (its context layers included).
pub fn render_anyhow(err: &anyhow::Error) -> String {
    render(err.as_ref())
}

/// Where a PostgreSQL URL (or key=value string) points: `host:port/dbname`, without the user's
/// password, for error messages.
pub fn database_target(url: &str) -> String {
    let Ok((cfg, _)) = super::config::parse_database_url(url) else {
        return "an unparsable DATABASE_URL".into();
    };
    let ports = cfg.get_ports();
    let hosts: Vec<String> = cfg
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let host = match h {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            };
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            format!("{host}:{port}")
        })
        .collect();
    let hosts = match hosts.is_empty() {
        true => "localhost:5432".to_string(),
        false => hosts.join(","),
    };
    format!(
        "{hosts}/{}",
        cfg.get_dbname().unwrap_or("(user's database)")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(String, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl Error for Layer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    fn chain(texts: &[&str]) -> Layer {
        texts
            .iter()
            .rev()
            .fold(None, |inner, t| {
                Some(Layer(t.to_string(), inner.map(Box::new)))
            })
            .expect("one layer at least")
    }

    #[test]
    fn a_cause_already_in_its_parents_text_is_said_once() {
        let err = chain(&[
            "error connecting to server: Connection refused (os error 111)",
            "error connecting to server: Connection refused (os error 111)",
            "Connection refused (os error 111)",
        ]);
        assert_eq!(
            render(&err),
            "error connecting to server: Connection refused (os error 111)"
        );
    }

    #[test]
    fn causes_the_parent_does_not_name_are_kept_in_order() {
        let err = anyhow::Error::new(chain(&["db error", "FATAL: database \"x\" does not exist"]))
            .context("migrating the database at 127.0.0.1:5432/x");
        assert_eq!(
            render_anyhow(&err),
            "migrating the database at 127.0.0.1:5432/x: db error: FATAL: database \"x\" does not exist"
        );
    }

    #[test]
    fn the_database_target_names_host_port_and_database_but_no_password() {
        let url = "postgres://agent:s3cret@db.example:6543/books?sslmode=disable";
        assert_eq!(database_target(url), "db.example:6543/books");
        let kv = "host=10.0.0.5 port=5433 user=agent password=s3cret dbname=books";
        assert_eq!(database_target(kv), "10.0.0.5:5433/books");
        assert!(!database_target("postgres://a:s3cret@[::1").contains("s3cret"));
    }
}
