#!/usr/bin/env bash
# `make compose-check`: run the project's docker-compose.yml for real on this machine's Docker
# engine: `docker compose up` until the demo prints its accuracy, then `--scale worker=3`
# until three workers are healthy, then `docker compose down -v`.
#
# Where public images cannot be pulled, name a harness that builds local stand-ins for them
# and runs the same steps (the team's: COMPOSE_HARNESS=../shared/compose/run.sh); it is run
# from a writable copy and its last line is its verdict.
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

processes_check() {  # the `processes` profile on images the steps before built
  local deadline health requests code stopped
  export COMPOSE_PROFILES=processes
  trap 'docker compose down -v >/dev/null 2>&1 || true' EXIT
  if (exec 3<>/dev/tcp/127.0.0.1/9092) 2>/dev/null; then  # a broker of the host's holds 9092
    local override
    override=$(mktemp --suffix .yml)
    printf 'services:\n  kafka:\n    ports: !override\n      - "127.0.0.1:19092:9092"\n' >"$override"
    export COMPOSE_FILE="docker-compose.yml:$override"
  fi
  echo "compose-check: docker compose --profile processes up worker-processes" >&2
  docker compose up --detach --no-build worker-processes
  deadline=$((SECONDS + 300))
  until [ "$(docker compose ps worker-processes --format '{{.Health}}')" = healthy ]; do
    health=$(docker compose ps --all worker-processes --format '{{.State}} {{.Health}}')
    if [ $SECONDS -ge $deadline ]; then
      echo "compose-check: worker-processes not healthy after 300 s ($health)" >&2
      docker compose logs --tail 40 worker-processes >&2
      return 1
    fi
    sleep 2
  done
  # The demo alone (--no-deps: not the single-process worker): only the two children answer it.
  docker compose run --rm --no-deps demo | tail -n 1
  # The parent reads its children's /metrics each second: the last replies show within one.
  deadline=$((SECONDS + 15))
  while :; do
    requests=$(docker compose exec -T worker-processes python -c "
import urllib.request
text = urllib.request.urlopen('http://127.0.0.1:9464/metrics', timeout=5).read().decode()
print(int(sum(float(l.rsplit(' ', 1)[1]) for l in text.splitlines()
              if l.startswith('inference_requests_total{'))))")
    [ "$requests" -ge 360 ] && break
    if [ $SECONDS -ge $deadline ]; then
      echo "compose-check: merged /metrics counts $requests requests after 15 s; the demo sent 360" >&2
      return 1
    fi
    sleep 1
  done
  docker compose stop worker-processes >/dev/null
  code=$(docker inspect --format '{{.State.ExitCode}}' "$(docker compose ps --all -q worker-processes)")
  stopped=$(docker compose logs --no-log-prefix worker-processes | grep -c "worker stopped cleanly" || true)
  if [ "$code" != 0 ] || [ "$stopped" -lt 2 ]; then
    echo "compose-check: worker-processes exit code $code, $stopped of 2 children drained" >&2
    docker compose logs --tail 40 worker-processes >&2
    return 1
  fi
  echo "compose-check: processes profile ok: healthy, /metrics counts $requests requests, 2 children drained, exit 0"
  docker compose down -v >/dev/null 2>&1
}

if [ "${1:-}" = processes ]; then  # only this step, on images built before
  processes_check
  exit
fi

if [ -n "${COMPOSE_HARNESS:-}" ]; then
  [ -f "$COMPOSE_HARNESS" ] || { echo "compose-check: COMPOSE_HARNESS=$COMPOSE_HARNESS is no file" >&2; exit 1; }
  # A shared harness may be laid read-only; it copies its files into images and Kafka's
  # start-up rewrites one of them, so it runs from a writable copy.
  copy=$(mktemp -d)
  trap 'rm -rf "$copy"' EXIT
  cp -r "$(dirname "$COMPOSE_HARNESS")/." "$copy"
  chmod -R u+w "$copy"
  echo "compose-check: running $COMPOSE_HARNESS (local stand-ins for the public images)" >&2
  bash "$copy/$(basename "$COMPOSE_HARNESS")"
  processes_check
  exit
fi

if ! docker compose version >/dev/null 2>&1; then
  echo "compose-check: the Docker Compose v2 plugin is missing ('docker compose version' fails)" >&2
  exit 1
fi
trap 'docker compose down -v >/dev/null 2>&1 || true' EXIT
echo "compose-check: docker compose up (pulls apache/kafka and python images, builds the worker)" >&2
docker compose up --detach --build
docker compose wait demo
docker compose logs --no-log-prefix demo | tail -n 1
echo "compose-check: docker compose up --scale worker=3" >&2
docker compose up --detach --no-recreate --scale worker=3 worker
for _ in $(seq 120); do
  healthy=$(docker compose ps worker --format '{{.Health}}' | grep -c '^healthy$' || true)
  if [ "$healthy" -ge 3 ]; then
    echo "compose-check: demo done, $healthy workers healthy"
    docker compose down -v >/dev/null 2>&1
    processes_check
    exit
  fi
  sleep 2
done
echo "compose-check: only $healthy of 3 workers became healthy" >&2
docker compose ps --all >&2
exit 1
