"""Unit tests of settings and of the explicit Kafka client configuration."""

from __future__ import annotations

import pytest

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
