"""int8 dynamic quantisation of a torch.export program's linear layers (``quantize = "int8"``)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, cast

import torch

from worker.errors import ConfigError

__all__ = ["quantize_int8"]


def quantize_int8(module: torch.nn.Module, path: Path) -> torch.nn.Module:
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
