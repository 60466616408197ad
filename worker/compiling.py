"""Ahead-of-time compilation of a version's program (``compile = "aot"`` in its ``config.toml``).

An eager forward pass dispatches every op of the graph from Python; for small models that
per-op cost, not the arithmetic, bounds a batch. ``compile = "aot"`` compiles the version's
torch.export program with AOTInductor (``torch._inductor.aoti_compile_and_package``) into a
package of native code, with the program's dynamic dimensions (the batch, and a sequence
model's length) kept dynamic, and serves it through ``aoti_load_package``.

- **Precision:** fp32 compiles the exported program as it is; fp16 and bf16 export the cast
  module again (:func:`program_in`), with the same dynamic dimensions and ranges, and compile
  that. ``quantize = "int8"`` cannot be compiled (refused by the config).
- **Cache:** compiling takes seconds to minutes (MiniLM: about 30 s on 2 cores), so packages
  are kept in a cache folder (:data:`DEFAULT_CACHE`, or ``LoadOptions.compile_cache``), named
  by a sha256 of the ``model.pt2`` bytes, the torch version, the device (a GPU's name and
  capability) and the precision (:func:`cache_key`). Not the torch threads: Inductor's CPU
  code reads the thread count when it runs (OpenMP), so a package serves any count (at
  start-up a version loads with torch's default threads, at a reload with the worker's).
  A second load of the same program loads the package (no compile); a changed ``model.pt2``
  gets a new key. The folder is bounded: after a package is written, the least recently used
  ones are deleted until the rest fit in :data:`MAX_CACHE_BYTES`. Packages are written to a
  temporary name and renamed, so concurrent workers sharing the folder never read half of one.
  A cache that cannot be written (a read-only home) is read, but a new compile is then
  loaded from a temporary folder and not kept (a warning says so).
- **Failure never stops serving:** no compiler, a program Inductor cannot compile, a package
  that does not load, or outputs that differ from eager on the load-time check: the version
  serves eagerly, and the reason is logged (``compile failed; serving eager``) and kept in
  :attr:`Compilation.error` (the ``compiled`` field of the version's log line says which
  way it runs).
- **Instances:** the package is loaded with one runner per instance, plus one for the shadow
  lane, so concurrent batches do not queue on one runner.

Blocking and slow: called while a version loads, which runs off the event loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch

from worker.device import torch_dtype

__all__ = [
    "CACHE_FORMAT",
    "DEFAULT_CACHE",
    "MAX_CACHE_BYTES",
    "PARTIAL",
    "STALE_PARTIAL_S",
    "SUFFIX",
    "Compilation",
    "cache_key",
    "compile_aot",
    "compile_version",
    "program_in",
    "prune",
]

log = structlog.get_logger(__name__)

CACHE_FORMAT = 2
"""Part of every cache key: bump it when what a package holds changes."""
DEFAULT_CACHE = Path.home() / ".cache" / "kafka-inference-worker" / "compiled"
"""Where compiled packages are kept unless ``LoadOptions.compile_cache`` says."""
MAX_CACHE_BYTES = 4 * 1024**3
"""The cache folder is pruned (least recently used first) to this many bytes of packages."""
SUFFIX = ".aoti.pt2"
"""The end of a package's file name in the cache."""
PARTIAL = ".compiling-"
"""The start of a compile's temporary folder in the cache (renamed out of when done)."""
STALE_PARTIAL_S = 3600.0
"""A temporary folder older than this is a dead process's: pruned."""


@dataclass(frozen=True, slots=True)
class Compilation:
    """How a version with ``compile = "aot"`` came to run: compiled, or eager and why."""

    compiled: bool
    cached: bool = False
    """True when the package came from the cache (no compile)."""
    seconds: float = 0.0
    """Spent compiling (0 on a cache hit)."""
    package: Path | None = None
    error: str | None = None
    """Why it serves eagerly (``compiled`` False)."""

    def describe(self) -> str:
        """E.g. ``aot (cached)``, ``aot (compiled in 31.2 s)``, ``eager (aot failed)``."""
        if not self.compiled:
            return "eager (aot failed)"
        return "aot (cached)" if self.cached else f"aot (compiled in {self.seconds:.1f} s)"


def cache_key(model_file: Path, device: torch.device, precision: str) -> str:
    """sha256 over the program's bytes and everything the compiled code depends on."""
    digest = hashlib.sha256()
    with model_file.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    parts = [
        f"format={CACHE_FORMAT}", f"torch={torch.__version__}", f"machine={platform.machine()}",
        f"isa={_cpu_isa()}", f"device={device.type}", f"precision={precision}",
    ]  # fmt: skip
    if device.type == "cuda":
        parts += [
            f"gpu={torch.cuda.get_device_name(device)}",
            f"capability={torch.cuda.get_device_capability(device)}",
        ]
    digest.update("\n".join(parts).encode())
    return digest.hexdigest()


def _cpu_isa() -> str:
    """The CPU instruction set Inductor compiles for here (AVX-512 code dies on an AVX2 CPU)."""
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa  # noqa: PLC0415 - torch internal

        return str(pick_vec_isa())
    except Exception:  # noqa: BLE001 - unknown: a key of its own, never another CPU's package
        return f"unknown-{platform.processor()}"


def program_in(
    program: torch.export.ExportedProgram, module: torch.nn.Module, dtype: torch.dtype
) -> torch.export.ExportedProgram:
    """``module`` (``program``'s, cast to ``dtype``) exported again, same dynamic dimensions.

    Example inputs are made from the program's own input placeholders: each dynamic
    dimension gets a :class:`torch.export.Dim` with the program's range (one per symbol, so
    dimensions that were equal stay equal) and a distinct example size above 1.
    """
    names = {
        spec.arg.name
        for spec in program.graph_signature.input_specs
        if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT
    }
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in names]
    dims: dict[str, tuple[Any, int]] = {}
    examples: list[torch.Tensor] = []
    shapes: list[dict[int, Any]] = []
    for node in placeholders:
        value = node.meta["val"]
        sizes: list[int] = []
        dynamic: dict[int, Any] = {}
        for axis, size in enumerate(value.shape):
            if isinstance(size, int):
                sizes.append(size)
                continue
            symbol = str(size)
            if symbol not in dims:
                bounds = program.range_constraints[size.node.expr]
                low, high = int(bounds.lower), int(bounds.upper)
                example = min(max(low, 2 + len(dims)), high)
                dims[symbol] = (torch.export.Dim(f"d{len(dims)}", min=low, max=high), example)
            dim, example = dims[symbol]
            sizes.append(example)
            dynamic[axis] = dim
        kind = dtype if value.dtype.is_floating_point else value.dtype
        examples.append(torch.zeros(sizes, dtype=kind, device=value.device))
        shapes.append(dynamic)
    return torch.export.export(module, tuple(examples), dynamic_shapes=tuple(shapes))


def compile_version(
    program: torch.export.ExportedProgram,
    module: torch.nn.Module,
    model_file: Path,
    *,
    device: torch.device,
    precision: str,
    runners: int,
    cache: Path,
    label: str,
    check: Callable[[Callable[..., Any]], str | None],
) -> tuple[Callable[..., Any], Compilation]:
    """What a version runs: its compiled program, or ``module`` (eager) and why.

    ``program`` (on its device) and ``module`` (the program's module, cast to ``precision``)
    are the loaded version's. fp32 compiles ``program``; fp16 and bf16 compile ``module``
    exported again (:func:`program_in`). ``check(runner)``: why the compiled program's
    outputs differ from eager's, or None; a difference serves eager. Never raises.
    """

    def to_compile() -> torch.export.ExportedProgram:
        if precision == "fp32":
            return program
        return program_in(program, module, torch_dtype(precision))

    runner, compilation = compile_aot(
        to_compile, model_file, device=device, precision=precision, runners=runners,
        cache=cache, label=label,
    )  # fmt: skip
    if runner is not None:
        problem = check(runner)
        if problem is not None:
            log.warning("compile failed; serving eager", version=label, error=problem,
                        package=str(compilation.package))  # fmt: skip
            if compilation.package is not None:  # never served: compiled afresh next time
                with contextlib.suppress(OSError):
                    compilation.package.unlink()
            runner, compilation = None, Compilation(compiled=False, error=problem)
    log.info(
        "version compiled" if compilation.compiled else "version eager",
        version=label, compiled=compilation.describe(),
    )  # fmt: skip
    return runner or module, compilation


def compile_aot(
    program: Callable[[], torch.export.ExportedProgram],
    model_file: Path,
    *,
    device: torch.device,
    precision: str,
    runners: int,
    cache: Path,
    label: str,
) -> tuple[Callable[..., Any] | None, Compilation]:
    """The compiled program (from the cache, else compiled and cached), or None and why.

    ``program``: makes the program to compile (called only on a cache miss). ``label``:
    ``<model>-<version>``, the start of the package's file name. Never raises: a failure
    is logged and returned.
    """
    from torch._inductor import aoti_compile_and_package, aoti_load_package  # noqa: PLC0415

    try:
        key = cache_key(model_file, device, precision)
        name = f"{label}-{key[:32]}{SUFFIX}"
        package = cache / name
        index = device.index if device.type == "cuda" and device.index is not None else -1
        if package.is_symlink():  # only packages written here are loaded (a package is code)
            log.warning(
                "compiled package is a symbolic link; compiling again", package=str(package)
            )
            with contextlib.suppress(OSError):
                package.unlink()
        if package.is_file():
            try:
                runner = aoti_load_package(str(package), device_index=index, num_runners=runners)
            except Exception as exc:  # noqa: BLE001 - a damaged package is compiled again
                log.warning("compiled package unreadable; compiling again", package=str(package),
                            error=repr(exc))  # fmt: skip
                with contextlib.suppress(OSError):
                    package.unlink()
            else:
                with contextlib.suppress(OSError):  # a read-only (pre-filled) cache is fine
                    os.utime(package)  # recently used: pruned last
                return runner, Compilation(compiled=True, cached=True, package=package)
        keep = _writable(cache)
        began = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=PARTIAL, dir=cache if keep else None) as tmp:
            partial = Path(tmp) / name  # renamed into place once whole
            with torch.no_grad():
                aoti_compile_and_package(program(), package_path=str(partial))
            seconds = time.monotonic() - began
            if keep:
                partial.replace(package)
            loaded = package if keep else partial
            runner = aoti_load_package(str(loaded), device_index=index, num_runners=runners)
        if keep:
            prune(cache, keep=package)
        return runner, Compilation(
            compiled=True, seconds=seconds, package=package if keep else None
        )
    except Exception as exc:  # noqa: BLE001 - never stop serving: eager instead
        log.warning("compile failed; serving eager", version=label, error=repr(exc)[:2000])
        return None, Compilation(compiled=False, error=f"{type(exc).__name__}: {exc}"[:2000])


def _writable(cache: Path) -> bool:
    """True if packages can be kept in ``cache`` (made if missing); else a warning says so."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        if os.access(cache, os.W_OK):
            return True
    except OSError:
        pass
    log.warning("compile cache not writable; compiling without keeping the package",
                cache=str(cache))  # fmt: skip
    return False


def prune(cache: Path, *, keep: Path, limit: int = MAX_CACHE_BYTES) -> list[Path]:
    """Delete the least recently used packages until the rest fit in ``limit`` bytes.

    ``keep`` (the package just written) stays whatever its size. Returns what was deleted.
    Unfinished compiles' folders older than :data:`STALE_PARTIAL_S` (a process that died
    compiling) are deleted too.
    """
    for folder in cache.glob(f"{PARTIAL}*"):
        with contextlib.suppress(OSError):
            if time.time() - folder.stat().st_mtime > STALE_PARTIAL_S:
                shutil.rmtree(folder, ignore_errors=True)
    entries = []
    for path in cache.glob(f"*{SUFFIX}"):
        with contextlib.suppress(OSError):
            stat = path.stat()
            entries.append((stat.st_mtime_ns, stat.st_size, path))
    total = sum(size for _, size, _ in entries)
    deleted = []
    for _, size, path in sorted(entries):
        if total <= limit:
            break
        if path == keep:
            continue
        with contextlib.suppress(OSError):
            path.unlink()
            deleted.append(path)
            total -= size
    return deleted
