"""One model version: loading its program, validating requests, the batched forward call.

A model takes its inputs positionally in ``config.toml`` order (:mod:`worker.model_config`) and
returns one tensor, or a tuple in ``outputs`` order. The first dimension of every input and
output is the batch. A ``[tokenizer]`` model takes the tokenizer's feeds instead (token ids,
attention mask); a sequence model without one may take an extra last argument (attention mask
or lengths) that :func:`stack_inputs` builds while padding the batch.

:meth:`LoadedModel.validate` turns a request into :class:`Prepared` inputs (tokenised, checked);
:mod:`worker.forward` assembles batches of them, runs them and cuts the outputs back.
A version runs on its device and precision (:mod:`worker.device`). A forward pass is three
steps: :meth:`LoadedModel.upload` (on a GPU: the batch assembled in pinned host memory, copied
on a copy stream without blocking), :meth:`LoadedModel.launch` (the program, on the thread's
compute stream), :meth:`LoadedModel.download` (outputs copied back once per batch).
Pipelining a run of batches and isolating failures is :mod:`worker.forward`'s.

Nothing here touches Kafka or asyncio: these are blocking calls that the worker runs off the
event loop.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch.export.passes import move_to_device_pass

from worker.device import resolve_device, torch_dtype
from worker.domain import BYTES, DATATYPES, InferenceRequest, Tensor
from worker.errors import ConfigError, ErrorCode, RequestError, shown
from worker.forward import Staged, stack_inputs
from worker.handler import HANDLER_FILE, Handler
from worker.model_config import (
    CONFIG_FILE,
    DEFAULT_EXECUTION,
    MODEL_FILE,
    ON_CPU,
    Execution,
    ModelConfig,
    TensorSpec,
)
from worker.quantize import quantize_int8
from worker.text import TextEncoder, Tokenized

__all__ = ["Argument", "LoadedModel", "Prepared", "export_model"]


@dataclass(frozen=True, slots=True)
class Prepared:
    """One request's inputs as the program takes them, and what batching needs to know."""

    arrays: list[npt.NDArray[Any]]
    """One array per program input (the extra mask or lengths argument excepted)."""
    rows: int
    length: int = 1
    """Sequence models: the request's length (second dimension); 1 otherwise."""
    tokens: int = 1
    """Real tokens (rows x length; for strings, their token counts): padding efficiency."""
    truncated: int = 0
    """Strings cut to the tokenizer's ``max_length``."""
    pending: bool = False
    """Strings not tokenised yet (``arrays`` holds them): :meth:`LoadedModel.tokenize` does it."""


@dataclass(frozen=True, slots=True)
class Argument:
    """One positional argument of the program."""

    name: str
    sequence: bool = False
    """Padded along its second dimension to the batch's longest request."""
    pad_value: float = 0.0
    extra: bool = False
    """Built by :func:`stack_inputs` (attention mask or lengths), not taken from requests."""


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
        self.handler = handler
        self.text = text
        """The tokenizer step of a ``[tokenizer]`` model."""
        self.arguments = _arguments(config, text)
        """The program's positional arguments, in order (the names :meth:`predict` takes)."""
        self.execution = execution
        """Device asked for, precision, instances."""
        self.device = device or torch.device("cpu")
        """Where it runs (``auto`` resolved)."""
        self._dtype = torch_dtype(execution.precision)
        self._out_dtypes = tuple(_torch_dtype_of(DATATYPES[s.datatype]) for s in config.outputs)

    @classmethod
    def load(
        cls,
        config: ModelConfig,
        folder: Path,
        *,
        allow_code: bool = False,
        defaults: Execution = DEFAULT_EXECUTION,
        warm_up: int = 0,
    ) -> LoadedModel:
        """Load ``folder/model.pt2`` and check it against the config with one dummy batch.

        ``allow_code``: import the folder's ``handler.py`` if there is one (else refuse it).
        ``defaults``: device, precision and instances where the config leaves them out.
        ``warm_up``: on a GPU, run dummy batches of 1, 2, 4 ... up to this many rows first,
        so that the first requests do not pay for kernel selection and allocation.
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
        module: torch.nn.Module = program.module()
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
        if device.type == "cuda" and warm_up:
            model.warm_up(warm_up)
        return model

    def warm_up(self, largest: int) -> list[int]:
        """Run dummy batches of 1, 2, 4 ... rows up to ``largest`` (included); their sizes."""
        sizes = [1 << i for i in range(largest.bit_length()) if 1 << i < largest] + [largest]
        dummy = self.dummy()
        for size in sizes:
            self.predict(stack_inputs(self, [dummy] * size))
        return sizes

    def same_program(self, other: LoadedModel) -> bool:
        """True if both run the very same loaded program (a reload reused it)."""
        return self._module is other._module

    def with_config(
        self, config: ModelConfig, defaults: Execution = DEFAULT_EXECUTION
    ) -> LoadedModel:
        """The same loaded program under a new config (new routing or instances).

        Inputs, outputs, device and precision are the same (else the version is reloaded).
        """
        return LoadedModel(
            config, self.version, self._module, self.text, self.handler,
            execution=config.execution(defaults), device=self.device,
        )  # fmt: skip

    def dummy(self) -> Prepared:
        """A request of one row of zeros (or one short string): the load-time check."""
        if self.text is not None:
            strings = np.array([b"warm up"], dtype=object)
            return self._tokenize(self.config.inputs[0], strings)
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
        expected = {s.name for s in self.config.inputs}
        for given in request.inputs:
            if given.name not in expected:
                raise RequestError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"unknown input {shown(given.name)} for model {self.name!r}; expected inputs: "
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
            if self.text is not None:
                if tokenize:
                    return self._tokenize(spec, array)
                return Prepared([array], rows=len(array), length=0, tokens=0, pending=True)
            if array.dtype.kind == "f" and not spec.allow_non_finite:
                _check_finite(spec, array)
            if rows is not None and array.shape[0] != rows:
                raise RequestError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"inputs disagree on the batch dimension ({rows} vs {array.shape[0]})",
                )
            rows = array.shape[0]
            arrays.append(array)
        assert rows is not None
        length = self._length(arrays)
        return Prepared(arrays, rows, length, rows * length)

    def tokenize_many(self, pending: Sequence[Prepared]) -> list[Prepared | RequestError]:
        """Tokenise several pending requests' strings in one call (blocking; off the loop)."""
        assert self.text is not None
        name = self.config.inputs[0].name
        return [
            r if isinstance(r, RequestError) else _prepared(r)
            for r in self.text.encode_many([(name, p.arrays[0]) for p in pending])
        ]

    def _tokenize(self, spec: TensorSpec, strings: npt.NDArray[Any]) -> Prepared:
        assert self.text is not None
        return _prepared(self.text.encode(spec.name, strings))

    def _length(self, arrays: Sequence[npt.NDArray[Any]]) -> int:
        """The one length all sequence inputs of a request share (1 for fixed shapes)."""
        lengths = {
            int(a.shape[1])
            for a, s in zip(arrays, self.config.inputs, strict=True)
            if s.is_sequence
        }
        if not lengths:
            return 1
        if len(lengths) > 1 or 0 in lengths:
            raise RequestError(
                ErrorCode.INVALID_ARGUMENT,
                f"sequence inputs of model {self.name!r} must share one length of at least 1 "
                f"(the second dimension); got {sorted(lengths)}",
            )
        return lengths.pop()

    def predict(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        """Run one forward pass on a batch (blocking), inputs keyed by :attr:`arguments` name.

        A version's handler, if any, runs its ``preprocess`` before and ``postprocess`` after.
        """
        staged = self.upload(inputs)  # held until the outputs are back: its copy is done then
        return self.download(self.launch(staged))

    def stage(self, per_request: Sequence[Prepared]) -> Staged:
        """Assemble a batch (in pinned memory on a GPU) and start its copy to the device."""
        pinned = self.device.type == "cuda"
        return self.upload(stack_inputs(self, per_request, empty=_pinned if pinned else None))

    def upload(self, inputs: Mapping[str, npt.NDArray[Any]]) -> Staged:
        """The handler's ``preprocess``, then the arguments to the device (not waiting on a GPU)."""
        handler = self.handler
        values: Sequence[Any] = [inputs[a.name] for a in self.arguments]
        if handler is not None and handler.preprocess is not None:
            given = handler.preprocess(dict(inputs))
            values = [given[a.name] for a in self.arguments] if isinstance(given, dict) else given
        host = [torch.from_numpy(_writable(np.asarray(v))) for v in values]
        if self.device.type != "cuda":
            return Staged(host)
        with torch.cuda.stream(_copy_stream(self.device)):
            args = [t.to(self.device, non_blocking=True) for t in host]
            ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
            ready.record()
        return Staged(args, ready, host)

    def launch(self, staged: Staged) -> tuple[torch.Tensor, ...]:
        """Run the program on a staged batch (on a GPU: queued on the thread's stream)."""
        args = staged.args
        if staged.ready is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(staged.ready)
            for arg in args:
                arg.record_stream(compute)  # its memory is in use on this stream too
        if self._dtype != torch.float32:
            args = [a.to(self._dtype) if a.is_floating_point() else a for a in args]
        with torch.inference_mode():
            result = self._module(*args)
        return (result,) if isinstance(result, torch.Tensor) else tuple(result)

    def download(self, tensors: Sequence[torch.Tensor]) -> dict[str, npt.NDArray[Any]]:
        """Outputs back to the host (one wait per batch on a GPU), then ``postprocess``."""
        if self._dtype != torch.float32:  # back to what the config declares
            wants = [*self._out_dtypes, *[None] * len(tensors)]  # a handler may return more
            tensors = [
                t.to(want) if t.dtype == self._dtype and want is not None else t
                for t, want in zip(tensors, wants, strict=False)
            ]
        if self.device.type == "cuda":
            tensors = [t.to("cpu", non_blocking=True) for t in tensors]
            torch.cuda.current_stream(self.device).synchronize()
        arrays = tuple(t.detach().cpu().numpy() for t in tensors)
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


_streams = threading.local()


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    """The calling thread's stream for host-to-device copies (so they overlap compute)."""
    stream: torch.cuda.Stream | None = getattr(_streams, "copy", None)
    if stream is None:
        stream = _streams.copy = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
    return stream


def _pinned(shape: tuple[int, ...], dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """An uninitialised array in page-locked host memory (fast, non-blocking copies)."""
    return torch.empty(shape, dtype=_torch_dtype_of(dtype), pin_memory=True).numpy()


def _torch_dtype_of(dtype: np.dtype[Any]) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype


def _prepared(tokenized: Tokenized) -> Prepared:
    return Prepared(
        tokenized.arrays,
        rows=len(tokenized.lengths),
        length=max(tokenized.lengths),
        tokens=sum(tokenized.lengths),
        truncated=tokenized.truncated,
    )


def _arguments(config: ModelConfig, text: TextEncoder | None) -> tuple[Argument, ...]:
    if text is not None:
        return tuple(Argument(f, sequence=True, pad_value=text.pad_value(f)) for f in text.feeds)
    arguments = [Argument(s.name, s.is_sequence, s.pad_value) for s in config.inputs]
    if config.extra_input != "none":
        arguments.append(Argument(config.extra_input, extra=True))
    return tuple(arguments)


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
        if spec.datatype == BYTES:
            raise RequestError(
                ErrorCode.INVALID_ARGUMENT,
                f"input {spec.name!r} has datatype {tensor.datatype}; expected {spec.describe()} "
                "(strings: each a 4-byte little-endian length, then UTF-8 bytes)",
            )
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
