#!/usr/bin/env bash
# Starts a throwaway PostgreSQL cluster and prints its URL on stdout; the cluster is stopped and
# deleted as soon as process WATCH_PID (default: the caller) exits. On failure nothing is left
# behind.
# Usage: scripts/throwaway-postgres.sh [PORT]
set -euo pipefail
port=${1:-55432}
if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
  echo "throwaway-postgres: port 127.0.0.1:$port is taken; choose another one" >&2
  exit 1
fi
watch_pid=${WATCH_PID:-$PPID}
bindir=$(dirname "$(command -v initdb 2>/dev/null || ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n1)")
[ -x "$bindir/initdb" ] || { echo "throwaway-postgres: no initdb found; install postgresql" >&2; exit 1; }
dir=$(mktemp -d /tmp/pa-pg.XXXXXX)
# Until the watchdog owns the cluster, a failure removes it here.
trap 'rm -rf "$dir"' EXIT
as_owner=()
if [ "$(id -u)" = 0 ]; then
  # initdb refuses to run as root.
  id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
  chown postgres "$dir"
  as_owner=(runuser -u postgres --)
fi
"${as_owner[@]}" "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust >"$dir/initdb.log" 2>&1 \
  || { cat "$dir/initdb.log" >&2; exit 1; }
"${as_owner[@]}" "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
  -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off" start >/dev/null \
  || { cat "$dir/server.log" >&2; echo "throwaway-postgres: could not start on 127.0.0.1:$port" >&2; exit 1; }
# Watchdog: stop and delete the cluster when the watched process is gone.
nohup bash -c "while kill -0 $watch_pid 2>/dev/null; do sleep 1; done;
  ${as_owner[*]} '$bindir/pg_ctl' -D '$dir/data' -m immediate stop >/dev/null 2>&1; rm -rf '$dir'" \
  >/dev/null 2>&1 &
trap - EXIT
echo "postgres://postgres@127.0.0.1:$port/postgres"
