"""A model's deep copy, as ``copy.deepcopy`` makes it, in a third of the time.

prune() works on a copy, and on a small CNN ``copy.deepcopy`` took as long as a third of
Torch-Pruning's whole trace: its generic protocol runs for every tensor, every module
and each of the dozen hook dicts a module holds. Here the plain weights and buffers are
cloned up front, and plain modules, dicts and tuples are rebuilt directly; anything else
(tensor subclasses, views sharing storage, modules that define their own copy or pickle
protocol, any other object) goes through ``copy.deepcopy`` with the same memo, so
shared and cyclic references come out as deepcopy leaves them. One difference: a tensor
attribute with an autograd history (the weight ``nn.utils.weight_norm`` recomputes each
forward), which deepcopy refuses, is copied detached.
"""
from __future__ import annotations

import copy
import copyreg
from collections import OrderedDict
from functools import lru_cache
from typing import Any

import torch
from torch import nn

_ATOMIC = (int, float, bool, str, type(None))  # deepcopy returns these as they are
_MISSING = object()


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``: equal values, strides, types and sharing, nothing shared
    with ``model``."""
    return _copy(model, _cloned_tensors(model))


def _cloned_tensors(model: nn.Module) -> dict[int, Any]:
    """A deepcopy memo holding a clone of each plain parameter and buffer: what
    ``Parameter.__deepcopy__`` and ``Tensor.__deepcopy__`` make of them. A subclass, a
    view sharing storage, or a tensor with a grad or attributes is left to deepcopy."""
    tensors = [*model.parameters(), *model.buffers()]
    owners: dict[int, int] = {}
    for t in tensors:
        if t.layout == torch.strided and not t.is_quantized and t.device.type in ("cpu", "cuda"):
            key = t.untyped_storage().data_ptr()
            owners[key] = owners.get(key, 0) + 1
    memo: dict[int, Any] = {}
    for t in tensors:
        plain = (type(t) in (nn.Parameter, torch.Tensor) and t.is_leaf and t.grad is None and not t.__dict__
                 and owners.get(t.untyped_storage().data_ptr() if t.layout == torch.strided else -1) == 1
                 and not t.is_quantized and (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)))
        if plain:
            clone = t.detach().clone(memory_format=torch.preserve_format)
            memo[id(t)] = (nn.Parameter(clone, t.requires_grad) if type(t) is nn.Parameter
                           else clone.requires_grad_(t.requires_grad))
    return memo


def _copy(value: Any, memo: dict[int, Any]) -> Any:
    """``copy.deepcopy(value, memo)``, directly for what modules are made of."""
    kind = type(value)
    if kind in _ATOMIC:
        return value
    done = memo.get(id(value), _MISSING)
    if done is not _MISSING:
        return done
    if kind is tuple and all(type(v) in _ATOMIC for v in value):
        return value  # as deepcopy: nothing inside changes
    if kind in (dict, OrderedDict) and all(type(k) is str for k in value):
        new = memo[id(value)] = kind()
        for k, v in value.items():
            new[k] = _copy(v, memo)
        return new
    if isinstance(value, torch.Tensor) and value.grad_fn is not None:
        # A weight a hook recomputes each forward (nn.utils.weight_norm keeps the last one as
        # a plain attribute, an autograd result), which deepcopy refuses (pytorch#103001).
        new = memo[id(value)] = value.detach().clone(memory_format=torch.preserve_format)
        return new
    if isinstance(value, nn.Module) and _plain_module(kind):
        state = value.__getstate__()
        if type(state) is dict:
            # deepcopy's protocol for it: __new__, memo, the state copied, __setstate__
            new = memo[id(value)] = kind.__new__(kind)
            new.__setstate__({k: _copy(v, memo) for k, v in state.items()})
            return new
    return copy.deepcopy(value, memo)


@lru_cache(maxsize=None)
def _plain_module(kind: type) -> bool:
    """Whether deepcopy copies this module class through object's reduce protocol:
    ``kind.__new__(kind)``, then ``__setstate__`` of its copied ``__getstate__``."""
    return (getattr(kind, "__deepcopy__", None) is None
            and kind.__reduce_ex__ is object.__reduce_ex__ and kind.__reduce__ is object.__reduce__
            and not hasattr(kind, "__getnewargs_ex__") and not hasattr(kind, "__getnewargs__")
            and kind.__new__ is object.__new__ and not copyreg._slotnames(kind))
