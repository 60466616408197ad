"""The README and docs tell the truth: examples run against the real broker, tables are complete.

The README is a short front door; the rest lives in docs/. Code blocks are found on every page
(README first), so a block moved between pages is still run, and every relative link (and its
anchor) on the README and the docs pages resolves.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from worker.codec import decode_request, encode_response
from worker.domain import InferenceResponse, Tensor
from worker.repository import ModelRepository
from worker.settings import SECRETS_DIR_VAR, Settings, env_var_names

from .conftest import MODELS, ROOT, running_worker, worker_env

README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
"""The README and every docs page, README first."""
SETTINGS = (DOCS / "settings.md").read_text()
README_MAX_LINES = 200


def python_blocks() -> list[tuple[str, str]]:
    """Every python code block of the README and the docs pages, with the page it is on."""
    return [
        (page.relative_to(ROOT).as_posix(), block)
        for page in PAGES
        for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)
    ]


def python_block(containing: str) -> tuple[str, str]:
    """The first python block (README first, then docs/ by name) that contains ``containing``."""
    return next((page, b) for page, b in python_blocks() if containing in b)


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
    """The docs' plain-fastavro snippet writes requests we accept and reads our replies."""
    namespace: dict[str, Any] = {}
    page, block = python_block("def decode_reply")
    exec(compile(block, page, "exec"), namespace)  # noqa: S102 - our own docs' code
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
    _, block = python_block("async with InferenceClient(")
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


def without_code(markdown: str) -> str:
    """``markdown`` without its fenced code blocks (a ``# comment`` there is no heading)."""
    return re.sub(r"^```.*?^```", "", markdown, flags=re.DOTALL | re.MULTILINE)


def anchors(page: Path) -> set[str]:
    """The anchors GitHub makes for ``page``'s headings (lowercase, punctuation dropped)."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", without_code(page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f"{slug}-{count}"] = 1
    return set(seen)


def test_doc_links_point_at_files_and_anchors_that_exist() -> None:
    """Every relative link in the README and docs/ names a file, and a heading, that exist."""
    for page in PAGES:
        for target, anchor in re.findall(
            r"\]\(([^)#:\s]*)(?:#([^)\s]*))?\)", without_code(page.read_text())
        ):
            linked = (page.parent / target).resolve() if target else page
            assert linked.exists(), f"{page.name} links to missing {target}"
            if anchor and linked.suffix == ".md":
                assert anchor in anchors(linked), f"{page.name} links to missing {target}#{anchor}"


def test_readme_is_a_short_front_door_linking_every_docs_page() -> None:
    """The README stays short, and every docs page can be reached from it."""
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    linked = set(re.findall(r"\]\(docs/([^)#]+\.md)(?:#[^)]*)?\)", text))
    assert linked >= {page.name for page in DOCS.glob("*.md")}
