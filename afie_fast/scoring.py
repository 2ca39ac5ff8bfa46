"""afie_fast.score: stream a loader through a model's convs (and Linear layers), or read their weights."""
from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from . import _ext
from .accumulator import CovarianceAccumulator, planar
from .inputs import run_batch
from .layers import Layer, eager, filter_weights, kind, layers_of, width
from .observe import Observed, output_moments
from .positions import Lattice, resolve
from .report import AFIEReport, LayerScore

SOURCES = ("activations", "weights")
ACTIVATION_CRITERIA = ("l1", "variance", "independence")
LayerSelector = Sequence[str] | Callable[[str, Layer], bool] | None


def select_layers(model: nn.Module, layers: LayerSelector = None, linear: bool = False) -> dict[str, Layer]:
    """The model's convs (and, with ``linear``, Linear) modules by qualified name,
    narrowed by names or a predicate."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found = layers_of(model, linear)
    kinds = "conv (nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d) or nn.Linear" if linear else \
        "conv (nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d)"
    if not found:
        raise ValueError(f"{type(model).__name__} has no {kinds} layers to score")
    if layers is None:
        return found
    if callable(layers):
        chosen = {n: m for n, m in found.items() if layers(n, m)}
    else:
        if isinstance(layers, str):
            layers = [layers]
        unknown = [n for n in layers if n not in found]
        if unknown:
            known = ", ".join(list(found)[:12]) + (" …" if len(found) > 12 else "")
            raise ValueError(f"layers: {unknown} are not {kinds} layers of the model (it has: {known})")
        chosen = {n: found[n] for n in found if n in set(layers)}
    if not chosen:
        raise ValueError(f"layers: the selection matched no {kinds} layer")
    return chosen


@contextmanager
def scoring_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, each submodule's own train/eval flag restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def weight_spectrum(layer: Layer) -> torch.Tensor:
    """The paper's data-free spectrum: singular values of the weight averaged over every
    kernel axis, (c_l, I/g, *k) → (c_l, I/g) (a transposed conv's weight read filter by
    filter, see filter_weights); of a Linear layer, of its weight (out, in)."""
    w = filter_weights(layer).to("cpu", torch.float64)
    return _ext.singular_values(w.flatten(2).mean(dim=2) if w.dim() > 2 else w)


def l1_scores(conv: Layer) -> torch.Tensor:
    """L1 norm of each filter's weights."""
    # float32 sums (~1e-6 relative, enough to order filters) run 4x faster than float64
    # ones, and score() computes this for every weight of the model.
    return torch.linalg.vector_norm(filter_weights(conv).to("cpu").flatten(1), 1, dim=1).double()


def activation_spectrum(w: torch.Tensor, eps: float = torch.finfo(torch.float64).eps,
                        floor_of: torch.Tensor | None = None) -> torch.Tensor:
    """s_i = √max(e_i, 0) for the covariance eigenvalues e, with eigenvalues under the
    rounding floor C·ε·max e set to 0 (numpy's matrix_rank tolerance; ε of the precision
    the products were computed in): below it an eigenvalue is rounding noise, and its
    square root (~√ε) would make AFIE depend on batch order and precision. ``floor_of``:
    the spectrum whose floor applies (default w's own)."""
    ref = w if floor_of is None else floor_of
    floor = ref.numel() * eps * ref.max().clamp(min=0)
    return torch.where(w > floor, w, torch.zeros_like(w)).sqrt()


def independence_scores(cov: torch.Tensor, w: torch.Tensor, v: torch.Tensor,
                        eps: float = torch.finfo(torch.float64).eps) -> torch.Tensor:
    """Drop in Σ_i s_i (s = √eig Σ) when channel j is deleted: CHIP's channel independence
    in covariance form, from the core's leave-one-out spectra. The submatrices' spectra
    take the full spectrum's rounding floor: a rank-deficient covariance's noise
    eigenvalues would otherwise add √noise to every channel's score."""
    if cov.shape[0] == 1:
        return activation_spectrum(w, eps)
    return activation_spectrum(w, eps).sum() - activation_spectrum(_ext.leave_one_out(w, v), eps, w).sum(dim=1)


def _layer_score(name: str, layer: Layer, spectrum: torch.Tensor, filter_scores: dict[str, torch.Tensor],
                 n_samples: int) -> LayerScore:
    c = width(layer)
    k = _ext.spectrum_entropy(spectrum)
    return LayerScore(name=name, kind=kind(layer), n_filters=c, entropy=k, afie=k / c,
                      spectrum=tuple(spectrum.sort(descending=True).values.tolist()),
                      filter_scores={key: tuple(v.tolist()) for key, v in filter_scores.items()},
                      n_samples=n_samples, shape_baseline=math.log(spectrum.numel()) / c)


def _kind(linear: bool) -> str:
    return "conv and linear layers" if linear else "conv layers"


def _resolve_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """The device to score on, checked before any work: one this torch can use."""
    if device is None:
        for t in model.parameters():
            return t.device
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: {device!r} is not a torch device ({exc})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}, but this torch {'has no CUDA device' if torch.backends.cuda.is_built() else 'was built without CUDA'}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}, but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type != "cpu":
        raise ValueError(f"device={device!r}: afie_fast scores on 'cpu' or 'cuda'")
    return dev


def score(model: nn.Module, loader: Iterable | None = None, *, source: str | None = None,
          layers: LayerSelector = None, max_batches: int | None = None, device: torch.device | str | None = None,
          progress: bool = True, distributed: bool = False, input_fn: Callable[[Any], Any] | None = None,
          criteria: Sequence[str] | None = None, precision: str = "float32", linear: bool = False,
          positions: str | int = "auto", seed: int = 0) -> AFIEReport:
    """Score every convolution of ``model`` with AFIE (and every Linear, with ``linear=True``).

    Convolutions of every kind go through one path: nn.Conv1d, Conv2d, Conv3d (grouped and
    depthwise too) and the transposed convs, whose filters are their output channels; the
    observations of a layer are every (sample, position) pair of its output, whatever the
    number of position axes.

    Args:
        model: any nn.Module with conv layers (a ``torch.compile`` wrapper is scored
            through the module it wraps); never changed (eval mode while scoring,
            each module's mode restored, hooks removed even on error).
        loader: an iterable of batches (a tensor, a tuple/list whose first tensor is the
            input, or a dict with "input"). Needed for ``source="activations"``.
        source: "activations" (default with a loader): spectrum of each layer's output
            covariance over the loader (a widening 1×1 conv or Linear accumulates its
            narrower input x and maps it, Σ_y = W Σ_x Wᵀ: exact, and (C_in/C_out)² of
            the work); "weights" (default without one): the paper's data-free spectrum
            of the kernel-averaged weights.
        layers: conv (or Linear) names, or a predicate ``(name, module) -> bool``; default all.
        max_batches: stop after this many batches.
        device: where the model runs; default the device of its parameters.
        progress: show a tqdm bar and a one-line summary.
        distributed: merge every rank's accumulators (torch.distributed must be
            initialised) so that all ranks get the same report.
        input_fn: maps a batch to the model input: a tensor, or a tuple (positional) or
            dict (keyword arguments) for a model of several inputs, e.g.
            ``lambda b: (b[0], b[1])`` for a U-Net's ``forward(x, t)``.
        criteria: within-layer filter scores to compute for activations, from
            ("l1", "variance", "independence"); default ("l1", "variance").
            "independence" costs one O(C³) leave-one-out solve per layer.
        linear: also score nn.Linear layers (their output width; every leading dimension
            of the output is an observation): the hidden widths of MLPs, as in ConvNeXt
            blocks, become prunable. The classifier, whose outputs are the model's, is
            scored but never pruned.
        precision: products inside a batch on the CPU: "float32" (default; for float32
            activations, ~1e-6 relative, about twice as fast) or "float64". The
            accumulated state is float64 on the CPU either way; on CUDA it is float32
            and the products run on the tensor cores as 3×TF32 (float32's accuracy).
        positions: the spatial positions of each conv output that enter its covariance:
            "all" (exact), an int P (per image at most P positions: a lattice of every
            s-th row and column, its offset changing from batch to batch), or "auto"
            (P = 1024: maps larger than 32×32 are thinned to a 32×32 lattice or less; on
            torchvision's CNNs this left the allocation unchanged, README "Positions").
        seed: the seed of the lattice offsets (the result is deterministic for a seed).

    Returns:
        AFIEReport with one LayerScore per selected layer, in model order.
    """
    model = eager(model)
    source = source or ("activations" if loader is not None else "weights")
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    convs = select_layers(model, layers, linear)
    dev = _resolve_device(model, device)  # checked before any work, for both sources
    meta = {"model": type(model).__name__, "afie_fast": _ext._C.__version__}
    if source == "weights":
        with scoring_mode(model):  # a parametrized weight (spectral norm) read in train mode would move its state
            report = AFIEReport([_layer_score(n, c, weight_spectrum(c), {"l1": l1_scores(c)}, 0)
                                 for n, c in convs.items()], source="weights", meta=meta)
        if progress:
            print(f"afie_fast: scored {len(report)} {_kind(linear)} from their weights")
        return report
    criteria = _check_activation_args(loader, criteria, precision, max_batches, distributed)
    lattice = Lattice(resolve(positions), seed)

    observed = {n: Observed(c) for n, c in convs.items()}
    accs, n_batches, seconds = stream_activations(model, loader, observed, dev, max_batches, progress, input_fn,
                                                  getattr(torch, precision), lattice)
    if distributed:
        for acc in accs.values():
            acc.all_reduce()
    _drop_layers_never_called(observed, accs, linear)
    with scoring_mode(model):
        layer_scores = _activation_scores(observed, accs, criteria)
    meta.update(batches=n_batches, seconds=round(seconds, 3), positions=positions)
    report = AFIEReport(layer_scores, source="activations", meta=meta)
    if progress:
        obs = sum(ls.n_samples for ls in report)
        print(f"afie_fast: scored {len(report)} {_kind(linear)} on {n_batches} batches "
              f"({obs:,} activation vectors) in {seconds:.2f} s")
    return report


def _drop_layers_never_called(observed: dict[str, Observed], accs: dict[str, CovarianceAccumulator],
                              linear: bool) -> None:
    """Layers the forward never called as modules have no activations: they are dropped
    with a warning (all of them: an error). A forward may use a layer's weight directly,
    as torchvision's Swin does its qkv (F.linear(x, self.qkv.weight)) and
    nn.MultiheadAttention its out_proj; no hook sees that."""
    unused = [name for name, acc in accs.items() if acc.count == 0]
    if not unused:
        return
    if len(unused) == len(accs):
        raise ValueError(f"none of the {len(accs)} {_kind(linear)} ran as a module during the pass, so none has "
                         f"activations (does the model's forward use their weights directly?)")
    shown = ", ".join(unused[:6]) + (", …" if len(unused) > 6 else "")
    warnings.warn(f"{len(unused)} of the {_kind(linear)} never ran as modules during the pass and are not scored "
                  f"({shown}): the forward uses their weights directly (as F.linear(x, layer.weight) in torchvision's "
                  f"Swin, or nn.MultiheadAttention's out_proj), which no hook sees", stacklevel=3)
    for name in unused:
        del observed[name], accs[name]


def _check_activation_args(loader, criteria, precision, max_batches, distributed) -> tuple[str, ...]:
    if loader is None:
        raise ValueError("source='activations' needs a loader")
    criteria = tuple(criteria or ("l1", "variance"))
    bad = [c for c in criteria if c not in ACTIVATION_CRITERIA]
    if bad:
        raise ValueError(f"criteria: unknown {bad}; choose from {ACTIVATION_CRITERIA}")
    if precision not in ("float32", "float64"):
        raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}")
    if max_batches is not None and (not isinstance(max_batches, int) or isinstance(max_batches, bool) or max_batches <= 0):
        raise ValueError(f"max_batches must be a positive int, got {max_batches!r}")
    if distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError("distributed=True needs torch.distributed to be initialised first")
    return criteria


def _activation_scores(observed: dict[str, Observed], accs: dict[str, CovarianceAccumulator],
                       criteria: tuple[str, ...]) -> list[LayerScore]:
    """Covariances → spectra (one batched eigensolve) → AFIE and per-filter scores."""
    observed_covs = {}
    for name, acc in accs.items():
        try:
            observed_covs[name] = acc.covariance().to("cpu", torch.float64)
        except ValueError as exc:
            raise ValueError(f"layer {name!r}: {exc} (score it on more data)") from None
    # The reduced congruences and the eigenvalues in float32 arithmetic when the products
    # were float32: they carry that rounding already, and wide layers run twice as fast.
    # "independence" needs accurate eigenvectors: a float64 solve of its own, so that AFIE
    # never depends on criteria.
    product = {name: acc.product_dtype for name, acc in accs.items()}
    eps = {name: torch.finfo(dtype).eps for name, dtype in product.items()}
    single = all(dtype == torch.float32 for dtype in product.values())
    moments = output_moments(observed, observed_covs, single)
    solved = _ext.eigh_many([s for s, _, _ in moments.values()], single=single)
    eigenvalues = {name: torch.cat([torch.zeros(zeros, dtype=torch.float64), w])
                   for (name, (_, zeros, _)), (w, _) in zip(moments.items(), solved)}
    covs = ({name: observed[name].output_covariance(cov) for name, cov in observed_covs.items()}
            if "independence" in criteria else {})
    pairs = dict(zip(covs, _ext.eigh_many(list(covs.values()), vectors=True)))
    layer_scores = []
    for name, obs in observed.items():
        scores: dict[str, torch.Tensor] = {}
        if "l1" in criteria:
            scores["l1"] = l1_scores(obs.layer)
        if "variance" in criteria:
            scores["variance"] = moments[name][2]
        if name in pairs:
            scores["independence"] = independence_scores(covs[name], *pairs[name], eps[name])
        spectrum = activation_spectrum(eigenvalues[name], eps[name])
        layer_scores.append(_layer_score(name, obs.layer, spectrum, scores, accs[name].count))
    return layer_scores


def stream_activations(model: nn.Module, loader: Iterable, layers: dict[str, Observed], device: torch.device,
                       max_batches: int | None, progress: bool, input_fn,
                       compute_dtype: torch.dtype = torch.float32,
                       lattice: Lattice | None = None) -> tuple[dict[str, CovarianceAccumulator], int, float]:
    """One pass over the loader with a forward hook on each layer feeding its accumulator
    what it observes (with the positions the lattice picks; default all)."""
    lattice = lattice or Lattice(None)
    acc_dtype = torch.float64 if device.type == "cpu" else torch.float32
    accs = {n: CovarianceAccumulator(o.channels, device=device, dtype=acc_dtype, compute_dtype=compute_dtype)
            for n, o in layers.items()}
    batch_index = 0

    def hook_for(index: int, name: str):
        def hook(module, args, kwargs, output):
            y = layers[name].tensor(args, kwargs, output)
            if isinstance(module, nn.Linear):  # (..., C): every leading position is an observation
                y = y.reshape(-1, y.shape[-1])
            elif output.dim() != 2 + len(module.kernel_size):  # convs also run on unbatched inputs
                axes = ("L", "H, W", "D, H, W")[len(module.kernel_size) - 1]
                raise ValueError(f"layer {name!r}, batch {batch_index}: the conv gave a {output.dim()}-D output "
                                 f"{tuple(output.shape)}; a batch is (N, C, {axes}): add the batch "
                                 f"dimension (x.unsqueeze(0)) to an unbatched input")
            else:  # positions on one or three axes as a plane (a view), then the lattice
                y = lattice.view(planar(y), index, batch_index)
            try:
                accs[name].update(y)
            except ValueError as exc:
                raise ValueError(f"layer {name!r}, batch {batch_index}: {exc}") from None
        return hook

    from tqdm.auto import tqdm

    total = len(loader) if hasattr(loader, "__len__") else None
    if total is not None and max_batches is not None:
        total = min(total, max_batches)
    bar = tqdm(total=total, desc="afie_fast score", unit="batch", disable=not progress)

    handles = [o.layer.register_forward_hook(hook_for(i, name), with_kwargs=True)
               for i, (name, o) in enumerate(layers.items())]
    start = time.perf_counter()
    try:
        # no_grad, not inference_mode: what the model caches in its forward (a detector's
        # anchors) would be inference tensors, and its next forward with grad would fail.
        with scoring_mode(model), torch.no_grad():
            for batch in loader:
                if max_batches is not None and batch_index >= max_batches:
                    break
                run_batch(model, batch, input_fn, device)
                batch_index += 1
                bar.update(1)
    finally:
        for h in handles:
            h.remove()
        bar.close()
    if batch_index == 0:
        raise ValueError("the loader yielded no batches")
    for name, acc in accs.items():
        try:
            acc.check()  # on CUDA, the NaN/Inf batches the device skipped
        except ValueError as exc:
            raise ValueError(f"layer {name!r}: {exc}") from None
    return accs, batch_index, time.perf_counter() - start
