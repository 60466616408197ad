#!/usr/bin/env bash
# `make compose-check`: run the project's docker-compose.yml for real on this machine's Docker
# engine: `docker compose up` (demo accuracy), `--scale worker=3`, Ctrl-C, `down -v`.
#
# Where public images cannot be pulled, the team's harness (COMPOSE_HARNESS, default
# ../shared/compose/run.sh beside the checkout) builds local stand-ins for them first and
# prints a one-line verdict; elsewhere the plain `docker compose` commands run.
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

HARNESS=${COMPOSE_HARNESS:-../shared/compose/run.sh}
if [ -f "$HARNESS" ]; then
  # shared/ is laid read-only; the harness copies its files into images and Kafka's start-up
  # rewrites one of them, so it runs from a writable copy.
  copy=$(mktemp -d)
  trap 'rm -rf "$copy"' EXIT
  cp -r "$(dirname "$HARNESS")/." "$copy"
  chmod -R u+w "$copy"
  echo "compose-check: running $HARNESS (local stand-ins for the public images)" >&2
  bash "$copy/$(basename "$HARNESS")"
  exit
fi

if ! docker compose version >/dev/null 2>&1; then
  echo "compose-check: the Docker Compose v2 plugin is missing ('docker compose version' fails)" >&2
  exit 1
fi
echo "compose-check: docker compose up (pulls apache/kafka and python images, builds the worker)" >&2
trap 'docker compose down -v >/dev/null 2>&1 || true' EXIT
docker compose up --detach --build
rc=0
docker compose wait demo || rc=$?
docker compose logs demo | tail -n 5
docker compose ps --all
exit "$rc"
