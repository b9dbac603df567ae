//! Deployment artefacts checked without Docker or Kubernetes: docker-compose.yml against the
//! compose-spec schema, environment variables against the service's configuration, and the helm
//! chart with Helm's own linter, rendered with Helm's library and validated against the
//! Kubernetes schemas (scripts/check-deploy.py).

use std::process::Command;

#[test]
fn compose_file_helm_chart_and_env_vars_are_consistent_and_valid() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("python3")
        .arg(format!("{root}/scripts/check-deploy.py"))
        .output()
        .expect("python3 runs (install: pip install jsonschema pyyaml helm-python-sdk kubernetes-validate; pip install --ignore-requires-python helm-sdkpy cffi)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "deployment checks failed:\n{text}");
    assert!(text.contains("all deployment checks passed"));
}

#[test]
fn agent_binary_checks_its_own_health_for_the_container() {
    let out = Command::new(env!("CARGO_BIN_EXE_persistence-agent"))
        .args(["health", "--url", "http://127.0.0.1:9/readyz"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "nothing listens on port 9");
}
