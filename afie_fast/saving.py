"""Pruned models on disk without pickle: safetensors weights plus the pruning plan (the
history Torch-Pruning replays on a fresh instance), under a SHA-256 of both."""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as masking

from .copying import copy_model
from .coupling import build_graph
from .inputs import Inputs, describe, example
from .layers import Conv, layers_of, width
from .scoring import scoring_mode
from .handlers import refresh
from .traceable import make_traceable

PLAN_FORMAT = "afie_fast.pruned"
PLAN_VERSION = 4  # 2: Linear layers in "layers", state-dict metadata; 3: every conv kind in "layers";
# 4: "inputs" (afie_fast.inputs.describe: several inputs too) for "input_shape" and "input_dtype"


def state_dict_metadata(model: nn.Module) -> dict[str, dict]:
    """Per-module state-dict metadata (versions) that safetensors does not keep but some
    modules' _load_from_state_dict need (torchvision's MNASNet, BatchNorm)."""
    meta = getattr(model.state_dict(), "_metadata", None) or {}
    return {k: {kk: vv for kk, vv in v.items() if isinstance(vv, (int, str, float, bool))} for k, v in meta.items()}


def pruning_plan(original: nn.Module, pruned: nn.Module, example_inputs: Inputs,
                 history: list) -> dict[str, Any]:
    """The plan :func:`save_pruned` stores for ``pruned``: ``original`` cut by ``history``
    (Torch-Pruning's ``DependencyGraph.pruning_history()``: (layer, outputs?, indices)),
    which :func:`load_pruned` replays on a fresh instance. :func:`prune` attaches it to the
    models it returns; set it as ``pruned.afie_fast_plan`` to save a model cut by
    Torch-Pruning's own pruners on a copy of ``original``."""
    before = {n: width(m) for n, m in layers_of(original).items()}
    return {
        "format": PLAN_FORMAT, "version": PLAN_VERSION, "model": type(original).__name__,
        "inputs": describe(example_inputs),
        "layers": {n: [before[n], width(m)] for n, m in layers_of(pruned).items()},
        "history": [[name, bool(out), [int(i) for i in idxs]] for name, out, idxs in history],
        "state_dict_metadata": state_dict_metadata(pruned),
    }


def save_pruned(pruned: nn.Module, path: str | Path) -> Path:
    """Save a model returned by :func:`prune` without pickle: one safetensors file holding
    the weights and, in its metadata, the pruning plan (kept filters per layer, as JSON)
    and a SHA-256 of both that :func:`load_pruned` checks."""
    from safetensors.torch import save_file

    if not isinstance(pruned, nn.Module):
        raise TypeError(f"pruned must be the torch.nn.Module afie_fast.prune returned, got {type(pruned).__name__}")
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    plan = getattr(pruned, "afie_fast_plan", None)
    if plan is None:
        raise ValueError("save_pruned takes a model returned by afie_fast.prune (it carries the pruning plan); for "
                         "one cut by Torch-Pruning directly, set its afie_fast_plan with afie_fast.saving.pruning_plan")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in pruned.state_dict().items()}
    plan_json = json.dumps(plan)
    save_file(tensors, str(path), metadata={"afie_fast.plan": plan_json,
                                            "afie_fast.sha256": _file_digest(tensors, plan_json)})
    return path


def _file_digest(tensors: dict[str, torch.Tensor], plan_json: str) -> str:
    """SHA-256 over the plan and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(plan_json.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@torch.inference_mode(False)  # the copy and the cut make tensors autograd must trace
def load_pruned(model: nn.Module, path: str | Path) -> nn.Module:
    """Rebuild a pruned model from a fresh, unpruned instance of its architecture and a
    file written by :func:`save_pruned`. Returns a new module; ``model`` is not changed.
    A damaged or edited file (its checksum does not match) is a ValueError."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a fresh instance of the pruned model's architecture (a torch.nn.Module), "
                        f"got {type(model).__name__}")
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        plan_json = meta["afie_fast.plan"]
        plan = json.loads(plan_json)
        state = OrderedDict(load_file(str(path)))
    except (OSError, KeyError, ValueError, SafetensorError) as exc:
        raise ValueError(f"{path}: not a pruned model saved by afie_fast.save_pruned ({exc})") from exc
    if "afie_fast.sha256" in meta and meta["afie_fast.sha256"] != _file_digest(state, plan_json):
        raise ValueError(f"{path}: corrupt file: its weights or plan do not match its checksum "
                         "(damaged or edited after save_pruned)")
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT or int(plan.get("version", 0)) > PLAN_VERSION:
        raise ValueError(f"{path}: unknown or newer pruning plan format")
    # Plans list the Conv2d layers only before version 2, and no other conv kind before 3.
    version = int(plan.get("version", 1))
    kinds = (Conv, nn.Linear) if version >= 3 else (nn.Conv2d, nn.Linear) if version == 2 else (nn.Conv2d,)
    convs = {n: width(m) for n, m in layers_of(model).items() if isinstance(m, kinds)}
    expected = {n: b for n, (b, _) in plan["layers"].items()}
    if convs != expected:
        raise ValueError(f"{path} was made for another model ({plan['model']}): its conv layers and widths "
                         f"do not match this {type(model).__name__}")
    rebuilt = copy_model(model)
    restore = make_traceable(rebuilt)
    traced = (example(plan["inputs"]) if "inputs" in plan else
              torch.zeros(plan["input_shape"], dtype=getattr(torch, plan["input_dtype"])))
    with scoring_mode(rebuilt):
        build_graph(rebuilt, traced).replay([[n, out, idxs] for n, out, idxs in plan["history"]])
    refresh(rebuilt)
    restore(rebuilt)
    _masks_as_saved(rebuilt, state)
    state._metadata = plan.get("state_dict_metadata", {})  # module versions, which safetensors does not keep
    rebuilt.load_state_dict(state, strict=True)
    rebuilt.afie_fast_plan = plan
    return rebuilt


def _masks_as_saved(model: nn.Module, state: dict) -> None:
    """The torch.nn.utils.prune masks the saved model carried (``<t>_orig`` and ``<t>_mask``),
    put on the fresh instance, which has none, so that its state dict matches."""
    for key in state:
        path, _, tensor = key.rpartition(".")
        if tensor.endswith("_mask") and f"{key[:-5]}_orig" in state:
            module = model.get_submodule(path)
            if not hasattr(module, tensor):
                masking.custom_from_mask(module, tensor[:-5], state[key])
