"""Compose, Dockerfile, Kubernetes and monitoring files, checked against the code.

These tests need no Docker engine or Kubernetes cluster: they check structure and that every
setting, port, path, topic and metric the files name really exists in the worker.
`make compose-check` runs the compose file for real on a Docker engine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from worker.cli import _parser
from worker.http import Probes, serve_http
from worker.kafka import consumer_config
from worker.metrics import Metrics
from worker.settings import (
    SECRETS_DIR_VAR,
    AuditSettings,
    HttpSettings,
    KafkaSettings,
    ModelSettings,
    RuntimeSettings,
    Settings,
    env_var_names,
    load_settings,
)

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
        if svc.get("build") == "."
        or (isinstance(svc.get("build"), dict) and svc["build"]["context"] == ".")
        or svc.get("image") == image
    }


def test_every_worker_variable_in_compose_is_a_real_setting() -> None:
    """Every WORKER_* variable the compose file sets names an existing setting."""
    known = env_var_names()
    services = worker_services(compose())
    assert set(services) == {"worker", "worker-gpu", "worker-processes", "demo"}
    for name, svc in services.items():
        env = svc["environment"]
        unknown = [k for k in env if k.startswith("WORKER_") and k not in known]
        assert unknown == [], f"service {name} sets unknown settings {unknown}"


def created_topics(doc: dict[str, Any]) -> set[str]:
    """The topics the compose ``topics`` job creates (its ``for topic in ...`` list)."""
    script = "\n".join(doc["services"]["topics"]["command"])
    found = re.search(r"for topic in ([^;]+);", script)
    assert found is not None, "the topics job has no `for topic in ...` loop"
    return set(found.group(1).split())


def compose_settings(env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a service of ours gets from its compose environment (and no other)."""
    for name in list(os.environ):
        if name.upper().startswith("WORKER_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    return load_settings()


def test_compose_creates_every_topic_the_worker_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The topics job creates every topic each worker service's own settings require.

    The workers run with WORKER_KAFKA__MANAGE_TOPICS=false, so a topic missing here stops them.
    """
    doc = compose()
    created = created_topics(doc)
    for name, svc in worker_services(doc).items():
        settings = compose_settings(svc["environment"], monkeypatch)
        kafka = settings.kafka
        assert settings.kafka.bootstrap_servers == "kafka:29092"
        needed = {kafka.requests_topic, kafka.replies_topic}
        if name != "demo":  # the demo is a client; it needs only these two
            assert not kafka.manage_topics, name
            needed = set(settings.topics())
        assert needed <= created, f"{name} needs {sorted(needed - created)}"
    kafka_env = doc["services"]["kafka"]["environment"]
    assert "INTERNAL://kafka:29092" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]
    assert "healthcheck" in doc["services"]["kafka"]


def test_settings_name_every_topic_the_worker_creates() -> None:
    """Settings.topics() lists the requests, replies, dead-letter and (if set) audit topics."""
    plain = Settings()
    assert plain.topics() == ["inference.requests", "inference.replies", "inference.dlq"]
    audited = Settings(audit=AuditSettings(topic="inference.audit"))
    assert "inference.audit" in audited.topics()


def test_worker_scales_and_drains() -> None:
    """The worker can be scaled (no fixed name or host port) and gets time to drain on stop."""
    worker = compose()["services"]["worker"]
    assert "container_name" not in worker
    # REST and gRPC reach the host on ports Docker picks per replica (never a fixed one).
    assert all(re.fullmatch(r"127\.0\.0\.1::\d+", p) for p in worker["ports"])
    assert {p.rsplit(":", 1)[1] for p in worker["ports"]} == {"8000", "8001"}
    assert {"8000", "8001"} <= set(worker["expose"])
    env = worker["environment"]
    assert env["WORKER_REST__ENABLED"] == env["WORKER_GRPC__ENABLED"] == "true"
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


K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
MONITORING = ROOT / "deploy" / "monitoring"


def manifests() -> dict[str, dict[str, Any]]:
    """Every Kubernetes object of the base (deploy/k8s/base), by kind."""
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(BASE.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and "kind" in doc and doc["kind"] != "Kustomization":
                objects[doc["kind"]] = doc
    return objects


def kustomize(folder: Path) -> list[dict[str, Any]]:
    """The objects ``kustomize build folder`` renders (``kubectl kustomize`` if that is here).

    Neither is a dependency of the project: without one the test calling this is skipped, and
    the tests that read the files themselves still run.
    """
    for command in (["kustomize", "build"], ["kubectl", "kustomize"]):
        if shutil.which(command[0]):
            done = subprocess.run(
                [*command, str(folder)], capture_output=True, text=True, timeout=120, check=False
            )
            assert done.returncode == 0, f"{' '.join(command)} {folder}: {done.stderr}"
            return [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    pytest.skip("neither kustomize nor kubectl is installed here")


INSTANCE_ID = "WORKER_KAFKA__GROUP_INSTANCE_ID"
INSTANCE_ID_FROM_POD_NAME = {
    "name": INSTANCE_ID,
    "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
}


def test_every_kustomization_builds() -> None:
    """deploy/k8s and each overlay build with kustomize, into the objects the overlay means."""
    base = {(o["kind"], o["metadata"]["name"]) for o in kustomize(K8S)}
    assert base == {(o["kind"], o["metadata"]["name"]) for o in manifests().values()}
    gpu = {o["kind"]: o for o in kustomize(K8S / "gpu")}
    assert set(gpu) == {kind for kind, _ in base}
    [container] = gpu["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith(":gpu")
    static = {o["kind"]: o for o in kustomize(K8S / "static")}
    assert set(static) == {kind for kind, _ in base} - {"Deployment"} | {"StatefulSet"}
    [container] = static["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    assert container["env"] == [INSTANCE_ID_FROM_POD_NAME]
    scaled = static["ScaledObject"]["spec"]
    assert scaled["scaleTargetRef"]["kind"] == "StatefulSet"
    assert scaled["triggers"] == manifests()["ScaledObject"]["spec"]["triggers"]
    # The patch replaces the scale-down policy and keeps the base's stabilisation window.
    down = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    base_window = hpa_behavior()["scaleDown"]["stabilizationWindowSeconds"]
    assert down["stabilizationWindowSeconds"] == base_window
    assert down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 120}]
    assert static["ConfigMap"]["data"]["WORKER_KAFKA__SESSION_TIMEOUT_MS"] == "60000"


def test_kustomization_lists_every_manifest() -> None:
    """`kubectl apply -k deploy/k8s` applies the base, which lists every manifest in base/."""
    assert yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"] == ["base"]
    assert {p.name for p in K8S.glob("*.yaml")} == {"kustomization.yaml"}, "manifests in base/"
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    files = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_k8s_config_uses_real_settings_and_secrets_are_mounted_files() -> None:
    """ConfigMap keys are settings; credentials live only in the Secret, mounted as files."""
    objects = manifests()
    config = objects["ConfigMap"]["data"]
    assert config
    assert set(config) <= env_var_names() | {SECRETS_DIR_VAR}
    secret = objects["Secret"]
    assert set(secret["stringData"]) <= env_var_names() | {"ca.pem"}
    assert {"WORKER_KAFKA__SASL_USERNAME", "WORKER_KAFKA__SASL_PASSWORD"} <= set(
        secret["stringData"]
    )
    assert not any("SASL_USERNAME" in k or "PASSWORD" in k for k in config), "no secret in config"
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert [next(iter(s)) for s in container["envFrom"]] == ["configMapRef"]
    assert "env" not in container or all(e["name"] in env_var_names() for e in container["env"])
    volume = next(v for v in pod["volumes"] if "secret" in v)
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    assert mount["readOnly"] is True
    assert config[SECRETS_DIR_VAR] == mount["mountPath"]
    assert config["WORKER_KAFKA__SSL_CAFILE"] == f"{mount['mountPath']}/ca.pem"
    kafka = KafkaSettings.model_validate(
        {
            k.removeprefix("WORKER_KAFKA__").lower(): v
            for k, v in config.items()
            if k.startswith("WORKER_KAFKA__") and k != "WORKER_KAFKA__SSL_CAFILE"
        }
        | {"sasl_username": "u", "sasl_password": "p"}
    )
    assert kafka.security_protocol == "SASL_SSL"
    assert kafka.refuse_plaintext is True


def test_compose_sasl_ssl_override_takes_credentials_from_secrets() -> None:
    """The SASL_SSL override sets real settings and mounts the credentials as secret files."""

    class ComposeLoader(yaml.SafeLoader):
        """Compose's ``!reset`` tag (drop a value set by the base file) reads as None."""

    ComposeLoader.add_constructor("!reset", lambda _loader, _node: None)
    text = (ROOT / "deploy" / "compose" / "sasl-ssl.yml").read_text()
    doc = yaml.load(text, Loader=ComposeLoader)  # noqa: S506 - a SafeLoader subclass
    assert "depends_on: !reset" in text, "the local broker dependency is dropped"
    worker = doc["services"]["worker"]
    env = worker["environment"]
    assert set(env) <= env_var_names() | {SECRETS_DIR_VAR}
    assert env["WORKER_KAFKA__SECURITY_PROTOCOL"] == "SASL_SSL"
    assert not any("PASSWORD" in k or "USERNAME" in k for k in env), "credentials not in env"
    targets = {s["target"] for s in worker["secrets"]}
    assert {"WORKER_KAFKA__SASL_USERNAME", "WORKER_KAFKA__SASL_PASSWORD"} <= targets
    assert env[SECRETS_DIR_VAR] == "/run/secrets"
    assert env["WORKER_KAFKA__SSL_CAFILE"].removeprefix("/run/secrets/") in targets
    for secret in doc["secrets"].values():
        assert secret["file"].startswith("./deploy/compose/secrets/")
    assert "/deploy/compose/secrets/" in (ROOT / ".gitignore").read_text()


def test_compose_worker_runs_read_only_without_privileges() -> None:
    """The Compose worker has a read-only root filesystem, a /tmp tmpfs and no capabilities."""
    worker = compose()["services"]["worker"]
    assert worker["read_only"] is True
    assert worker["tmpfs"] == ["/tmp"]  # noqa: S108 - the container's own /tmp, a tmpfs
    assert worker["cap_drop"] == ["ALL"]


def test_k8s_deployment_probes_resources_drain_and_hardening() -> None:
    """Probes hit /healthz and /readyz on the metrics port; grace period covers the drain."""
    objects = manifests()
    config = objects["ConfigMap"]["data"]
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    port = next(p for p in container["ports"] if p["name"] == "http")["containerPort"]
    assert port == int(config.get("WORKER_HTTP__PORT", HttpSettings().port))
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["requests"]["memory"]
    drain = float(
        config.get("WORKER_RUNTIME__SHUTDOWN_TIMEOUT_S", RuntimeSettings().shutdown_timeout_s)
    )
    assert pod["terminationGracePeriodSeconds"] > drain
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_keda_scales_the_group_on_lag_capped_at_the_partition_count() -> None:
    """The ScaledObject watches our group and topic and never exceeds the partitions."""
    objects = manifests()
    config = objects["ConfigMap"]["data"]
    scaled = objects["ScaledObject"]["spec"]
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["consumerGroup"] == config["WORKER_KAFKA__GROUP_ID"]
    assert trigger["metadata"]["topic"] == config["WORKER_KAFKA__REQUESTS_TOPIC"]
    assert trigger["metadata"]["bootstrapServers"] == config["WORKER_KAFKA__BOOTSTRAP_SERVERS"]
    assert scaled["scaleTargetRef"]["name"] == objects["Deployment"]["metadata"]["name"]
    partitions = int(config.get("WORKER_KAFKA__TOPIC_PARTITIONS", KafkaSettings().topic_partitions))
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"] <= partitions
    # KEDA authenticates as the worker does: same protocol, keys of the worker's Secret.
    assert trigger["metadata"]["sasl"] == "scram_sha512"
    assert config["WORKER_KAFKA__SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert trigger["metadata"]["tls"] == "enable"
    auth = objects["TriggerAuthentication"]
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    secret = objects["Secret"]
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]


def keda_trigger() -> dict[str, str]:
    """The metadata of the base ScaledObject's (only) Kafka trigger."""
    (trigger,) = manifests()["ScaledObject"]["spec"]["triggers"]
    return dict(trigger["metadata"])


def hpa_behavior() -> dict[str, Any]:
    """The HPA behaviour the base ScaledObject gives KEDA's HPA."""
    advanced = manifests()["ScaledObject"]["spec"]["advanced"]
    return dict(advanced["horizontalPodAutoscalerConfig"]["behavior"])


def test_keda_scales_in_one_pod_at_a_time_after_a_stabilisation_window() -> None:
    """Scale-in waits out a window of recommendations and then removes one pod per period."""
    scaled = manifests()["ScaledObject"]["spec"]
    down = hpa_behavior()["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 120
    assert down["policies"], "without a policy the HPA may drop every surplus pod at once"
    assert all(p["type"] == "Pods" and p["value"] == 1 for p in down["policies"])
    assert all(p["periodSeconds"] >= 60 for p in down["policies"])
    # A burst must last a while before it adds a worker (a model load and a rebalance).
    assert hpa_behavior()["scaleUp"]["stabilizationWindowSeconds"] > 0
    # KEDA's cooldownPeriod applies only to scaling to zero, which minReplicaCount rules out:
    # setting it would suggest it slows scale-in, which it does not.
    assert scaled["minReplicaCount"] >= 1
    assert "cooldownPeriod" not in scaled


def test_keda_lag_threshold_is_per_replica_and_above_the_workers_own_prefetch() -> None:
    """The lag per replica exceeds what busy workers hold uncommitted; KEDA reads as they do."""
    config = manifests()["ConfigMap"]["data"]
    trigger = keda_trigger()
    in_flight = int(config.get("WORKER_RUNTIME__MAX_IN_FLIGHT", RuntimeSettings().max_in_flight))
    # Each worker may hold max_in_flight fetched, unanswered and so uncommitted records; a lag
    # per replica below twice that would scale the group out on its own prefetch.
    assert int(trigger["lagThreshold"]) >= 2 * in_flight
    # KEDA counts a partition without a committed offset the way the worker will serve it.
    kafka = KafkaSettings(bootstrap_servers=config["WORKER_KAFKA__BOOTSTRAP_SERVERS"])
    assert trigger["offsetResetPolicy"] == consumer_config(kafka)["auto_offset_reset"]
    assert trigger["scaleToZeroOnInvalidOffset"] == "false"
    # Replicas capped at the partition count (KEDA's own cap), not at partitions with lag.
    assert trigger["allowIdleConsumers"] == "false"
    assert trigger["limitToPartitionsWithLag"] == "false"
    assert trigger["excludePersistentLag"] == "false"


def test_scaling_doc_states_the_scaledobject_values() -> None:
    """docs/scaling.md's table of KEDA values says what scaledobject.yaml sets."""
    text = (ROOT / "docs" / "scaling.md").read_text()
    documented = dict(re.findall(r"^\| `([\w.]+)` \| `([^`]+)` \|", text, flags=re.MULTILINE))
    scaled = manifests()["ScaledObject"]["spec"]
    down, up = hpa_behavior()["scaleDown"], hpa_behavior()["scaleUp"]
    [policy] = down["policies"]
    expected = {
        "minReplicaCount": str(scaled["minReplicaCount"]),
        "maxReplicaCount": str(scaled["maxReplicaCount"]),
        "pollingInterval": str(scaled["pollingInterval"]),
        "scaleDown.stabilizationWindowSeconds": str(down["stabilizationWindowSeconds"]),
        "scaleDown.policies": f"{policy['type']}: {policy['value']} / {policy['periodSeconds']} s",
        "scaleUp.stabilizationWindowSeconds": str(up["stabilizationWindowSeconds"]),
    } | {key: value for key, value in keda_trigger().items() if key in documented}
    for key in ("lagThreshold", "allowIdleConsumers", "limitToPartitionsWithLag"):
        assert key in documented, f"docs/scaling.md does not document {key}"
    assert {key: documented.get(key) for key in expected} == expected
    assert "desired replicas = ceil(total lag / lagThreshold)" in text


def test_k8s_workloads_leave_the_replica_count_to_keda() -> None:
    """Neither workload sets replicas, which every `kubectl apply` would reset the group to."""
    assert "replicas" not in manifests()["Deployment"]["spec"]
    assert "replicas" not in static_objects()["StatefulSet"]["spec"]


def test_k8s_heartbeat_and_session_timeouts_notice_changes_quickly() -> None:
    """Heartbeats at most a third of the session timeout, in the base and the static variant."""
    config = manifests()["ConfigMap"]["data"]
    static = config | static_objects()["ConfigMap"]["data"]
    for data in (config, static):
        assert set(data) <= env_var_names() | {SECRETS_DIR_VAR}
        heartbeat = int(data["WORKER_KAFKA__HEARTBEAT_INTERVAL_MS"])
        session = int(data["WORKER_KAFKA__SESSION_TIMEOUT_MS"])
        assert 3 * heartbeat <= session
        KafkaSettings(heartbeat_interval_ms=heartbeat, session_timeout_ms=session)
    # The other workers learn of a rebalance at their next heartbeat: within a second.
    assert int(config["WORKER_KAFKA__HEARTBEAT_INTERVAL_MS"]) <= 1_000


STATIC = K8S / "static"


def static_objects() -> dict[str, dict[str, Any]]:
    """The objects deploy/k8s/static adds or patches, by kind (read from its files)."""
    kustomization = yaml.safe_load((STATIC / "kustomization.yaml").read_text())
    objects: dict[str, dict[str, Any]] = {}
    for name in [*kustomization["resources"][1:], *(p["path"] for p in kustomization["patches"])]:
        doc = yaml.safe_load((STATIC / name).read_text())
        kind = doc["kind"] if "$patch" not in doc else f"delete {doc['kind']}"
        objects[kind] = doc
    return objects


def test_k8s_static_variant_swaps_the_deployment_for_a_statefulset() -> None:
    """deploy/k8s/static: the base, its Deployment deleted, a StatefulSet with the same pods."""
    kustomization = yaml.safe_load((STATIC / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../base", "statefulset.yaml"]
    base, static = manifests(), static_objects()
    deployment, stateful = base["Deployment"], static["StatefulSet"]
    deleted = static["delete Deployment"]
    assert deleted["$patch"] == "delete"
    assert deleted["metadata"]["name"] == deployment["metadata"]["name"]
    assert stateful["metadata"]["name"] == deployment["metadata"]["name"]
    spec = stateful["spec"]
    assert spec["podManagementPolicy"] == "Parallel"
    # The governing service is the base's headless Service, selecting these pods.
    service = base["Service"]
    assert spec["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    labels = spec["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert spec["selector"] == deployment["spec"]["selector"]
    # The same pods as the Deployment's (probes, resources, hardening, volumes, grace period),
    # apart from the member id.
    pod, base_pod = spec["template"], deployment["spec"]["template"]
    [container], [base_container] = pod["spec"]["containers"], base_pod["spec"]["containers"]
    assert {k: v for k, v in container.items() if k != "env"} == base_container
    assert {k: v for k, v in pod["spec"].items() if k != "containers"} == {
        k: v for k, v in base_pod["spec"].items() if k != "containers"
    }
    assert pod["metadata"] == base_pod["metadata"]


def test_k8s_static_pods_take_their_group_instance_id_from_their_name() -> None:
    """Each StatefulSet pod's member id is its own name; the Deployment's pods have none."""
    [container] = static_objects()["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    assert container["env"] == [INSTANCE_ID_FROM_POD_NAME]
    [base_container] = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert INSTANCE_ID not in {e["name"] for e in base_container.get("env", [])}
    assert INSTANCE_ID not in manifests()["ConfigMap"]["data"]
    # A real setting (an unknown WORKER_* variable stops the worker's start), and pod names
    # (lowercase letters, digits, '-', '.') are valid ids.
    assert {e["name"] for e in container["env"]} <= env_var_names()
    assert KafkaSettings(group_instance_id="inference-worker-0").group_instance_id


def test_k8s_static_session_timeout_outlasts_a_pod_replacement() -> None:
    """The session timeout covers the grace period; scale-in waits out a member's timeout."""
    static = static_objects()
    config = manifests()["ConfigMap"]["data"] | static["ConfigMap"]["data"]
    session_s = int(config["WORKER_KAFKA__SESSION_TIMEOUT_MS"]) / 1000
    pod = static["StatefulSet"]["spec"]["template"]["spec"]
    drain = float(config["WORKER_RUNTIME__SHUTDOWN_TIMEOUT_S"])
    assert drain < pod["terminationGracePeriodSeconds"] < session_s
    assert session_s - drain >= 20, "time left for the new pod to start, load and join"
    down = static["ScaledObject"]["spec"]["advanced"]["horizontalPodAutoscalerConfig"]
    [policy] = down["behavior"]["scaleDown"]["policies"]
    assert policy == {"type": "Pods", "value": 1, "periodSeconds": policy["periodSeconds"]}
    assert policy["periodSeconds"] >= session_s


def test_k8s_static_scaledobject_targets_the_statefulset() -> None:
    """KEDA scales the StatefulSet (its default target kind is Deployment)."""
    static = static_objects()
    target = static["ScaledObject"]["spec"]["scaleTargetRef"]
    assert target == {
        "apiVersion": static["StatefulSet"]["apiVersion"],
        "kind": "StatefulSet",
        "name": static["StatefulSet"]["metadata"]["name"],
    }
    base = manifests()["ScaledObject"]
    assert static["ScaledObject"]["metadata"]["name"] == base["metadata"]["name"]
    assert base["spec"]["scaleTargetRef"]["kind"] == "Deployment"


async def test_probe_paths_are_served_by_the_worker_endpoint(tmp_path: Path) -> None:
    """The paths the manifests probe exist on worker.http (on a free port, told in a file)."""

    async def joining() -> tuple[bool, str]:  # process mode's probes are awaited
        return False, "joining"

    probes = Probes(lambda: b"# metrics\n", lambda: (True, "ok"), joining)
    http = HttpSettings(host="127.0.0.1", port=0, port_file=tmp_path / "port")
    async with serve_http(probes, http) as port, aiohttp.ClientSession() as session:
        statuses = {}
        for path in ("/healthz", "/readyz", "/metrics", "/nope"):
            async with session.get(f"http://127.0.0.1:{port}{path}") as response:
                statuses[path] = response.status
    assert statuses == {"/healthz": 200, "/readyz": 503, "/metrics": 200, "/nope": 404}
    assert (tmp_path / "port").read_text() == str(port)


def test_monitoring_profile_scrapes_the_workers_and_provisions_the_dashboard() -> None:
    """Prometheus scrapes port 9464 of every worker; Grafana gets the datasource and dashboard."""
    doc = compose()
    for name in ("prometheus", "grafana"):
        assert doc["services"][name]["profiles"] == ["monitoring"]
        for volume in doc["services"][name]["volumes"]:
            assert (ROOT / volume.split(":")[0]).exists(), volume
    scrape = yaml.safe_load((MONITORING / "prometheus.yml").read_text())["scrape_configs"][0]
    sd = scrape["dns_sd_configs"][0]
    assert sd["names"] == ["worker"]
    assert str(sd["port"]) in doc["services"]["worker"]["expose"]


def test_dashboard_queries_only_metrics_the_worker_exports() -> None:
    """Every metric a Grafana panel queries is one the worker registers."""
    dashboard = json.loads(
        (MONITORING / "grafana" / "dashboards" / "inference-worker.json").read_text()
    )
    exported = {
        sample_name
        for family in Metrics().registry.collect()
        for sample_name in (family.name, f"{family.name}_total", f"{family.name}_bucket",
                            f"{family.name}_sum", f"{family.name}_count")
    }  # fmt: skip
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"Throughput (requests/s) by outcome", "Consumer lag by partition"} <= titles
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"inference_[a-z_]+", target["expr"]):
                assert name in exported, (panel["title"], name)


def test_gpu_profile_reserves_a_gpu_and_builds_torch_with_cuda() -> None:
    """Compose profile gpu: a CUDA torch build, one NVIDIA device reserved, device = cuda."""
    gpu = compose()["services"]["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert "download.pytorch.org/whl/cpu" not in gpu["build"]["args"]["TORCH_INDEX_URL"]
    assert "ARG TORCH_INDEX_URL" in (ROOT / "Dockerfile").read_text()
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    env = gpu["environment"]
    assert env["WORKER_MODELS__DEVICE"] == "cuda"
    assert (
        ModelSettings(
            device=env["WORKER_MODELS__DEVICE"],
            precision=env["WORKER_MODELS__PRECISION"],
            instances=int(env["WORKER_MODELS__INSTANCES"]),
        ).execution.device
        == "cuda"
    )
    assert gpu["read_only"] is True
    assert gpu["cap_drop"] == ["ALL"]


def test_k8s_gpu_overlay_limits_nvidia_gpus_and_sets_real_settings() -> None:
    """deploy/k8s/gpu: the base plus a patch with an nvidia.com/gpu limit and real settings."""
    overlay = K8S / "gpu"
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../base"]  # not "../": kustomize sees a cycle
    [patch] = kustomization["patches"]
    deployment = yaml.safe_load((overlay / patch["path"]).read_text())
    assert deployment["metadata"]["name"] == manifests()["Deployment"]["metadata"]["name"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e["value"] for e in container["env"]}
    assert set(env) <= env_var_names()
    assert env["WORKER_MODELS__DEVICE"] == "cuda"
    ModelSettings(
        precision=env["WORKER_MODELS__PRECISION"], instances=env["WORKER_MODELS__INSTANCES"]
    )


def test_process_mode_examples_run_serve_with_several_processes() -> None:
    """Compose's worker-processes (a profile) and the k8s overlay pass --processes to serve."""
    service = compose()["services"]["worker-processes"]
    assert service["profiles"] == ["processes"]
    assert _parser().parse_args(service["command"]).processes == 2
    assert service["stop_grace_period"] == "45s", "above the children's 30 s drain"
    patch = yaml.safe_load((K8S / "processes" / "deployment-processes.yaml").read_text())
    [container] = patch["spec"]["template"]["spec"]["containers"]
    processes = _parser().parse_args(container["args"]).processes
    assert int(container["resources"]["requests"]["cpu"]) == processes, "a core per process"
    overlay = yaml.safe_load((K8S / "processes" / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["../base"]
    assert {p["path"] for p in overlay["patches"]} == {
        p.name for p in (K8S / "processes").glob("*-processes.yaml")
    }
    scaled = yaml.safe_load((K8S / "processes" / "scaledobject-processes.yaml").read_text())
    partitions = manifests()["ScaledObject"]["spec"]["maxReplicaCount"]  # the base: partitions
    assert scaled["spec"]["maxReplicaCount"] * processes <= partitions, "a partition per member"
