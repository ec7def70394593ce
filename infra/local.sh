#!/usr/bin/env bash
# A local Prefect server (SQLite) and process workers for the scheduled deployment, on one machine.
#
#   infra/local.sh server-start            start `prefect server start` in the background
#   infra/local.sh pools                   create the work pools (process type)
#   infra/local.sh deploy [NAME...]        deploy from infra/prefect.yaml (default: nightly)
#   infra/local.sh worker-start [POOL]     start a worker for POOL (default ae-cpu)
#   infra/local.sh run NAME [ARGS...]      prefect deployment run NAME ARGS --watch
#   infra/local.sh stop                    stop every worker, then the server
#
# Settings (environment): AE_PREFECT_PORT (4200), AE_STATE_DIR (.prefect/local: logs, pids, the
# server's PREFECT_HOME), AE_WATCH_TIMEOUT (3600 s), AE_POOLS ("ae-cpu").
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=${AE_BIN:-$ROOT/.venv/bin}
STATE=${AE_STATE_DIR:-$ROOT/.prefect/local}
PORT=${AE_PREFECT_PORT:-4200}
export PREFECT_HOME=${PREFECT_HOME:-$STATE/home}
export PREFECT_API_URL=http://127.0.0.1:$PORT/api
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
mkdir -p "$STATE" "$PREFECT_HOME"

wait_healthy() {  # wait_healthy PID: until the server answers, or PID (the server we started) dies
  for _ in $(seq 1 240); do
    if ! kill -0 "$1" 2>/dev/null; then
      echo "prefect server exited: $(tail -n 1 "$STATE/server.log")" >&2
      return 1
    fi
    if "$BIN/python" -c "import urllib.request as u; u.urlopen('$PREFECT_API_URL/health', timeout=2)" 2>/dev/null; then
      return 0
    fi
    sleep 0.5
  done
  echo "prefect server did not become healthy; see $STATE/server.log" >&2
  return 1
}

running() {  # running FILE: the pid in FILE is a live process
  [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

port_taken() {
  "$BIN/python" -c "import socket; socket.create_connection(('127.0.0.1', $PORT), timeout=1).close()" 2>/dev/null
}

stop_pid() {  # stop_pid FILE: SIGINT, then SIGTERM, then SIGKILL, waiting for the process to go
  local file=$1 pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  for sig in INT TERM KILL; do
    kill -0 "$pid" 2>/dev/null || break
    kill -s "$sig" -- "-$pid" 2>/dev/null || kill -s "$sig" "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  done
  rm -f "$file"
}

cmd=${1:-help}; shift || true
case "$cmd" in
  server-start)
    if running "$STATE/server.pid"; then
      echo "prefect server already running (pid $(cat "$STATE/server.pid")) on $PREFECT_API_URL"; exit 0
    fi
    if port_taken; then  # another process: its pid must not become ours, nor `stop` leave it running
      echo "port $PORT is taken by a process not started here; stop it, or set AE_PREFECT_PORT" >&2; exit 1
    fi
    setsid "$BIN/prefect" server start --host 127.0.0.1 --port "$PORT" >"$STATE/server.log" 2>&1 &
    pid=$!
    echo "$pid" >"$STATE/server.pid"  # at once: `stop` finds it even if this wait is interrupted
    if ! wait_healthy "$pid"; then
      stop_pid "$STATE/server.pid"
      exit 1
    fi
    echo "prefect server on $PREFECT_API_URL (export PREFECT_API_URL=$PREFECT_API_URL)";;
  pools)
    for pool in ${AE_POOLS:-ae-cpu}; do
      "$BIN/prefect" work-pool create "$pool" --type process --overwrite
    done;;
  deploy)
    names=("$@"); [ ${#names[@]} -gt 0 ] || names=(nightly)
    for name in "${names[@]}"; do
      "$BIN/prefect" --no-prompt deploy --prefect-file infra/prefect.yaml --name "$name"
    done;;
  worker-start)
    pool=${1:-ae-cpu}
    if running "$STATE/worker-$pool.pid"; then
      echo "worker for $pool already running (pid $(cat "$STATE/worker-$pool.pid"))"; exit 0
    fi
    # env --default-signal: a worker started in the background would otherwise ignore SIGINT.
    setsid env --default-signal=INT "$BIN/prefect" worker start --pool "$pool" --type process \
      >"$STATE/worker-$pool.log" 2>&1 &
    echo $! >"$STATE/worker-$pool.pid"
    echo "worker for $pool started (log: $STATE/worker-$pool.log)";;
  run)
    name=$1; shift
    "$BIN/prefect" deployment run "$name" "$@" --watch --watch-timeout "${AE_WATCH_TIMEOUT:-3600}";;
  stop)
    for f in "$STATE"/worker-*.pid; do [ -e "$f" ] && stop_pid "$f"; done
    stop_pid "$STATE/server.pid"
    echo "stopped";;
  *)
    sed -n '2,14p' "$0"; exit 2;;
esac
