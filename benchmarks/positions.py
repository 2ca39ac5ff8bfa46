"""What thinning the spatial positions costs: score(positions=P) against positions="all".

For each model and budget P (positions per image, per layer) over lattice seeds (2 by default):
the largest relative AFIE error over the layers, whether the paper's allocation (filters
removed per layer at 30/50/70% of the filters) is identical to the exact one, the share
of layers thinned, and score()'s time as a multiple of plain inference (interleaved
rounds, medians, 2 threads).

Models: the digits-trained digits_cnn and alexnet_mnist on the real digits set (small
maps: only small budgets thin them) and torchvision's families at 224² (random init,
4 batches of 16 Gaussian images).

    python benchmarks/positions.py                                   # ~12 min on 2 cores
    python benchmarks/positions.py --models mobilenet_v2 --budgets all,4096,1024
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import afie_fast as af
from afie_fast.positions import resolve, stride_for
from afie_fast.report import MAX_RATIO, allocate_ratios, round_counts

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from _timing import interleaved, table  # noqa: E402

TARGETS = (0.3, 0.5, 0.7)


def digits_model(name: str):
    from afie_fast.data import load_digits
    from afie_fast.models import INPUT_SHAPES, ZOO
    from afie_fast.training import train

    torch.manual_seed(0)
    split = load_digits(seed=0, size=INPUT_SHAPES[name][-1])
    model = train(ZOO[name](), split.train_loader(64, 0), 5)
    return model.eval(), list(split.train_loader(128, 0, shuffle=False))[:4]


def torchvision_model(name: str):
    from conftest import import_torchvision  # the test shim: torchvision's CUDA wheel beside a CPU torch

    tv = import_torchvision()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    return getattr(tv.models, name)().eval(), [torch.randn(16, 3, 224, 224, generator=g) for _ in range(4)]


def counts(report: af.AFIEReport, target: float) -> dict[str, int]:
    """Filters the paper's allocation removes per layer (every layer its own unit)."""
    aw = {ls.name: (ls.afie, ls.n_filters) for ls in report}
    total = sum(c for _, c in aw.values())
    max_target = sum(min(MAX_RATIO * c, c - 1) for _, c in aw.values()) / total
    ratios = allocate_ratios(aw, min(target, max_target), max_target)
    caps = {n: c - 1 for n, (_, c) in aw.items()}
    return round_counts({n: ratios[n] * c for n, (_, c) in aw.items()}, caps, round(min(target, max_target) * total))


def thinned_share(model, loader, budget) -> float:
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append(o.shape[2:]))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.inference_mode():
        model(loader[0][:1] if isinstance(loader[0], torch.Tensor) else loader[0][0][:1])
    for h in hooks:
        h.remove()
    return sum(stride_for(h, w, resolve(budget)) > 1 for h, w in shapes) / len(shapes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="digits_cnn,alexnet_mnist,resnet50,mobilenet_v2,efficientnet_b0,densenet121")
    ap.add_argument("--budgets", default="all,4096,1024,256")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    budgets = [b if b in ("all", "auto") else int(b) for b in args.budgets.split(",")]
    rows = []
    for name in args.models.split(","):
        model, loader = digits_model(name) if name in ("digits_cnn", "alexnet_mnist") else torchvision_model(name)
        inputs = [b[0] if isinstance(b, (tuple, list)) else b for b in loader]
        exact = af.score(model, inputs, positions="all", progress=False)
        ref_counts = {t: counts(exact, t) for t in TARGETS}

        def inference():
            with torch.inference_mode():
                for x in inputs:
                    model(x)

        fns = {"inference": inference}
        for b in budgets:
            fns[b] = lambda b=b: af.score(model, inputs, positions=b, progress=False)
        times = interleaved(fns, repeats=args.repeats)
        for b in budgets:
            errs, same = [], []
            for seed in range(args.seeds):
                rep = af.score(model, inputs, positions=b, seed=seed, progress=False)
                errs.append(max(abs(a.afie - e.afie) / e.afie for a, e in zip(rep, exact)))
                same.append(all(counts(rep, t) == ref_counts[t] for t in TARGETS))
            ratio = statistics.median(s / i for s, i in zip(times[b], times["inference"]))
            rows.append([name, str(b), f"{thinned_share(model, loader, b):.0%}", f"{max(errs):.1e}",
                         f"{sum(same)}/{len(same)}", f"{ratio:.2f}×"])
            print(rows[-1], file=sys.stderr, flush=True)
    print(table(["model", "positions", "layers thinned", "max AFIE rel. error", "allocation identical (seeds)",
                 "score / inference"], rows))
    print(f"\n{args.seeds} lattice seeds; allocation at {', '.join(f'{t:.0%}' for t in TARGETS)} of the filters; "
          f"{torch.get_num_threads()} threads; {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
