"""``compile = "aot"``: the setting, AOTInductor's outputs against eager, the cache, fallbacks.

One real compile of a tiny MLP for the whole module (about 15 to 50 s on 2 cores, the first
compile in a fresh machine the longest); every other test loads it from the cache, or fakes
the compiler to fail or to lie.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from structlog.testing import capture_logs

from worker import compiling
from worker.errors import ConfigError
from worker.forward import run_batches
from worker.instances import Instances
from worker.metrics import Metrics
from worker.model import LoadedModel, Prepared, export_model
from worker.model_config import ModelConfig
from worker.repository import LoadOptions, ModelRepository

CONFIG = """\
compile = "aot"

[[inputs]]
name = "x"
datatype = "FP32"
shape = [-1, 8]

[[outputs]]
name = "y"
datatype = "FP32"
shape = [-1, 3]
"""


def tiny_repository(root: Path, config: str = CONFIG) -> Path:
    """A repository with one model ``tiny``: an MLP 8-16-3 with seeded weights, version 1."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    export_model(module, 8, root / "tiny" / "1" / "model.pt2")
    (root / "tiny" / "config.toml").write_text(config)
    return root


def load(repo: Path, cache: Path, **over: Any) -> LoadedModel:
    """Version 1 of ``tiny`` as the worker loads it, packages cached in ``cache``."""
    options = LoadOptions(compile_cache=cache, **over)
    return ModelRepository.load(repo, options=options).route("tiny", None, "").primary


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, LoadedModel]:
    """The repository, its cache folder and the version compiled once (a real compile)."""
    root = tmp_path_factory.mktemp("aot")
    repo = tiny_repository(root / "models")
    cache = root / "cache"
    return repo, cache, load(repo, cache)


@pytest.fixture
def no_compiler(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """AOTInductor's compile replaced by one that fails (as without a C++ compiler)."""
    calls: list[str] = []

    def failing(program: object, **kwargs: Any) -> str:
        calls.append(str(kwargs.get("package_path")))
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", failing)
    return calls


def pretend_compile(program: object, *, package_path: str, **_: Any) -> str:
    """A stand-in for aoti_compile_and_package: writes a placeholder package, compiles nothing."""
    Path(package_path).write_bytes(b"pretend")
    return package_path


def rows(count: int) -> dict[str, np.ndarray[Any, Any]]:
    """``count`` rows of seeded random inputs."""
    return {"x": np.random.default_rng(count).standard_normal((count, 8)).astype(np.float32)}


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ('compile = "jit"', "compile = 'jit'; expected one of none, aot"),
        ('compile = "AOT"', "compile = 'AOT'; expected one of none, aot"),
        ("compile = 1", "compile = 1; expected one of none, aot"),
        ("compile = true", "compile = True; expected one of none, aot"),
        ('compile = ["aot"]', "compile = ['aot']; expected one of none, aot"),
        ('compile = "aot"\nquantize = "int8"', 'cannot be combined with quantize = "int8"'),
    ],
)
def test_bad_compile_values_are_config_errors(tmp_path: Path, line: str, says: str) -> None:
    """Each bad ``compile`` value (or aot with int8) is refused, naming the file and the values."""
    repo = tiny_repository(tmp_path, CONFIG.replace('compile = "aot"', line))
    with pytest.raises(ConfigError, match=r"tiny/config\.toml") as caught:
        ModelConfig.load(repo / "tiny")
    assert says in str(caught.value)


def test_compile_defaults_to_none_and_takes_its_values(tmp_path: Path) -> None:
    """Left out, ``compile`` is "none"; "none" and "aot" are read as given."""
    repo = tiny_repository(tmp_path, CONFIG.replace('compile = "aot"\n', ""))
    assert ModelConfig.load(repo / "tiny").compile == "none"
    for mode in ("none", "aot"):
        (repo / "tiny" / "config.toml").write_text(CONFIG.replace('"aot"', f'"{mode}"'))
        assert ModelConfig.load(repo / "tiny").compile == mode


def test_aot_gives_eager_outputs_at_any_batch_size(
    compiled: tuple[Path, Path, LoadedModel], tmp_path: Path
) -> None:
    """Compiled: runs natively, keeps no eager weights, and matches eager at 1, 5, 64 rows."""
    repo, _, model = compiled
    assert model.compilation is not None
    assert model.compilation.compiled, model.compilation.error
    assert not isinstance(model._runner, torch.nn.Module)
    assert not list(model._module.parameters())  # eager's weights are not kept beside it
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.toml").write_text(CONFIG.replace('"aot"', '"none"'))
    (tmp_path / "tiny" / "1").symlink_to(repo / "tiny" / "1")
    eager = load(tmp_path, tmp_path / "unused")
    assert eager.compilation is None
    for count in (1, 5, 64):
        got, want = model.predict(rows(count)), eager.predict(rows(count))
        np.testing.assert_allclose(got["y"], want["y"], rtol=1e-5, atol=1e-6)


def test_second_load_comes_from_the_cache_without_compiling(
    compiled: tuple[Path, Path, LoadedModel], no_compiler: list[str]
) -> None:
    """A second load of the same program loads the cached package; the compiler is not called."""
    repo, cache, first = compiled
    assert first.compilation is not None
    assert first.compilation.package is not None
    before = first.compilation.package.stat()
    again = load(repo, cache)
    assert again.compilation is not None
    assert again.compilation.compiled
    assert again.compilation.cached
    assert again.compilation.package == first.compilation.package
    now = first.compilation.package.stat()
    assert (before.st_ino, before.st_size) == (now.st_ino, now.st_size)
    assert no_compiler == []
    np.testing.assert_allclose(again.predict(rows(7))["y"], first.predict(rows(7))["y"])


def test_a_compile_failure_serves_eager_and_says_why(
    compiled: tuple[Path, Path, LoadedModel], tmp_path: Path, no_compiler: list[str]
) -> None:
    """Compiling fails (no compiler): the version loads, serves eagerly, and a warning says why."""
    repo, _, reference = compiled
    with capture_logs() as logs:
        model = load(repo, tmp_path / "empty-cache")
    assert len(no_compiler) == 1
    assert model.compilation is not None
    assert not model.compilation.compiled
    assert "no C++ compiler found" in (model.compilation.error or "")
    assert model._runner is model._module
    warnings = [e for e in logs if e["event"] == "compile failed; serving eager"]
    assert warnings
    assert "no C++ compiler found" in warnings[0]["error"]
    np.testing.assert_allclose(
        model.predict(rows(4))["y"], reference.predict(rows(4))["y"], rtol=1e-5, atol=1e-6
    )


def test_a_damaged_package_is_dropped_and_compiled_again(
    compiled: tuple[Path, Path, LoadedModel], tmp_path: Path, no_compiler: list[str]
) -> None:
    """A cached package that does not load is deleted and compiled again (here: failing, eager)."""
    repo, _cache, first = compiled
    assert first.compilation is not None
    assert first.compilation.package is not None
    damaged = tmp_path / "cache" / first.compilation.package.name
    damaged.parent.mkdir()
    damaged.write_bytes(b"not a package")
    model = load(repo, damaged.parent)
    assert len(no_compiler) == 1
    assert not damaged.exists()
    assert model.compilation is not None
    assert not model.compilation.compiled


def test_a_compiled_program_that_disagrees_with_eager_is_not_served(
    compiled: tuple[Path, Path, LoadedModel], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compiled outputs that differ from eager's on the load-time check: eager serves."""
    repo, _, _ = compiled

    def lying(path: str, **_: Any) -> Any:
        return lambda x: torch.full((x.shape[0], 3), 7.0)

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", pretend_compile)
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lying)
    model = load(repo, tmp_path / "cache")
    assert model.compilation is not None
    assert not model.compilation.compiled
    assert "differs from eager's" in (model.compilation.error or "")
    assert model._runner is model._module


def test_a_package_that_agrees_only_on_zeros_is_not_served_and_is_deleted(
    compiled: tuple[Path, Path, LoadedModel], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Other weights (same on a zero input, not on others) fail the check; the file goes."""
    repo, _, _ = compiled
    eager = torch.export.load(repo / "tiny" / "1" / "model.pt2").module()
    written: list[Path] = []

    def scaled_weights(path: str, **_: Any) -> Any:
        written.append(Path(path))
        return lambda x: eager(x * 1.5)  # zero in, the same out: only other inputs tell

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", pretend_compile)
    monkeypatch.setattr(torch._inductor, "aoti_load_package", scaled_weights)
    model = load(repo, tmp_path / "cache")
    assert model.compilation is not None
    assert not model.compilation.compiled
    assert "differs from eager's" in (model.compilation.error or "")
    assert written, "the package was loaded and checked"
    assert not any(p.exists() for p in written), "a package that failed the check is deleted"


def test_a_symlinked_package_is_never_loaded(
    compiled: tuple[Path, Path, LoadedModel], tmp_path: Path
) -> None:
    """A package is code: a link in the cache is removed and the version compiled afresh."""
    repo, _cache, model = compiled
    assert model.compilation is not None
    assert model.compilation.package is not None
    elsewhere = tmp_path / "elsewhere.aoti.pt2"
    elsewhere.write_bytes(model.compilation.package.read_bytes())
    mine = tmp_path / "cache"
    mine.mkdir()
    link = mine / model.compilation.package.name
    link.symlink_to(elsewhere)
    again = load(repo, mine)
    assert again.compilation is not None
    assert again.compilation.compiled
    assert not again.compilation.cached, "compiled afresh, not loaded through the link"
    assert not link.is_symlink()
    assert elsewhere.exists(), "the link's target is left alone"


async def test_two_instances_run_the_compiled_program_at_once(
    compiled: tuple[Path, Path, LoadedModel],
) -> None:
    """Two instance threads running compiled batches concurrently each get their own answers."""
    _, _, model = compiled
    pool = Instances("tiny", "1", 2, device=model.device, threads=2, busy=Metrics().busy)
    batches = [
        [[Prepared([rows(n)["x"][i : i + 1]], rows=1) for i in range(n)]] * 3 for n in (5, 9)
    ]
    try:
        runs = [pool.run(run_batches, model, b) for b in batches]
        for n, run in zip((5, 9), [await r for r in runs], strict=True):
            want = model.predict(rows(n))["y"]
            for _, _, results in run:
                got = [r[0].to_numpy()[0] for r in results if not isinstance(r, Exception)]
                np.testing.assert_allclose(np.stack(got), want, rtol=1e-5, atol=1e-6)
    finally:
        pool.close()
    assert model.warm_up(8) == [(1, 1), (2, 1), (4, 1), (8, 1)]


def test_reload_keeps_the_compiled_program_and_reloads_on_new_instances(
    compiled: tuple[Path, Path, LoadedModel], no_compiler: list[str]
) -> None:
    """An unchanged reload reuses the compiled program; new instances load it again (cached)."""
    repo, cache, _ = compiled
    repository = ModelRepository.load(repo, options=LoadOptions(compile_cache=cache))
    before = repository.route("tiny", None, "").primary
    same, errors = repository.reload()
    assert not errors
    reused = same.route("tiny", None, "").primary
    assert reused.same_program(before)
    assert reused._runner is before._runner
    config = repo / "tiny" / "config.toml"
    config.write_text("instances = 2\n" + config.read_text())
    try:
        changed, errors = same.reload()
    finally:
        config.write_text(CONFIG)
    assert not errors
    after = changed.route("tiny", None, "").primary
    assert not after.same_program(before)
    assert after.execution.instances == 2
    assert after.compilation is not None
    assert after.compilation.cached
    assert no_compiler == []


def test_bf16_program_is_exported_again_with_the_same_dynamic_batch(tmp_path: Path) -> None:
    """``program_in`` casts to bf16 and keeps the batch dynamic over the program's range."""
    repo = tiny_repository(tmp_path)
    program = torch.export.load(repo / "tiny" / "1" / "model.pt2")
    x = torch.randn(33, 8)
    want = program.module()(x)  # before the cast: the module shares the program's weights
    module = program.module().to(torch.bfloat16)
    again = compiling.program_in(program, module, torch.bfloat16)
    ranges = {(int(r.lower), int(r.upper)) for r in again.range_constraints.values()}
    assert ranges == {(1, 65536)}
    got = again.module()(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    np.testing.assert_allclose(got.float().detach().numpy(), want.detach().numpy(), atol=0.05)


def test_cache_key_follows_the_program_bytes_and_precision(tmp_path: Path) -> None:
    """The key changes with the model file's bytes and the precision, not with its path."""
    first, second = tmp_path / "a.pt2", tmp_path / "b.pt2"
    first.write_bytes(b"program")
    second.write_bytes(b"program")
    cpu = torch.device("cpu")
    key = compiling.cache_key(first, cpu, "fp32")
    assert key == compiling.cache_key(second, cpu, "fp32")
    assert key != compiling.cache_key(first, cpu, "bf16")
    second.write_bytes(b"programme")
    assert key != compiling.cache_key(second, cpu, "fp32")


def test_the_cache_is_pruned_least_recently_used_first(tmp_path: Path) -> None:
    """Over the limit, the oldest packages go first; the one just written always stays."""
    paths = []
    for age, name in enumerate(["new", "mid", "old", "kept"]):
        path = tmp_path / f"{name}{compiling.SUFFIX}"
        path.write_bytes(b"x" * 100)
        os.utime(path, ns=(10**18 - age * 10**9, 10**18 - age * 10**9))
        paths.append(path)
    (tmp_path / "other.bin").write_bytes(b"x" * 1000)  # not a package: never touched
    deleted = compiling.prune(tmp_path, keep=paths[3], limit=200)
    assert deleted == [paths[2], paths[1]]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "kept.aoti.pt2", "new.aoti.pt2", "other.bin",
    ]  # fmt: skip


def test_an_unwritable_cache_compiles_without_keeping_the_package(
    compiled: tuple[Path, Path, LoadedModel], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache folder that cannot be made: compiled in a temporary folder, served, not kept."""
    repo, _, _ = compiled
    written: list[Path] = []

    def compile_to_file(program: object, *, package_path: str, **_: Any) -> str:
        written.append(Path(package_path))
        Path(package_path).write_bytes(b"pretend")
        return package_path

    def eager_runner(path: str, **_: Any) -> Any:
        return torch.export.load(repo / "tiny" / "1" / "model.pt2").module()

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_to_file)
    monkeypatch.setattr(torch._inductor, "aoti_load_package", eager_runner)
    (tmp_path / "a-file").write_text("")
    with capture_logs() as logs:
        model = load(repo, tmp_path / "a-file" / "cache")
    assert model.compilation is not None
    assert model.compilation.compiled
    assert model.compilation.package is None
    assert any(e["event"].startswith("compile cache not writable") for e in logs)
    assert len(written) == 1
    assert not written[0].exists()
    assert not written[0].parent.exists()


def test_a_dead_compile_leftover_is_pruned_and_a_live_one_kept(tmp_path: Path) -> None:
    """Temporary compile folders older than an hour are deleted; a recent one is not."""
    dead, live = tmp_path / f"{compiling.PARTIAL}dead", tmp_path / f"{compiling.PARTIAL}live"
    for folder in (dead, live):
        folder.mkdir()
        (folder / f"x{compiling.SUFFIX}").write_bytes(b"half")
    old = time.time() - compiling.STALE_PARTIAL_S - 60
    os.utime(dead, (old, old))
    compiling.prune(tmp_path, keep=tmp_path / "none")
    assert not dead.exists()
    assert live.exists()


def test_a_package_is_found_again_under_other_torch_threads(
    compiled: tuple[Path, Path, LoadedModel], no_compiler: list[str]
) -> None:
    """Loading with another torch thread count (start-up vs reload) still hits the cache."""
    repo, cache, _ = compiled
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        model = load(repo, cache)
    finally:
        torch.set_num_threads(threads)
    assert model.compilation is not None
    assert model.compilation.cached
    assert no_compiler == []


def test_the_compile_cache_setting_reaches_the_loaded_repository(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WORKER_MODELS__COMPILE_CACHE is where the worker's versions keep compiled packages."""
    from worker.cli import _build_worker  # noqa: PLC0415 - what `serve` runs
    from worker.settings import load_settings  # noqa: PLC0415

    repo = tiny_repository(tmp_path / "models", CONFIG.replace('compile = "aot"', ""))
    monkeypatch.setenv("WORKER_MODELS__REPOSITORY", str(repo))
    monkeypatch.setenv("WORKER_MODELS__COMPILE_CACHE", str(tmp_path / "packages"))
    worker = _build_worker(load_settings())
    assert worker.repository.options.compile_cache == tmp_path / "packages"
