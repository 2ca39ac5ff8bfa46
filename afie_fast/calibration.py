"""BatchNorm recalibration after pruning ("adaptive BN", Li et al., EagleEye, ECCV 2020)."""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from .inputs import run_batch

DEFAULT_BATCHES = 50


def recalibrate_bn(model: nn.Module, loader: Iterable, batches: int | None = DEFAULT_BATCHES, *,
                   input_fn: Callable[[Any], Any] | None = None, device: torch.device | str | None = None,
                   progress: bool = False) -> nn.Module:
    """Re-estimate every BatchNorm's running mean and variance on ``loader``, in place.

    Removing filters leaves the remaining BatchNorm statistics describing the unpruned
    network. This resets them and runs ``batches`` batches (all of the loader with None)
    with the BatchNorm layers in train mode and ``momentum=None``, so each ends as the
    plain average of the per-batch statistics; everything else stays in eval mode (no
    dropout), no gradients are taken, and each module's mode and momentum are restored.
    A model without BatchNorm is returned unchanged, with a warning that says so.

    Args:
        model: the (pruned) model; changed in place and returned.
        loader: batches as for :func:`afie_fast.score` (a tensor, a tuple/list whose first
            tensor is the input, a dict with "input", or ``input_fn(batch)``).
        batches: how many batches to average over; None for the whole loader.
        device: where to run; default the device of the model's parameters.
        progress: show a tqdm bar.

    Returns:
        ``model``.
    """
    _check_args(model, batches)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        warnings.warn(f"{type(model).__name__} has no BatchNorm layers: nothing to recalibrate", stacklevel=2)
        return model
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    from tqdm.auto import tqdm

    bar = tqdm(loader, desc="recalibrate BN", unit="batch", disable=not progress, leave=False, total=batches)
    with _norms_averaging(model, norms), torch.no_grad():
        seen = 0
        for batch in bar:
            if batches is not None and seen >= batches:
                break
            run_batch(model, batch, input_fn, device)
            seen += 1
        if seen == 0:
            raise ValueError("the loader yielded no batches")
    return model


def _check_args(model: Any, batches: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if batches is not None and (not isinstance(batches, int) or isinstance(batches, bool) or batches < 1):
        raise ValueError(f"batches must be a positive int or None, got {batches!r}")


@contextlib.contextmanager
def _norms_averaging(model: nn.Module, norms: list[nn.Module]) -> Iterator[None]:
    """The model in eval mode but ``norms`` in train mode, their statistics reset and
    averaged cumulatively (momentum None), for the block. Every module's mode and every
    norm's momentum are restored after; its statistics too if the block fails."""
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in norms]
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches, not an exponential one
            m.train()
        yield
    except BaseException:
        for m, state in zip(norms, saved):
            m.load_state_dict(state)
        raise
    finally:
        for m, momentum in momenta:
            m.momentum = momentum
        for m, mode in modes:
            m.training = mode
