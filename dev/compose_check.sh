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
  [ "$healthy" -ge 3 ] && { echo "compose-check: demo done, $healthy workers healthy"; exit 0; }
  sleep 2
done
echo "compose-check: only $healthy of 3 workers became healthy" >&2
docker compose ps --all >&2
exit 1
