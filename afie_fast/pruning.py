"""afie_fast.prune: remove the filters AFIE allocates, physically, through torch-pruning."""
from __future__ import annotations

import contextlib
import gc
import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Sequence

import torch
import torch_pruning as tp
from torch import nn

from .calibration import recalibrate_bn
from .copying import copy_model
from .counting import Counting, Measured, loosen, matches, shapes
from .inputs import Inputs, call, map_tensors
from .inputs import check as check_inputs
from .layers import Conv, Layer, eager, layers_of, width
from .coupling import RESIDUAL, Graph, Unit, build_graph, find_units, is_out_conv
from .saving import pruning_plan
from .handlers import heads_handler, refresh
from .report import DEFAULT_DEGENERATE, DEGENERATE, MAX_RATIO, AFIEReport, allocate_ratios, round_counts, text_table
from .scoring import l1_scores, scoring_mode
from .traceable import make_traceable

CRITERIA = ("l1", "variance", "independence", "random")
DEFAULT_CRITERION = "l1"
UNITS = ("filters", "flops", "params")
PROGRESS_DELAY_S = 2.0  # prune() shows its bar only once it has run this long


@dataclass
class PruneStats:
    """What prune() did: params and MACs per input before and after (FLOPs / 2 as
    torch.utils.flop_counter.FlopCounterMode counts them: conv, linear, matmul), filters
    kept per layer."""

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    kept: dict[str, tuple[int, int]]  # layer → (filters before, filters after)
    unit: str
    target: float
    reached: float  # fraction of `unit` actually removed (of the prunable filters for "filters")
    filter_target: float  # the filter fraction asked of the allocation
    criterion: str
    skipped: dict[str, str] = field(default_factory=dict)  # conv layer left whole → why
    prunable_macs: float = 1.0  # fraction of the model's MACs in layers a unit can cut
    prunable_params: float = 1.0  # ... and of its params
    residual_streams: dict[str, str] = field(default_factory=dict)  # layer of a residual stream cut → why

    def summary(self) -> str:
        rows = [(n, str(b), str(a), f"{1 - a / b:.0%}") for n, (b, a) in self.kept.items()]
        lines = [text_table(("layer", "before", "after", "removed"), rows), "",
                 f"params {self.params_before:,} → {self.params_after:,} "
                 f"(−{1 - self.params_after / self.params_before:.1%}); "
                 f"MACs {self.macs_before:,} → {self.macs_after:,} (−{1 - self.macs_after / self.macs_before:.1%}); "
                 f"{self.unit} target {self.target:.0%}, reached {self.reached:.1%}, criterion {self.criterion}",
                 f"prunable: {self.prunable_macs:.0%} of the MACs, {self.prunable_params:.0%} of the params; "
                 f"{len(self.skipped)} conv layers left whole"
                 + (f" ({', '.join(sorted(set(self.skipped.values())))})" if self.skipped else "")]
        if self.residual_streams:
            lines.append(f"residual streams cut ({len(self.residual_streams)} layers): "
                         f"{next(iter(self.residual_streams.values()))}")
        return "\n".join(lines)


@dataclass
class _Plan:
    """How many filters each unit loses, and what that is predicted to cost."""

    counts: list[int]
    filter_target: float
    filters_removed: float  # fraction of the prunable units' filters
    macs: float
    params: float


def _check_report(model: nn.Module, report: AFIEReport) -> dict[str, Layer]:
    if not isinstance(report, AFIEReport):
        raise TypeError(f"report must be an AFIEReport, got {type(report).__name__}")
    convs = layers_of(model)
    missing = [n for n in report.layers if n not in convs]
    wrong = [f"{n} ({report.layers[n].n_filters} in the report, {width(convs[n])} in the model)"
             for n in report.layers if n in convs and width(convs[n]) != report.layers[n].n_filters]
    if missing or wrong:
        raise ValueError("the report does not match this model: "
                         + "; ".join(([f"no conv or Linear layer named {missing[:5]}"] if missing else []) + wrong[:5]))
    return convs


def _filter_scores(report: AFIEReport, convs: dict[str, Layer], name: str, criterion: str) -> torch.Tensor:
    if criterion == "l1":  # from the weights (of the model the report describes)
        return l1_scores(convs[name])
    scores = report.layers[name].filter_scores.get(criterion)
    if scores is None:
        hint = ("score it with a loader (source='activations')" if report.source == "weights" else
                "score it with criteria=(…, 'independence')")
        raise ValueError(f"criterion {criterion!r} needs {criterion} scores, which this {report.source} report "
                         f"lacks: {hint}")
    return torch.tensor(scores, dtype=torch.float64)


def _unit_scores(unit: Unit, report: AFIEReport, convs, criterion: str, seed: int) -> torch.Tensor:
    """One score per filter of the unit: the sum of its members' (root indexing)."""
    if criterion == "random":
        g = torch.Generator().manual_seed(seed + unit.width * 7919 + len(unit.members))
        return torch.rand(unit.width, generator=g, dtype=torch.float64)
    total = torch.zeros(unit.width, dtype=torch.float64)
    for name, idxs, root_idxs in unit.members:
        scores = _filter_scores(report, convs, name, criterion)
        if idxs == root_idxs and len(idxs) == unit.width == len(scores):  # every channel, one to one
            total += scores
        else:
            total.index_add_(0, torch.tensor(root_idxs), scores[idxs])
    return total


def _choose(unit: Unit, scores: torch.Tensor, k: int) -> list[int]:
    """The k filters of the unit to remove: lowest scores, ties by index. A grouped unit
    loses the same positions in each of its G channel groups (the lowest summed over
    groups). No part of the unit (see Unit.parts) loses all its channels: a position that
    would take a part's last one is passed over for the next lowest."""
    if unit.block > 1:  # whole blocks, the lowest summed (find_units gives such a unit no groups or parts)
        per = scores.view(-1, unit.block).sum(1).tolist()
        worst = sorted(range(len(per)), key=per.__getitem__)[:k // unit.block]
        return [b * unit.block + t for b in sorted(worst) for t in range(unit.block)]
    g, size = unit.channel_groups, unit.width // unit.channel_groups
    per = scores.view(g, size).sum(0).tolist()
    order = sorted(range(size), key=per.__getitem__)  # a stable sort: ties by index
    if not unit.parts:
        worst = order[:k // g]
    else:
        left, worst = [set(p) for p in unit.parts], []
        for j in order:
            if len(worst) == k // g:
                break
            cut = {grp * size + j for grp in range(g)}
            if any(part <= cut for part in left):
                continue
            for part in left:
                part -= cut
            worst.append(j)
    return [grp * size + j for grp in range(g) for j in sorted(worst)]


class _CostModel:
    """MACs and params of the model as a function of each unit's cut: the per-layer counts
    of one measured forward, conv and linear scaled by their kept input and output
    fractions, BN by its kept channels. prune() searches a FLOPs/params target on this,
    then measures."""

    def __init__(self, measured: Measured, names: dict[nn.Module, str], units: list[Unit]):
        self.macs0, self.params0, self.units = measured.macs, measured.params, units
        self.cost = {m: measured.layers[n] for m, n in names.items() if n in measured.layers}

    def predict(self, counts: list[int]) -> tuple[float, float]:
        removed: dict[tuple[nn.Module, str], float] = {}
        for unit, k in zip(self.units, counts):
            for module, side, n in unit.touched:
                removed[module, side] = removed.get((module, side), 0.0) + k * n / unit.width
        macs, params = float(self.macs0), float(self.params0)
        for module, (m_cost, p_cost) in self.cost.items():
            out = removed.get((module, "out"), 0.0)
            inn = removed.get((module, "in"), 0.0)
            if not out and not inn:
                continue
            dims = _dims(module)
            keep_out = 1 - out / dims[0]
            keep_in = 1 - inn / dims[1] if dims[1] else 1.0
            depthwise = isinstance(module, Conv) and module.groups == module.in_channels == module.out_channels
            keep = min(keep_out, keep_in) if depthwise or dims[1] is None else keep_out * keep_in
            macs -= m_cost * (1 - keep)
            params -= p_cost * (1 - keep)
        return macs, params


def _dims(module: nn.Module) -> tuple[int, int | None]:
    heads = heads_handler(module)
    if heads is not None:  # its matmuls: by the heads' width, as a layer of that many filters
        return heads.proj(module).in_features, None
    if isinstance(module, Conv):
        return module.out_channels, module.in_channels
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    return module.num_features, None


def _plan(units: list[Unit], report: AFIEReport, filter_target: float, allocation: str, cost: _CostModel,
          degenerate: str = DEFAULT_DEGENERATE) -> _Plan:
    """Whole filters per unit for a fraction of the prunable filters (the paper's allocation)."""
    key = lambda i: f"unit{i}"
    # One ratio per unit: the smallest of its members' is the largest AFIE (DESIGN §2).
    afies = {key(i): (max(report.layers[m[0]].afie for m in u.members), u.width) for i, u in enumerate(units)}
    flat = [key(i) for i, u in enumerate(units) if _flat(u, report)]
    total = sum(u.width for u in units)
    ratios = (allocate_ratios(afies, filter_target, _max_target(units), flat, degenerate) if allocation == "afie"
              else {k: filter_target for k in afies})  # "uniform": the baseline the paper beats
    caps = {key(i): u.width - u.keep for i, u in enumerate(units)}
    counts = round_counts({k: ratios[k] * w for k, (_, w) in afies.items()}, caps, round(filter_target * total))
    counts = [_whole_positions(u, counts[key(i)]) for i, u in enumerate(units)]
    macs, params = cost.predict(counts)
    return _Plan(counts, filter_target, sum(counts) / total, macs, params)


def _whole_positions(unit: Unit, k: int) -> int:
    """The most filters up to ``k`` the unit can lose: a grouped unit loses whole positions
    of its G groups (a multiple of G), a blocked one whole blocks, and one read by
    attention heads keeps a multiple of them. 0 when no count does (a width the heads do
    not divide)."""
    while k > 0 and (k % unit.channel_groups or k % unit.block or (unit.width - k) % unit.multiple):
        k -= 1
    return k


def _flat(unit: Unit, report: AFIEReport) -> bool:
    """Whether every member of the unit has a one-value spectrum (LayerScore.degenerate)."""
    return all(report.layers[name].degenerate for name, _, _ in unit.members)


def _max_target(units: list[Unit], whole: Sequence[bool] = ()) -> float:
    """The largest fraction of the units' filters the caps allow (0.99, one kept per group
    and part), the ``whole`` ones (by position) cut not at all."""
    total = sum(u.width for u in units)
    whole = list(whole) or [False] * len(units)
    return sum(0 if w else min(MAX_RATIO * u.width, u.width - u.keep) for u, w in zip(units, whole)) / total


def _prunable_share(cost: _CostModel, units: list[Unit]) -> tuple[float, float]:
    """Fractions of the model's MACs and params in layers some unit can cut."""
    touched = {module for u in units for module, _, _ in u.touched}
    macs = sum(c[0] for m, c in cost.cost.items() if m in touched)
    params = sum(c[1] for m, c in cost.cost.items() if m in touched)
    return macs / max(cost.macs0, 1), params / max(cost.params0, 1)


def _why_short(skipped: dict[str, str], prune_residual: bool | str) -> str:
    by_reason: dict[str, list[str]] = {}
    for name, reason in skipped.items():
        by_reason.setdefault(reason, []).append(name)
    parts = [f"{len(v)} left whole: {k} ({', '.join(v[:4])}{', …' if len(v) > 4 else ''})" for k, v in by_reason.items()]
    hint = ("; prune_residual=True would add the residual streams"
            if prune_residual is False and any(r.startswith(RESIDUAL) for r in by_reason) else "")
    return "; ".join(parts) + hint


@torch.inference_mode(False)  # the copy and the cut make tensors autograd must trace
def prune(model: nn.Module, report: AFIEReport, *, target: float = 0.5, unit: str = "filters",
          example_inputs: Inputs, criterion: str | None = None, prune_residual: bool | str = "auto",
          ignored_layers: Sequence[str | nn.Module] | None = None, seed: int = 0,
          allocation: str = "afie", calibrate: Iterable | None = None,
          progress: bool = True, degenerate: str = DEFAULT_DEGENERATE) -> tuple[nn.Module, PruneStats]:
    """Remove filters from a copy of ``model`` the paper's way.

    How many per layer follows the report's AFIE (λ_l ∝ 1/AFIE_l, capped at 0.99, total
    exact); which ones follows ``criterion`` within each layer. Coupled convs (residual
    adds, depthwise convs, concat) are pruned together through torch-pruning's
    DependencyGraph, with one ratio (their smallest) and summed filter scores; grouped
    convs lose the same positions in every group. Convs whose channels reach the model's
    output, and couplings fixed in the forward code (channel shuffle, split, slice), stay
    whole and are listed in ``stats.skipped`` with the reason. Residual streams stay
    whole unless the target needs them (``prune_residual="auto"``).

    Args:
        model: the model the report was made for; it is not modified (a ``torch.compile``
            wrapper: the module it wraps is cut, and returned uncompiled).
        report: from :func:`afie_fast.score`.
        target: fraction of ``unit`` to remove.
        unit: "filters" (of the prunable convs), "flops" (as FlopCounterMode counts them:
            conv, linear, matmul) or "params"; for the last two the filter fraction is
            searched on a cost model of the graph so that the measured reduction lands
            within 1% of ``target``.
        example_inputs: an input batch for tracing and counting, e.g. ``torch.randn(1, 3, 32, 32)``;
            for a model of several inputs a tuple (positional) or a dict (keyword
            arguments), e.g. ``(x[:1], t[:1])`` for a U-Net's ``forward(x, t)``.
        criterion: which filters within a layer: "l1", "variance", "independence"
            (activations reports), or "random" (seeded). Default "l1".
        prune_residual: whether the channels of residual streams (added to a block's
            output: a ResNet's stem-to-head width, RepVGG's and MobileOne's summed
            branches, ConvNeXt's stages) are cut. False: never, the paper's ResNet setting
            (only the convs inside the blocks); True: always; "auto" (default): only when
            the target is out of reach without them, which ``stats.residual_streams``
            then says.
        ignored_layers: convs (names or modules) to leave whole.
        seed: for "random".
        allocation: "afie" (the paper's layer-wise ratios) or "uniform" (the same ratio
            for every layer, for comparison).
        calibrate: a loader of training batches: re-estimate the pruned copy's BatchNorm
            statistics on it (:func:`afie_fast.recalibrate_bn`, up to 50 batches), which
            recovers much of the accuracy lost right after pruning.
        progress: show a tqdm bar (trace, groups read, units cut, check) once the call
            has taken over 2 s, as it can on large graphs.
        degenerate: what the allocation gives a layer whose spectrum has one value (a
            weights report's conv with one input channel per group, AFIE 0 by shape alone):
            "whole" (default: none cut), "uniform" (the target's ratio) or "cap" (the
            paper's 0.99, which cost 6-7 points of accuracy on real MNIST).

    Returns:
        (pruned model, PruneStats). ``afie_fast.save_pruned`` saves the result.

    Raises:
        ValueError: a target out of reach, with the cause (the layers left whole and why)
            and the largest reachable target.
    """
    model = eager(model)
    criterion = _check_prune_args(model, target, unit, example_inputs, criterion, allocation, prune_residual,
                                  degenerate)
    convs0 = _check_report(model, report)
    ignored = _ignored_names(ignored_layers, convs0)
    if criterion in ("variance", "independence"):
        _filter_scores(report, {}, next(iter(report.layers)), criterion)  # a clear error before any work
    from tqdm.auto import tqdm

    with _collector_paused(), tqdm(desc="afie_fast prune", unit="step", total=0, delay=PROGRESS_DELAY_S,
                                   disable=not progress, leave=False) as bar:
        run = _Run(model, report, map_tensors(example_inputs, torch.Tensor.detach), ignored, prune_residual, allocation,
                   unit, target, bar, degenerate)
        plan, work = run.reach(target, criterion, seed)
        plain = run.restore(work)
        if plain:
            warnings.warn(f"{', '.join(plain[:4])}{' …' if len(plain) > 4 else ''}: computed from a parametrization "
                          "(spectral norm, orthogonal, …) in the model; the pruned copy holds them as plain weights "
                          "with the values they had, since a subset of filters does not keep that constraint",
                          stacklevel=2)
        stats = run.stats(plan, target, criterion)
        work.afie_fast_plan = run.saved_plan()
    if calibrate is not None:
        recalibrate_bn(work, calibrate)
    return work, stats


@contextlib.contextmanager
def _collector_paused():
    """Python's cyclic garbage collector off for the block. prune() makes tens of thousands
    of objects (a model copy, Torch-Pruning's graph) that all live until it returns: the
    collector would only scan them, promote them, and so trigger full collections of the
    caller's whole heap (~0.1 s each with torchvision loaded). Paused, prune() runs ~20%
    faster on average (MNASNet 0.5); its garbage is collected after it returns."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _check_prune_args(model, target, unit, example_inputs, criterion, allocation, prune_residual, degenerate) -> str:
    """prune()'s arguments checked before any work; the criterion, defaulted."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    criterion = criterion or DEFAULT_CRITERION
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if allocation not in ("afie", "uniform"):
        raise ValueError(f"allocation must be 'afie' or 'uniform', got {allocation!r}")
    if degenerate not in DEGENERATE:
        raise ValueError(f"degenerate must be one of {DEGENERATE}, got {degenerate!r}")
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    if prune_residual not in (True, False, "auto"):
        raise ValueError(f"prune_residual must be True, False or 'auto', got {prune_residual!r}")
    if not isinstance(target, (int, float)) or not 0 <= target < 1:
        raise ValueError(f"target must be a fraction in [0, 1), got {target!r}")
    check_inputs(example_inputs)
    return criterion


def _check_reached(run: "_Run", plan: _Plan, target: float, kept: dict[str, tuple[int, int]]) -> float:
    """The measured FLOPs/params reduction: a ValueError if the target is out of reach
    (short of it with every unit at its cap), a warning if whole filters land more than 1%
    off it."""
    reached, unit = run.reached, run.unit
    if reached < target - 0.01 and plan.filter_target >= run.max_target - 1e-6:
        removed, total = sum(b - a for b, a in kept.values()), sum(b for b, _ in kept.values())
        raise ValueError(f"a {unit} reduction of {target:.0%} is out of reach for this {type(run.model).__name__}: "
                         f"the most is {reached:.1%} ({removed} of {total} filters removed, "
                         f"{len(run.units)} prunable units); {_why_short(run.skipped, run.prune_residual)}")
    if abs(reached - target) > 0.01:  # whole filters are too coarse in a small model
        warnings.warn(f"{unit} reduction {reached:.1%} is the closest whole filters get to {target:.0%}", stacklevel=4)
    return reached


_KEPT = f"{RESIDUAL} (the target is reachable without it; prune_residual=True cuts it)"


class _Run:
    """One prune() call's state: a deep copy of the model, its traced graph and units, the
    cost model, and after :meth:`apply` the measured result."""

    def __init__(self, model: nn.Module, report: AFIEReport, example_inputs: Inputs, ignored: list[str],
                 prune_residual: bool | str, allocation: str, unit: str, target: float, bar,
                 degenerate: str = DEFAULT_DEGENERATE) -> None:
        self.model, self.report, self.x = model, report, example_inputs
        self.ignored, self.prune_residual, self.unit = ignored, prune_residual, unit
        self.allocation, self.degenerate = allocation, degenerate
        self.residual = prune_residual is True  # whether residual streams are cut
        self.joined: dict[str, str] = {}  # residual-stream layers "auto" cut, and why
        self.broken: dict[str, str] = {}  # layers whose unit's cut stopped the model from running, and why
        self.bar = bar  # tqdm: one step per trace, group read, unit cut and check
        self.macs = self.params = 0
        self._trace(count=True)
        if prune_residual == "auto":
            self._join_residual_if_needed(target)
        self._check_some_units()

    def _check_some_units(self) -> None:
        if self.units:
            return
        model, report = self.model, self.report
        linear_unscored = (any(isinstance(m, nn.Linear) for m in model.modules())
                           and not any(isinstance(self.layers.get(n), nn.Linear) for n in report.layers))
        hint = "; its nn.Linear layers may hold the width: score(..., linear=True)" if linear_unscored else ""
        raise ValueError(f"nothing to prune in this {type(model).__name__}: "
                         f"{_why_short(self.skipped, self.prune_residual)}{hint}")

    def _trace(self, count: bool = False) -> None:
        """Trace a fresh copy of the model into its graph, groups and units; the first time,
        the same forward also measures the model (MACs, params, conv calls, output shape)."""
        # The last trace's graph holds its copy and that forward's autograd graph in
        # reference cycles, which Python frees only at a full collection: without one, the
        # hidden-tie search's retraces piled up (Twins-SVT-S: 11.8 GB, 1.3 GB with it).
        self.work = self.graph = self.groups = self.units = self.cost = None
        gc.collect()
        self.work = copy_model(self.model)
        self.restore = make_traceable(self.work)  # computed weights and frozen layers, cut like the rest
        self.layers = layers_of(self.work)
        counting = Counting(self.work) if count else contextlib.nullcontext()
        self._step("trace")
        with scoring_mode(self.work), counting:  # eval while tracing: BN statistics must not move
            self.graph = build_graph(self.work, self.x)
        self.bar.update()
        self._step("groups", sum(isinstance(m, (Conv, nn.Linear)) for m in self.graph.dg.module2node))
        if count:
            self.before = replace(counting.measured, shape=self._output_pattern(counting.measured.shape))
        self.groups = self.graph.groups([self.layers[n] for n in self.ignored], tick=self.bar.update)
        self._find_units()

    def _output_pattern(self, shape: Any) -> Any:
        """The output's shape with what depends on the data loosened (counting.loosen),
        from the uncut copy run on other inputs of the same shapes: a detector's number of
        kept boxes changes with its weights too, and a pruned detector's different count
        read as a broken cut, which left every conv whole."""
        with scoring_mode(self.work), torch.no_grad():
            for make in (torch.randn_like, torch.zeros_like):
                other = map_tensors(self.x, lambda t: make(t) if t.is_floating_point() else t)
                try:
                    shape = loosen(shape, shapes(call(self.work, other)))
                except Exception:  # noqa: BLE001 - an input the model refuses tells nothing
                    continue
        return shape

    def _find_units(self) -> None:
        self.units, self.skipped = find_units(self.graph, self.groups, self.report.layers, self.residual)
        if self.broken:  # found by an earlier cut (see reach)
            whole = [u for u in self.units if any(m[0] in self.broken for m in u.members)]
            for u in whole:
                why = next(self.broken[m[0]] for m in u.members if m[0] in self.broken)
                self.skipped.update((m[0], why) for m in u.members if m[0] in self.report.layers)
            self.units = [u for u in self.units if u not in whole]
        if self.prune_residual == "auto" and not self.residual:  # kept whole because the target did not need them
            self.skipped = {n: _KEPT if why.startswith(RESIDUAL) else why for n, why in self.skipped.items()}
        self.cost = _CostModel(self.before, self.graph.names, self.units)
        whole = [self.degenerate == "whole" and _flat(u, self.report) for u in self.units]
        self.max_target = _max_target(self.units, whole) if self.units else 0.0

    def _join_residual_if_needed(self, target: float) -> None:
        """prune_residual="auto": cut the residual streams too when the target is out of
        reach without them (by the cost model, every unit at its cap)."""
        streams = [n for n, why in self.skipped.items() if why.startswith(RESIDUAL)]
        if not streams:
            return
        most = 0.0
        if self.units:
            at_caps = self._plan(self.max_target)
            most = self.max_target if self.unit == "filters" else self.predicted(at_caps)
        if self.units and most >= target - 0.01:
            return
        self.residual = True
        self._find_units()
        why = (f"a {self.unit} target of {target:.0%} is out of reach without them (at most {most:.1%}); "
               "prune_residual=False keeps them whole")
        self.joined = {n: why for n in streams if n not in self.skipped}

    def _step(self, phase: str, steps: int = 1) -> None:
        """Name the phase on the bar and add its steps to the total."""
        self.bar.total += steps
        self.bar.set_description_str(f"afie_fast prune: {phase}", refresh=False)

    def _plan(self, filter_target: float) -> _Plan:
        return _plan(self.units, self.report, filter_target, self.allocation, self.cost, self.degenerate)

    def predicted(self, plan: _Plan) -> float:
        base = self.before.macs if self.unit == "flops" else self.before.params
        return 1 - (plan.macs if self.unit == "flops" else plan.params) / base

    @property
    def reached(self) -> float:
        """The measured reduction of the last :meth:`apply`, in the unit asked for."""
        if self.unit == "flops":
            return 1 - self.macs / self.before.macs
        return 1 - self.params / self.before.params

    def plan(self, goal: float, fresh: bool = False) -> _Plan:
        """Whole filters per unit: for "filters" the allocation at ``goal``; for FLOPs or
        params the filter fraction whose predicted reduction is closest to ``goal``
        (bisection: the prediction grows with the fraction)."""
        if fresh:
            self._trace()
        make = self._plan
        if self.unit == "filters":
            return make(goal)
        lo, hi = 0.0, self.max_target
        best = make(hi)
        if self.predicted(best) < goal:
            return best
        # Halve until the fraction is pinned to a quarter of one filter: finer steps only
        # repeat the same whole-filter plan.
        for _ in range(math.ceil(math.log2(4 * sum(u.width for u in self.units)))):
            mid = (lo + hi) / 2
            p = make(mid)
            if abs(self.predicted(p) - goal) < abs(self.predicted(best) - goal):
                best = p
            lo, hi = (mid, hi) if self.predicted(p) < goal else (lo, mid)
        return best

    def reach(self, target: float, criterion: str, seed: int) -> tuple[_Plan, nn.Module]:
        """:meth:`_reach`; a unit whose cut alone stops the model from running (a width its
        forward code ties to another, which the graph does not see: EdgeNeXt's transposed
        attention reshapes to its input's width, TResNet's blur is a functional conv of a
        fixed width) is left whole with that cause, and the rest planned again."""
        while True:
            try:
                return self._reach(target, criterion, seed)
            except _DoesNotRun as exc:
                culprit = self._breaking_unit(exc.plan, criterion, seed)
                if culprit is None:  # only a combination of cuts breaks it
                    raise
                why = f"its cut stops the model from running ({exc.cause}): a width tied in its forward code"
                self.broken.update((m[0], why) for m in culprit.members)
                for name, _, _ in culprit.members:
                    self.joined.pop(name, None)
                self._trace()
                if self.prune_residual == "auto" and not self.residual:  # the streams may be needed now
                    self._join_residual_if_needed(target)
                self._check_some_units()

    def _breaking_unit(self, plan: _Plan, criterion: str, seed: int) -> Unit | None:
        """The unit of ``plan`` (which does not run) whose cut alone does not run, found by
        halving the planned cuts on fresh copies; None when no half fails on its own."""
        cut = [i for i, k in enumerate(plan.counts) if k > 0]
        while len(cut) > 1:
            halves = (cut[:len(cut) // 2], cut[len(cut) // 2:])
            failing = next((h for h in halves if not self._runs_with(plan, h, criterion, seed)), None)
            if failing is None:
                return None
            cut = failing
        return self.units[cut[0]] if cut else None

    def _runs_with(self, plan: _Plan, cut: list[int], criterion: str, seed: int) -> bool:
        """Whether a fresh copy runs with only the units ``cut`` of ``plan`` cut."""
        self._trace()
        keep = set(cut)
        try:
            self.apply(replace(plan, counts=[k if i in keep else 0 for i, k in enumerate(plan.counts)]), criterion, seed)
        except _DoesNotRun:
            return False
        return True

    def _reach(self, target: float, criterion: str, seed: int) -> tuple[_Plan, nn.Module]:
        """Plan, cut and measure; for FLOPs/params, re-aim on a fresh copy (up to 3 times)
        while the cost model misses the measured reduction by more than 1%. The cost model
        holds the layers' own costs; what it leaves out (a non-local block's matmuls, whose
        size follows its convs' widths) makes the measured reduction a multiple of the
        predicted one: the first re-aim scales by it, the next ones follow the secant
        through the last two (predicted, measured) pairs."""
        plan = self.plan(target)
        work = self.apply(plan, criterion, seed)
        if self.unit == "filters":
            return plan, work
        seen = [(0.0, 0.0)]  # no cut predicts and measures nothing
        for _ in range(3):
            close = abs(self.reached - target) <= 0.01
            at_most = plan.filter_target >= self.max_target - 1e-6 and self.reached < target
            # A cost model that predicted the measurement leaves only whole filters' granularity.
            granular = abs(self.predicted(plan) - self.reached) < 1e-6
            if close or at_most or granular:
                break
            seen.append((self.predicted(plan), self.reached))
            (p0, r0), (p1, r1) = seen[-2:]
            aim = p1 + (target - r1) * (p1 - p0) / (r1 - r0) if abs(r1 - r0) > 1e-9 else p1 + target - r1
            plan = self.plan(min(max(aim, 0.0), 1.0), fresh=True)
            work = self.apply(plan, criterion, seed)
        return plan, work

    def apply(self, plan: _Plan, criterion: str, seed: int) -> nn.Module:
        """Cut the copy as planned, check it runs with the original's output shape, measure it."""
        self._step("cut", sum(k > 0 for k in plan.counts))
        # Scores index the original's channels, as the units' members do: l1 from the caller's
        # model, not from the copy, whose layers earlier cuts may have narrowed (a conv whose
        # channels two units share, as a residual stream fed by a concat).
        with scoring_mode(self.model):  # a parametrized weight read in train mode would move its state
            _apply(self.graph, self.units, plan, self.report, layers_of(self.model), criterion, seed,
                   tick=self.bar.update)
        refresh(self.work)  # split sizes kept in attributes follow the cut layers
        self._step("check")
        # Counted like the original: by its conv and linear layers where they held every FLOP.
        try:
            self.macs, self.params = _check_runs(self.work, self.x, self.before.shape,
                                                 dispatch=not self.before.by_layers)
        except _DoesNotRun as exc:
            exc.plan = plan
            raise
        self.bar.update()
        return self.work

    def stats(self, plan: _Plan, target: float, criterion: str) -> PruneStats:
        """What the last :meth:`apply` did; for FLOPs/params an error if ``target`` was out
        of reach (see _check_reached)."""
        kept = {n: (self.report.layers[n].n_filters, width(self.layers[n])) for n in self.report.layers}
        reached = plan.filters_removed if self.unit == "filters" else _check_reached(self, plan, target, kept)
        share_macs, share_params = _prunable_share(self.cost, self.units)
        return PruneStats(self.before.params, self.params, self.before.macs, self.macs, kept, self.unit, target,
                          reached, plan.filter_target, criterion, self.skipped, share_macs, share_params, self.joined)

    def saved_plan(self) -> dict[str, Any]:
        """What save_pruned stores: the history that load_pruned replays, and the widths."""
        return pruning_plan(self.model, self.work, self.x, self.graph.dg.pruning_history())


def _ignored_names(ignored_layers, convs: dict[str, Layer]) -> list[str]:
    """ignored_layers as names: the modules given are the caller's, prune works on a copy."""
    if ignored_layers is None:
        return []
    if isinstance(ignored_layers, (str, nn.Module)) or not isinstance(ignored_layers, (list, tuple, set)):
        raise TypeError(f"ignored_layers must be a list of conv names or modules, got {type(ignored_layers).__name__}")
    name_of = {id(m): n for n, m in convs.items()}
    unknown = [x for x in ignored_layers if (x not in convs if isinstance(x, str) else id(x) not in name_of)]
    if unknown:
        shown = [x if isinstance(x, str) else type(x).__name__ for x in unknown]
        raise ValueError(f"ignored_layers: {shown} are not conv or Linear layers of the model "
                         f"(it has: {', '.join(list(convs)[:8])}{' …' if len(convs) > 8 else ''})")
    return [x if isinstance(x, str) else name_of[id(x)] for x in ignored_layers]


def _apply(graph: Graph, units: list[Unit], plan: _Plan, report: AFIEReport, convs, criterion: str, seed: int,
           tick: Callable[[], object]) -> None:
    for i, (unit, k) in enumerate(zip(units, plan.counts)):
        if k == 0:
            continue
        scores = _unit_scores(unit, report, convs, criterion, seed + i)
        graph.prune(unit, _choose(unit, scores, k))
        tick()


class _DoesNotRun(RuntimeError):
    """The pruned copy fails to run or changes the output's shape: ``cause`` says how."""

    def __init__(self, message: str, cause: str) -> None:
        super().__init__(message)
        self.cause, self.plan = cause, None


def _check_runs(model: nn.Module, example_inputs: Inputs, shape: Any, dispatch: bool = True) -> tuple[int, int]:
    """MACs and params of the pruned copy, which must run and give outputs of the
    original's shape: a failure here is a coupling the dependency graph did not see."""
    empty = [n for n, m in layers_of(model).items() if width(m) < 1]
    if empty:
        raise RuntimeError(f"pruning left {empty[:3]} with no filters, which every cut is planned to prevent "
                           "(one kept per layer, group and concat part): please report it with the model")
    try:
        with Counting(model, per_layer=False, dispatch=dispatch) as counting, scoring_mode(model), torch.no_grad():
            call(model, example_inputs)
        after = counting.measured
    except (RuntimeError, IndexError, ValueError, TypeError, AssertionError) as exc:  # what a forward raises on a
        cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__  # wrong shape (timm's asserts too)
        raise _DoesNotRun(f"the pruned {type(model).__name__} does not run ({cause}): its forward couples channels "
                          "in a way Torch-Pruning's graph does not see; pass the convs involved in "
                          "ignored_layers=[...]", cause) from exc
    if not matches(shape, after.shape):
        raise _DoesNotRun(f"the pruned {type(model).__name__} gives outputs of shape {after.shape} instead of "
                          f"{shape}; pass the convs involved in ignored_layers=[...]",
                          f"outputs of shape {after.shape}, not {shape}")
    return after.macs, after.params


class AFIEImportance(tp.importance.Importance):
    """AFIE's within-layer filter scores as a torch-pruning Importance, so that its own
    pruners (MetaPruner with ``pruning_ratio_dict`` from ``report.ratios(...)``) can use them.

    Coupled convs in a group add their scores; the criterion is one of "l1", "variance",
    "independence" (see :func:`prune`).
    """

    def __init__(self, report: AFIEReport, criterion: str = DEFAULT_CRITERION) -> None:
        if not isinstance(report, AFIEReport):
            raise TypeError(f"report must be an AFIEReport, got {type(report).__name__}")
        if criterion not in CRITERIA[:3]:
            raise ValueError(f"criterion must be one of {CRITERIA[:3]}, got {criterion!r}")
        self.report, self.criterion = report, criterion

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        dg = group._DG
        total = torch.zeros(len(group[0].idxs), dtype=torch.float64)
        found = False
        for item in group:
            if not is_out_conv(dg, item.dep):
                continue
            conv, name = item.dep.target.module, dg._module2name[item.dep.target.module]
            if name not in self.report.layers:
                continue
            scores = _filter_scores(self.report, {name: conv}, name, self.criterion)
            if scores.numel() != width(conv):  # the layer was already pruned: l1 only is current
                scores = l1_scores(conv)
            total.index_add_(0, torch.tensor(list(item.root_idxs)), scores[list(item.idxs)])
            found = True
        return total.float() if found else None
