# The single gate: `make check` (lint + types + the whole suite against a real Kafka broker).
#
# torch is several GB, so the virtual environment lives outside the checkout and is shared by
# every checkout on this machine (CI included): it is built once per machine. Override with
# `make VENV=.venv ...` for a private one.
PYTHON ?= python3
VENV ?= $(HOME)/.cache/kafka-inference-worker/venv
PY := $(VENV)/bin/python
# The shared venv's editable install points at whichever checkout last ran `make install`;
# every target puts this checkout first, so it always runs its own code.
export PYTHONPATH := $(CURDIR)

.PHONY: install kafka kafka-stop kafka-fresh registry registry-stop minilm gpu-pack proto test lint typecheck check demo compose-check train clean help

help:
	@echo "install     create $(VENV) and install the package with dev and train extras"
	@echo "kafka       start (or reuse) the local Apache Kafka broker on 127.0.0.1:9092"
	@echo "kafka-stop  stop it"
	@echo "kafka-fresh stop it, delete its topics' data, start it empty (before a benchmark)"
	@echo "registry    build (Go) and start the local schema registry on 127.0.0.1:8081"
	@echo "registry-stop stop it"
	@echo "minilm      fetch all-MiniLM-L6-v2 (pinned, sha256-checked) and export it to models/minilm"
	@echo "gpu-pack    wheels + MiniLM (fp16) a lent GPU machine needs for dev/gpu_check.sh, into build/gpu-pack (<= 60 MiB)"
	@echo "proto       regenerate worker/oip/*_pb2*.py from the Open Inference Protocol's proto (pinned grpcio-tools)"
	@echo "test        run the test suite (starts the broker if WORKER_KAFKA__BOOTSTRAP_SERVERS is unset)"
	@echo "check       ruff + mypy --strict + test"
	@echo "demo        broker + worker + digits demo client; prints accuracy and requests/s"
	@echo "compose-check  docker compose up for real (needs a Docker engine): demo, --scale worker=3, down,"
	@echo "              then the processes profile (serve --processes 2): demo, merged /metrics, drain"
	@echo "              (COMPOSE_HARNESS=../shared/compose/run.sh: with local stand-ins for the images)"
	@echo "train       retrain the models (models/*/train.py; needs scikit-learn)"

install:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Python 3.11+ needed (set PYTHON=...)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,train]'

kafka: install
	$(PY) dev/local_kafka.py start

kafka-stop:
	$(PYTHON) dev/local_kafka.py stop

kafka-fresh: install
	$(PY) dev/local_kafka.py fresh

registry:
	$(PYTHON) dev/local_registry.py start

registry-stop:
	$(PYTHON) dev/local_registry.py stop

minilm: install
	$(PY) dev/minilm.py --repository models

gpu-pack: install
	$(PY) dev/gpu_pack.py build --pack build/gpu-pack

proto: install
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \
		worker/oip/open_inference_grpc.proto

test: install minilm
	$(PY) -m pytest

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: install
	$(PY) -m mypy

check: lint typecheck test

demo: install
	PY=$(PY) bash dev/demo.sh

compose-check:
	COMPOSE_HARNESS="$(COMPOSE_HARNESS)" bash dev/compose_check.sh

train: install
	$(PY) models/digits/train.py --version 1 --arch mlp
	$(PY) models/digits/train.py --version 2 --arch cnn --epochs 40
	$(PY) models/iris/train.py --version 1

clean:
	rm -rf .mypy_cache .ruff_cache .pytest_cache build dist *.egg-info
