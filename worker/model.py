"""One model version: loading its program and checking it, and the steps of a forward pass.

A model takes its inputs positionally in ``config.toml`` order (:mod:`worker.model_config`) and
returns one tensor, or a tuple in ``outputs`` order. The first dimension of every input and
output is the batch. A ``[tokenizer]`` model takes the tokenizer's feeds instead (token ids,
attention mask); a sequence model without one may take an extra last argument (attention mask
or lengths): :mod:`worker.prepared` says which arguments, :mod:`worker.stacking` builds them.

:meth:`LoadedModel.validate` turns a request into :class:`Prepared` inputs (tokenised, checked;
:mod:`worker.validation`); :mod:`worker.forward` assembles batches of them, runs them and cuts
the outputs back. A version runs on its device and precision (:mod:`worker.device`). A forward
pass is four steps: :meth:`LoadedModel.upload` (on a GPU: the batch assembled in pinned host
memory, copied on a copy stream without blocking: :mod:`worker.staging`),
:meth:`LoadedModel.launch` (the program, on the thread's compute stream),
:meth:`LoadedModel.fetch` (the outputs' copy back started, not waited for) and
:meth:`LoadedModel.collect` (one wait per batch, then the handler's ``postprocess``).
Pipelining a run of batches and isolating failures is :mod:`worker.forward`'s.

Nothing here touches Kafka or asyncio: these are blocking calls that the worker runs off the
event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch.export.passes import move_to_device_pass

from worker.compiling import DEFAULT_CACHE, Compilation, compile_version
from worker.device import resolve_device, torch_dtype
from worker.domain import DATATYPES, InferenceRequest
from worker.errors import ConfigError, RequestError
from worker.handler import HANDLER_FILE, Handler
from worker.model_config import (
    CONFIG_FILE,
    DEFAULT_EXECUTION,
    MODEL_FILE,
    ON_CPU,
    Execution,
    ModelConfig,
)
from worker.prepared import Argument, Prepared, program_arguments
from worker.quantize import quantize_int8
from worker.response_cache import ResponseCache
from worker.stacking import stack_inputs
from worker.staging import (
    Fetched,
    Launched,
    Staged,
    copy_back,
    pinned,
    to_device,
    torch_dtype_of,
)
from worker.text import TextEncoder
from worker.validation import tokenize_pending, validate_request
from worker.warming import warm_up_batch, warm_up_shapes

__all__ = ["Argument", "LoadedModel", "Prepared", "export_model"]


class LoadedModel:
    """One version of one model, loaded and ready to run batches."""

    def __init__(
        self,
        config: ModelConfig,
        version: str,
        module: torch.nn.Module,
        text: TextEncoder | None = None,
        handler: Handler | None = None,
        *,
        execution: Execution = ON_CPU,
        device: torch.device | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.version = version
        self._module = module
        self._runner: Callable[..., Any] = module
        """What a batch runs: the module, or its compiled program (``compile = "aot"``)."""
        self.compilation: Compilation | None = None
        """With ``compile = "aot"``: compiled (from the cache or not), or eager and why."""
        self.handler = handler
        self.text = text
        """The tokenizer step of a ``[tokenizer]`` model."""
        self.arguments = program_arguments(config, text)
        """The program's positional arguments, in order (the names :meth:`predict` takes)."""
        self.execution = execution
        """Device asked for, precision, instances."""
        self.device = device or torch.device("cpu")
        """Where it runs (``auto`` resolved)."""
        self._dtype = torch_dtype(execution.precision)
        self._out_dtypes = tuple(torch_dtype_of(DATATYPES[s.datatype]) for s in config.outputs)
        self.warms_up = False
        """Each instance thread runs :meth:`warm_up` before it serves (on a GPU, set by load)."""
        size = config.cache.max_bytes
        self.cache = ResponseCache(size) if size else None
        """Its response cache (``[cache] max_bytes``); kept by :meth:`with_config` while the
        ``[cache]`` table is unchanged, a new (empty) one otherwise."""

    @classmethod
    def load(
        cls,
        config: ModelConfig,
        folder: Path,
        *,
        allow_code: bool = False,
        defaults: Execution = DEFAULT_EXECUTION,
        warm_up: int = 0,
        compile_cache: Path | None = None,
    ) -> LoadedModel:
        """Load ``folder/model.pt2`` and check it against the config with one dummy batch.

        ``allow_code``: import the folder's ``handler.py`` if there is one (else refuse it).
        ``defaults``: device, precision and instances where the config leaves them out.
        ``warm_up``: on a GPU, > 0 turns :attr:`warms_up` on: each instance thread runs
        dummy batches of the shapes its lane will serve (:meth:`warm_up`) before it serves,
        so that the first requests do not pay for kernel selection and allocation.
        ``compile_cache``: where ``compile = "aot"`` keeps its packages
        (default :data:`worker.compiling.DEFAULT_CACHE`).
        """
        path = folder / MODEL_FILE
        execution = config.execution(defaults)
        try:
            device = resolve_device(execution.device)
        except ConfigError as exc:
            raise ConfigError(f"{folder.parent / CONFIG_FILE}: {exc}") from exc
        if config.quantize == "int8" and (device.type != "cpu" or execution.precision != "fp32"):
            raise ConfigError(
                f'{folder.parent / CONFIG_FILE}: quantize = "int8" runs on the CPU in fp32; '
                f"it cannot be combined with device {device} and precision {execution.precision}"
            )
        try:
            program = torch.export.load(path)
            if device.type != "cpu":
                program = move_to_device_pass(program, device)
        except Exception as exc:
            raise ConfigError(f"{path}: cannot load torch.export program: {exc}") from exc
        module = _callable(program, path)
        if config.quantize == "int8":
            module = quantize_int8(module, path)
        if execution.precision != "fp32":
            module = module.to(torch_dtype(execution.precision))
        text = None
        if config.tokenizer is not None:
            tokenizer = config.tokenizer
            text = TextEncoder(
                folder / tokenizer.file, max_length=tokenizer.max_length, feeds=tokenizer.feeds
            )
        handler = Handler.load(folder / HANDLER_FILE, allowed=allow_code)
        model = cls(config, folder.name, module, text, handler, execution=execution, device=device)
        try:
            outputs = model.predict(stack_inputs(model, [model.dummy()]))
        except Exception as exc:
            raise ConfigError(
                f"{path}: a batch of one zero input failed on {device} in "
                f"{execution.precision}: {exc}"
            ) from exc
        for spec in config.outputs:
            out = outputs[spec.name]
            if out.dtype != DATATYPES[spec.datatype] or out.shape[0] != 1:
                raise ConfigError(
                    f"{path}: output {spec.name!r} came out {out.dtype} {list(out.shape)} for a "
                    f"batch of one; {folder.parent / CONFIG_FILE} declares {spec.describe()}"
                )
        if config.compile == "aot":
            probes = _probes(model)
            eager = [model.predict(stack_inputs(model, [probe])) for probe in probes]
            model._runner, model.compilation = compile_version(
                program, module, path, device=device, precision=execution.precision,
                runners=execution.instances + 1, cache=compile_cache or DEFAULT_CACHE,
                label=f"{model.name}-{model.version}",
                check=partial(_disagreement, model, probes, eager),
            )  # fmt: skip
            if model.compilation.compiled:  # the package holds its own weights: drop eager's
                model._module = torch.nn.Module()
        model.warms_up = device.type == "cuda" and warm_up > 0  # in each instance's thread
        return model

    def warm_up(self, largest: int, max_batch_tokens: int | None = None) -> list[tuple[int, int]]:
        """Run the dummy batches serving's shapes call for (blocking); their (rows, length).

        Batches of 1, 2, 4 ... rows up to ``largest``; a ``[tokenizer]`` model also every
        power-of-two length up to its ``max_length``, at ``max_batch_tokens``
        (:mod:`worker.warming`). Run in the thread that will serve: its streams, cuBLAS handle
        and allocator pool are warmed, not another thread's.
        """
        dummy = self.dummy()
        tokenizer = self.config.tokenizer
        shapes = warm_up_shapes(
            largest, length=dummy.length, max_batch_tokens=max_batch_tokens,
            max_length=tokenizer.max_length if tokenizer is not None else None,
        )  # fmt: skip
        for rows, length in shapes:
            self.predict(stack_inputs(self, [warm_up_batch(dummy, rows, length)]))
        return shapes

    def same_program(self, other: LoadedModel) -> bool:
        """True if both run the very same loaded program (a reload reused it)."""
        return self._module is other._module

    def with_config(
        self, config: ModelConfig, defaults: Execution = DEFAULT_EXECUTION
    ) -> LoadedModel:
        """The same loaded program under a new config (new routing or instances).

        Inputs, outputs, device and precision are the same (else the version is reloaded).
        """
        model = LoadedModel(
            config, self.version, self._module, self.text, self.handler,
            execution=config.execution(defaults), device=self.device,
        )  # fmt: skip
        model.warms_up = self.warms_up
        model._runner, model.compilation = self._runner, self.compilation
        if config.cache == self.config.cache:  # same program, same answers: keep what it holds
            model.cache = self.cache
        return model

    def dummy(self) -> Prepared:
        """A request of one row of zeros (or one short string): the load-time check."""
        if self.text is not None:
            strings = np.array([b"warm up"], dtype=object)
            return Prepared.from_tokenized(self.text.encode(self.config.inputs[0].name, strings))
        arrays = [
            np.zeros((1, *(max(d, 1) for d in s.shape[1:])), DATATYPES[s.datatype])
            for s in self.config.inputs
        ]
        return Prepared(arrays, rows=1)

    def validate(self, request: InferenceRequest, *, tokenize: bool = True) -> Prepared:
        """Check a request against the config; return its inputs as the program takes them.

        Strings are tokenised here (a ``[tokenizer]`` model), unless ``tokenize`` is False:
        then they are checked and returned ``pending``, for :meth:`tokenize` (or
        :mod:`worker.tokenizing`, batch-wise) to finish. Raises :class:`RequestError`
        (INVALID_ARGUMENT) saying what was wrong and what the model expects.
        """
        return validate_request(self.config, self.text, request, tokenize=tokenize)

    def tokenize_many(self, pending: Sequence[Prepared]) -> list[Prepared | RequestError]:
        """Tokenise several pending requests' strings in one call (blocking; off the loop)."""
        assert self.text is not None
        return tokenize_pending(self.config, self.text, pending)

    def predict(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        """Run one forward pass on a batch (blocking), inputs keyed by :attr:`arguments` name.

        A version's handler, if any, runs its ``preprocess`` before and ``postprocess`` after.
        """
        staged = self.upload(inputs)  # held until the outputs are back: its copy is done then
        return self.collect(self.fetch(self.launch(staged)))

    def stage(self, per_request: Sequence[Prepared]) -> Staged:
        """Assemble a batch (in pinned memory on a GPU) and start its copy to the device."""
        on_gpu = self.device.type == "cuda"
        return self.upload(stack_inputs(self, per_request, empty=pinned if on_gpu else None))

    def upload(self, inputs: Mapping[str, npt.NDArray[Any]]) -> Staged:
        """The handler's ``preprocess``, then the arguments to the device (not waiting on a GPU)."""
        handler = self.handler
        values: Sequence[Any] = [inputs[a.name] for a in self.arguments]
        if handler is not None and handler.preprocess is not None:
            given = handler.preprocess(dict(inputs))
            values = [given[a.name] for a in self.arguments] if isinstance(given, dict) else given
        return to_device(values, self.device)

    def launch(self, staged: Staged) -> Launched:
        """Run the program on a staged batch (on a GPU: queued on the thread's stream)."""
        args = staged.args
        began = None
        if staged.ready is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(staged.ready)
            for arg in args:
                arg.record_stream(compute)  # its memory is in use on this stream too
            began = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            began.record(compute)
        if self._dtype != torch.float32:
            args = [a.to(self._dtype) if a.is_floating_point() else a for a in args]
        with torch.inference_mode():
            result = self._runner(*args)
        outputs = (result,) if isinstance(result, torch.Tensor) else tuple(result)
        return Launched(outputs, began)

    def fetch(self, launched: Launched) -> Fetched:
        """Outputs cast back to the declared datatypes; their copy to the host started."""
        tensors: Sequence[torch.Tensor] = launched.outputs
        if self._dtype != torch.float32:  # back to what the config declares
            wants = [*self._out_dtypes, *[None] * len(tensors)]  # a handler may return more
            tensors = [
                t.to(want) if t.dtype == self._dtype and want is not None else t
                for t, want in zip(tensors, wants, strict=False)
            ]
        return copy_back(tensors, self.device, launched.began)

    def collect(self, fetched: Fetched) -> dict[str, npt.NDArray[Any]]:
        """The outputs on the host (one wait per batch on a GPU), then ``postprocess``."""
        arrays = fetched.wait()
        handler = self.handler
        if handler is not None and handler.postprocess is not None:
            made = handler.postprocess(arrays)
            return {s.name: np.asarray(made[s.name]) for s in self.config.outputs}
        if len(arrays) != len(self.config.outputs):
            raise RuntimeError(
                f"model {self.name} v{self.version} returned {len(arrays)} tensors; "
                f"config declares {len(self.config.outputs)}"
            )
        return {spec.name: a for spec, a in zip(self.config.outputs, arrays, strict=True)}


def _probes(model: LoadedModel) -> list[Prepared]:
    """Inputs a compiled program must answer as eager does (the load-time check).

    Zeros, and for float inputs of a tensor model seeded random rows too: weights that a
    zero input never reaches act on them.
    """
    probes = [model.dummy()]
    specs = model.config.inputs
    if model.text is None and all(DATATYPES[s.datatype].kind == "f" for s in specs):
        rng = np.random.default_rng(0)
        arrays = [
            rng.standard_normal((3, *(max(d, 1) for d in s.shape[1:]))).astype(
                DATATYPES[s.datatype]
            )
            for s in specs
        ]
        probes.append(Prepared(arrays, rows=3))
    return probes


def _disagreement(
    model: LoadedModel,
    probes: Sequence[Prepared],
    eager: Sequence[Mapping[str, npt.NDArray[Any]]],
    runner: Callable[..., Any],
) -> str | None:
    """Why ``runner``'s outputs on the probes differ from ``eager``'s (None: they agree).

    ``model`` runs ``runner`` afterwards if they agree, its module otherwise.
    """
    model._runner = runner
    for probe, expected in zip(probes, eager, strict=True):
        try:
            outputs = model.predict(stack_inputs(model, [probe]))
        except Exception as exc:  # noqa: BLE001 - reported, eager serves
            model._runner = model._module
            return f"the compiled program failed the check: {type(exc).__name__}: {exc}"
        for name, want in expected.items():
            got = outputs[name]
            if got.shape != want.shape or not np.allclose(got, want, rtol=1e-2, atol=1e-3):
                model._runner = model._module
                return f"the compiled program's output {name!r} differs from eager's"
    return None


def _callable(program: torch.export.ExportedProgram, path: Path) -> torch.nn.Module:
    """The program as a module to call; :class:`ConfigError` if it takes keyword arguments.

    Its guards (shapes, ranges) run inside its graph; the pre-hook torch adds would match the
    arguments' pytree again on each call (half a small model's call at batch 1), so it is
    turned off: the worker always passes its checked inputs as positional tensors, which is
    why a program exported with keyword arguments is refused here (the hook refused it too).
    """
    if program.call_spec.in_spec is not None and program.call_spec.in_spec.child(1).num_children:
        raise ConfigError(
            f"{path}: the program takes keyword arguments; export it with positional inputs "
            "only, in the order config.toml lists them"
        )
    module: torch.nn.Module = program.module()
    if hasattr(module, "_guards_fn"):
        setattr(module, "validate_inputs", False)  # noqa: B010 - torch declares no such attribute
    return module


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
