"""Unit tests of the model repository: version policy, routing, canary split, shadow, reload."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import pytest

from worker.errors import ConfigError, ErrorCode, RequestError
from worker.model_config import VersionPolicy
from worker.repository import ModelRepository, split_bucket

from .conftest import configure


def test_version_policies_select_like_triton() -> None:
    """all, latest N and specific pick the expected versions, oldest first."""
    on_disk = ["10", "2", "1", "3"]
    assert VersionPolicy().select(on_disk) == ["1", "2", "3", "10"]
    assert VersionPolicy(latest=2).select(on_disk) == ["3", "10"]
    assert VersionPolicy(specific=("1", "3", "7")).select(on_disk) == ["1", "3"]


def test_two_models_and_two_versions_are_served(repository: ModelRepository) -> None:
    """The repository serves digits v1 and v2 and iris; no version means the highest."""
    assert repository.names == ["digits", "iris"]
    assert repository.versions("digits") == ["1", "2"]
    assert repository.route("digits", None, "").primary.version == "2"
    assert repository.route("digits", "1", "").primary.version == "1"
    assert repository.route("iris", None, "").primary.config.inputs[0].name == "features"


def test_policy_hides_versions_and_default_version_pins(repo_dir: Path) -> None:
    """A version outside the policy is NOT_FOUND; default_version routes unnamed requests."""
    configure(repo_dir, "digits", '[version_policy]\nspecific = ["1"]')
    repo = ModelRepository.load(repo_dir)
    assert repo.route("digits", None, "").primary.version == "1"
    with pytest.raises(RequestError, match="served: 1") as info:
        repo.route("digits", "2", "")
    assert info.value.code is ErrorCode.NOT_FOUND
    configure(repo_dir, "iris", '[routing]\ndefault_version = "1"')
    assert ModelRepository.load(repo_dir).route("iris", None, "").primary.version == "1"


def test_canary_split_is_weighted_and_stable_per_id(repo_dir: Path) -> None:
    """A 90/10 split sends about 10% to v2 over many ids, always the same version per id."""
    configure(repo_dir, "digits", '[routing]\nsplit = { "1" = 90, "2" = 10 }')
    served = ModelRepository.load(repo_dir).get("digits")
    ids = [f"request-{i}" for i in range(10_000)]
    first = [served.route(None, i).primary.version for i in ids]
    share = Counter(first)["2"] / len(ids)
    assert 0.08 < share < 0.12
    assert [served.route(None, i).primary.version for i in ids] == first
    assert served.route("2", ids[0]).primary.version == "2", "an explicit version beats the split"


def test_split_bucket_is_uniform_enough() -> None:
    """Buckets of sequential ids spread evenly over 0..99."""
    counts = Counter(split_bucket(f"id-{i}", 100) for i in range(20_000))
    assert len(counts) == 100
    assert max(counts.values()) < 2 * min(counts.values())


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ('[routing]\nshadow = "7"', "routing.shadow names version '7'"),
        ('[routing]\nsplit = { "1" = 50, "3" = 50 }', "routing.split names version '3'"),
        ('[routing]\ndefault_version = "9"', "routing.default_version names version '9'"),
        ("[routing]\nshaddow = 2", "unknown [routing] key"),
        ("[version_policy]\nlatest = 0", "latest must be"),
        ("[version_policy]\nall = true\nlatest = 1", "exactly one"),
        ('[routing]\nsplit = { "1" = 0 }', "not all 0"),
        ('[routing]\nshadow_compare = "logits"', "not an output"),
        ("[servers]\nx = 1", "unknown section"),
    ],
)
def test_bad_routing_and_policy_name_the_file(repo_dir: Path, extra: str, fragment: str) -> None:
    """Routing to unserved versions and malformed sections fail start-up naming config.toml."""
    configure(repo_dir, "digits", extra)
    with pytest.raises(ConfigError, match=r"config\.toml") as info:
        ModelRepository.load(repo_dir)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("old", "new", "fragment"),
    [
        ("shape = [-1, 64]", 'shape = [-1, "4x"]', "shape = [-1, '4x']"),
        ("shape = [-1, 64]", "shape = [-1, -5]", "each -1 (any size) or at least 1"),
        ("shape = [-1, 64]", "shape = [-1, true]", "shape = [-1, True]"),
        ("shape = [-1, 64]", "shape = " + str([-1] * 40), "1 to 32 whole numbers"),
        ("shape = [-1, 64]", 'shape = "wide"', "shape = 'wide'"),
        ("max_batch_size = 64", "max_batch_size = -1", "max_batch_size = -1"),
        ("max_batch_size = 64", "max_batch_size = 0", "from 1 to 65536"),
        ("max_batch_size = 64", "max_batch_size = 10000000", "from 1 to 65536"),
        ("max_batch_size = 64", "max_batch_size = true", "max_batch_size = True"),
        ("max_batch_size = 64", "max_batch_size = 2.5", "max_batch_size = 2.5"),
        ("max_batch_delay_ms = 5.0", "max_batch_delay_ms = -1", "max_batch_delay_ms = -1"),
        ("max_batch_delay_ms = 5.0", "max_batch_delay_ms = nan", "max_batch_delay_ms = nan"),
        ("max_batch_delay_ms = 5.0", 'max_batch_delay_ms = "5"', "max_batch_delay_ms = '5'"),
        ("max_batch_delay_ms = 5.0", "max_batch_delay_ms = 5.0\nmax_batch = 1", "unknown [batch"),
    ],
)
def test_malformed_config_values_are_config_errors(
    repo_dir: Path, old: str, new: str, fragment: str
) -> None:
    """Wrong types and out-of-range values in config.toml fail as ConfigError naming them."""
    config = repo_dir / "digits" / "config.toml"
    text = config.read_text()
    assert old in text
    config.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError, match=r"config\.toml") as info:
        ModelRepository.load(repo_dir)
    assert fragment in str(info.value)


TENSORS = (
    '[[inputs]]\nname = "x"\ndatatype = "FP32"\nshape = [-1]\n'
    '[[outputs]]\nname = "y"\ndatatype = "FP32"\nshape = [-1]\n'
)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("inputs = 3\noutputs = 4\n", "inputs must be an array of tables"),
        (f"batching = 3\n{TENSORS}", "[batching] must be a table"),
        (f"{TENSORS}[routing]\nsplit = 5\n", "routing.split must be a table"),
    ],
)
def test_sections_of_the_wrong_kind_are_config_errors(
    tmp_path: Path, text: str, fragment: str
) -> None:
    """A section given as a number (or a table as a scalar) is a ConfigError, not a crash."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.toml").write_text(text)
    with pytest.raises(ConfigError, match=r"config\.toml") as info:
        ModelRepository.load(tmp_path)
    assert fragment in str(info.value)


def test_a_malformed_config_on_reload_keeps_the_model_serving(repo_dir: Path) -> None:
    """A reload of a broken config.toml returns the error and keeps the current versions."""
    repo = ModelRepository.load(repo_dir)
    config = repo_dir / "digits" / "config.toml"
    config.write_text(config.read_text().replace("max_batch_size = 64", "max_batch_size = -1"))
    reloaded, errors = repo.reload()
    assert len(errors) == 1
    assert "max_batch_size" in str(errors[0])
    assert reloaded.route("digits", None, "").primary is repo.route("digits", None, "").primary


def test_reload_reuses_unchanged_versions_and_adds_new_ones(repo_dir: Path) -> None:
    """A reload keeps loaded programs that did not change and serves a new version folder."""
    shutil.move(repo_dir / "digits" / "2", repo_dir.parent / "v2")
    repo = ModelRepository.load(repo_dir)
    assert repo.versions("digits") == ["1"]
    before = repo.fingerprint()
    shutil.move(repo_dir.parent / "v2", repo_dir / "digits" / "2")
    assert repo.fingerprint() != before
    reloaded, errors = repo.reload()
    assert errors == []
    assert reloaded.versions("digits") == ["1", "2"]
    assert reloaded.route("digits", "1", "").primary.same_program(
        repo.route("digits", "1", "").primary
    )
    assert reloaded.route("iris", None, "").primary.same_program(
        repo.route("iris", None, "").primary
    )


def test_reload_keeps_the_old_state_of_a_model_whose_new_version_is_broken(
    repo_dir: Path,
) -> None:
    """A new version that fails to load is reported; the model keeps serving its old versions."""
    repo = ModelRepository.load(repo_dir)
    (repo_dir / "digits" / "3").mkdir()
    (repo_dir / "digits" / "3" / "model.pt2").write_bytes(b"truncated")
    configure(repo_dir, "iris", '[routing]\ndefault_version = "1"')
    reloaded, errors = repo.reload()
    assert len(errors) == 1
    assert "digits/3/model.pt2" in str(errors[0])
    assert reloaded.versions("digits") == ["1", "2"]
    assert reloaded.get("iris").config.routing.default_version == "1", "other models still apply"


def test_rollback_is_a_config_change(repo_dir: Path) -> None:
    """Pinning default_version in config.toml and reloading moves unnamed traffic back."""
    repo = ModelRepository.load(repo_dir)
    assert repo.route("digits", None, "").primary.version == "2"
    configure(repo_dir, "digits", '[routing]\ndefault_version = "1"')
    os.utime(repo_dir / "digits" / "config.toml")
    reloaded, errors = repo.reload()
    assert errors == []
    assert reloaded.route("digits", None, "").primary.version == "1"
