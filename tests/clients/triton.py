"""Triton's Python clients against a worker, in a process of their own; prints JSON results.

tritonclient's generated Protobuf messages and the worker's share the protocol's package
(``inference``), and protobuf refuses the same symbol twice in one process: the tests run the
clients here, in a child process, and read what it prints.

    python tests/clients/triton.py http|grpc URL SCRIPT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def _client(kind: str, url: str, token: str | None) -> Any:
    if kind == "http":
        import tritonclient.http as module  # noqa: PLC0415
    else:
        import tritonclient.grpc as module  # noqa: PLC0415
    return module, module.InferenceServerClient(url)


def _tensor(meta: Any) -> dict[str, Any]:
    return {"name": meta.name, "datatype": meta.datatype, "shape": list(meta.shape)}


def main() -> int:  # noqa: PLR0912 - one branch per kind of step, read top to bottom
    """Run each step of the script, print one JSON line per step."""
    kind, url, script = sys.argv[1], sys.argv[2], json.loads(Path(sys.argv[3]).read_text())
    module, client = _client(kind, url, None)
    headers = script.get("headers")
    results = []
    for step in script["steps"]:
        op = step["op"]
        try:
            if op == "live":
                result: Any = client.is_server_live(headers=headers)
            elif op == "ready":
                result = client.is_server_ready(headers=headers)
            elif op == "model_ready":
                result = client.is_model_ready(step["model"], headers=headers)
            elif op == "server_metadata":
                meta = client.get_server_metadata(headers=headers)
                result = (
                    meta
                    if kind == "http"
                    else {"name": meta.name, "extensions": list(meta.extensions)}
                )
            elif op == "model_metadata":
                meta = client.get_model_metadata(step["model"], headers=headers)
                if kind == "grpc":
                    meta = {
                        "name": meta.name,
                        "versions": list(meta.versions),
                        "inputs": [
                            {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                            for t in meta.inputs
                        ],
                        "outputs": [
                            {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                            for t in meta.outputs
                        ],
                    }
                result = meta
            elif op == "infer":
                array = np.asarray(step["data"], dtype=step.get("dtype", "float32"))
                tensor = module.InferInput(step["input"], list(array.shape), step["datatype"])
                if kind == "http":
                    tensor.set_data_from_numpy(array, binary_data=step.get("binary", True))
                    outputs = [
                        module.InferRequestedOutput(n, binary_data=step.get("binary", True))
                        for n in step.get("outputs", [])
                    ] or None
                else:
                    tensor.set_data_from_numpy(array)
                    outputs = [
                        module.InferRequestedOutput(n) for n in step.get("outputs", [])
                    ] or None
                reply = client.infer(
                    step["model"],
                    [tensor],
                    model_version=step.get("version", ""),
                    outputs=outputs,
                    headers=headers,
                )
                out = {n: reply.as_numpy(n).tolist() for n in step["read"]}
                if kind == "grpc":
                    params = reply.get_response().parameters
                    out["batch_size"] = params["batch_size"].int64_param
                else:
                    out["batch_size"] = reply.get_response().get("parameters", {}).get("batch_size")
                result = out
            else:
                result = {"unknown op": op}
            results.append({"ok": True, "result": result})
        except Exception as exc:  # noqa: BLE001 - the test reads what the client raised
            status = getattr(exc, "status", lambda: None)
            results.append(
                {
                    "ok": False,
                    "error": str(exc),
                    "status": str(status() if callable(status) else status),
                }
            )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
