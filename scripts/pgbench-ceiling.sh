#!/usr/bin/env bash
# The database's own ceiling for the agent's transaction: pgbench runs the agent's persist
# statement (read verbatim from src/persist/sql.rs), its confirmation UPDATE and COMMIT, in one
# SERIALIZABLE transaction, pipelined (one round trip), with the agent's fencing and parked-key
# checks on, retrying serialization failures (--max-tries). Requests are for USERS users with
# 1-5 distinct catalogue books each, as the benchmark's load.
#   scripts/pgbench-ceiling.sh [SECONDS]   CLIENTS=16 USERS=10000 (DATABASE_URL as test.sh)
# Prints one line: "pgbench <tps> tps (<clients> clients, <retried> retried, <failed> failed)".
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
secs=${1:-20}
clients=${CLIENTS:-16}
users=${USERS:-10000}
ensure_postgres
schema=pgbench_$(date +%s)_$$
work=$(mktemp -d)
cleanup() { psql "$DATABASE_URL" -qc "DROP SCHEMA IF EXISTS $schema CASCADE" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
cargo build --release --locked --bin persistence-agent >&2
DATABASE_SCHEMA=$schema target/release/persistence-agent migrate --sample-catalogue >/dev/null
psql "$DATABASE_URL" -qc "INSERT INTO $schema.partition_owner (topic, partition, generation)
  SELECT 'bench', p, 1 FROM generate_series(0, 5) p"

# The statement as the agent prepares it, its $n parameters replaced by what pgbench sends.
sql=$(awk '/^pub\(super\) const PERSIST_SQL: &str = r#"/ {on = 1; next} on && /^"#;/ {exit} on' \
  src/persist/sql.rs | sed 's/--.*$//')
[ -n "$sql" ] || { echo "PERSIST_SQL not found in src/persist/sql.rs" >&2; exit 1; }
for n in 1 2 3 4 5; do
  ids=() scores=() breakdowns=() justifications=() reasons=()
  for i in $(seq 1 "$n"); do
    # Slot i draws from its own 20 books, so a request's books are distinct (as the agent's).
    ids+=("format('book-%s', lpad((:b$i + $(( (i - 1) * 20 )))::text, 3, '0'))")
    scores+=("0.5") breakdowns+=("NULL") justifications+=("'Matches the reader''s interest'")
    reasons+=("'[\"theme\",\"depth\"]'")
  done
  join() { local IFS=,; echo "$*"; }
  declare -A p=(
    [1]="(:rid)::text" [2]="('user-' || :u)" [3]="'bench'" [4]=":part" [5]=":rid"
    [6]="'curious'" [7]="'avanzado'" [8]="'{history}'::text[]" [9]="'aprendizaje'"
    [10]="NULL::jsonb" [11]="0.5" [12]="1200" [13]="'{context,search,scoring,justifier}'::text[]"
    [14]="'{}'::text[]" [15]="ARRAY[$(join "${ids[@]}")]" [16]="ARRAY[$(join "${scores[@]}")]"
    [17]="ARRAY[$(join "${breakdowns[@]}")]::jsonb[]" [18]="ARRAY[$(join "${justifications[@]}")]"
    [19]="ARRAY[$(join "${reasons[@]}")]::jsonb[]" [20]="convert_to('user-' || :u, 'UTF8')"
    [21]="'bench'" [22]=":part" [23]="1"
  )
  body=$sql
  for k in $(seq 23 -1 1); do body=${body//"\$$k"/${p[$k]}}; done
  {
    echo "\\set u random(1, $users)"
    echo "\\set rid random(1, 1000000000000000)"
    echo "\\set part random(0, 5)"
    for i in $(seq 1 "$n"); do echo "\\set b$i random(1, 20)"; done
    echo "\\startpipeline"
    echo "BEGIN ISOLATION LEVEL SERIALIZABLE;"
    echo "SET LOCAL statement_timeout = 5000;"
    echo "SET LOCAL idle_in_transaction_session_timeout = '60s';"
    echo "$body" | tr '\n' ' ' | sed 's/  */ /g'
    echo ";"
    echo "UPDATE processed_request SET confirmation = '{\"persistenceStatus\":\"SUCCESS\"}'::jsonb WHERE request_id = (:rid)::text;"
    echo "COMMIT;"
    echo "\\endpipeline"
  } >"$work/books$n.sql"
done
out=$(PGOPTIONS="-c search_path=$schema" pgbench "$DATABASE_URL" -n -M "${PGBENCH_MODE:-prepared}" \
  -c "$clients" -j 2 -T "$secs" --max-tries=100 \
  -f "$work/books1.sql" -f "$work/books2.sql" -f "$work/books3.sql" -f "$work/books4.sql" \
  -f "$work/books5.sql" 2>&1) || { echo "$out" >&2; exit 1; }
tps=$(awk '/^tps = / {print $3}' <<<"$out")
retried=$(awk '/number of transactions retried:/ {print $5; exit}' <<<"$out")
failed=$(awk '/number of failed transactions:/ {print $5; exit}' <<<"$out")
printf 'pgbench %.0f tps (%s clients, %s retried, %s failed, %s s)\n' "$tps" "$clients" "${retried:-0}" "${failed:-0}" "$secs"
