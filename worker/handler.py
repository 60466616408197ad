"""A version's optional ``handler.py``: Python pre/post-processing around each batch.

Loading a handler runs code from the model repository, so it is refused unless
``WORKER_MODELS__ALLOW_CODE`` allows it (:class:`~worker.repository.ModelRepository` passes
the setting down). Nothing here touches Kafka or asyncio.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.errors import ConfigError

__all__ = ["HANDLER_FILE", "Handler"]

HANDLER_FILE = "handler.py"
"""Optional pre/post-processing code in a version folder (run only when allowed)."""


@dataclass(frozen=True, slots=True)
class Handler:
    """A version's ``handler.py``: functions run around each batch's forward pass.

    ``preprocess(inputs)`` gets the batch's inputs by name (padded and concatenated) and
    returns the program's arguments (a dict by the same names, or a tuple in order);
    ``postprocess(outputs)`` gets the program's outputs as a tuple and returns a dict of the
    config's outputs (checked at load like any output). Both run in the inference thread,
    once per batch, before the outputs are cut back per request.
    """

    preprocess: Any = None
    postprocess: Any = None

    @classmethod
    def load(cls, path: Path, *, allowed: bool) -> Handler | None:
        """Import ``path`` if it exists and code is allowed; ConfigError if not allowed."""
        if not path.is_file():
            return None
        if not allowed:
            raise ConfigError(
                f"{path}: a version with pre/post-processing code is served only when "
                "WORKER_MODELS__ALLOW_CODE=true (loading it runs it)"
            )
        name = f"worker_handler_{abs(hash(str(path.resolve())))}"
        try:
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec is not None
            assert spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except Exception as exc:
            raise ConfigError(f"{path}: importing it raised {type(exc).__name__}: {exc}") from exc
        handler = cls(getattr(module, "preprocess", None), getattr(module, "postprocess", None))
        for hook in ("preprocess", "postprocess"):
            value = getattr(handler, hook)
            if value is not None and not callable(value):
                raise ConfigError(f"{path}: {hook} must be a function")
        if handler.preprocess is None and handler.postprocess is None:
            raise ConfigError(f"{path}: defines neither preprocess nor postprocess")
        return handler
