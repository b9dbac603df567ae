# Shared by scripts/test.sh and scripts/run-local.sh: find or start PostgreSQL and a broker.

TANSU_VERSION=0.6.0

have_port() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# The first port from $1 up that nothing listens on.
free_port() {
  local port=$1
  while have_port 127.0.0.1 "$port"; do port=$((port + 1)); done
  echo "$port"
}

# Whether HOST PORT answers a Kafka ApiVersions request (v0, correlation id 7) within 3 s: a web
# server or anything else that merely listens there does not.
speaks_kafka() {
  local reply
  reply=$(timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1" || exit 1
    printf "\x00\x00\x00\x0f\x00\x12\x00\x00\x00\x00\x00\x07\x00\x05probe" >&3
    head -c 8 <&3 | od -An -v -tx1' "$1" "$2" 2>/dev/null | tr -d ' \n')
  [ "${reply:8:8}" = 00000007 ]
}

# Runs each registered command when the calling script exits, however it exits (an error, a
# failed check, Ctrl-C, SIGTERM), the last registered first: `at_exit 'kill $pid'`.
AT_EXIT=()
at_exit() {
  AT_EXIT+=("$1")
  trap 'for ((i = ${#AT_EXIT[@]} - 1; i >= 0; i--)); do eval "${AT_EXIT[i]}" 2>/dev/null || true; done' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

# Sets DATABASE_URL: given, the local server on 5432, or a throwaway cluster.
ensure_postgres() {
  if [ -n "${DATABASE_URL:-}" ]; then return; fi
  if have_port 127.0.0.1 5432; then
    export DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres
  else
    echo "no PostgreSQL on 127.0.0.1:5432: starting a throwaway cluster" >&2
    DATABASE_URL=$(WATCH_PID=$$ scripts/throwaway-postgres.sh "$(free_port 55432)")
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

# Sets KAFKA_BROKERS: given, a Kafka broker already on 127.0.0.1:$TANSU_PORT (default 9092), or
# a tansu broker started there now (stopped when the calling script exits). A given
# KAFKA_BROKERS of one local address with nothing listening gets tansu started there too.
# Something else listening on the port is an error that names it.
ensure_kafka() {
  local port
  if [ -n "${KAFKA_BROKERS:-}" ]; then
    case "$KAFKA_BROKERS" in
      127.0.0.1:* | localhost:*) port=${KAFKA_BROKERS#*:} ;;
      *) return 0 ;;
    esac
    [[ $port =~ ^[0-9]+$ ]] || return 0
  else
    port=${TANSU_PORT:-9092}
    export KAFKA_BROKERS=127.0.0.1:$port
  fi
  if have_port 127.0.0.1 "$port"; then
    speaks_kafka 127.0.0.1 "$port" && return
    echo "127.0.0.1:$port is taken by something that does not answer as a Kafka broker:" \
      "stop it, set KAFKA_BROKERS to a broker, or TANSU_PORT to a free port for the local tansu" >&2
    return 1
  fi
  ensure_tansu
  mkdir -p .local
  tansu broker --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine memory://tansu/ >.local/tansu.log 2>&1 &
  TANSU_PID=$!
  at_exit 'kill $TANSU_PID'
  for _ in $(seq 1 100); do speaks_kafka 127.0.0.1 "$port" && return; sleep 0.2; done
  echo "tansu did not start on 127.0.0.1:$port; see .local/tansu.log" >&2
  cat .local/tansu.log >&2
  return 1
}

# Python modules of the deployment checks (tests/deploy.rs): compose-spec validation, Helm's
# linter (helm-sdkpy declares Python >= 3.12 but works on 3.11), Helm v4's renderer
# (helm-python-sdk) and the Kubernetes schemas (kubernetes-validate); and the Kafka client the
# README's Python example uses (tests/readme.rs).
ensure_python_deps() {
  python3 -c "import jsonschema, yaml" 2>/dev/null || pip install -q jsonschema pyyaml >&2
  python3 -c "import helm_sdkpy" 2>/dev/null || pip install -q --ignore-requires-python helm-sdkpy cffi >&2
  python3 -c "import helm_python, kubernetes_validate" 2>/dev/null \
    || pip install -q helm-python-sdk kubernetes-validate >&2
  python3 -c "import confluent_kafka" 2>/dev/null || pip install -q confluent-kafka >&2
}
