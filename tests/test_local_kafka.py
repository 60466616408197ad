"""The local broker's helpers: the KRaft cluster id it formats storage with."""

from __future__ import annotations

import base64
import uuid

import local_kafka
import pytest


def test_a_cluster_id_that_would_read_as_an_option_is_drawn_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An id starting with "-" (one draw in 64) is drawn again: `format` would read it as a flag."""
    draws = iter([uuid.UUID(bytes=b"\xf8" + bytes(15)), uuid.UUID(bytes=b"\x01" * 16)])
    monkeypatch.setattr(uuid, "uuid4", lambda: next(draws))
    text = local_kafka.new_cluster_id()
    assert not text.startswith("-")
    assert base64.urlsafe_b64decode(text + "==") == b"\x01" * 16


def test_cluster_ids_are_22_characters_of_16_random_bytes() -> None:
    """Every id is unpadded base64url of 16 bytes, as Kafka's StorageTool random-uuid prints."""
    ids = {local_kafka.new_cluster_id() for _ in range(2000)}
    assert len(ids) == 2000
    for text in ids:
        assert len(text) == 22
        assert not text.startswith("-")
        assert len(base64.urlsafe_b64decode(text + "==")) == 16
