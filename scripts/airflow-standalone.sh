#!/usr/bin/env bash
# `make airflow`: `sofare airflow standalone`, i.e. Airflow standalone on this checkout with the environment `sofare
# init` uses (var/airflow, dags/, plugins/, no examples, the API bound to 127.0.0.1: sofare.runtime) and the venv's bin
# first on PATH (standalone starts its components as `airflow ...` subprocesses). Ctrl-C, SIGTERM or the end of this
# script stops everything standalone started — the scheduler, the API server, the dag-processor, the triggerer and
# every LocalExecutor worker — by process group and by process tree (a component that starts a session of its own
# is still found through its parent).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

set -m  # the background job below gets a process group of its own: its id is the job's pid
"$ROOT/.venv/bin/sofare" airflow standalone &  # prints the UI's address and where the login is
leader=$!

tree() {  # a process and all its descendants
  echo "$1"
  local child
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do tree "$child"; done
}

running() {  # whether any of these pids still runs (a zombie, dead but not yet reaped, does not)
  local pid state
  for pid in $1; do
    state="$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1 || true)"
    [[ -n "$state" && "$state" != Z && "$state" != X ]] && return 0
  done
  return 1
}

stop() {
  trap - INT TERM EXIT
  local pids
  pids="$(tree "$leader" | tr '\n' ' ')"
  kill -TERM -- "-$leader" $pids 2>/dev/null || true
  for _ in $(seq 1 30); do
    running "$pids" || exit 0
    sleep 1
  done
  kill -KILL -- "-$leader" $pids 2>/dev/null || true
}
trap stop INT TERM EXIT
echo "Ctrl-C stops everything Airflow standalone started."
wait "$leader"
