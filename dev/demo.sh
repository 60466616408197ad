#!/usr/bin/env bash
# `make demo`: local broker + worker + digits demo client, without Docker.
# Prints accuracy and requests/s; stops what it started (a broker that was already running stays).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}

broker_was_running=0
$PY dev/local_kafka.py status >/dev/null 2>&1 && broker_was_running=1
$PY dev/local_kafka.py start >/dev/null

worker_pid=""
cleanup() {
  if [ -n "$worker_pid" ]; then
    kill -TERM "$worker_pid" 2>/dev/null && wait "$worker_pid" 2>/dev/null || true
  fi
  [ "$broker_was_running" = 1 ] || $PY dev/local_kafka.py stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

export WORKER_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:9092
WORKER_LOG__FORMAT=json $PY -m worker serve 2>.kafka/demo-worker.log &
worker_pid=$!
echo "demo: worker pid $worker_pid (log: .kafka/demo-worker.log); sending the digits test split"
$PY -m worker demo "$@"
