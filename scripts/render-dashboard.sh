#!/usr/bin/env bash
# Renders the Grafana dashboard dashboards/persistence-agent.json with real data into
# docs/dashboard.png, without Docker or a Grafana server:
#
#   1. PostgreSQL (DATABASE_URL, else 127.0.0.1:5432, else a throwaway cluster) and a Kafka broker
#      (KAFKA_BROKERS, else 127.0.0.1:9092, else tansu), as in scripts/lib.sh;
#   2. two agent replicas in one consumer group (own topics, group and DATABASE_SCHEMA), scraped
#      every 5 s by a private Prometheus that loads prometheus/rules.yml;
#   3. DURATION seconds of sample traffic (JSON, Confluent Avro, Avro single-object) at RATE msg/s,
#      about FAILURE_PERMILLE ‰ invalid messages (garbage, invalid JSON, unknown schema id, a
#      score of 1.5, an unknown bookId), duplicates, one burst of failures at 60 % of the run and
#      a restart of the second replica at 45 %;
#   4. scripts/dashboard-render/index.html (uPlot) draws every panel from Prometheus's HTTP API,
#      and headless Chromium takes the screenshot;
#   5. everything started here is stopped and its temporary files removed.
#
# Usage: scripts/render-dashboard.sh            (DURATION=600 RATE=20 by default; ~11 minutes)
#        DURATION=120 OUT=/tmp/d.png scripts/render-dashboard.sh
# Needs: prometheus, chromium, node/npm, python3, curl (apt-get installs the first two when
# missing and running as root); psql is optional (drops the demo schema before and after).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
source scripts/lib.sh

DURATION=${DURATION:-600}            # seconds of traffic
RATE=${RATE:-20}                     # sample requests per second (all formats together)
FAILURE_PERMILLE=${FAILURE_PERMILLE:-10}  # steady invalid messages per 1000 sample requests
BURST=${BURST:-120}                  # invalid messages in the burst (0: none)
RESTART=${RESTART:-1}                # restart replica 2 mid-run (rebalance, lag bump)
OUT=${OUT:-docs/dashboard.png}
SCHEMA=${DASH_SCHEMA:-dash_demo}
AGENT_PORTS=(${AGENT_PORTS:-18080 18081})
PROM_PORT=${PROM_PORT:-19090}
WEB_PORT=${WEB_PORT:-18090}
STEP=${STEP:-10}
RATE_INTERVAL=${RATE_INTERVAL:-1m}
WIDTH=${WIDTH:-1600}
# Short tiers, so the retry panels show the unknown-bookId requests walking them within the run.
RETRY_DELAYS=${RETRY_DELAYS:-30s,1m,2m}
KEEP_SCHEMA=${KEEP_SCHEMA:-0}           # 1: leave the demo schema in the database

nap() { sleep "$1" & wait $!; }   # a sleep that SIGTERM/Ctrl-C interrupts
log() { printf '%s render-dashboard: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
t_start=$(date +%s)

# ---------------------------------------------------------------- tools
missing=()
command -v prometheus >/dev/null || missing+=(prometheus)
command -v chromium >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >/dev/null
  else
    echo "missing: ${missing[*]} (apt-get install ${missing[*]})" >&2; exit 1
  fi
fi
for t in node npm python3 curl; do command -v $t >/dev/null || { echo "missing: $t" >&2; exit 1; }; done
for p in "${AGENT_PORTS[@]}" "$PROM_PORT" "$WEB_PORT"; do
  if have_port 127.0.0.1 "$p"; then echo "port $p is in use; set AGENT_PORTS/PROM_PORT/WEB_PORT" >&2; exit 1; fi
done
if [ ! -d scripts/dashboard-render/node_modules/uplot ] || [ ! -d scripts/dashboard-render/node_modules/kafkajs ]; then
  log "npm ci (uPlot, kafkajs)"
  (cd scripts/dashboard-render && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi

agent=target/release/persistence-agent
if [ ! -x "$agent" ]; then
  log "building $agent"
  cargo build --release --locked --bin persistence-agent
fi

# ---------------------------------------------------------------- servers
ensure_postgres
ensure_kafka   # may start tansu (TANSU_PID), which cleanup stops
export DATABASE_URL KAFKA_BROKERS
export PGOPTIONS="${PGOPTIONS:-} -c client_min_messages=warning"

# ---------------------------------------------------------------- cleanup
tmp=$(mktemp -d /tmp/render-dashboard.XXXXXX)
pids=()        # background jobs, stopped in reverse order
cleanup() {
  local rc=$?
  set +e
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill "${pids[i]}" 2>/dev/null; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
  [ -n "${TANSU_PID:-}" ] && { kill "$TANSU_PID" 2>/dev/null; wait "$TANSU_PID" 2>/dev/null; }
  if [ "$KEEP_SCHEMA" != 1 ] && command -v psql >/dev/null && [ -n "${DATABASE_URL:-}" ]; then
    psql -q "$DATABASE_URL" -c "DROP SCHEMA IF EXISTS \"$SCHEMA\" CASCADE" >/dev/null 2>&1
  fi
  if [ $rc -ne 0 ]; then
    for f in "$tmp"/*.log; do [ -f "$f" ] && { echo "== $f (tail)" >&2; tail -n 15 "$f" >&2; }; done
  fi
  rm -rf "$tmp"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "brokers $KAFKA_BROKERS, schema $SCHEMA, traffic ${DURATION}s at ${RATE}/s"

# ---------------------------------------------------------------- topics, schema
run=$(date +%s)
req_topic=dash.$run.requests
res_topic=dash.$run.results
group=dash-render-$run
if command -v psql >/dev/null; then
  psql -q "$DATABASE_URL" -c "DROP SCHEMA IF EXISTS \"$SCHEMA\" CASCADE" >/dev/null
fi
export DATABASE_SCHEMA=$SCHEMA LOG_FORMAT=json
$agent topics --partitions 6 "$req_topic" >/dev/null
$agent topics --partitions 1 "$res_topic" >/dev/null
$agent migrate --sample-catalogue >"$tmp/migrate.log" 2>&1

# ---------------------------------------------------------------- Prometheus
targets=$(printf "'127.0.0.1:%s'," "${AGENT_PORTS[@]}")
cat >"$tmp/prometheus.yml" <<EOF
global:
  scrape_interval: 5s
  evaluation_interval: 10s
rule_files:
  - $root/prometheus/rules.yml
scrape_configs:
  - job_name: persistence-agent
    static_configs:
      - targets: [${targets%,}]
EOF
prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/tsdb" \
  --storage.tsdb.retention.time=1d --web.listen-address="127.0.0.1:$PROM_PORT" \
  --web.cors.origin='.*' >"$tmp/prometheus.log" 2>&1 &
pids+=($!)
until curl -sf "http://127.0.0.1:$PROM_PORT/-/ready" >/dev/null; do sleep 0.5; done

# ---------------------------------------------------------------- agents
declare -A agent_pid
alive() { local s; s=$(ps -o stat= -p "$1" 2>/dev/null) && [[ $s != Z* ]]; }
start_agent() {  # port
  env HTTP_ADDR="127.0.0.1:$1" KAFKA_INPUT_TOPICS="$req_topic" KAFKA_RESULTS_TOPIC="$res_topic" \
    KAFKA_GROUP_ID="$group" DATABASE_POOL_SIZE=8 WORKERS=8 RUST_LOG=info,persistence_agent::pipeline=warn \
    RETRY_DELAYS="$RETRY_DELAYS" \
    'KAFKA_CONFIG_statistics.interval.ms=5000' \
    "$agent" run >>"$tmp/agent-$1.log" 2>&1 &
  agent_pid[$1]=$!
  pids+=($!)
  until curl -sf "http://127.0.0.1:$1/readyz" >/dev/null; do
    alive "${agent_pid[$1]}" || { echo "agent on :$1 exited" >&2; exit 1; }
    sleep 0.5
  done
}
for p in "${AGENT_PORTS[@]}"; do start_agent "$p"; done
log "agents ready on ${AGENT_PORTS[*]}; Prometheus on :$PROM_PORT"
sleep 10   # a couple of idle scrapes before the traffic starts

# ---------------------------------------------------------------- traffic
t0=$(date +%s)
producers=()
json_rate=$((RATE * 3 / 5)); confluent_rate=$((RATE / 4)); single_rate=$((RATE - json_rate - confluent_rate))
for spec in "json $json_rate" "avro-confluent $confluent_rate" "avro-single $single_rate"; do
  set -- $spec
  [ "$2" -gt 0 ] || continue
  $agent produce --topic "$req_topic" --sample --format "$1" --rate "$2" --count $(($2 * DURATION)) \
    >"$tmp/produce-$1.log" 2>&1 &
  pids+=($!); producers+=($!)
done

# invalid messages and duplicates (scripts/dashboard-render/inject.js)
KAFKA_BROKERS=$KAFKA_BROKERS TOPIC=$req_topic DURATION=$DURATION RATE=$RATE RUN=$run \
  FAILURE_PERMILLE=$FAILURE_PERMILLE BURST=$BURST node scripts/dashboard-render/inject.js >"$tmp/inject.log" 2>&1 &
pids+=($!)

# Watch the replicas while the traffic runs: restart replica 2 once at 45 % (RESTART=1), and
# restart any replica that exits on its own (reported, with its exit status).
restart_at=$((t0 + DURATION * 45 / 100)); restarted=0
[ "$RESTART" = 1 ] && [ ${#AGENT_PORTS[@]} -gt 1 ] || restarted=1
while [ $(($(date +%s) - t0)) -lt "$DURATION" ]; do
  for p in "${AGENT_PORTS[@]}"; do
    alive "${agent_pid[$p]}" && continue
    rc=0; wait "${agent_pid[$p]}" 2>/dev/null || rc=$?
    log "the replica on :$p exited unexpectedly (status $rc); restarting it"
    start_agent "$p"
  done
  if [ $restarted = 0 ] && [ "$(date +%s)" -ge $restart_at ]; then
    restarted=1
    p=${AGENT_PORTS[1]}
    log "restarting the replica on :$p (SIGTERM, 20 s down)"
    kill -TERM "${agent_pid[$p]}" 2>/dev/null || true
    wait "${agent_pid[$p]}" 2>/dev/null || true
    nap 20
    start_agent "$p"
  fi
  nap 2
done
log "traffic done; waiting for the agents to drain"

for _ in $(seq 1 30); do   # the producers finish at their rate; give them 30 s more at most
  alive=0; for p in "${producers[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
  [ $alive = 0 ] && break; sleep 1
done
in_flight() {
  local n=0 p v
  for p in "${AGENT_PORTS[@]}"; do
    v=$(curl -sf "http://127.0.0.1:$p/metrics" | awk '/^persistence_agent_in_flight_messages/ {n += $2} END {print n + 0}')
    n=$((n + ${v%.*}))
  done
  echo $n
}
for _ in $(seq 1 30); do [ "$(in_flight)" -le 0 ] && break; sleep 1; done
sleep 15   # final scrapes and a rule evaluation
t_end=$(date +%s)

# ---------------------------------------------------------------- render
python3 -m http.server "$WEB_PORT" --bind 127.0.0.1 --directory "$root" >"$tmp/http.log" 2>&1 &
pids+=($!)
until curl -sf "http://127.0.0.1:$WEB_PORT/scripts/dashboard-render/index.html" >/dev/null; do sleep 0.3; done
rows=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(max(p["gridPos"]["y"]+p["gridPos"]["h"] for p in d["panels"]))' dashboards/persistence-agent.json)
height=$((rows * 38 + 110))
url="http://127.0.0.1:$WEB_PORT/scripts/dashboard-render/index.html?prom=http://127.0.0.1:$PROM_PORT&start=$((t0 - 30))&end=$t_end&step=$STEP&rate_interval=$RATE_INTERVAL"
mkdir -p "$(dirname "$OUT")"
case $OUT in /*) out_abs=$OUT ;; *) out_abs=$root/$OUT ;; esac
rm -f "$out_abs"
log "screenshot ${WIDTH}x$height of $url"
TZ=UTC timeout 120 chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync --hide-scrollbars \
  --user-data-dir="$tmp/chromium" --window-size="$WIDTH,$height" --virtual-time-budget=20000 \
  --screenshot="$out_abs" "$url" >"$tmp/chromium.log" 2>&1 || true
[ -s "$out_abs" ] || { echo "chromium wrote no screenshot" >&2; tail -n 5 "$tmp/chromium.log" >&2; exit 1; }
log "wrote $OUT ($(du -k "$out_abs" | cut -f1) KB)"

# ---------------------------------------------------------------- what each panel got
python3 - "http://127.0.0.1:$PROM_PORT" "$((t0 - 30))" "$t_end" "$STEP" "$RATE_INTERVAL" <<'EOF'
import json, sys, urllib.parse, urllib.request
prom, start, end, step, ri = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
def q(path, **args):
    data = urllib.parse.urlencode(args).encode()
    return json.load(urllib.request.urlopen(prom + path, data))["data"]["result"]
def fmt(v):
    return f"{v:.4g}"
d = json.load(open("dashboards/persistence-agent.json"))
print(f"\npanel data over {(end - start) // 60} min (query_range step {step}s, $__rate_interval={ri}):")
for p in d["panels"]:
    if p["type"] == "row":
        continue
    for t in p.get("targets", []):
        expr = t["expr"].replace("$__rate_interval", ri).replace("$__range", f"{end - start}s")
        if t.get("instant") or t.get("format") == "table":
            res = q("/api/v1/query", query=expr, time=end)
            desc = "; ".join(f'{r["metric"]} = {r["value"][1]}' for r in res)
        else:
            res = q("/api/v1/query_range", query=expr, start=start, end=end, step=step)
            parts = []
            for r in res[:8]:
                vals = [float(v) for _, v in r["values"] if v not in ("NaN", "+Inf", "-Inf")]
                name = ",".join(f"{k}={v}" for k, v in r["metric"].items() if k != "__name__") or "value"
                if vals:
                    parts.append(f"{name}: last {fmt(vals[-1])} avg {fmt(sum(vals) / len(vals))} max {fmt(max(vals))}")
            desc = "; ".join(parts)
        status = f"{len(res)} series" if res else "NO DATA"
        print(f'  [{p["id"]:>2}] {p["title"]} / {t["refId"]}: {status}{" - " + desc if desc else ""}')
        if not res:
            print(f'       query: {t["expr"]}')
EOF
log "done in $(($(date +%s) - t_start)) s"
if [ "${HOLD:-0}" -gt 0 ]; then   # keep Prometheus and the page up a while, to work on the renderer
  echo "$url" >"${HOLD_URL_FILE:-/dev/null}"
  log "holding ${HOLD}s: $url"; nap "$HOLD"
fi
