"""``dev/gpu_check.sh --dry-run``: the GPU check works, on the CPU, before a GPU is lent (#25).

The same script, stages and in-process benchmark as on a lent GPU machine, with tiny sizes and
this interpreter (``PYTHON``): every stage that should pass passes, the GPU tests' failures
(no CUDA here) are recorded without stopping it, and its JSON lines are written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT, TEXT_MODELS


def test_the_gpu_check_dry_run_passes_and_records_every_stage(tmp_path: Path) -> None:
    assert (TEXT_MODELS / "minilm" / "1" / "model.pt2").is_file(), "run `make minilm` first"
    done = subprocess.run(
        ["bash", str(ROOT / "dev" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
        env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
        timeout=280, check=False,
    )  # fmt: skip
    log = (tmp_path / "gpu-check.log").read_text()
    assert done.returncode == 0, done.stdout + done.stderr + log[-4000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-check.jsonl", "gpu-check.log"]
    records = [
        json.loads(line) for line in (tmp_path / "gpu-check.jsonl").read_text().split("\n") if line
    ]
    ended = {r["stage"]: r["status"] for r in records if "status" in r}
    assert ended == {
        "device": "ok", "pack": "skipped", "imports": "ok", "pytest": "failed",
        "heavy": "ok", "minilm": "ok", "grpc": "ok", "compile": "ok",
    }  # fmt: skip
    assert any(r["stage"] == "pytest-failure" for r in records)
    heavy = [r for r in records if r["stage"] == "heavy" and "worker_rows_per_s" in r]
    assert {(r["precision"], r["quantize"], r["instances"]) for r in heavy} == {
        (p, q, n) for p, q in (("fp32", "none"), ("bf16", "none"), ("fp32", "int8")) for n in (1, 2)
    }
    assert all(r["worker_rows_per_s"] > 0 and r["plain_predict_rows_per_s"] > 0 for r in heavy)
    [minilm] = [r for r in records if r["stage"] == "minilm" and "precision" in r]
    assert minilm["min_cosine_worker_vs_sentence_transformers"] > 0.9999
    [grpc] = [r for r in records if r["stage"] == "grpc" and "requests_per_s" in r]
    assert grpc["errors"] == 0
    assert grpc["responses"] == 200
    compiled = [r for r in records if r["stage"] == "compile" and "worker_rows_per_s" in r]
    assert {(r["model"], r["compile"], r["compiled"]) for r in compiled} == {
        ("mlp", "none", False), ("mlp", "aot", True),
    }  # fmt: skip
    assert all(r["worker_rows_per_s"] > 0 for r in compiled)
    assert records[-1] == {"stage": "done", "failed": "", "dry_run": 1}
