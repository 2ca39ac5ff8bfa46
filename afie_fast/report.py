"""AFIEReport: per-layer AFIE scores, the paper's ratio allocation, save/load and plots."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from .layers import KINDS

FORMAT = "afie_fast.report"
VERSION = 3  # 2: a SHA-256 of the content (version 1 files, without, still load); 3: each layer's kind
CRITERIA = ("l1", "variance", "independence")
MAX_RATIO = 0.99  # the paper's cap on a layer's pruning ratio
# What the allocation gives a layer whose spectrum has one value (a weights report's conv
# with one input channel per group: the first conv on grey images, a lone depthwise conv),
# whose AFIE is 0 by shape alone: "cap" (the paper's 0.99), "uniform" (the target's ratio)
# or "whole" (none). On real MNIST "cap" cost 6-7 points of accuracy and "whole" led
# "uniform" within a standard deviation (README "Degenerate spectra", benchmarks/degenerate.py).
DEGENERATE = ("cap", "uniform", "whole")
DEFAULT_DEGENERATE = "whole"


@dataclass(frozen=True)
class LayerScore:
    """AFIE of one conv (or Linear) layer.

    Attributes:
        name: the module's qualified name in the model.
        n_filters: output channels c_l.
        entropy: K_l, natural-log entropy of the softmax of the min-max spectrum.
        afie: K_l / c_l.
        spectrum: the layer's spectrum s (descending): singular values of the
            kernel-averaged weights, or square roots of the activation covariance's
            eigenvalues.
        filter_scores: criterion name → one importance per filter (higher = keep).
        n_samples: activation observations (N × positions summed over batches); 0 for weights.
        shape_baseline: ln(p) / c_l, the AFIE a flat spectrum of the same length gives.
            After min-max and softmax K_l lies within ~0.12 nats of ln p, so compare
            every AFIE with this to see how much of it is layer shape.
        kind: the module type: "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d/2d/3d" or
            "Linear" ("" when not recorded, as in reports saved before version 3).
    """

    name: str
    n_filters: int
    entropy: float
    afie: float
    spectrum: tuple[float, ...]
    filter_scores: dict[str, tuple[float, ...]] = field(default_factory=dict)
    n_samples: int = 0
    shape_baseline: float = 0.0
    kind: str = ""

    @property
    def degenerate(self) -> bool:
        """A spectrum of one value for more than one filter: its AFIE (0) says nothing."""
        return len(self.spectrum) == 1 and self.n_filters > 1


class AFIEReport:
    """The result of :func:`afie_fast.score`: an ordered mapping of layer name → LayerScore."""

    def __init__(self, layers: Mapping[str, LayerScore] | list[LayerScore], source: str,
                 meta: dict[str, Any] | None = None) -> None:
        items = list(layers.values()) if isinstance(layers, Mapping) else list(layers)
        if not items:
            raise ValueError("a report needs at least one layer")
        self.layers: dict[str, LayerScore] = {ls.name: ls for ls in items}
        self.source = source
        self.meta = dict(meta or {})

    def __iter__(self) -> Iterator[LayerScore]:
        return iter(self.layers.values())

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return f"AFIEReport(source={self.source!r}, layers={len(self)})"

    # ---- the paper's allocation -------------------------------------------------------
    def max_target(self) -> float:
        """The largest target ``ratios``/``counts`` accept: every layer at its cap, with at
        least one filter kept per layer."""
        total = sum(ls.n_filters for ls in self)
        removable = sum(min(MAX_RATIO * ls.n_filters, ls.n_filters - 1) for ls in self)
        return removable / total

    def ratios(self, target: float = 0.5, degenerate: str = DEFAULT_DEGENERATE) -> dict[str, float]:
        """Layer pruning ratios λ_l = min(λ_min · AFIE_max / AFIE_l, 0.99), with λ_min solved
        exactly so that Σ λ_l c_l = target · Σ c_l (Lu et al., 2024). Layers with AFIE 0 get
        0.99, except those whose spectrum has one value (``LayerScore.degenerate``), which
        get what ``degenerate`` says (see DEGENERATE). Raises ValueError for a target above
        what the caps allow."""
        flat = {ls.name for ls in self if ls.degenerate}
        return allocate_ratios({ls.name: (ls.afie, ls.n_filters) for ls in self}, target, self.max_target(),
                               flat, degenerate)

    def counts(self, target: float = 0.5, degenerate: str = DEFAULT_DEGENERATE) -> dict[str, int]:
        """Whole filters to remove per layer: the ratios turned into counts that sum to
        round(target · Σ c_l) exactly (largest remainder), keeping ≥ 1 filter per layer."""
        ratios = self.ratios(target, degenerate)
        return round_counts({n: ratios[n] * ls.n_filters for n, ls in self.layers.items()},
                            {n: ls.n_filters - 1 for n, ls in self.layers.items()},
                            round(target * sum(ls.n_filters for ls in self)))

    # ---- presentation -----------------------------------------------------------------
    def summary(self, target: float = 0.5) -> str:
        """A plain-text table: layer, kind, filters, samples, K, AFIE, shape baseline, ratio."""
        try:
            ratios = self.ratios(target)
        except ValueError:
            ratios = {}
        head = ("layer", "kind", "filters", "samples", "K", "AFIE", "ln(p)/c", f"ratio@{target:.0%}")
        rows = [(ls.name, ls.kind or "?", str(ls.n_filters), f"{ls.n_samples:,}", f"{ls.entropy:.4f}", f"{ls.afie:.5f}",
                 f"{ls.shape_baseline:.5f}", f"{ratios[ls.name]:.3f}" if ratios else "-") for ls in self]
        table = f"AFIE report ({self.source}, {len(self)} layers)\n" + text_table(head, rows)
        flat = [ls.name for ls in self if ls.degenerate]
        if flat:
            table += (f"\none-value spectra (one input channel per group: AFIE 0 by shape alone): {', '.join(flat[:6])}"
                      f"{' …' if len(flat) > 6 else ''}; left whole (degenerate='{DEFAULT_DEGENERATE}')")
        return table

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "source": self.source, "meta": self.meta,
                "layers": [{**asdict(ls), "spectrum": list(ls.spectrum),
                            "filter_scores": {k: list(v) for k, v in ls.filter_scores.items()}} for ls in self]}

    def save(self, path: str | Path) -> Path:
        """Write the report as JSON (floats round-trip bit-exactly), with a SHA-256 of its
        content that :meth:`load` checks."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        data["sha256"] = _digest(data)
        path.write_text(json.dumps(data, allow_nan=False))
        return path

    @classmethod
    def from_dict(cls, data: Any, origin: str = "report") -> "AFIEReport":
        """Rebuild a report from :meth:`to_dict` output, checking every field (and the
        checksum, when there is one): a damaged or edited report is a ValueError."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{origin}: not an afie_fast report (format {FORMAT!r} expected)")
        version = data.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version > VERSION:
            raise ValueError(f"{origin}: report format version {version!r} is newer than this afie_fast reads "
                             f"({VERSION}); upgrade afie_fast")
        if version >= 2:
            stored = data.get("sha256")
            if stored != _digest({k: v for k, v in data.items() if k != "sha256"}):
                raise ValueError(f"{origin}: corrupt afie_fast report: its content does not match its checksum "
                                 "(the file was damaged or edited)")
        try:
            if data.get("source") not in ("activations", "weights"):
                raise ValueError(f"source {data.get('source')!r}")
            layers = [_layer_from_dict(d, version) for d in data["layers"]]
            return cls(layers, source=str(data["source"]), meta=dict(data.get("meta", {})))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{origin}: corrupt afie_fast report ({type(exc).__name__}: {exc})") from exc

    @classmethod
    def load(cls, path: str | Path) -> "AFIEReport":
        """Read a report written by :meth:`save`; a foreign, damaged, edited or newer file is a ValueError."""
        try:
            data = json.loads(Path(path).read_bytes().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not valid JSON, truncated or not an afie_fast report ({exc})") from exc
        return cls.from_dict(data, origin=str(path))

    def plot(self, path: str | Path) -> Path:
        """Save a PNG: per-layer AFIE against the shape baseline, and the normalised spectra."""
        # Imported here: matplotlib costs ~0.3 s to import and only plot() needs it. The
        # object-oriented Figure draws without pyplot's global backend state.
        from matplotlib.figure import Figure

        names = list(self.layers)
        fig = Figure(figsize=(13, 4.5))
        ax1, ax2 = fig.subplots(1, 2)
        x = range(len(names))
        ax1.plot(x, [ls.afie for ls in self], "o-", label="AFIE")
        ax1.plot(x, [ls.shape_baseline for ls in self], "x--", label="ln(p)/c (flat spectrum)")
        few = len(names) <= 12  # short lists of names read horizontally
        ax1.set_xticks(list(x), names, rotation=0 if few else 60, ha="center" if few else "right",
                       fontsize=9 if few else 7)
        ax1.set_yscale("log")
        ax1.set_xlabel("layer")
        ax1.set_ylabel("AFIE = K / c (log scale)")
        ax1.set_title(f"AFIE per layer ({self.source})")
        ax1.legend()
        for ls in self:
            s = list(ls.spectrum)
            span = (max(s) - min(s)) or 1.0
            ax2.plot([i / max(len(s) - 1, 1) for i in range(len(s))], [(v - min(s)) / span for v in s], lw=1,
                     label=ls.name)
        if len(self) <= 16:
            ax2.legend(fontsize=7, title="layer", title_fontsize=7)
        ax2.set_xlabel("rank / (p − 1)")
        ax2.set_ylabel("min-max normalised spectrum")
        ax2.set_title("spectra")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        return path


def text_table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def _digest(data: dict[str, Any]) -> str:
    # allow_nan: an edited file may hold NaN; it must fail the comparison, not the hashing.
    return hashlib.sha256(json.dumps(data, sort_keys=True, allow_nan=True).encode()).hexdigest()


def _finite(values, what: str, minimum: float | None = None) -> tuple[float, ...]:
    out = tuple(float(v) for v in values)
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{what} holds NaN or Inf")
    if minimum is not None and any(v < minimum for v in out):
        raise ValueError(f"{what} holds values below {minimum}")
    return out


def _layer_from_dict(d: dict[str, Any], version: int) -> LayerScore:
    """One layer of a saved report, every field checked: what reaches prune() is sound."""
    name = d["name"]
    if not isinstance(name, str) or not name:
        raise ValueError(f"layer name {name!r}")
    c = d["n_filters"]
    if not isinstance(c, int) or isinstance(c, bool) or c < 1:
        raise ValueError(f"layer {name!r}: n_filters {c!r}")
    (entropy, afie, baseline) = _finite([d["entropy"], d["afie"], d["shape_baseline"]], f"layer {name!r}: scores", 0.0)
    if not math.isclose(afie, entropy / c, rel_tol=1e-9, abs_tol=1e-15):
        raise ValueError(f"layer {name!r}: afie {afie} is not entropy / n_filters ({entropy / c})")
    spectrum = _finite(d["spectrum"], f"layer {name!r}: spectrum", 0.0)
    if not 1 <= len(spectrum) <= c:
        raise ValueError(f"layer {name!r}: a spectrum of {len(spectrum)} values for {c} filters")
    scores = {}
    for key, values in d["filter_scores"].items():
        if key not in CRITERIA:
            raise ValueError(f"layer {name!r}: unknown criterion {key!r}")
        scores[key] = _finite(values, f"layer {name!r}: {key} scores")
        if len(scores[key]) != c:
            raise ValueError(f"layer {name!r}: {len(scores[key])} {key} scores for {c} filters")
    n = d["n_samples"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"layer {name!r}: n_samples {n!r}")
    kind = d["kind"] if version >= 3 else ""
    if kind not in (*KINDS, ""):  # "": not recorded
        raise ValueError(f"layer {name!r}: unknown kind {kind!r}")
    return LayerScore(name=name, kind=kind, n_filters=c, entropy=entropy, afie=afie, spectrum=spectrum,
                      filter_scores=scores, n_samples=n, shape_baseline=baseline)


def allocate_ratios(afie_and_width: Mapping[str, tuple[float, int]], target: float, max_target: float,
                    flat: Iterable[str] = (), degenerate: str = "cap") -> dict[str, float]:
    """The paper's allocation, solved exactly (piecewise-linear in λ_min).

    afie_and_width: name → (AFIE_l, c_l). Layers with AFIE 0 sit at the cap, except the
    ``flat`` ones (a one-value spectrum) under ``degenerate`` "uniform" (the target's
    ratio; the rest solved at the same target) or "whole" (0; the rest take their share).
    """
    _check_allocation(target, degenerate)
    flat = [n for n in flat if n in afie_and_width]
    if flat and len(flat) < len(afie_and_width) and degenerate != "cap":
        return _around_flat(afie_and_width, target, flat, degenerate)
    if target > max_target + 1e-12:
        raise ValueError(f"target {target} is infeasible: the largest feasible target is {max_target:.4f} "
                         f"(each layer capped at {MAX_RATIO} and keeping at least one filter)")
    a_max = max(a for a, _ in afie_and_width.values())
    rel = {n: (a_max / a, c) for n, (a, c) in afie_and_width.items() if a > 0}  # r_l = AFIE_max / AFIE_l
    at_cap = MAX_RATIO if target > 0 else 0.0  # AFIE 0: the cap
    if not rel or target == 0:
        return {n: 0.0 if n in rel else at_cap for n in afie_and_width}
    total = sum(c for _, c in afie_and_width.values())
    need = target * total - MAX_RATIO * (total - sum(c for _, c in rel.values()))
    lam = _lambda_min(list(rel.values()), need)
    return {n: min(lam * rel[n][0], MAX_RATIO) if n in rel else at_cap for n in afie_and_width}


def _check_allocation(target: Any, degenerate: Any) -> None:
    if not isinstance(target, (int, float)) or not 0.0 <= target <= 1.0 or math.isnan(target):
        raise ValueError(f"target must be a fraction in [0, 1], got {target!r}")
    if degenerate not in DEGENERATE:
        raise ValueError(f"degenerate must be one of {DEGENERATE}, got {degenerate!r}")


def _lambda_min(rel: list[tuple[float, int]], need: float) -> float:
    """λ_min with Σ_l min(λ·r_l, MAX_RATIO)·c_l = need, for (r_l, c_l) pairs: raising λ caps
    the largest r_l first, so cap layers in that order until the rest solve it linearly."""
    rel = sorted(rel, reverse=True)
    capped, free, lam = 0.0, sum(r * c for r, c in rel), 0.0  # free: Σ r_l c_l over uncapped layers
    for r, c in rel:
        if free > 0:
            lam = max(need - MAX_RATIO * capped, 0.0) / free
            if lam * r <= MAX_RATIO:
                return lam
        capped += c
        free -= r * c
    return max(need - MAX_RATIO * capped, 0.0) / free if free > 0 else lam


def _around_flat(afie_and_width: Mapping[str, tuple[float, int]], target: float, flat: list[str],
                 degenerate: str) -> dict[str, float]:
    """The allocation with one-value spectra given the target's ratio ("uniform") or left
    whole ("whole", the other layers taking their share so that the total is the target)."""
    rest = {n: v for n, v in afie_and_width.items() if n not in flat}
    total, share = (sum(c for _, c in m.values()) for m in (afie_and_width, rest))
    goal = target if degenerate == "uniform" else target * total / share
    most = sum(min(MAX_RATIO * c, c - 1) for _, c in rest.values()) / share
    if goal > most + 1e-12:
        most = most if degenerate == "uniform" else most * share / total
        raise ValueError(f"target {target} is infeasible: the largest feasible target is {most:.4f} (each layer "
                         f"capped at {MAX_RATIO}, one filter kept; one-value spectra {degenerate!r})")
    ratios = allocate_ratios(rest, goal, most)
    fixed = target if degenerate == "uniform" else 0.0
    return {n: ratios.get(n, fixed) for n in afie_and_width}


def round_counts(ideal: Mapping[str, float], caps: Mapping[str, int], total: int) -> dict[str, int]:
    """Integers near ``ideal`` that sum to ``total`` exactly (largest remainder), each
    within [0, caps[name]]."""
    counts = {n: min(int(math.floor(v)), caps[n]) for n, v in ideal.items()}
    left = total - sum(counts.values())
    # Hand out the rest by largest fractional part, then to whoever still has room.
    order = sorted(ideal, key=lambda n: (ideal[n] - math.floor(ideal[n]), ideal[n]), reverse=True)
    while left > 0:
        progressed = False
        for n in order:
            if left == 0:
                break
            if counts[n] < caps[n]:
                counts[n] += 1
                left -= 1
                progressed = True
        if not progressed:
            raise ValueError(f"cannot remove {total} filters while keeping one per layer")
    while left < 0:  # rounding up overshot (ideal was above the cap)
        for n in reversed(order):
            if left == 0:
                break
            if counts[n] > 0:
                counts[n] -= 1
                left += 1
    return counts
