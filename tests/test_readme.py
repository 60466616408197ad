"""The README and docs tell the truth: examples run against the real broker, tables are complete."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import uuid
from typing import Any

import numpy as np
import pytest

from worker.codec import InferenceResponse, Tensor, decode_request, encode_response
from worker.repository import ModelRepository
from worker.settings import SECRETS_DIR_VAR, Settings, env_var_names

from .conftest import MODELS, ROOT, running_worker, worker_env

README = (ROOT / "README.md").read_text()
SETTINGS = (ROOT / "docs" / "settings.md").read_text()


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def test_every_setting_is_in_the_readme_table() -> None:
    """Each WORKER_* variable appears in the settings table, and no stale one does."""
    documented = set(re.findall(r"^\| `(WORKER_[A-Z_]+)`", SETTINGS, flags=re.MULTILINE))
    assert documented == env_var_names() | {SECRETS_DIR_VAR}


def rendered(value: object) -> str | None:
    """A default as the settings table writes it; None for "not set" values."""
    if value is None or value in ("", [], ()):
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def test_every_documented_default_is_the_real_one() -> None:
    """The settings table's default column says what the settings object really defaults to."""
    rows = re.findall(r"^\| `(WORKER_[A-Z_]+)` \| ([^|]+) \|", SETTINGS, flags=re.MULTILINE)
    checked = 0
    for name, cell in rows:
        if name == SECRETS_DIR_VAR:
            continue
        section, field = name.removeprefix("WORKER_").lower().split("__")
        model = Settings.model_fields[section].annotation
        assert model is not None
        default = model.model_fields[field].get_default(call_default_factory=True)
        text = cell.strip()
        if text.startswith("`"):
            assert rendered(default) == text.strip("`"), name
        else:
            assert rendered(default) is None, f"{name}: documented as {text}, is {default!r}"
        checked += 1
    assert checked == len(env_var_names())


def test_wire_format_snippet_interoperates_with_the_worker_codec() -> None:
    """The README's plain-fastavro snippet writes requests we accept and reads our replies."""
    namespace: dict[str, Any] = {}
    block = next(b for b in python_blocks() if "def decode_reply" in b)
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README's code
    pixels = np.arange(64, dtype=np.float32).reshape(1, 64)
    request = decode_request(namespace["encode_request"]("abc", pixels))
    assert request.id == "abc"
    np.testing.assert_array_equal(request.inputs[0].to_numpy(), pixels)
    labels = np.array([7, 1], dtype=np.int64)
    reply = encode_response(
        InferenceResponse(
            id="abc", model_name="digits", outputs=[Tensor.from_numpy("label", labels)]
        )
    )
    decoded = namespace["decode_reply"](reply)
    assert decoded["id"] == "abc"
    np.testing.assert_array_equal(namespace["output"](decoded, "label"), labels)


@pytest.mark.kafka
async def test_client_example_and_predict_command_run(
    settings: Settings, repository: ModelRepository
) -> None:
    """The README's client example and `python -m worker predict` get real replies."""
    block = next(b for b in python_blocks() if "InferenceClient" in b)
    env = worker_env(settings)
    example_request = str(MODELS / "digits" / "example_request.json")

    async def python(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run, [sys.executable, *args], env=env, cwd=ROOT,
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    async with running_worker(settings, repository):
        example = await python("-c", block)
        predict = await python(
            "-m", "worker", "predict", "--model", "digits", "--input", example_request
        )
    assert example.returncode == 0, example.stderr
    assert re.search(r"version \d+ label \d", example.stdout), example.stdout
    assert predict.returncode == 0, predict.stderr
    reply = json.loads(predict.stdout)
    label = next(o for o in reply["outputs"] if o["name"] == "label")
    assert label["data"] == [4]  # the example image is a 4 the model gets right
    assert reply["error"] is None
    uuid.UUID(reply["id"])


def test_doc_links_point_at_files_that_exist() -> None:
    """Every relative link in the README and docs/ names a file of the repository."""
    pages = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    for page in pages:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
