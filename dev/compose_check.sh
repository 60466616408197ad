#!/usr/bin/env bash
# `make compose-check`: run the project's docker-compose.yml for real on this machine's Docker
# engine: `docker compose up` until the demo prints its accuracy, then `--scale worker=3`
# until three workers are healthy, then `docker compose down -v`; then the `processes` profile
# (`serve --processes 2` in one container, its own project): healthy, both children with
# partitions, the demo answered by them alone, the merged /metrics counting its 361 requests,
# both children drained on `docker compose stop` with exit code 0, `down -v`.
# `dev/compose_check.sh processes` runs that last step alone, on the image built before.
#
# Where public images cannot be pulled, name a harness that builds local stand-ins for them
# and runs the same steps (the team's: COMPOSE_HARNESS=../shared/compose/run.sh); it is run
# from a writable copy. The last line printed is the verdict (the harness's, then the
# processes step's).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v docker >/dev/null 2>&1; then
  echo "compose-check: no docker command here; install Docker (Debian: apt-get install -y docker.io) and start dockerd" >&2
  exit 1
fi
if ! docker info >/dev/null 2>&1; then
  echo "compose-check: no Docker engine answers ('docker info' fails); start dockerd first" >&2
  exit 1
fi

WORK=$(mktemp -d)
cleanup() {
  if [ -n "${PROCESSES_PROJECT:-}" ]; then
    COMPOSE_PROJECT_NAME=$PROCESSES_PROJECT docker compose down -v --remove-orphans >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

processes_check() {  # the `processes` profile, on the image built before (--no-build)
  local deadline health requests before code container since stopped children demo
  # Its own project (not the user's stack, nor the steps before), from nothing; no host port
  # for kafka: the demo and the probes reach everything over the project's network.
  export COMPOSE_PROJECT_NAME=kiw-processes-check PROCESSES_PROJECT=kiw-processes-check
  export COMPOSE_PROFILES=processes
  printf 'services:\n  kafka:\n    ports: !reset []\n' >"$WORK/no-host-port.yml"
  export COMPOSE_FILE="docker-compose.yml:$WORK/no-host-port.yml"
  fail() {
    echo "compose-check: processes profile FAILED: $1" >&2
    docker compose logs --tail 40 worker-processes >&2 || true
    return 1
  }
  docker compose down -v --remove-orphans >/dev/null 2>&1 || true
  echo "compose-check: docker compose --profile processes up worker-processes" >&2
  docker image inspect kafka-inference-worker:latest >/dev/null 2>&1 \
    || fail "no image kafka-inference-worker:latest; build it first (docker compose build worker)" || return 1
  docker compose up --detach --no-build worker-processes || fail "docker compose up" || return 1
  deadline=$((SECONDS + 300))
  until [ "$(docker compose ps worker-processes --format '{{.Health}}' 2>/dev/null || true)" = healthy ]; do
    if [ $SECONDS -ge $deadline ]; then
      health=$(docker compose ps --all worker-processes --format '{{.State}} {{.Health}}' 2>/dev/null || true)
      fail "worker-processes not healthy after 300 s (${health:-no container})" || return 1
    fi
    sleep 2
  done
  requests_now() {  # inference_requests_total summed over the merged /metrics (0 if unreadable)
    local n
    n=$(docker compose exec -T worker-processes python -c "
import urllib.request
text = urllib.request.urlopen('http://127.0.0.1:9464/metrics', timeout=5).read().decode()
print(int(sum(float(l.split('}', 1)[1].split()[0]) for l in text.splitlines()
              if l.startswith('inference_requests_total{'))))" 2>/dev/null || true)
    case $n in '' | *[!0-9]*) echo 0 ;; *) echo "$n" ;; esac
  }
  before=$(requests_now)
  # The demo alone (--no-deps: not the single-process worker): only the two children answer
  # it. It sends 361 requests: one first, to wait for a worker, then the 360 images.
  if ! demo=$(docker compose run --rm --no-deps -T demo 2>&1); then
    echo "$demo" | tail -n 5 >&2
    fail "the demo failed" || return 1
  fi
  echo "$demo" | tail -n 1
  # The parent reads its children's /metrics each second: the last replies show within one.
  deadline=$((SECONDS + 15))
  until [ "$(( $(requests_now) - before ))" -ge 361 ]; do
    [ $SECONDS -lt $deadline ] \
      || fail "merged /metrics counts $(( $(requests_now) - before )) new requests after 15 s; the demo sent 361" \
      || return 1
    sleep 1
  done
  requests=$(( $(requests_now) - before ))
  # Both children were members with partitions of their own: each logged an assignment.
  children=$(docker compose logs --no-log-prefix worker-processes 2>/dev/null \
    | grep '"partitions assigned"' | grep -o '"child": [0-9]*' | sort -u | wc -l || true)
  [ "$children" -ge 2 ] || fail "$children of 2 children logged partitions assigned" || return 1
  since=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  docker compose stop worker-processes >/dev/null || fail "docker compose stop" || return 1
  container=$(docker compose ps --all -q worker-processes 2>/dev/null || true)
  [ -n "$container" ] || fail "no worker-processes container after stop" || return 1
  code=$(docker inspect --format '{{.State.ExitCode}}' "$container" 2>/dev/null || echo "?")
  stopped=$(docker compose logs --since "$since" --no-log-prefix worker-processes 2>/dev/null \
    | grep -c "worker stopped cleanly" || true)
  if [ "$code" != 0 ] || [ "$stopped" -lt 2 ]; then
    fail "worker-processes exit code $code, $stopped of 2 children drained on stop" || return 1
  fi
  docker compose down -v --remove-orphans >/dev/null 2>&1 || true
  PROCESSES_VERDICT="processes profile ok: 2 children with partitions, /metrics counts $requests requests, both drained, exit 0"
}

if [ "${1:-}" = processes ]; then  # only this step, on the image built before
  processes_check
  echo "compose-check: $PROCESSES_VERDICT"
  exit
fi

if [ -n "${COMPOSE_HARNESS:-}" ]; then
  [ -f "$COMPOSE_HARNESS" ] || { echo "compose-check: COMPOSE_HARNESS=$COMPOSE_HARNESS is no file" >&2; exit 1; }
  # A shared harness may be laid read-only; it copies its files into images and Kafka's
  # start-up rewrites one of them, so it runs from a writable copy.
  copy="$WORK/harness"
  cp -r "$(dirname "$COMPOSE_HARNESS")/." "$copy"
  chmod -R u+w "$copy"
  echo "compose-check: running $COMPOSE_HARNESS (local stand-ins for the public images)" >&2
  verdict=$(bash "$copy/$(basename "$COMPOSE_HARNESS")" | tee /dev/stderr | tail -n 1)
  processes_check
  echo "$verdict; $PROCESSES_VERDICT"
  exit
fi

if ! docker compose version >/dev/null 2>&1; then
  echo "compose-check: the Docker Compose v2 plugin is missing ('docker compose version' fails)" >&2
  exit 1
fi
trap 'docker compose down -v >/dev/null 2>&1 || true; cleanup' EXIT
echo "compose-check: docker compose up (pulls apache/kafka and python images, builds the worker)" >&2
docker compose up --detach --build
docker compose wait demo
docker compose logs --no-log-prefix demo | tail -n 1
echo "compose-check: docker compose up --scale worker=3" >&2
docker compose up --detach --no-recreate --scale worker=3 worker
for _ in $(seq 120); do
  healthy=$(docker compose ps worker --format '{{.Health}}' | grep -c '^healthy$' || true)
  if [ "$healthy" -ge 3 ]; then
    docker compose down -v >/dev/null 2>&1 || true
    processes_check
    echo "compose-check: demo done, $healthy workers healthy; $PROCESSES_VERDICT"
    exit
  fi
  sleep 2
done
echo "compose-check: only $healthy of 3 workers became healthy" >&2
docker compose ps --all >&2
exit 1
