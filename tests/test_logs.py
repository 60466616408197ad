"""Log output: one event per line, no local variables (a record's payload) in tracebacks."""

from __future__ import annotations

import json
import logging
from typing import Literal

import pytest
import structlog

from worker.logs import configure_logging
from worker.settings import LogSettings

PAYLOAD = "payload-" + "x" * 200


def raise_holding_the_payload() -> None:
    value = PAYLOAD  # a local of the failing frame, as a record's bytes would be
    raise RuntimeError(f"failed on {len(value)} bytes")


@pytest.mark.parametrize("kind", ["json", "console"])
def test_a_logged_traceback_shows_no_local_variables(
    kind: Literal["json", "console"], capsys: pytest.CaptureFixture[str]
) -> None:
    """Both formats print the exception and its frames, never the frames' local values."""
    root = logging.getLogger()
    saved = structlog.get_config(), root.handlers[:], root.level
    configure_logging(LogSettings(format=kind))
    try:
        try:
            raise_holding_the_payload()
        except RuntimeError:
            structlog.get_logger("worker.test").exception("answering a batch raised")
        err = capsys.readouterr().err
    finally:  # as it was for the other tests
        structlog.configure(**saved[0])
        root.handlers[:], root.level = saved[1], saved[2]
    assert "answering a batch raised" in err
    assert "RuntimeError: failed on 208 bytes" in err
    assert "raise_holding_the_payload" in err
    assert PAYLOAD not in err
    if kind == "json":
        assert err.count("\n") == 1, "one JSON line"


@pytest.mark.parametrize("child", [None, 0, 3])
def test_a_child_s_every_line_names_it(
    child: int | None, capsys: pytest.CaptureFixture[str]
) -> None:
    """With ``child`` set (serve --processes), our events and aiokafka's records carry it."""
    root = logging.getLogger()
    saved = structlog.get_config(), root.handlers[:], root.level
    configure_logging(LogSettings(format="json", child=child))
    try:
        structlog.get_logger("worker.test").warning("ours")
        logging.getLogger("aiokafka.test").warning("theirs")
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    finally:  # as it was for the other tests
        structlog.configure(**saved[0])
        root.handlers[:], root.level = saved[1], saved[2]
    assert [line["event"] for line in lines] == ["ours", "theirs"]
    for line in lines:
        assert line.get("child") == child
