"""afie_fast.prune: remove the filters AFIE allocates, physically, through torch-pruning."""
from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch_pruning as tp
from torch import nn

from .report import MAX_RATIO, AFIEReport, allocate_ratios, round_counts
from .scoring import l1_scores, scoring_mode

CRITERIA = ("l1", "variance", "independence", "random")
DEFAULT_CRITERION = "l1"
UNITS = ("filters", "flops", "params")
PLAN_FORMAT = "afie_fast.pruned"
PLAN_VERSION = 1


@dataclass
class PruneStats:
    """What prune() did: params and FLOPs (MACs) before and after, filters kept per layer."""

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
    skipped: list[str] = field(default_factory=list)  # conv layers left whole (residual, ignored)

    def summary(self) -> str:
        head = ("layer", "before", "after", "removed")
        rows = [(n, str(b), str(a), f"{1 - a / b:.0%}") for n, (b, a) in self.kept.items()]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
        fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        lines = [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows), "",
                 f"params {self.params_before:,} → {self.params_after:,} "
                 f"(−{1 - self.params_after / self.params_before:.1%}); "
                 f"MACs {self.macs_before:,} → {self.macs_after:,} (−{1 - self.macs_after / self.macs_before:.1%}); "
                 f"{self.unit} target {self.target:.0%}, reached {self.reached:.1%}, criterion {self.criterion}"]
        return "\n".join(lines)


@dataclass
class _Unit:
    """Filters that must go together: one torch-pruning group rooted at a conv."""

    root: nn.Module
    handler: Any
    members: list[tuple[str, list[int], list[int]]]  # (conv name, its idxs, matching root idxs)
    width: int


@dataclass
class _Attempt:
    """One pruned copy and what it cost to make."""

    model: nn.Module
    history: list  # torch-pruning's pruning history: the plan that save/load replays
    kept: dict[str, tuple[int, int]]
    skipped: list[str]
    max_target: float  # largest filter fraction the prunable units allow
    filters_removed: float  # fraction of the prunable units' filters removed
    macs: int = 0
    params: int = 0


def _check_report(model: nn.Module, report: AFIEReport) -> dict[str, nn.Conv2d]:
    if not isinstance(report, AFIEReport):
        raise TypeError(f"report must be an AFIEReport, got {type(report).__name__}")
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    missing = [n for n in report.layers if n not in convs]
    wrong = [f"{n} ({report.layers[n].n_filters} in the report, {convs[n].out_channels} in the model)"
             for n in report.layers if n in convs and convs[n].out_channels != report.layers[n].n_filters]
    if missing or wrong:
        raise ValueError("the report does not match this model: "
                         + "; ".join(([f"no Conv2d named {missing[:5]}"] if missing else []) + wrong[:5]))
    return convs


def _is_out_conv(dg: tp.DependencyGraph, dep) -> bool:
    return isinstance(dep.target.module, nn.Conv2d) and dg.is_out_channel_pruning_fn(dep.handler)


def _units(dg: tp.DependencyGraph, report: AFIEReport, prune_residual: bool, ignored: list[nn.Module]) -> tuple[list[_Unit], list[str]]:
    """The coupled groups of conv filters that can be pruned, and the conv layers left whole."""
    names = dg._module2name
    units, skipped = [], []
    for group in list(dg.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d])):
        members = [(names[item.dep.target.module], list(item.idxs), list(item.root_idxs))
                   for item in group if _is_out_conv(dg, item.dep)]
        residual = any(isinstance(item.dep.target.module, tp.ops._ElementWiseOp) and "Add" in str(item.dep.target.module._grad_fn)
                       for item in group) and len(members) > 1
        # A grouped (not depthwise) conv needs equal cuts per group, which torch-pruning's
        # graph does not enforce: its filters and the channels feeding it stay whole.
        grouped = any(isinstance(item.dep.target.module, nn.Conv2d) and 1 < item.dep.target.module.groups
                      and item.dep.target.module.groups != item.dep.target.module.in_channels for item in group)
        if (residual and not prune_residual) or grouped or any(m[0] not in report.layers for m in members) or not members:
            skipped += [m[0] for m in members]
            continue
        units.append(_Unit(group[0].dep.target.module, group[0].dep.handler, members, len(group[0].idxs)))
    return units, skipped


def _filter_scores(report: AFIEReport, convs: dict[str, nn.Conv2d], name: str, criterion: str) -> torch.Tensor:
    if criterion == "l1":  # from the weights as they are now
        return l1_scores(convs[name])
    scores = report.layers[name].filter_scores.get(criterion)
    if scores is None:
        hint = ("score it with a loader (source='activations')" if report.source == "weights" else
                "score it with criteria=(…, 'independence')")
        raise ValueError(f"criterion {criterion!r} needs {criterion} scores, which this {report.source} report "
                         f"lacks: {hint}")
    return torch.tensor(scores, dtype=torch.float64)


def _unit_scores(unit: _Unit, report: AFIEReport, convs, criterion: str, seed: int) -> torch.Tensor:
    """One score per filter of the unit: the sum of its members' (root indexing)."""
    if criterion == "random":
        g = torch.Generator().manual_seed(seed + unit.width * 7919 + len(unit.members))
        return torch.rand(unit.width, generator=g, dtype=torch.float64)
    total = torch.zeros(unit.width, dtype=torch.float64)
    for name, idxs, root_idxs in unit.members:
        total.index_add_(0, torch.tensor(root_idxs), _filter_scores(report, convs, name, criterion)[idxs])
    return total


def _prune_copy(model: nn.Module, report: AFIEReport, filter_target: float, example_inputs: torch.Tensor,
                criterion: str, prune_residual: bool, ignored_layers, seed: int, clamp: bool = False,
                allocation: str = "afie"):
    """Prune a deep copy to `filter_target` of its prunable filters (clamped to what the
    caps allow when `clamp`)."""
    pruned = copy.deepcopy(model)
    convs = {n: m for n, m in pruned.named_modules() if isinstance(m, nn.Conv2d)}
    ignored = [convs[x] if isinstance(x, str) else x for x in (ignored_layers or [])]
    with scoring_mode(pruned):  # eval while tracing: BN statistics must not move
        dg = tp.DependencyGraph().build_dependency(pruned, example_inputs=example_inputs, verbose=False)
        units, skipped = _units(dg, report, prune_residual, ignored)
        if not units:
            raise ValueError("nothing to prune: every conv is residual, ignored or outside the report")
        # One ratio per unit: the smallest of its members' is the largest AFIE (DESIGN §2).
        key = lambda i: f"unit{i}"
        afies = {key(i): (max(report.layers[m[0]].afie for m in u.members), u.width) for i, u in enumerate(units)}
        total = sum(u.width for u in units)
        max_target = sum(min(MAX_RATIO * u.width, u.width - 1) for u in units) / total
        if clamp:
            filter_target = min(filter_target, max_target)
        ratios = (allocate_ratios(afies, filter_target, max_target) if allocation == "afie"
                  else {k: filter_target for k in afies})  # "uniform": the baseline the paper beats
        counts = round_counts({k: ratios[k] * w for k, (_, w) in afies.items()},
                              {key(i): u.width - 1 for i, u in enumerate(units)}, round(filter_target * total))
        before = {n: m.out_channels for n, m in convs.items()}
        for i, unit in enumerate(units):
            k = counts[key(i)]
            if k == 0:
                continue
            scores = _unit_scores(unit, report, convs, criterion, seed + i)
            # lowest scores go; ties broken by index so the choice is deterministic
            order = sorted(range(unit.width), key=lambda j: (scores[j].item(), j))
            dg.get_pruning_group(unit.root, unit.handler, sorted(order[:k])).prune()
    kept = {n: (before[n], m.out_channels) for n, m in convs.items()}
    history = [[name, bool(out), [int(i) for i in idxs]] for name, out, idxs in dg.pruning_history()]
    macs, params = _measure(pruned, example_inputs)
    return _Attempt(pruned, history, kept, skipped, max_target, sum(counts.values()) / total, macs, params)


def _measure(model: nn.Module, example_inputs: torch.Tensor) -> tuple[int, int]:
    with scoring_mode(model):
        macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return round(macs), int(params)


def prune(model: nn.Module, report: AFIEReport, *, target: float = 0.5, unit: str = "filters",
          example_inputs: torch.Tensor, criterion: str | None = None, prune_residual: bool = False,
          ignored_layers: Sequence[str | nn.Module] | None = None, seed: int = 0,
          allocation: str = "afie") -> tuple[nn.Module, PruneStats]:
    """Remove filters from a copy of ``model`` the paper's way.

    How many per layer follows the report's AFIE (λ_l ∝ 1/AFIE_l, capped at 0.99, total
    exact); which ones follows ``criterion`` within each layer. Coupled convs (residual
    adds, depthwise convs, concat) are pruned together through torch-pruning's
    DependencyGraph, with one ratio (their smallest) and summed filter scores.

    Args:
        model: the model the report was made for; it is not modified.
        report: from :func:`afie_fast.score`.
        target: fraction of ``unit`` to remove.
        unit: "filters" (of the prunable convs), "flops" (MACs) or "params"; for the
            last two the filter fraction is found by bisection so that the measured
            reduction lands within 1% of ``target``.
        example_inputs: an input batch for tracing and counting, e.g. ``torch.randn(1, 3, 32, 32)``.
        criterion: which filters within a layer: "l1", "variance", "independence"
            (activations reports), or "random" (seeded). Default "l1".
        prune_residual: also prune a ResNet's residual stream (default False).
        ignored_layers: convs (names or modules) to leave whole.
        seed: for "random".
        allocation: "afie" (the paper's layer-wise ratios) or "uniform" (the same ratio
            for every layer, for comparison).

    Returns:
        (pruned model, PruneStats). ``afie_fast.save_pruned`` saves the result.
    """
    criterion = criterion or DEFAULT_CRITERION
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if allocation not in ("afie", "uniform"):
        raise ValueError(f"allocation must be 'afie' or 'uniform', got {allocation!r}")
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    if not isinstance(target, (int, float)) or not 0 <= target < 1:
        raise ValueError(f"target must be a fraction in [0, 1), got {target!r}")
    if not isinstance(example_inputs, torch.Tensor):
        raise TypeError("example_inputs must be a tensor batch the model accepts, e.g. torch.randn(1, 3, 32, 32)")
    _check_report(model, report)
    if criterion in ("variance", "independence"):
        _filter_scores(report, {}, next(iter(report.layers)), criterion)  # a clear error before any work
    example_inputs = example_inputs.detach()
    macs0, params0 = _measure(model, example_inputs)

    def attempt(t: float, clamp: bool = False) -> _Attempt:
        return _prune_copy(model, report, t, example_inputs, criterion, prune_residual, ignored_layers, seed, clamp,
                           allocation)

    if unit == "filters":
        best, filter_target = attempt(target), target
        reached = best.filters_removed
    else:
        # The measured reduction grows with the filter fraction: bisect on that fraction.
        base = macs0 if unit == "flops" else params0
        reduction = lambda a: 1 - (a.macs if unit == "flops" else a.params) / base
        lo, hi, t = 0.0, None, target
        best, filter_target = None, target
        for _ in range(25):
            res = attempt(t, clamp=True)
            t = min(t, res.max_target)
            r = reduction(res)
            if best is None or abs(r - target) < abs(reduction(best) - target):
                best, filter_target = res, t
            if abs(r - target) <= 0.01:
                break
            lo, hi = (t, hi) if r < target else (lo, t)
            upper = hi if hi is not None else res.max_target
            if upper - lo < 1e-4:
                break
            t = (lo + upper) / 2
        reached = reduction(best)
        if reached < target - 0.01 and filter_target >= best.max_target - 1e-4:
            raise ValueError(f"a {unit} reduction of {target:.0%} is out of reach: the most is {reached:.1%} "
                             f"(at most {best.max_target:.0%} of the prunable filters can go)")
        if abs(reached - target) > 0.01:  # whole filters are too coarse in a small model
            warnings.warn(f"{unit} reduction {reached:.1%} is the closest whole filters get to {target:.0%}",
                          stacklevel=2)
    pruned = best.model
    pruned.afie_fast_plan = {
        "format": PLAN_FORMAT, "version": PLAN_VERSION, "model": type(model).__name__,
        "input_shape": list(example_inputs.shape), "input_dtype": str(example_inputs.dtype).replace("torch.", ""),
        "layers": {n: list(v) for n, v in best.kept.items()}, "history": best.history,
    }
    stats = PruneStats(params0, best.params, macs0, best.macs, best.kept, unit, target, reached, filter_target,
                       criterion, best.skipped)
    return pruned, stats


class AFIEImportance(tp.importance.Importance):
    """AFIE's within-layer filter scores as a torch-pruning Importance, so that its own
    pruners (MetaPruner with ``pruning_ratio_dict`` from ``report.ratios(...)``) can use them.

    Coupled convs in a group add their scores; the criterion is one of "l1", "variance",
    "independence" (see :func:`prune`).
    """

    def __init__(self, report: AFIEReport, criterion: str = DEFAULT_CRITERION) -> None:
        if criterion not in CRITERIA[:3]:
            raise ValueError(f"criterion must be one of {CRITERIA[:3]}, got {criterion!r}")
        self.report, self.criterion = report, criterion

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        dg = group._DG
        total = torch.zeros(len(group[0].idxs), dtype=torch.float64)
        found = False
        for item in group:
            if not _is_out_conv(dg, item.dep):
                continue
            conv, name = item.dep.target.module, dg._module2name[item.dep.target.module]
            if name not in self.report.layers:
                continue
            scores = _filter_scores(self.report, {name: conv}, name, self.criterion)
            if scores.numel() != conv.out_channels:  # the layer was already pruned: l1 only is current
                scores = l1_scores(conv)
            total.index_add_(0, torch.tensor(list(item.root_idxs)), scores[list(item.idxs)])
            found = True
        return total.float() if found else None


def save_pruned(pruned: nn.Module, path: str | Path) -> Path:
    """Save a model returned by :func:`prune` without pickle: one safetensors file holding
    the weights and, in its metadata, the pruning plan (kept filters per layer, as JSON)."""
    from safetensors.torch import save_file

    plan = getattr(pruned, "afie_fast_plan", None)
    if plan is None:
        raise ValueError("save_pruned takes a model returned by afie_fast.prune (it carries the pruning plan)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in pruned.state_dict().items()}
    save_file(tensors, str(path), metadata={"afie_fast.plan": json.dumps(plan)})
    return path


def load_pruned(model: nn.Module, path: str | Path) -> nn.Module:
    """Rebuild a pruned model from a fresh, unpruned instance of its architecture and a
    file written by :func:`save_pruned`. Returns a new module; ``model`` is not changed."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        plan = json.loads(meta["afie_fast.plan"])
    except (OSError, KeyError, ValueError, Exception) as exc:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a pruned model saved by afie_fast.save_pruned ({exc})") from exc
    if plan.get("format") != PLAN_FORMAT or int(plan.get("version", 0)) > PLAN_VERSION:
        raise ValueError(f"{path}: unknown or newer pruning plan format")
    convs = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    expected = {n: b for n, (b, _) in plan["layers"].items()}
    if convs != expected:
        raise ValueError(f"{path} was made for another model ({plan['model']}): its conv layers and widths "
                         f"do not match this {type(model).__name__}")
    rebuilt = copy.deepcopy(model)
    example = torch.zeros(plan["input_shape"], dtype=getattr(torch, plan["input_dtype"]))
    with scoring_mode(rebuilt):
        dg = tp.DependencyGraph().build_dependency(rebuilt, example_inputs=example, verbose=False)
        dg.load_pruning_history([[n, out, idxs] for n, out, idxs in plan["history"]])
    rebuilt.load_state_dict(load_file(str(path)), strict=True)
    rebuilt.afie_fast_plan = plan
    return rebuilt
