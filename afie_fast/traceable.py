"""A working copy made ready for Torch-Pruning's trace and cut, and given back what the
user's model had afterwards.

Two things in a user's model hide layers from that trace or break the cut:

- Weights a module computes: torch's parametrizations (``parametrizations.weight_norm``,
  ``spectral_norm``, ``orthogonal``, custom ones) and the older hook-based
  ``nn.utils.weight_norm`` / ``spectral_norm``, common on the Conv1d layers of audio
  models. Torch-Pruning assigns the cut weight to ``layer.weight``, which a parametrized
  module refuses (a KeyError escaped prune()), and a hook recomputes it from the uncut
  tensors on the next forward. They are folded into plain weights for the cut; weight
  norm is applied again afterwards, exactly (g = ‖w‖, v = w gives back w), the others
  stay plain (their constraint, a spectral norm of 1 or an orthogonal matrix, is not
  one a subset of filters keeps). Masks of ``torch.nn.utils.prune`` (unstructured
  pruning before this structured one) are folded as ``prune.remove`` does and applied
  again to the cut weight, their zeros the mask.
- Frozen parameters (``requires_grad=False``, a frozen backbone): the trace follows
  autograd, which records no edge into a layer whose parameters need no grad, so those
  layers were never cut and a fully frozen model had "nothing to prune". Every parameter
  requires grad for the trace and cut; each gets its own flag back afterwards.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

from torch import nn
from torch.nn.utils import parametrizations, parametrize
from torch.nn.utils import prune as masking
from torch.nn.utils.spectral_norm import SpectralNorm, SpectralNormLoadStateDictPreHook, remove_spectral_norm
from torch.nn.utils.weight_norm import WeightNorm, remove_weight_norm

from .scoring import scoring_mode


@dataclass
class _Computed:
    """One computed weight that was folded: where, and how to compute it again."""
    module: str
    tensor: str
    again: str | None  # weight norm ("parametrization" or "hook") or a pruning "mask", applied again; None: plain
    dim: int | None
    requires_grad: bool


def make_traceable(model: nn.Module) -> Callable[[nn.Module], list[str]]:
    """Prepare ``model`` (a working copy) in place: computed weights folded into plain
    ones (in eval mode: in train mode a spectral norm would run a power iteration first),
    every parameter requiring grad. Returns ``restore(cut)``, which applies the weight
    norms again to the cut copy, gives each parameter its flag back, and returns the
    names of the computed weights it left plain."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    modules = list(model.named_modules())  # folding changes the tree
    with scoring_mode(model):
        computed = [c for name, module in modules for c in _fold(name, module)]
    plain = {_qualified(c): c.requires_grad for c in computed if c.again is None}
    for p in model.parameters():
        p.requires_grad_(True)

    def restore(cut: nn.Module) -> list[str]:
        modules = dict(cut.named_modules())
        for c in computed:
            if c.again == "parametrization":
                parametrizations.weight_norm(modules[c.module], c.tensor, c.dim)
            elif c.again == "mask":
                module = modules[c.module]
                masking.custom_from_mask(module, c.tensor, getattr(module, c.tensor) != 0)
            elif c.again == "hook":
                with warnings.catch_warnings():  # torch deprecates it; the user's model has it
                    warnings.simplefilter("ignore", FutureWarning)
                    nn.utils.weight_norm(modules[c.module], c.tensor, c.dim)
        for name, p in cut.named_parameters():
            p.requires_grad_(flags.get(name, plain.get(name, True)))
        return list(plain)

    return restore


def _fold(name: str, module: nn.Module) -> list[_Computed]:
    """Fold every tensor ``module`` computes itself (not its children's) into a plain one."""
    folded = []
    for hook in [h for h in module._forward_pre_hooks.values() if isinstance(h, masking.BasePruningMethod)]:
        requires_grad = getattr(module, hook._tensor_name + "_orig").requires_grad
        masking.remove(module, hook._tensor_name)
        folded.append(_Computed(name, hook._tensor_name, "mask", None, requires_grad))
    for hook in [h for h in module._forward_pre_hooks.values() if isinstance(h, (WeightNorm, SpectralNorm))]:
        requires_grad = any(p.requires_grad for n, p in module.named_parameters(recurse=False)
                            if n.startswith(hook.name + "_"))
        norm = isinstance(hook, WeightNorm)
        (remove_weight_norm if norm else remove_spectral_norm)(module, hook.name)
        for key, pre in list(module._load_state_dict_pre_hooks.items()):  # torch leaves this one (wrapped)
            pre = getattr(pre, "hook", pre)
            if isinstance(pre, SpectralNormLoadStateDictPreHook) and pre.fn.name == hook.name:
                del module._load_state_dict_pre_hooks[key]
        folded.append(_Computed(name, hook.name, "hook" if norm else None, hook.dim if norm else None, requires_grad))
    if parametrize.is_parametrized(module):
        for tensor, chain in module.parametrizations.items():
            norm = len(chain) == 1 and isinstance(chain[0], parametrizations._WeightNorm)
            folded.append(_Computed(name, tensor, "parametrization" if norm else None, chain[0].dim if norm else None,
                                    any(p.requires_grad for p in chain.parameters(recurse=False))))
        _unparametrize(module)
    return folded


def _unparametrize(module: nn.Module) -> None:
    """``parametrize.remove_parametrizations(module, t, leave_parametrized=True)`` for
    every t, without its side effect on other models: it deletes each tensor's property
    from the module's class, which a deep copy shares with the user's model (whose layer
    then had no weight at all). Here the module just gets its layer's class back."""
    values = {t: (getattr(module, t).detach().clone(), isinstance(getattr(chain, "original", None), nn.Parameter)
                  or not hasattr(chain, "original")) for t, chain in module.parametrizations.items()}
    del module._modules["parametrizations"]
    module.__class__ = type(module).__bases__[0]  # the class parametrize derived for the module
    for t, (value, is_parameter) in values.items():
        if is_parameter:
            module.register_parameter(t, nn.Parameter(value))
        else:
            module.register_buffer(t, value)


def _qualified(c: _Computed) -> str:
    return f"{c.module}.{c.tensor}" if c.module else c.tensor
