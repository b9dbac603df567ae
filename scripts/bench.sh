#!/usr/bin/env bash
# Throughput and memory benchmark: pre-loads N sample requests (default 20000) into a fresh
# 6-partition topic, starts a release build of the agent, and measures how long it takes to
# persist them all, plus peak RSS. Uses DATABASE_URL / KAFKA_BROKERS when set (like test.sh).
#   scripts/bench.sh [N]       WORKERS=… DATABASE_POOL_SIZE=… FORMAT=json|avro-confluent|avro-single
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
n=${1:-20000}
ensure_postgres
ensure_kafka
cargo build --release --locked --bin persistence-agent >&2
agent=target/release/persistence-agent
id=$(date +%s)-$$
export DATABASE_SCHEMA=bench_${id//-/_} KAFKA_INPUT_TOPICS=bench.requests.$id KAFKA_RESULTS_TOPIC=bench.results.$id
port=${BENCH_HTTP_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export KAFKA_GROUP_ID=bench-$id HTTP_ADDR=127.0.0.1:$port RUST_LOG=warn
$agent topics --partitions 6 "$KAFKA_INPUT_TOPICS" >/dev/null
$agent topics --partitions 6 "$KAFKA_RESULTS_TOPIC" >/dev/null
$agent migrate --sample-catalogue >/dev/null
# One record per batch: tansu 0.6 answers a fetch that starts inside a multi-record batch with
# nothing (Apache Kafka returns the batch), which would stall the agent after its first pause.
$agent produce --kafka-config batch.num.messages=1 --topic "$KAFKA_INPUT_TOPICS" --sample --count "$n" --format "${FORMAT:-json}"

metric() { curl -sf "http://$HTTP_ADDR/metrics" | awk -v m="$1" 'index($1, m) == 1 {s += $2} END {printf "%d", s}'; }
start=$(date +%s.%N)
$agent run & pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; psql "$DATABASE_URL" -qc "DROP SCHEMA $DATABASE_SCHEMA CASCADE" 2>/dev/null || true' EXIT
alive() { [ -n "$(ps -o stat= -p "$pid" | grep -v Z)" ] || { echo "agent exited" >&2; exit 1; }; }
until curl -sf "http://$HTTP_ADDR/healthz" >/dev/null; do alive; sleep 0.1; done
while [ "$(metric persistence_agent_outcomes_total)" -lt "$n" ]; do alive; sleep 0.2; done
end=$(date +%s.%N)
hwm=$(awk '/VmHWM/ {print $2}' /proc/$pid/status)
secs=$(echo "$end - $start" | bc -l)
conflicts=$(( $(metric 'persistence_agent_transaction_attempts_total{result="serialization_failure"') + $(metric 'persistence_agent_transaction_attempts_total{result="deadlock"') ))
txn_sum=$(curl -sf "http://$HTTP_ADDR/metrics" | awk '$1 == "persistence_agent_transaction_duration_seconds_sum" {print $2}')
txn_count=$(metric persistence_agent_transaction_duration_seconds_count)
printf 'messages        %d (%s, 6 partitions, WORKERS=%s, pool=%s)\n' "$n" "${FORMAT:-json}" "${WORKERS:-16}" "${DATABASE_POOL_SIZE:-16}"
printf 'elapsed         %.2f s (agent start to last outcome, includes group join)\n' "$secs"
printf 'throughput      %.0f messages/s\n' "$(echo "$n / $secs" | bc -l)"
printf 'mean txn        %.2f ms over %d attempts (%d conflict retries)\n' "$(echo "1000 * $txn_sum / $txn_count" | bc -l)" "$txn_count" "$conflicts"
printf 'peak RSS        %.1f MiB\n' "$(echo "$hwm / 1024" | bc -l)"
