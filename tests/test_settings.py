"""Unit tests of settings and of the explicit Kafka client configuration."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from worker import settings as settings_module
from worker.errors import ConfigError
from worker.kafka import consumer_config, producer_config
from worker.settings import KafkaSettings, Settings, env_var_names, env_vars, load_settings


def test_defaults_match_the_documented_topics_and_group() -> None:
    """Defaults: inference.requests, inference.replies, group inference-workers."""
    kafka = KafkaSettings()
    assert kafka.requests_topic == "inference.requests"
    assert kafka.replies_topic == "inference.replies"
    assert kafka.group_id == "inference-workers"


def test_nested_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """WORKER_<SECTION>__<FIELD> sets nested fields, with type conversion."""
    for name in [n for n in env_var_names() if n != "WORKER_KAFKA__BOOTSTRAP_SERVERS"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORKER_KAFKA__GROUP_ID", "g1")
    monkeypatch.setenv("WORKER_BATCHING__MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("WORKER_KAFKA__MANAGE_TOPICS", "false")
    settings = load_settings()
    assert settings.kafka.group_id == "g1"
    assert settings.batching.max_batch_size == 7
    assert settings.kafka.manage_topics is False


def test_unknown_variable_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A misspelt WORKER_ variable fails start-up instead of being ignored."""
    monkeypatch.setenv("WORKER_BATCHING__MAX_BACH_SIZE", "7")
    with pytest.raises(ConfigError, match="WORKER_BATCHING__MAX_BACH_SIZE"):
        load_settings()


def test_invalid_value_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A value that fails validation is reported as ConfigError."""
    monkeypatch.setenv("WORKER_BATCHING__MAX_BATCH_SIZE", "0")
    with pytest.raises(ConfigError, match="max_batch_size"):
        load_settings()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MAX_RUN_MS", "1e-5"),  # would round to no bound at all
        ("MAX_RUN_MS", "-1"),
        ("MAX_RUN_MS", "nan"),
        ("MAX_RUN_MS", "60001"),
        ("MAX_BATCHES_PER_RUN", "4097"),
        ("MAX_BATCHES_PER_RUN", "1" + "0" * 400),
    ],
)
def test_a_run_bound_out_of_range_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    """Run bounds that are negative, too large or too small to measure fail start-up."""
    monkeypatch.setenv(f"WORKER_BATCHING__{name}", value)
    with pytest.raises(ConfigError, match=name.lower()):
        load_settings()


def test_a_run_time_bound_of_zero_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """MAX_RUN_MS=0 is accepted (no time bound); the smallest other value is 0.001."""
    monkeypatch.setenv("WORKER_BATCHING__MAX_RUN_MS", "0")
    assert load_settings().batching.max_run_ms == 0
    monkeypatch.setenv("WORKER_BATCHING__MAX_RUN_MS", "0.001")
    assert load_settings().batching.max_run_ms == pytest.approx(0.001)


def test_every_field_has_an_env_name() -> None:
    """env_var_names covers every field of every section."""
    names = env_var_names()
    for section, info in Settings.model_fields.items():
        model = info.annotation
        assert model is not None
        for field in model.model_fields:
            assert f"WORKER_{section}__{field}".upper() in names


def test_consumer_is_configured_for_at_least_once() -> None:
    """No auto-commit, earliest reset for new groups, read_committed."""
    config = consumer_config(KafkaSettings())
    assert config["enable_auto_commit"] is False
    assert config["auto_offset_reset"] == "earliest"
    assert config["isolation_level"] == "read_committed"
    assert config["group_id"] == "inference-workers"


def test_producer_waits_for_all_replicas_idempotently() -> None:
    """Replies use acks=all and the idempotent producer."""
    config = producer_config(KafkaSettings())
    assert config["acks"] == "all"
    assert config["enable_idempotence"] is True


def test_reply_topics_are_comma_separated_and_survive_env_vars(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """WORKER_KAFKA__REPLY_TOPICS splits on commas; env_vars() writes it back the same way."""
    for name in [n for n in env_var_names() if n != "WORKER_KAFKA__BOOTSTRAP_SERVERS"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORKER_KAFKA__REPLY_TOPICS", " a , clients.* ,,b")
    kafka = load_settings().kafka
    assert kafka.reply_topics == ["a", "clients.*", "b"]
    assert env_vars(kafka, "kafka")["WORKER_KAFKA__REPLY_TOPICS"] == "a,clients.*,b"
    assert KafkaSettings().reply_topics == []


BOUNDS = [
    # (section class, field, lowest accepted, what 0 or the value below it means)
    ("KafkaSettings", "topic_partitions", 1, None),
    ("KafkaSettings", "topic_replication_factor", 1, None),
    ("KafkaSettings", "session_timeout_ms", 3_000, "three heartbeats (of the default 1 s)"),
    ("KafkaSettings", "rebalance_timeout_ms", 1, None),
    ("KafkaSettings", "heartbeat_interval_ms", 1, None),
    ("KafkaSettings", "max_poll_interval_ms", 1, None),
    ("KafkaSettings", "request_timeout_ms", 1, None),
    ("KafkaSettings", "fetch_max_records", 1, None),
    ("KafkaSettings", "linger_ms", 0, "send at once"),
    ("BatchingSettings", "max_batch_size", 1, None),
    ("BatchingSettings", "max_batch_delay_ms", 0, "no delay"),
    ("BatchingSettings", "max_batches_per_run", 1, None),
    ("BatchingSettings", "max_batch_tokens", 1, None),
    ("BatchingSettings", "sort_window", 1, "1: arrival order"),
    ("BatchingSettings", "min_padding_efficiency", 0, "cut by size and budget only"),
    ("ModelSettings", "torch_threads", 0, "one per core but one"),
    ("ModelSettings", "poll_interval_s", 0, "reload on SIGHUP only"),
    ("RuntimeSettings", "max_in_flight", 1, None),
    ("RuntimeSettings", "commit_interval_ms", 1, None),
    ("RuntimeSettings", "default_timeout_ms", 0, "no deadline"),
    ("RuntimeSettings", "max_request_bytes", 1, None),
    ("RuntimeSettings", "max_request_elements", 1, None),
    ("RuntimeSettings", "reply_retries", 0, "no retries"),
    ("RuntimeSettings", "watchdog_timeout_s", 0, "no watchdog"),
    ("HttpSettings", "port", 0, "any free port"),
]


@pytest.mark.parametrize(("section", "field", "lowest", "meaning"), BOUNDS)
def test_each_numeric_setting_accepts_its_documented_lowest_value_only(
    section: str, field: str, lowest: int, meaning: str | None
) -> None:
    """The lowest value a setting takes (0 where it means something) passes; one below fails."""
    model = getattr(settings_module, section)
    assert getattr(model(**{field: lowest}), field) == lowest, meaning
    below = lowest - 1 if lowest >= 1 else -0.5
    with pytest.raises(ValidationError):
        model(**{field: below})


def test_shutdown_timeout_must_be_positive_and_efficiency_at_most_one() -> None:
    """A zero shutdown timeout and a padding efficiency over 1 are refused; their edges pass."""
    assert settings_module.RuntimeSettings(shutdown_timeout_s=0.001).shutdown_timeout_s == 0.001
    with pytest.raises(ValidationError):
        settings_module.RuntimeSettings(shutdown_timeout_s=0)
    assert settings_module.BatchingSettings(min_padding_efficiency=1).min_padding_efficiency == 1
    with pytest.raises(ValidationError):
        settings_module.BatchingSettings(min_padding_efficiency=1.01)
    with pytest.raises(ValidationError):
        settings_module.HttpSettings(port=65536)


@pytest.mark.parametrize(("cores", "threads"), [(8, 7), (2, 1), (1, 1), (None, 1)])
def test_torch_threads_default_to_one_per_core_but_one(
    monkeypatch: pytest.MonkeyPatch, cores: int | None, threads: int
) -> None:
    """torch_threads = 0: cores minus one (for the event loop), at least one."""
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert settings_module.ModelSettings().threads == threads
    assert settings_module.ModelSettings(torch_threads=3).threads == 3


@pytest.mark.parametrize(
    "instance_id", ["", "a" * 250, "has space", "ünïcode", "line\nbreak", "trailing\n", "a/b"]
)
def test_a_hostile_group_instance_id_is_refused_at_start(instance_id: str) -> None:
    """Static membership ids are Kafka-legal names (A-Z a-z 0-9 . _ -, 1-249), else refused."""
    with pytest.raises(ValidationError):
        KafkaSettings(group_instance_id=instance_id)
    assert KafkaSettings(group_instance_id="worker-0.a_b").group_instance_id == "worker-0.a_b"
