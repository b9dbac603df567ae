#!/usr/bin/env bash
# Runs the whole pipeline locally without Docker: PostgreSQL (DATABASE_URL, or a throwaway
# cluster), a Kafka-protocol broker (KAFKA_BROKERS, or tansu on 127.0.0.1:9092), migrations with
# the sample catalogue, the agent, and sample traffic in all three encodings plus three poison
# messages (two dead-lettered, one sent to the first retry tier). The agent keeps
# running until Ctrl-C; with --once it stops after the sample traffic is persisted. Whatever it
# started (agent, broker, throwaway cluster and its temporary directory) is gone when it exits.
#
# Ports, each taken from its variable when set:
#   PGPORT_LOCAL   throwaway PostgreSQL (default: the first free port from 55433)
#   TANSU_PORT     local tansu broker (default 9092; used as is when a Kafka broker answers there)
#   HTTP_ADDR      the agent's metrics and probes (default: 127.0.0.1 and the first free port
#                  from 8080)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
once=false; [ "${1:-}" = "--once" ] && once=true

ensure_kafka
if [ -z "${DATABASE_URL:-}" ]; then
  DATABASE_URL=$(WATCH_PID=$$ scripts/throwaway-postgres.sh "${PGPORT_LOCAL:-$(free_port 55433)}")
  export DATABASE_URL
fi
cargo build --release --locked --bin persistence-agent
agent=target/release/persistence-agent
export KAFKA_INPUT_TOPICS=${KAFKA_INPUT_TOPICS:-persistence.requests}
export KAFKA_RESULTS_TOPIC=${KAFKA_RESULTS_TOPIC:-persistence.results}
export HTTP_ADDR=${HTTP_ADDR:-127.0.0.1:$(free_port 8080)}
export LOG_FORMAT=${LOG_FORMAT:-pretty}

$agent topics --partitions 6 "$KAFKA_INPUT_TOPICS"
$agent topics --partitions 1 "$KAFKA_RESULTS_TOPIC"
$agent migrate --sample-catalogue

$agent run &
agent_pid=$!
at_exit 'kill $agent_pid; wait $agent_pid'
until curl -sf "http://$HTTP_ADDR/readyz" >/dev/null; do
  kill -0 $agent_pid || { echo "agent exited" >&2; exit 1; }
  sleep 0.5
done

$agent produce --topic "$KAFKA_INPUT_TOPICS" --sample --count 20 --format json
$agent produce --topic "$KAFKA_INPUT_TOPICS" --sample --count 10 --format avro-confluent
$agent produce --topic "$KAFKA_INPUT_TOPICS" --sample --count 10 --format avro-single
# Poison: undecodable bytes and a score out of range (dead-lettered), an unknown book (retry tier).
$agent produce --topic "$KAFKA_INPUT_TOPICS" --sample --count 3 --poison-ratio 1

persisted() {
  curl -sf "http://$HTTP_ADDR/metrics" | awk '/^persistence_agent_outcomes_total/ {n += $2} END {print n + 0}'
}
for _ in $(seq 1 120); do [ "$(persisted)" -ge 43 ] && break; sleep 0.5; done
echo
echo "== outcomes (from http://$HTTP_ADDR/metrics)"
curl -sf "http://$HTTP_ADDR/metrics" | grep '^persistence_agent_outcomes_total'
if command -v psql >/dev/null; then
  echo "== rows in $DATABASE_URL"
  psql "$DATABASE_URL" -c "SELECT (SELECT count(*) FROM recommendation) AS recommendations,
    (SELECT count(*) FROM recommendation_book) AS books_linked,
    (SELECT count(*) FROM reader_context) AS readers, (SELECT count(*) FROM audit_log) AS audit_rows"
fi
echo "== dead letters"
$agent dlq list
if $once; then exit 0; fi
echo "agent running (metrics: http://$HTTP_ADDR/metrics, database: $DATABASE_URL, brokers: $KAFKA_BROKERS); Ctrl-C stops it"
wait $agent_pid
