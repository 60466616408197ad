"""The compose file and Dockerfile, checked against the code (no Docker engine runs here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from worker.settings import KafkaSettings, env_var_names

from .conftest import ROOT


def compose() -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(doc, dict)
    return doc


def worker_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services that run our image (built here, or the image the build produces)."""
    image = doc["services"]["worker"]["image"]
    return {
        name: svc
        for name, svc in doc["services"].items()
        if svc.get("build") == "." or svc.get("image") == image
    }


def test_every_worker_variable_in_compose_is_a_real_setting() -> None:
    """Every WORKER_* variable the compose file sets names an existing setting."""
    known = env_var_names()
    services = worker_services(compose())
    assert set(services) == {"worker", "demo"}
    for name, svc in services.items():
        env = svc["environment"]
        unknown = [k for k in env if k.startswith("WORKER_") and k not in known]
        assert unknown == [], f"service {name} sets unknown settings {unknown}"


def test_compose_topics_agree_with_worker_settings() -> None:
    """The topics job creates exactly the topics the worker and demo use, and the defaults."""
    doc = compose()
    script = "\n".join(doc["services"]["topics"]["command"])
    defaults = KafkaSettings()
    for svc in worker_services(doc).values():
        env = svc["environment"]
        for key, default in (
            ("WORKER_KAFKA__REQUESTS_TOPIC", defaults.requests_topic),
            ("WORKER_KAFKA__REPLIES_TOPIC", defaults.replies_topic),
        ):
            topic = env.get(key, default)
            assert topic == default
            assert topic in script
        assert env["WORKER_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:29092"
    kafka_env = doc["services"]["kafka"]["environment"]
    assert "INTERNAL://kafka:29092" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]
    assert "healthcheck" in doc["services"]["kafka"]


def test_worker_scales_and_drains() -> None:
    """The worker can be scaled (no fixed name or host port) and gets time to drain on stop."""
    worker = compose()["services"]["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker
    grace = int(str(worker["stop_grace_period"]).rstrip("s"))
    assert grace > float(worker["environment"]["WORKER_RUNTIME__SHUTDOWN_TIMEOUT_S"])


def test_dockerfile_runs_as_non_root_and_ships_schemas_and_models() -> None:
    """The image switches to a non-root user and copies schemas and models."""
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users
    assert users[-1] not in ("root", "0")
    copies = " ".join(line for line in lines if line.startswith("COPY "))
    for path in ("schemas", "worker", "models", "pyproject.toml"):
        assert path in copies


def test_wheel_carries_the_schemas() -> None:
    """The wheel carries schemas/ (force-included), where codec.schema_dir finds them."""
    text = (ROOT / "pyproject.toml").read_text()
    assert '"schemas" = "worker/schemas"' in text
    assert Path(ROOT / "schemas" / "inference_request.avsc").is_file()
