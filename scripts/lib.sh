# Shared by scripts/test.sh and scripts/run-local.sh: find or start PostgreSQL and a broker.

TANSU_VERSION=0.6.0

have_port() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# Sets DATABASE_URL: given, the local server on 5432, or a throwaway cluster.
ensure_postgres() {
  if [ -n "${DATABASE_URL:-}" ]; then return; fi
  if have_port 127.0.0.1 5432; then
    export DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres
  else
    echo "no PostgreSQL on 127.0.0.1:5432: starting a throwaway cluster" >&2
    DATABASE_URL=$(WATCH_PID=$$ scripts/throwaway-postgres.sh 55432)
    export DATABASE_URL
  fi
}

# Installs tansu (an Apache-Kafka-protocol broker) from crates.io when missing.
ensure_tansu() {
  export PATH="$HOME/.cargo/bin:$PATH"
  if command -v tansu >/dev/null && tansu --version 2>/dev/null | grep -q "$TANSU_VERSION"; then return; fi
  echo "installing tansu $TANSU_VERSION (about 10 minutes on 2 cores)" >&2
  cargo install "tansu@$TANSU_VERSION" --locked --no-default-features --features dynostore >&2
}

# Sets KAFKA_BROKERS: given, a broker already on 127.0.0.1:9092, or a tansu broker started now
# (stopped when the calling script exits).
ensure_kafka() {
  if [ -n "${KAFKA_BROKERS:-}" ]; then return; fi
  export KAFKA_BROKERS=127.0.0.1:9092
  if have_port 127.0.0.1 9092; then return; fi
  ensure_tansu
  mkdir -p .local
  tansu broker --listener-url tcp://127.0.0.1:9092 --advertised-listener-url tcp://127.0.0.1:9092 \
    --storage-engine memory://tansu/ >.local/tansu.log 2>&1 &
  TANSU_PID=$!
  trap 'kill $TANSU_PID 2>/dev/null || true' EXIT
  for _ in $(seq 1 100); do have_port 127.0.0.1 9092 && return; sleep 0.2; done
  echo "tansu did not start; see .local/tansu.log" >&2
  cat .local/tansu.log >&2
  return 1
}

# Python modules of the deployment checks (tests/deploy.rs): compose-spec validation and Helm's
# linter (helm-sdkpy declares Python >= 3.12 but works on 3.11).
ensure_python_deps() {
  python3 -c "import jsonschema, yaml" 2>/dev/null || pip install -q jsonschema pyyaml >&2
  python3 -c "import helm_sdkpy" 2>/dev/null || pip install -q --ignore-requires-python helm-sdkpy cffi >&2
}
