"""The model repository on disk, loading, request validation and the batched forward call.

Layout (the repository itself, versions and routing: :mod:`worker.repository`)::

    models/
      <name>/
        config.toml          inputs, outputs (name, datatype, shape; -1 = any), batching,
                             version_policy, routing, quantize ("none" or "int8")
        <version>/           a folder per version, named by an integer ("1", "2", ...)
          model.pt2          a torch.export program (loaded without unpickling code)
          metrics.json       optional: how the version was trained and evaluated

A model takes its inputs positionally in ``config.toml`` order and returns one tensor, or a
tuple in ``outputs`` order. The first dimension of every input and output is the batch.
Nothing here touches Kafka or asyncio: :meth:`LoadedModel.predict` is a blocking call that
the worker runs off the event loop.
"""

from __future__ import annotations

import itertools
import tomllib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch

from worker.codec import DATATYPES, InferenceRequest, Tensor
from worker.errors import ConfigError, ErrorCode, RequestError

__all__ = [
    "CONFIG_FILE",
    "MODEL_FILE",
    "QUANTIZE_MODES",
    "LoadedModel",
    "ModelConfig",
    "Routing",
    "TensorSpec",
    "VersionPolicy",
    "export_model",
    "run_isolated",
    "split_outputs",
    "stack_inputs",
]

MODEL_FILE = "model.pt2"
CONFIG_FILE = "config.toml"
QUANTIZE_MODES = ("none", "int8")
"""Values of a model's ``quantize`` key: float as exported, or int8 dynamic quantisation."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, OIP datatype and shape (``-1`` for any size) of a model input or output."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    allow_non_finite: bool = False
    """Inputs only: accept NaN and infinity in a floating-point input."""

    def describe(self) -> str:
        """E.g. ``pixels FP32 [-1, 64]``."""
        return f"{self.name} {self.datatype} {list(self.shape)}"


@dataclass(frozen=True, slots=True)
class VersionPolicy:
    """Which version folders are served: all (default), the ``latest`` N, or ``specific`` ones."""

    latest: int | None = None
    specific: tuple[str, ...] | None = None

    def select(self, available: Sequence[str]) -> list[str]:
        """The served versions among those on disk, oldest first."""
        ordered = sorted(available, key=int)
        if self.specific is not None:
            return [v for v in ordered if v in self.specific]
        if self.latest is not None:
            return ordered[-self.latest :]
        return ordered


@dataclass(frozen=True, slots=True)
class Routing:
    """Where requests that name no version go, and which version shadows the traffic."""

    default_version: str | None = None
    """Version for requests naming none (default: the highest served)."""
    split: tuple[tuple[str, int], ...] = ()
    """Canary: (version, weight) pairs for requests naming no version; stable per request id."""
    shadow: str | None = None
    """A version that gets a copy of the primary traffic; its results are compared, not sent."""
    shadow_compare: str | None = None
    """Output compared between primary and shadow (default: the last output)."""


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """What ``<name>/config.toml`` declares."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int | None = None
    max_batch_delay_ms: float | None = None
    version_policy: VersionPolicy = VersionPolicy()
    routing: Routing = Routing()
    quantize: str = "none"
    """``"int8"``: the program's linear layers run with int8 dynamic quantisation."""

    @classmethod
    def load(cls, folder: Path) -> ModelConfig:
        """Parse ``folder/config.toml``; raise :class:`ConfigError` naming file and problem."""
        path = folder / CONFIG_FILE
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read model config: {exc}") from exc
        known = {"inputs", "outputs", "batching", "version_policy", "routing", "quantize"}
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}")
        quantize = raw.get("quantize", "none")
        if quantize not in QUANTIZE_MODES:
            raise ConfigError(
                f"{path}: quantize = {quantize!r}; expected one of {', '.join(QUANTIZE_MODES)}"
            )
        try:
            batching = raw.get("batching", {})
            config = cls(
                name=folder.name,
                inputs=tuple(_spec(s, path) for s in raw["inputs"]),
                outputs=tuple(_spec(s, path) for s in raw["outputs"]),
                max_batch_size=batching.get("max_batch_size"),
                max_batch_delay_ms=batching.get("max_batch_delay_ms"),
                version_policy=_policy(raw.get("version_policy", {}), path),
                routing=_routing(raw.get("routing", {}), path),
                quantize=quantize,
            )
        except KeyError as exc:
            raise ConfigError(f"{path}: missing key {exc}") from exc
        if not config.inputs or not config.outputs:
            raise ConfigError(f"{path}: needs at least one [[inputs]] and one [[outputs]]")
        compare = config.routing.shadow_compare
        if compare is not None and compare not in {s.name for s in config.outputs}:
            raise ConfigError(f"{path}: routing.shadow_compare {compare!r} is not an output")
        return config


def _policy(raw: Mapping[str, Any], path: Path) -> VersionPolicy:
    chosen = set(raw) & {"all", "latest", "specific"}
    if set(raw) - chosen or len(chosen) > 1:
        raise ConfigError(
            f"{path}: [version_policy] takes exactly one of all = true, latest = N, "
            f'specific = ["1", ...]; found {sorted(raw)}'
        )
    if "latest" in raw:
        if not isinstance(raw["latest"], int) or raw["latest"] < 1:
            raise ConfigError(f"{path}: version_policy.latest must be a whole number >= 1")
        return VersionPolicy(latest=raw["latest"])
    if "specific" in raw:
        return VersionPolicy(specific=tuple(str(v) for v in raw["specific"]))
    return VersionPolicy()


def _routing(raw: Mapping[str, Any], path: Path) -> Routing:
    unknown = set(raw) - {"default_version", "split", "shadow", "shadow_compare"}
    if unknown:
        raise ConfigError(f"{path}: unknown [routing] key(s) {sorted(unknown)}")
    split = tuple((str(v), w) for v, w in raw.get("split", {}).items())
    if any(not isinstance(w, int) or w < 0 for _, w in split) or (
        split and sum(w for _, w in split) == 0
    ):
        raise ConfigError(f"{path}: routing.split weights must be whole numbers >= 0, not all 0")

    def version(key: str) -> str | None:
        value = raw.get(key)
        return None if value is None else str(value)

    return Routing(version("default_version"), split, version("shadow"), raw.get("shadow_compare"))


def _spec(raw: Mapping[str, Any], path: Path) -> TensorSpec:
    datatype = raw["datatype"]
    if datatype not in DATATYPES:
        raise ConfigError(
            f"{path}: tensor {raw.get('name')!r} has datatype {datatype!r}; "
            f"expected one of {', '.join(DATATYPES)}"
        )
    shape = tuple(int(d) for d in raw["shape"])
    if not shape or shape[0] != -1:
        raise ConfigError(f"{path}: tensor {raw['name']!r} shape {list(shape)} must start with -1")
    return TensorSpec(str(raw["name"]), datatype, shape, bool(raw.get("allow_non_finite", False)))


class LoadedModel:
    """One version of one model, loaded and ready to run batches."""

    def __init__(self, config: ModelConfig, version: str, module: torch.nn.Module) -> None:
        self.config = config
        self.name = config.name
        self.version = version
        self._module = module

    @classmethod
    def load(cls, config: ModelConfig, folder: Path) -> LoadedModel:
        """Load ``folder/model.pt2`` and check it against the config with one dummy batch."""
        path = folder / MODEL_FILE
        try:
            program = torch.export.load(path)
        except Exception as exc:
            raise ConfigError(f"{path}: cannot load torch.export program: {exc}") from exc
        module: torch.nn.Module = program.module()
        if config.quantize == "int8":
            module = _quantize_int8(module, path)
        model = cls(config, folder.name, module)
        dummy = {
            s.name: np.zeros((1, *(max(d, 1) for d in s.shape[1:])), DATATYPES[s.datatype])
            for s in config.inputs
        }
        try:
            outputs = model.predict(dummy)
        except Exception as exc:
            raise ConfigError(f"{path}: a batch of one zero input failed: {exc}") from exc
        for spec in config.outputs:
            out = outputs[spec.name]
            if out.dtype != DATATYPES[spec.datatype] or out.shape[0] != 1:
                raise ConfigError(
                    f"{path}: output {spec.name!r} came out {out.dtype} {list(out.shape)} for a "
                    f"batch of one; {folder.parent / CONFIG_FILE} declares {spec.describe()}"
                )
        return model

    def same_program(self, other: LoadedModel) -> bool:
        """True if both run the very same loaded program (a reload reused it)."""
        return self._module is other._module

    def with_config(self, config: ModelConfig) -> LoadedModel:
        """The same loaded program under a new config (same inputs and outputs; new routing)."""
        return LoadedModel(config, self.version, self._module)

    def validate(self, request: InferenceRequest) -> list[npt.NDArray[Any]]:
        """Check a request against the config; return its inputs as arrays, in config order.

        Raises :class:`RequestError` (INVALID_ARGUMENT) saying what was wrong and what the
        model expects.
        """
        expected = {s.name for s in self.config.inputs}
        for given in request.inputs:
            if given.name not in expected:
                raise RequestError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"unknown input {given.name!r} for model {self.name!r}; expected inputs: "
                    + ", ".join(s.describe() for s in self.config.inputs),
                )
        arrays = []
        rows = None
        for spec in self.config.inputs:
            tensor = request.input(spec.name)
            if tensor is None:
                raise RequestError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"missing input {spec.describe()} for model {self.name!r}",
                )
            _check_spec(tensor, spec)
            array = tensor.to_numpy()
            if array.dtype.kind == "f" and not spec.allow_non_finite:
                _check_finite(spec, array)
            if rows is not None and array.shape[0] != rows:
                raise RequestError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"inputs disagree on the batch dimension ({rows} vs {array.shape[0]})",
                )
            rows = array.shape[0]
            arrays.append(array)
        return arrays

    def predict(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        """Run one forward pass on a batch (blocking). Inputs and outputs are keyed by name."""
        args = [torch.from_numpy(_writable(inputs[s.name])) for s in self.config.inputs]
        with torch.inference_mode():
            result = self._module(*args)
        tensors = (result,) if isinstance(result, torch.Tensor) else tuple(result)
        if len(tensors) != len(self.config.outputs):
            raise RuntimeError(
                f"model {self.name} v{self.version} returned {len(tensors)} tensors; "
                f"config declares {len(self.config.outputs)}"
            )
        return {
            spec.name: t.detach().cpu().numpy()
            for spec, t in zip(self.config.outputs, tensors, strict=True)
        }


def export_model(module: torch.nn.Module, features: int, path: Path) -> None:
    """Save ``module`` (one input of ``features`` columns) as a torch.export program at ``path``.

    The batch dimension is dynamic (1 to 65,536 rows), so the worker can batch freely.
    """
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(
        module.eval(), (torch.zeros(2, features),), dynamic_shapes=({0: batch},)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path)


def _quantize_int8(module: torch.nn.Module, path: Path) -> torch.nn.Module:
    """Run the program's linear layers with int8 weights (dynamic quantisation, CPU).

    A torch.export program calls ``aten.linear`` on weight attributes; each such call becomes
    an ``nn.Linear`` submodule, which ``quantize_dynamic`` then swaps for its int8 version
    (weights quantised once, activations per batch). Other layers are left in float.
    """
    if not isinstance(module, torch.fx.GraphModule):
        raise ConfigError(f"{path}: quantize = int8 needs a torch.export program")
    graph = module.graph
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
            continue
        x, weight_node, *rest = node.args
        bias_node = rest[0] if rest else None
        if not isinstance(weight_node, torch.fx.Node) or weight_node.op != "get_attr":
            continue
        if bias_node is not None and (
            not isinstance(bias_node, torch.fx.Node) or bias_node.op != "get_attr"
        ):
            continue
        weight = _attribute(module, str(weight_node.target))
        bias = _attribute(module, str(bias_node.target)) if bias_node is not None else None
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        name = f"int8_linear_{count}"
        count += 1
        module.add_submodule(name, linear)
        with graph.inserting_before(node):
            replacement = graph.call_module(name, (x,))
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
    if not count:
        raise ConfigError(f"{path}: quantize = int8, but the program has no linear layer")
    graph.eliminate_dead_code()
    module.recompile()
    with warnings.catch_warnings():  # torch points eager quantisation users to torchao
        warnings.simplefilter("ignore")
        quantized: torch.nn.Module = torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
            module, {torch.nn.Linear}, dtype=torch.qint8
        )
    return quantized


def _attribute(module: torch.nn.Module, target: str) -> torch.Tensor:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return cast(torch.Tensor, value)


def _writable(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Torch wants writable memory; a lone request's array is a read-only view of its bytes."""
    if array.flags.writeable and array.flags.c_contiguous:
        return array
    return np.array(array, order="C")


def _check_finite(spec: TensorSpec, array: npt.NDArray[Any]) -> None:
    finite = np.isfinite(array)
    if not finite.all():
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise RequestError(
            ErrorCode.INVALID_ARGUMENT,
            f"input {spec.name!r} holds {int((~finite).sum())} NaN or infinite value(s), the "
            f"first at index {list(first)}; this model accepts finite values only",
        )


def _check_spec(tensor: Tensor, spec: TensorSpec) -> None:
    if tensor.datatype != spec.datatype:
        raise RequestError(
            ErrorCode.INVALID_ARGUMENT,
            f"input {spec.name!r} has datatype {tensor.datatype}; expected {spec.describe()}",
        )
    shape = tensor.shape
    if (
        len(shape) != len(spec.shape)
        or shape[0] < 1
        or any(want not in (-1, got) for want, got in zip(spec.shape[1:], shape[1:], strict=True))
    ):
        raise RequestError(
            ErrorCode.INVALID_ARGUMENT,
            f"input {spec.name!r} has shape {list(shape)}; expected {spec.describe()} "
            "(-1 is any size, the first dimension is the batch and must be at least 1)",
        )


def stack_inputs(
    model: LoadedModel, per_request: Sequence[Sequence[npt.NDArray[Any]]]
) -> dict[str, npt.NDArray[Any]]:
    """Concatenate validated inputs of several requests along the batch dimension."""
    return {
        spec.name: np.concatenate([arrays[i] for arrays in per_request], axis=0)
        if len(per_request) > 1
        else per_request[0][i]
        for i, spec in enumerate(model.config.inputs)
    }


def split_outputs(
    model: LoadedModel, outputs: Mapping[str, npt.NDArray[Any]], rows: Sequence[int]
) -> list[list[Tensor]]:
    """Cut batch outputs back into each request's rows, as wire tensors."""
    total = sum(rows)
    for spec in model.config.outputs:
        if outputs[spec.name].shape[0] != total:
            raise RuntimeError(
                f"model {model.name} v{model.version} output {spec.name!r} has "
                f"{outputs[spec.name].shape[0]} rows for a batch of {total}"
            )
    bounds = np.cumsum([0, *rows]).tolist()
    return [
        [Tensor.from_numpy(spec.name, outputs[spec.name][lo:hi]) for spec in model.config.outputs]
        for lo, hi in itertools.pairwise(bounds)
    ]


def run_isolated(
    model: LoadedModel, per_request: Sequence[Sequence[npt.NDArray[Any]]]
) -> list[list[Tensor] | Exception]:
    """Run a batch; if the model raises, split it in halves until the failing requests are alone.

    Every request gets its outputs, or the exception its own rows raise: one bad request costs
    its batch about log2(batch size) extra forward passes, never the good requests' results.
    Blocking: call it off the event loop.
    """
    try:
        outputs = model.predict(stack_inputs(model, per_request))
        return list(split_outputs(model, outputs, [int(a[0].shape[0]) for a in per_request]))
    except Exception as exc:  # noqa: BLE001 - a model may raise anything; it is reported per request
        if len(per_request) == 1:
            return [exc]
        middle = len(per_request) // 2
        return run_isolated(model, per_request[:middle]) + run_isolated(model, per_request[middle:])
