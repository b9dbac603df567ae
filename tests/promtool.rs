//! Monitoring as code: the Prometheus rules are valid and pass their promtool unit tests, the
//! docker-compose Prometheus config is valid, and every Grafana dashboard query reads metrics
//! the agent exports or recording rules that prometheus/rules.yml defines.
//!
//! `promtool` must be on PATH (Debian: `apt-get install prometheus`); without it these tests
//! fail rather than skip.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    let path: PathBuf = root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Runs promtool in the crate root and returns its combined output; panics unless it succeeds.
fn promtool(args: &[&str]) -> String {
    let output = match Command::new("promtool")
        .args(args)
        .current_dir(root())
        .output()
    {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "promtool is not on PATH, so the Prometheus rules cannot be checked. Install it with \
             `apt-get install prometheus` (Debian's prometheus package provides promtool); \
             these tests never skip."
        ),
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "`promtool {}` failed ({}):\n{text}",
        args.join(" "),
        output.status
    );
    text
}

#[test]
fn recording_and_alert_rules_are_valid() {
    let out = promtool(&["check", "rules", "prometheus/rules.yml"]);
    assert!(
        out.contains("SUCCESS"),
        "unexpected promtool output:\n{out}"
    );
}

#[test]
fn alert_rules_pass_promtool_unit_tests() {
    let out = promtool(&["test", "rules", "prometheus/rules_test.yml"]);
    assert!(
        out.contains("SUCCESS"),
        "unexpected promtool output:\n{out}"
    );
}

#[test]
fn prometheus_config_scrapes_the_agent_and_loads_the_rules() {
    // --syntax-only: the rules path is the container's (/etc/prometheus/rules.yml).
    promtool(&[
        "check",
        "config",
        "--syntax-only",
        "prometheus/prometheus.yml",
    ]);
    let config = read("prometheus/prometheus.yml");
    for needle in [
        "job_name: persistence-agent",
        "names: ['agent']",
        "port: 8080",
        "/etc/prometheus/rules.yml",
    ] {
        assert!(config.contains(needle), "prometheus.yml lacks `{needle}`");
    }
}

#[test]
fn rules_reference_only_exported_metrics() {
    let rules = read("prometheus/rules.yml");
    let exported = exported();
    let mut referenced = BTreeSet::new();
    let mut rest = rules.as_str();
    while let Some(start) = rest.find("persistence_agent_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        referenced.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    assert!(!referenced.is_empty(), "rules.yml references no metric");
    for name in &referenced {
        assert!(
            is_exported(name, &exported),
            "rules.yml uses `{name}`, which the agent does not export"
        );
    }
}

#[test]
fn dashboard_queries_use_exported_metrics() {
    let dashboard = dashboard();
    let exported = exported();
    let recorded = recorded_rules();
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(
        exprs.len() >= 12,
        "only {} queries in the dashboard",
        exprs.len()
    );
    for expr in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "query reads no metric: {expr}");
        for name in &names {
            assert!(
                name.starts_with("persistence_agent_") || name.starts_with("persistence_agent:"),
                "query uses `{name}`, not a persistence_agent metric: {expr}"
            );
            if name.contains(':') {
                assert!(
                    recorded.contains(name),
                    "query uses `{name}`, which prometheus/rules.yml does not record: {expr}"
                );
            } else {
                assert!(
                    is_exported(name, &exported),
                    "query uses `{name}`, which the agent does not export: {expr}"
                );
            }
        }
    }
}

#[test]
fn dashboard_has_the_slo_and_operations_panels() {
    let dashboard = dashboard();
    let mut panels = Vec::new();
    collect_panels(&dashboard, &mut panels);
    // Title, then metrics (or recording rules) its queries must read.
    let required: &[(&str, &[&str])] = &[
        (
            "Success rate vs 99% objective",
            &[
                "persistence_agent:slo_success:ratio_rate5m",
                "persistence_agent:slo_objective:ratio",
            ],
        ),
        (
            "Error budget remaining (30d)",
            &["persistence_agent:slo_error_budget_remaining:ratio_rate30d"],
        ),
        (
            "Throughput by outcome",
            &["persistence_agent_outcomes_total"],
        ),
        (
            "End-to-end latency p50 / p95 / p99",
            &["persistence_agent_end_to_end_latency_seconds_bucket"],
        ),
        (
            "Transaction duration p99",
            &["persistence_agent_transaction_duration_seconds_bucket"],
        ),
        ("Retries by tier", &["persistence_agent_retry_routed_total"]),
        (
            "Transaction attempts by result",
            &["persistence_agent_transaction_attempts_total"],
        ),
        (
            "Dead letters by class",
            &["persistence_agent_dead_letters_total"],
        ),
        (
            "Consumer lag per partition",
            &["persistence_agent_consumer_lag_messages"],
        ),
        (
            "Connection pool",
            &[
                "persistence_agent_db_pool_connections",
                "persistence_agent_db_pool_available",
                "persistence_agent_db_pool_waiting",
            ],
        ),
        ("Database outage", &["persistence_agent_database_outage"]),
        (
            "In-flight messages and paused partitions",
            &[
                "persistence_agent_in_flight_messages",
                "persistence_agent_paused_partitions",
            ],
        ),
    ];
    for (title, metrics) in required {
        let panel = panels
            .iter()
            .find(|p| p.get("title").and_then(Value::as_str) == Some(*title))
            .unwrap_or_else(|| panic!("the dashboard has no panel titled {title:?}"));
        let mut exprs = Vec::new();
        collect_exprs(panel, &mut exprs);
        let names: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
        for metric in *metrics {
            assert!(
                names.contains(*metric),
                "panel {title:?} does not query `{metric}`"
            );
        }
    }
}

#[test]
fn dashboard_queries_go_to_the_prometheus_datasource_variable() {
    let dashboard = dashboard();
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let ds = variables
        .iter()
        .find(|v| v["name"] == "DS_PROMETHEUS")
        .expect("a DS_PROMETHEUS datasource variable");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    assert_eq!(
        ds["current"]["value"], "prometheus",
        "defaults to the provisioned uid"
    );
    let mut panels = Vec::new();
    collect_panels(&dashboard, &mut panels);
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(
            panel["datasource"]["uid"], "${DS_PROMETHEUS}",
            "panel {} does not use the datasource variable",
            panel["title"]
        );
        for target in panel["targets"].as_array().into_iter().flatten() {
            assert_eq!(
                target["datasource"]["uid"], "${DS_PROMETHEUS}",
                "in {}",
                panel["title"]
            );
        }
    }
    let datasources = read("dashboards/provisioning/datasources.yml");
    assert!(
        datasources.contains("uid: prometheus"),
        "datasources.yml provisions uid prometheus"
    );
}

#[test]
fn promql_metric_name_extraction_skips_functions_labels_and_variables() {
    let expr = r#"histogram_quantile(0.99, sum by (le, tier) (
            rate(a_bucket{tier=~"5m|x}"}[$__rate_interval] offset 1h)))
        / on (job) group_left (version) b:rec:ratio > bool 1e-3 and ignoring(x) c unless ${v}
        or max without (instance) (d) or sum(e) by (le)"#;
    assert_eq!(
        metric_names(expr),
        ["a_bucket", "b:rec:ratio", "c", "d", "e"]
    );
    assert_eq!(metric_names("vector(0.99)"), Vec::<String>::new());
}

fn dashboard() -> Value {
    serde_json::from_str(&read("dashboards/persistence-agent.json"))
        .expect("dashboards/persistence-agent.json is valid JSON")
}

/// Names recorded by `- record:` entries of prometheus/rules.yml.
fn recorded_rules() -> BTreeSet<String> {
    read("prometheus/rules.yml")
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- record:"))
        .map(|name| name.trim().to_string())
        .collect()
}

/// The full name of every metric in the agent's registry, observed yet or not.
fn exported() -> BTreeSet<String> {
    persistence_agent::ops::metrics::Metrics::new()
        .names()
        .iter()
        .cloned()
        .collect()
}

/// Whether `name` is a metric the agent registers (histograms also expose _bucket, _sum and
/// _count).
fn is_exported(name: &str, exported: &BTreeSet<String>) -> bool {
    exported.contains(name)
        || ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|suffix| name.strip_suffix(suffix))
            .any(|base| exported.contains(base))
}

/// Every panel object, rows and panels nested in collapsed rows included.
fn collect_panels<'a>(value: &'a Value, out: &mut Vec<&'a Value>) {
    for panel in value
        .get("panels")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        out.push(panel);
        collect_panels(panel, out);
    }
}

/// Every `expr` string anywhere below `value`.
fn collect_exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", Value::String(expr)) => out.push(expr.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// Metric names (series selectors) in a PromQL expression: identifiers that are not function
/// calls, keywords, label names (in matchers or grouping clauses), numbers, durations or
/// Grafana variables.
fn metric_names(expr: &str) -> Vec<String> {
    const GROUPING: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    const KEYWORDS: [&str; 8] = [
        "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan",
    ];
    // Aggregation operators may be followed by a grouping clause instead of `(`.
    const AGGREGATIONS: [&str; 12] = [
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&chars, i);
        } else if c == '{' {
            i = skip_enclosed(&chars, i, '{', '}');
        } else if c == '[' {
            i = skip_enclosed(&chars, i, '[', ']');
        } else if c == '$' {
            i += 1;
            if chars.get(i) == Some(&'{') {
                i = skip_enclosed(&chars, i, '{', '}');
            }
            while i < chars.len() && ident(chars[i]) {
                i += 1;
            }
        } else if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if ident(c) {
            let start = i;
            while i < chars.len() && ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let opens_paren = chars.get(next) == Some(&'(');
            if GROUPING.contains(&word.as_str()) {
                if opens_paren {
                    i = skip_enclosed(&chars, next, '(', ')');
                }
            } else if !opens_paren
                && !KEYWORDS.contains(&word.to_ascii_lowercase().as_str())
                && !AGGREGATIONS.contains(&word.as_str())
            {
                names.push(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Index just past the string literal that starts at `start`.
fn skip_string(chars: &[char], start: usize) -> usize {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() && chars[i] != quote {
        if chars[i] == '\\' {
            i += 1;
        }
        i += 1;
    }
    i + 1
}

/// Index just past the `close` matching the `open` at `start`, skipping string literals.
fn skip_enclosed(chars: &[char], start: usize, open: char, close: char) -> usize {
    let mut depth = 0;
    let mut i = start;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(chars, i);
            continue;
        }
        if c == open {
            depth += 1;
        } else if c == close {
            depth -= 1;
            if depth == 0 {
                return i + 1;
            }
        }
        i += 1;
    }
    i
}
