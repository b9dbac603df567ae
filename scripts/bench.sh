#!/usr/bin/env bash
# Throughput benchmark against the database's own ceiling, in one run on one machine:
#  1. pgbench runs the agent's own transaction (scripts/pgbench-ceiling.sh) at the agent's
#     concurrency (WORKERS clients): the single-request ceiling;
#  2. N sample requests (USERS users, 1-5 books, FORMAT encodings) are pre-loaded into a fresh
#     6-partition topic, a release build of the agent persists them, and the script prints
#     requests/s, its ratio to the ceiling, CPU per 1,000 requests, conflict retries and peak RSS.
#   scripts/bench.sh [N]   N=20000 USERS=10000 FORMAT=mixed WORKERS=16 DATABASE_POOL_SIZE=16
#                          CEILING_SECONDS=20 (0 skips the ceiling), PROFILE=<perf.data file>;
#                          DATABASE_URL / KAFKA_BROKERS
#                          as scripts/test.sh. Any other agent setting passes through the env.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
n=${1:-20000}
users=${USERS:-10000}
format=${FORMAT:-mixed}
workers=${WORKERS:-16}
ensure_postgres
ensure_kafka
cargo build --release --locked --bin persistence-agent >&2
agent=target/release/persistence-agent

ceiling=
if [ "${CEILING_SECONDS:-20}" != 0 ]; then
  line=$(CLIENTS=$workers USERS=$users scripts/pgbench-ceiling.sh "${CEILING_SECONDS:-20}")
  echo "$line"
  ceiling=$(awk '{print $2}' <<<"$line")
fi

id=$(date +%s)-$$
export DATABASE_SCHEMA=bench_${id//-/_} KAFKA_INPUT_TOPICS=bench.requests.$id KAFKA_RESULTS_TOPIC=bench.results.$id
port=${BENCH_HTTP_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export KAFKA_GROUP_ID=bench-$id HTTP_ADDR=127.0.0.1:$port RUST_LOG=warn WORKERS=$workers
$agent topics --partitions 6 "$KAFKA_INPUT_TOPICS" >/dev/null
$agent topics --partitions 6 "$KAFKA_RESULTS_TOPIC" >/dev/null
$agent migrate --sample-catalogue >/dev/null
# One record per batch: tansu 0.6 answers a fetch that starts inside a multi-record batch with
# nothing (Apache Kafka returns the batch), which would stall the agent after a pause.
$agent produce --kafka-config batch.num.messages=1 --topic "$KAFKA_INPUT_TOPICS" --sample \
  --count "$n" --users "$users" --format "$format"

metric() { curl -sf "http://$HTTP_ADDR/metrics" | awk -v m="$1" 'index($1, m) == 1 {s += $2} END {printf "%d", s}'; }
start=$(date +%s.%N)
$agent run & pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; psql "$DATABASE_URL" -qc "DROP SCHEMA $DATABASE_SCHEMA CASCADE" 2>/dev/null || true' EXIT
alive() { [ -n "$(ps -o stat= -p "$pid" | grep -v Z)" ] || { echo "agent exited" >&2; exit 1; }; }
until curl -sf "http://$HTTP_ADDR/healthz" >/dev/null; do alive; sleep 0.1; done
# Timed from the first outcome: the group join (seconds on tansu) is not throughput.
while [ "$(metric persistence_agent_outcomes_total)" -lt 1 ]; do alive; sleep 0.05; done
first=$(date +%s.%N)
ticks0=$(awk '{print $14 + $15}' /proc/$pid/stat)
# PROFILE=<file>: perf samples the agent from the first outcome to the last (perf report -i).
[ -z "${PROFILE:-}" ] || { perf record -q -F 499 -g -p "$pid" -o "$PROFILE" 2>/dev/null & perf_pid=$!; }
while [ "$(metric persistence_agent_outcomes_total)" -lt "$n" ]; do alive; sleep 0.2; done
end=$(date +%s.%N)
[ -z "${perf_pid:-}" ] || { kill -INT "$perf_pid"; wait "$perf_pid" || true; }
hwm=$(awk '/VmHWM/ {print $2}' /proc/$pid/status)
# utime + stime of the agent, in clock ticks.
ticks=$(awk '{print $14 + $15}' /proc/$pid/stat)
hz=$(getconf CLK_TCK)
secs=$(echo "$end - $first" | bc -l)
joined=$(echo "$first - $start" | bc -l)
rate=$(echo "$n / $secs" | bc -l)
conflicts=$(( $(metric 'persistence_agent_transaction_attempts_total{result="serialization_failure"') + $(metric 'persistence_agent_transaction_attempts_total{result="deadlock"') ))
txn_sum=$(curl -sf "http://$HTTP_ADDR/metrics" | awk '$1 == "persistence_agent_transaction_duration_seconds_sum" {print $2}')
txn_count=$(metric persistence_agent_transaction_duration_seconds_count)
printf 'requests        %d (%s, %d users, 6 partitions, WORKERS=%s, pool=%s)\n' "$n" "$format" "$users" "$workers" "${DATABASE_POOL_SIZE:-16}"
printf 'elapsed         %.2f s (first outcome to last; start and group join took %.1f s more)\n' "$secs" "$joined"
if [ -n "$ceiling" ]; then
  printf 'throughput      %.0f requests/s = %.2fx the pgbench ceiling (%s tps)\n' "$rate" "$(echo "$rate / $ceiling" | bc -l)" "$ceiling"
else
  printf 'throughput      %.0f requests/s\n' "$rate"
fi
printf 'agent CPU       %.0f us per request while it ran (%.1f s in all, start-up included)\n' "$(echo "1000000 * ($ticks - $ticks0) / $hz / $n" | bc -l)" "$(echo "$ticks / $hz" | bc -l)"
printf 'mean txn        %.2f ms over %d attempts (%.1f conflict retries per 1,000)\n' "$(echo "1000 * $txn_sum / $txn_count" | bc -l)" "$txn_count" "$(echo "1000 * $conflicts / $n" | bc -l)"
printf 'peak RSS        %.1f MiB\n' "$(echo "$hwm / 1024" | bc -l)"
