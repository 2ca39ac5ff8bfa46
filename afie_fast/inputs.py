"""A model's input: one tensor, a tuple of positional arguments, or a dict of keyword
arguments (a diffusion U-Net's ``(x, t)``, an image with its mask), tensors or not."""
from __future__ import annotations

from typing import Any, Callable, Union

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map_only

Inputs = Union[torch.Tensor, tuple, list, dict]
_EXAMPLE = "e.g. torch.randn(1, 3, 32, 32), or (x, t) / {'x': x, 't': t} for a model of several inputs"


def call(model: nn.Module, inputs: Inputs) -> Any:
    """model(inputs), model(*inputs) or model(**inputs)."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def map_tensors(inputs: Inputs, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
    """``inputs`` with ``fn`` applied to every tensor inside, the rest as it is."""
    return tree_map_only(torch.Tensor, fn, inputs)


def check(inputs: Any, name: str = "example_inputs") -> None:
    """A TypeError unless ``inputs`` is a tensor, or a tuple/list/dict holding one."""
    if isinstance(inputs, torch.Tensor):
        return
    if not isinstance(inputs, (tuple, list, dict)) or not any(isinstance(t, torch.Tensor) for t in tree_leaves(inputs)):
        raise TypeError(f"{name} must be the input the model takes: a tensor batch, or a tuple (positional) or dict "
                        f"(keyword arguments) holding one ({_EXAMPLE}); got {type(inputs).__name__}")


def model_input(batch: Any, input_fn: Callable[[Any], Any] | None = None) -> Inputs:
    """The model input in a loader's batch: whatever input_fn(batch) returns (a tensor, a
    tuple of positional or a dict of keyword arguments), else the batch itself if a tensor,
    the first tensor of a tuple/list (``(x, y)``), or batch["input"]."""
    if input_fn is not None:
        inputs = input_fn(batch)
        check(inputs, "input_fn(batch)")
        return inputs
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)):
        for item in batch:
            if isinstance(item, torch.Tensor):
                return item
    if isinstance(batch, dict):
        if isinstance(batch.get("input"), torch.Tensor):
            return batch["input"]
        raise TypeError(f"a dict batch needs a tensor under 'input' (it has keys {sorted(map(str, batch))}); "
                        "or pass input_fn=")
    raise TypeError(f"a batch must be a tensor, a tuple/list holding one, or a dict with 'input'; got "
                    f"{type(batch).__name__} (pass input_fn= to extract the input)")


def run_batch(model: nn.Module, batch: Any, input_fn: Callable[[Any], Any] | None, device: torch.device | str) -> Any:
    """The model on a loader's batch (see :func:`model_input`), its tensors moved to ``device``."""
    inputs = map_tensors(model_input(batch, input_fn), lambda t: t.to(device, non_blocking=True))
    try:
        return call(model, inputs)
    except TypeError as exc:
        if input_fn is None and "argument" in str(exc):  # forward(x, t) given only x
            raise TypeError(f"{exc} (the model was given the batch's first tensor; for a model of several inputs "
                            "pass input_fn=, e.g. input_fn=lambda b: (b[0], b[1]))") from exc
        raise


def describe(inputs: Inputs) -> Any:
    """A JSON description of ``inputs`` from which :func:`example` builds inputs of the same
    shapes and dtypes (zeros), for save_pruned's replay."""
    if isinstance(inputs, torch.Tensor):
        return {"shape": list(inputs.shape), "dtype": str(inputs.dtype).replace("torch.", "")}
    if isinstance(inputs, (tuple, list)):
        return {"args": [describe(v) for v in inputs]}
    if isinstance(inputs, dict):
        return {"kwargs": {str(k): describe(v) for k, v in inputs.items()}}
    if inputs is None or isinstance(inputs, (bool, int, float, str)):
        return {"value": inputs}
    raise TypeError(f"cannot save an input of type {type(inputs).__name__}: save_pruned keeps tensors' shapes "
                    "and plain values (numbers, strings, None)")


def example(description: Any) -> Inputs:
    """Inputs as :func:`describe` described them, tensors as zeros."""
    if "shape" in description:
        return torch.zeros(description["shape"], dtype=getattr(torch, description["dtype"]))
    if "args" in description:
        return tuple(example(v) for v in description["args"])
    if "kwargs" in description:
        return {k: example(v) for k, v in description["kwargs"].items()}
    return description["value"]
