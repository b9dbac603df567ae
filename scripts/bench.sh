#!/usr/bin/env bash
# Throughput benchmark against the database's own ceiling, in one run on one machine:
#  1. ceilings: pgbench runs the agent's own SQL (scripts/pgbench-ceiling.sh), single-request at
#     DATABASE_POOL_SIZE clients and batched (BATCH_MAX requests per transaction) at
#     BATCH_CONCURRENCY clients;
#  2. N sample requests (USERS users, 1-5 books, FORMAT encodings) are loaded once into a
#     6-partition topic; release builds of the agent persist them, each run with its own
#     consumer group and database schema: unbatched (BATCH_MAX=1), batched (defaults), and
#     the batched agent scaled out to 2 and 4 members of one group;
#  3. latency: JSON requests produced at half the batched rate, produce-to-result percentiles,
#     and the broker's own one-hop latency at the same rate (scripts/broker-latency.py); then
#     latency-mock, the same on librdkafka's mock cluster (examples/mock_broker.rs) with a
#     5 ms fetch wait, where tansu holds each fetch 500 ms: what the agent itself adds. Under
#     each, the share of the database's transactions in that time (scripts/stages.py, from the
#     agent's /metrics) and the checkpoints PostgreSQL began while the load ran.
# Each run prints requests/s, its ratio to the ceilings, CPU per request, conflict retries per
# 1,000 and peak RSS, and (scripts/cores.py) the cores PostgreSQL, the clients and the broker
# used meanwhile: on a shared machine what the agent and the broker use, PostgreSQL cannot.
#   scripts/bench.sh [N]   N=100000 USERS=10000 FORMAT=mixed CEILING_SECONDS=20 (0 skips them)
#                          RUNS="unbatched batched scale latency latency-mock" (also: alt, the
#                          batched run with ALT_AGENT=<binary> and/or ALT_ENV="KEY=VALUE ..."
#                          agent settings)
#                          PROFILE=<perf.data> (perf samples the run labelled PROFILE_RUN, default
#                          batched; PERF_CALLGRAPH="--call-graph dwarf" for stacks through code
#                          without frame pointers; the profiled run's CPU figures include perf's),
#                          METRICS_DUMP=<prefix> (the first agent's /metrics after each run),
#                          LATENCY_RATE=<requests/s> (instead of half the batched rate),
#                          LANES=1 (under each latency run, what the agent's database sessions
#                          were doing: scripts/lanes.py, sampling every 20 ms; off by default:
#                          the sampler's own process takes about 0.04 cores from the run it
#                          describes, and its queries some of PostgreSQL's),
#                          TIMELINE=1 (under each latency run, its latency half a second at a
#                          time beside the agent's in-flight messages and batches, the idle
#                          cores, runnable threads and ms per disk write: scripts/timeline.py,
#                          reading /metrics and /proc every 100 ms; off by default, as LANES),
#                          LATENCY_LINGER_MS=5 (linger.ms of the latency runs' load generator),
#                          THREADS=1 (under each throughput run, the agents' context switches
#                          per request and cores by thread name: scripts/threads.py, from
#                          /proc/<pid>/task, recorded by the run's two CPU snapshots),
#                          MOCK_BROKER=<binary> (else a release build of examples/mock_broker),
#                          MOCK_FETCH_WAIT_MS=5 (fetch.wait.max.ms of latency-mock's consumers;
#                          its tier and dead-letter topics are made for the default RETRY_DELAYS,
#                          DLQ_TOPIC and RETRY_TOPICS; for latency-mock alone, N=1000 and
#                          CEILING_SECONDS=0 cut the load and ceilings it does not use),
#                          AGENT=<binary> (else a release build); DATABASE_URL / KAFKA_BROKERS as
#                          scripts/test.sh. Agent settings (BATCH_MAX, WORKERS, ...) pass through
#                          the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
n=${1:-100000}
users=${USERS:-10000}
format=${FORMAT:-mixed}
runs=${RUNS:-unbatched batched scale latency latency-mock}
# The agent's defaults (src/ops/config/mod.rs) unless set: the ceilings run at the same. With
# AGENT=<a build of other defaults>, set BATCH_CONCURRENCY (and the rest) to that build's.
pool=${DATABASE_POOL_SIZE:-16}
batch_max=${BATCH_MAX:-128}
batch_conc=${BATCH_CONCURRENCY:-3}
ceiling_secs=${CEILING_SECONDS:-20}
# The cores are sampled a second into pgbench's run and 2 s before its end: shorter runs have
# no window.
[ "$ceiling_secs" = 0 ] || [ "$ceiling_secs" -ge 4 ] ||
  { echo "CEILING_SECONDS must be 0 or at least 4" >&2; exit 1; }
ensure_postgres
ensure_kafka
agent=${AGENT:-target/release/persistence-agent}
[ -n "${AGENT:-}" ] || cargo build --release --locked --bin persistence-agent >&2
id=$(date +%s)-$$
export RUST_LOG=warn KAFKA_RESULTS_TOPIC=bench.results.$id
pids=() schemas=()
snaps=$(mktemp -d)
cleanup() {
  rm -rf "$snaps"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
  for s in "${schemas[@]}"; do psql "$DATABASE_URL" -qc "DROP SCHEMA IF EXISTS $s CASCADE" 2>/dev/null || true; done
}
# After the broker and database helpers' own exit steps are registered (lib.sh at_exit).
at_exit cleanup

# One pgbench ceiling (env as arguments): its line, then the cores used while pgbench ran. A
# background sampler takes them inside the run (its backends exit with it); the ceiling runs in
# the foreground, so its failure or a Ctrl-C stops the bench at once.
ceiling() {
  local line sampler
  rm -f "$snaps/c0" "$snaps/c1" "$snaps/done"
  (
    # This bench's pgbench (its process group), seen before the ceiling is over.
    until pgrep -g 0 -x pgbench >/dev/null; do [ ! -e "$snaps/done" ] || exit 1; sleep 0.1; done
    sleep 1; python3 scripts/cores.py snap "$snaps/c0"
    sleep "$((ceiling_secs - 3))"; python3 scripts/cores.py snap "$snaps/c1"
  ) >&2 & sampler=$!
  # Its sleep would hold this function's output open: stopped with it.
  line=$(env "$@" USERS="$users" scripts/pgbench-ceiling.sh "$ceiling_secs" | grep '^pgbench ') ||
    { pkill -P "$sampler"; kill "$sampler" 2>/dev/null; echo "pgbench ceiling ($*) failed" >&2; return 1; }
  touch "$snaps/done"
  if ! wait "$sampler" || [ ! -e "$snaps/c1" ]; then
    echo "no CPU sample of pgbench's run: pgrep -g 0 did not find it in this bench's process group" >&2
    return 1
  fi
  echo "$line"
  python3 scripts/cores.py diff "$snaps/c0" "$snaps/c1"
}
# Prints one ceiling's two lines under LABEL; sets the variable named VAR to its requests/s.
show_ceiling() {
  local var=$1 label=$2 out; shift 2
  out=$(ceiling "$@")
  printf '%-15s %s\n%15s %s\n' "$label" "${out%%$'\n'*}" "" "${out#*$'\n'}"
  printf -v "$var" '%s' "$(awk 'NR == 1 {print $2}' <<<"$out")"
}
single= batched=
if [ "$ceiling_secs" != 0 ]; then
  show_ceiling single "ceiling single" CLIENTS="$pool"
  show_ceiling batched "ceiling batched" CLIENTS="$batch_conc" BATCH="$batch_max"
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# Checkpoints the server has begun since its statistics were reset, timed or requested
# (pg_stat_checkpointer from PostgreSQL 17, pg_stat_bgwriter before).
checkpoints() {
  psql "$DATABASE_URL" -Atc "SELECT num_timed + num_requested FROM pg_stat_checkpointer" 2>/dev/null ||
    psql "$DATABASE_URL" -Atc "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter"
}
metric() { curl -sf "http://$1/metrics" | awk -v m="$2" 'index($1, m) == 1 {s += $2} END {printf "%d", s}'; }
sum_metric() { local t=0 a; for a in "${addrs[@]}"; do t=$((t + $(metric "$a" "$1"))); done; echo "$t"; }
# Polled every 0.2 s while agents run, so without forking: its CPU is taken from the run.
alive() {
  local p stat
  for p in "${run_pids[@]}"; do
    stat=
    { read -r stat </proc/"$p"/stat; } 2>/dev/null || true
    stat=${stat##*) }
    [ -n "$stat" ] && [ "${stat%% *}" != Z ] || { echo "agent exited" >&2; exit 1; }
  done
}

# Starts K agents on TOPIC in a fresh group and schema (extra env as arguments).
start_agents() {
  local k=$1 topic=$2; shift 2
  local run=${id//-/_}_$((${#schemas[@]} + 1))
  schemas+=("bench_$run")
  DATABASE_SCHEMA=bench_$run $agent migrate --sample-catalogue >/dev/null
  run_pids=() addrs=()
  for _ in $(seq 1 "$k"); do
    local addr=127.0.0.1:$(free_port)
    env DATABASE_SCHEMA=bench_$run KAFKA_INPUT_TOPICS=$topic KAFKA_GROUP_ID=bench-$run \
      HTTP_ADDR=$addr "$@" "${run_agent:-$agent}" run &
    run_pids+=($!) pids+=($!) addrs+=("$addr")
  done
  local a; for a in "${addrs[@]}"; do answers "http://$a/healthz" "answer"; done
}
# Waits until URL answers 200 (WHAT names the wait in the error), 60 s at most, while the
# agents live.
answers() {
  local deadline=$((SECONDS + 60))
  until curl -sf --max-time 2 "$1" >/dev/null; do
    alive; sleep 0.1
    [ "$SECONDS" -lt "$deadline" ] || { echo "the agent did not $2 in 60 s" >&2; return 1; }
  done
}
# Outcomes other than duplicates (each request once, whichever member settled it), from one
# scrape per agent; fails when an agent does not answer, rather than count it as nothing.
settled() {
  local a text t=0
  for a in "${addrs[@]}"; do
    text=$(curl -sf --max-time 5 "http://$a/metrics") || { echo "no metrics from the agent at $a" >&2; return 1; }
    t=$((t + $(awk '/^persistence_agent_outcomes_total/ && !/outcome="duplicate"/ {s += $2} END {printf "%d", s}' <<<"$text")))
  done
  echo "$t"
}
# Waits until settled() reaches AT_LEAST, polling every EVERY seconds (sparingly while a run is
# timed: each poll forks), failing once it has not grown for 60 s (a request that can only
# come back as a duplicate would otherwise hold the run forever); a scrape that fails counts
# as no progress. Prints the count reached.
settle_until() {
  local at_least=$1 every=$2 now last=-1 since=$SECONDS
  while :; do
    alive
    if now=$(settled 2>/dev/null); then
      [ "$now" -lt "$at_least" ] || { echo "$now"; return 0; }
      [ "$now" -eq "$last" ] || { last=$now since=$SECONDS; }
    fi
    [ $((SECONDS - since)) -lt 60 ] ||
      { echo "$label: ${last#-1} of $at_least settled, none for 60 s" >&2; return 1; }
    sleep "$every"
  done
}
stop_agents() { local p; for p in "${run_pids[@]}"; do kill "$p"; wait "$p" 2>/dev/null || true; done; }
ratio() { [ -n "$2" ] && printf ' = %.2fx %s' "$(echo "$1 / $2" | bc -l)" "$3"; }

# Runs K agents over the loaded topic and prints one line of figures.
measure() {
  local label=$1 k=$2; shift 2
  start_agents "$k" "$loaded" "$@"
  # Timed from the first outcome: the group join (seconds on tansu) is not throughput. Members
  # that join after the first has started take partitions over mid-run, and what their last
  # owner finished but had not committed comes back as duplicates: printed, and not counted
  # as settled (the run ends once every request is).
  local first before perf_pid=
  before=$(settle_until 1 0.05)
  first=$(date +%s.%N)
  # With THREADS, the agents' threads too, in the same process at the same moment.
  python3 scripts/cores.py snap "$snaps/a0" ${THREADS:+"${run_pids[@]}"}
  if [ -n "${PROFILE:-}" ] && [ "${label%% (*}" = "${PROFILE_RUN:-batched}" ]; then
    perf record -q -F 499 ${PERF_CALLGRAPH:--g} -p "${run_pids[0]}" -o "$PROFILE" 2>/dev/null & perf_pid=$!
    profiled=1
  fi
  settle_until "$n" 0.2 >/dev/null
  local end hwm=0 p timed=$((n - before))
  [ "$timed" -gt 0 ] || { echo "$label: settled before it could be timed; raise N" >&2; return 1; }
  end=$(date +%s.%N)
  python3 scripts/cores.py snap "$snaps/a1" ${THREADS:+"${run_pids[@]}"}
  [ -z "$perf_pid" ] || { kill -INT "$perf_pid"; wait "$perf_pid" || true; }
  [ -z "${METRICS_DUMP:-}" ] || curl -sf "http://${addrs[0]}/metrics" > "$METRICS_DUMP.$label" || true
  for p in "${run_pids[@]}"; do h=$(awk '/VmHWM/ {print $2}' "/proc/$p/status"); [ "$h" -gt "$hwm" ] && hwm=$h; done
  local conflicts
  conflicts=$(( $(sum_metric 'persistence_agent_transaction_attempts_total{result="serialization_failure"') \
    + $(sum_metric 'persistence_agent_transaction_attempts_total{result="deadlock"') \
    + $(sum_metric 'persistence_agent_batch_transactions_total{result="serialization_failure"') \
    + $(sum_metric 'persistence_agent_batch_transactions_total{result="deadlock"') ))
  local batches size=1 dups
  batches=$(sum_metric persistence_agent_batch_requests_count)
  [ "$batches" -gt 0 ] && size=$(echo "$(sum_metric persistence_agent_batch_requests_sum) / $batches" | bc -l)
  dups=$(sum_metric 'persistence_agent_outcomes_total{outcome="duplicate"')
  stop_agents
  rate=$(echo "$timed / ($end - $first)" | bc -l)
  printf '%-15s %6.0f requests/s%s%s, CPU %3.0f us/request, %4.1f conflicts/1000, mean batch %.1f, peak RSS %.1f MiB, %d duplicates\n' \
    "$label" "$rate" "$(ratio "$rate" "$single" single)" "$(ratio "$rate" "$batched" batched)" \
    "$(echo "1000000 * $(python3 scripts/cores.py cpu "$snaps/a0" "$snaps/a1" "${run_pids[@]}") / $timed" | bc -l)" \
    "$(echo "1000 * $conflicts / $n" | bc -l)" "$size" "$(echo "$hwm / 1024" | bc -l)" "$dups"
  local cores
  cores=$(python3 scripts/cores.py diff "$snaps/a0" "$snaps/a1" "${run_pids[@]}")
  printf '%15s %s\n' "" "$cores"
  if [ -n "${THREADS:-}" ]; then
    local threads
    threads=$(python3 scripts/threads.py diff "$snaps/a0" "$snaps/a1" "$timed")
    printf '%15s %s\n' "" "$threads"
  fi
}

# Produce-to-result latency on BROKERS for 20 s (on the mock cluster, less above 1,800/s) at
# half the batched rate (or of the last run; or at LATENCY_RATE requests/s), JSON so
# latency.py can match request ids; then the broker alone, one hop, at the same rate: the
# measured path holds one such hop (a result's timestamp is taken when the agent produces it).
# Args: LABEL BROKERS TOPIC RESULTS HOP_TOPIC [env of the agent and the one-hop consumer]. The
# topics are created here when HOP_TOPIC is empty, else (a broker without CreateTopics) they
# exist, HOP_TOPIC among them.
latency() {
  local label=$1 brokers=$2 topic=$3 results=$4 hop_topic=$5; shift 5
  local half secs=20 count line broker
  half=${LATENCY_RATE:-$(printf '%.0f' "$(echo "${best:-${rate:-1000}} / 2" | bc -l)")}
  [[ $half =~ ^[1-9][0-9]*$ ]] || { echo "latency rate $half is not a whole number of requests/s" >&2; return 1; }
  # The mock cluster (the caller that gives HOP_TOPIC) keeps 5 MB a partition, about 7,000
  # requests, 42,000 over six: what latency.py reads afterwards must still be there. (Read
  # while the load runs instead, its fetches make the mock's linear search of its log cost
  # more than the agent: worse figures, not truer ones.)
  [ -z "$hop_topic" ] || secs=$(( 36000 / half < 20 ? 36000 / half : 20 ))
  [ "$secs" -ge 5 ] || { echo "latency rate $half is above what the mock cluster keeps for 5 s" >&2; return 1; }
  count=$((half * secs))
  [ -n "$hop_topic" ] || KAFKA_BROKERS=$brokers $agent topics --partitions 6 "$topic" "$results" >/dev/null
  start_agents 1 "$topic" KAFKA_BROKERS="$brokers" KAFKA_RESULTS_TOPIC="$results" "$@"
  # Steady state, not the group join: requests produced before the agent holds its partitions
  # would wait for the join (seconds on the mock cluster).
  answers "http://${addrs[0]}/readyz" "join its group"
  # From before the first request, so the load's first second is seen too.
  local timeline=
  if [ -n "${TIMELINE:-}" ]; then
    python3 scripts/timeline.py sample "http://${addrs[0]}/metrics" "$((secs + 3))" \
      "$snaps/timeline" "${run_pids[@]}" &
    timeline=$!
    pids+=("$timeline")
  fi
  local ckpt0 ckpt1
  ckpt0=$(checkpoints) || ckpt0=
  # The cores while the load runs (the generator's among "other"): how much of the machine
  # the agent at this rate leaves idle. Both snapshots from one process, started and ready
  # before the load: a Python start for each in the middle of it cost about 90 ms of a core,
  # and coincided with slow requests (p99 48-110 ms for 200-500 ms; BENCHMARKS.md, ninth
  # session). Its offsets count from its "ready" line.
  local snap_fd snapper
  exec {snap_fd}< <(exec python3 scripts/cores.py at 1 "$snaps/l0" "$((secs - 2))" "$snaps/l1")
  snapper=$!
  pids+=("$snapper")
  read -r -t 30 _ <&"$snap_fd" || { echo "cores.py at did not start in 30 s" >&2; return 1; }
  # linger.ms=5, librdkafka's default and the produce tool's (the latency counts the wait, from
  # the record's timestamp on). At 1 ms nearly every record is a record batch of its own, and
  # librdkafka's mock cluster finds a fetch's offset by walking its partition's batches from
  # the oldest: its CPU grew through a run with their number, to 0.5-0.7 cores, and the tail
  # with it (BENCHMARKS.md, ninth session). At half rate the agent does not pause, so tansu's
  # multi-record batch stall above is moot.
  KAFKA_BROKERS=$brokers $agent produce --kafka-config "linger.ms=${LATENCY_LINGER_MS:-5}" \
    --topic "$topic" --sample \
    --count "$count" --users "$users" --format json --rate "$half" >/dev/null &
  local gen=$!
  pids+=("$gen")
  local sampler=
  if [ -n "${LANES:-}" ]; then
    # Bounded: lanes.py waits up to 5 minutes for a statement that a dead agent never runs.
    LANES_EVERY_MS=20 timeout "$((secs + 10))" python3 scripts/lanes.py "$((secs - 3))" \
      "$DATABASE_URL" >"$snaps/lanes" &
    sampler=$!
    pids+=("$sampler")
  fi
  # A process substitution's status is not wait's to give: the second snapshot's file says.
  wait "$snapper" 2>/dev/null || true
  exec {snap_fd}<&-
  [ -s "$snaps/l1" ] || { echo "cores.py at took no second snapshot" >&2; return 1; }
  wait "$gen"
  ckpt1=$(checkpoints) || ckpt1=
  [ -z "$timeline" ] || wait "$timeline" || echo "timeline.py failed" >&2
  line=$(LATENCY_RAW=${timeline:+$snaps/latencies} python3 scripts/latency.py "$brokers" "$topic" "$results" "$count")
  printf '%-15s %s at %s requests/s\n' "$label" "$line" "$half"
  printf '%15s %s\n' "" "$(python3 scripts/cores.py diff "$snaps/l0" "$snaps/l1" "${run_pids[@]}")"
  # How much of it is the database's: the transactions against the whole span in the agent,
  # and the checkpoints PostgreSQL began meanwhile (each writes out the dirty pages, which
  # slows the commits under way).
  printf '%15s %s; checkpoints begun during the load: %s\n' "" \
    "$(curl -sf --max-time 5 "http://${addrs[0]}/metrics" | python3 scripts/stages.py)" \
    "$([ -n "$ckpt0" ] && [ -n "$ckpt1" ] && echo $((ckpt1 - ckpt0)) || echo unknown)"
  if [ -n "$sampler" ]; then
    wait "$sampler" && sed 's/^/                /' "$snaps/lanes" || echo "lanes.py failed" >&2
  fi
  if [ -n "$timeline" ]; then
    python3 scripts/timeline.py report "$snaps/timeline" "$snaps/latencies" |
      sed 's/^/                /' || echo "timeline.py report failed" >&2
  fi
  stop_agents
  broker=$(env "$@" python3 scripts/broker-latency.py "$brokers" "$half" "$secs" ${hop_topic:+"$hop_topic"})
  printf '%-15s %s at %s records/s\n' "$label" "$broker" "$half"
}

loaded=bench.requests.$id
$agent topics --partitions 6 "$loaded" "$KAFKA_RESULTS_TOPIC" >/dev/null
# One record per batch: tansu 0.6 answers a fetch that starts inside a multi-record batch with
# nothing (Apache Kafka returns the batch), which would stall the agent after a pause.
$agent produce --kafka-config batch.num.messages=1 --topic "$loaded" --sample \
  --count "$n" --users "$users" --format "$format"
echo "loaded          $n requests ($format, $users users, 1-5 books, 6 partitions); pool $pool, BATCH_MAX $batch_max, BATCH_CONCURRENCY $batch_conc"

rate= profiled=
for r in $runs; do
  case $r in
    # Unbatched, each worker runs its own transaction: as many workers as connections.
    unbatched) measure unbatched 1 BATCH_MAX=1 WORKERS="$pool" ;;
    batched) measure batched 1; best=$rate ;;
    # The batched run with another build (ALT_AGENT) and/or settings (ALT_ENV), for an A/B in
    # one run; ALT_ENV="BATCH_MAX=1 WORKERS=16" makes it an unbatched one.
    alt)
      read -ra alt_env <<<"${ALT_ENV:-}"
      for kv in "${alt_env[@]}"; do [[ $kv == *=* ]] || { echo "ALT_ENV: $kv is not KEY=VALUE" >&2; exit 1; }; done
      run_agent=${ALT_AGENT:-} measure "alt${ALT_ENV:+ ($ALT_ENV)}" 1 "${alt_env[@]}"; run_agent= ;;
    scale) measure "2 agents" 2; measure "4 agents" 4 ;;
    latency) latency latency "$KAFKA_BROKERS" bench.latency.$id bench.latency-results.$id "" ;;
    # The same on librdkafka's mock cluster: what the agent itself adds. Like tansu it holds a
    # fetch that finds nothing for the whole fetch.wait.max.ms, even as data arrives (Apache
    # Kafka answers once data is there), so its consumers wait MOCK_FETCH_WAIT_MS (5) at most.
    latency-mock)
      t=bench.latency-mock.$id hop=bench.broker-latency-mock.$id
      [ -n "${MOCK_BROKER:-}" ] || cargo build --release --locked --example mock_broker >&2
      exec {mock_fd}< <(exec "${MOCK_BROKER:-target/release/examples/mock_broker}" "$t:6" \
        "bench.latency-mock-results.$id:6" "$t.retry.5m:6" "$t.retry.30m:6" "$t.retry.2h:6" \
        "$t.dlq:6" "$hop:6")
      mock_pid=$!
      pids+=("$mock_pid")
      read -r -t 30 mock <&"$mock_fd" || { echo "the mock broker did not start in 30 s" >&2; exit 1; }
      latency latency-mock "$mock" "$t" "bench.latency-mock-results.$id" "$hop" \
        CREATE_RETRY_TOPICS=false "KAFKA_CONFIG_fetch.wait.max.ms=${MOCK_FETCH_WAIT_MS:-5}"
      # Not in a later run's cores.
      kill "$mock_pid" 2>/dev/null || true; wait "$mock_pid" 2>/dev/null || true
      exec {mock_fd}<&- ;;
  esac
done
[ -z "${PROFILE:-}" ] || [ -n "$profiled" ] ||
  echo "PROFILE_RUN=${PROFILE_RUN:-batched} named no run of RUNS=\"$runs\": nothing profiled" >&2
