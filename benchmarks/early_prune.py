"""The paper's claim as a user would use it: prune after one epoch of training instead of
after a full training, on real data (scikit-learn's digits).

Routes, for each seed and FLOPs target (E training epochs, F fine-tuning epochs):
  full        train E epochs → score (activations) → prune → fine-tune F epochs
  early-act   train 1 epoch → score (activations) → prune → train E + F − 1 epochs
  early-w     the same, scored from the weights (the paper's data-free AFIE)
  early-unif  the same, with a uniform per-layer ratio instead of AFIE's allocation
Every route sees E + F epochs of data. Printed: final test accuracy (mean ± std over
the seeds) and the CPU seconds each route spent training (mean).

    python benchmarks/early_prune.py                           # digits_cnn, 5 seeds, 30/50/70%
    python benchmarks/early_prune.py --models alexnet_mnist --seeds 2
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import afie_fast as af
from afie_fast.data import load_digits
from afie_fast.models import INPUT_SHAPES, ZOO
from afie_fast.training import accuracy, train

sys.path.insert(0, str(Path(__file__).parent))
from _timing import table  # noqa: E402

ROUTES = ("full", "early-act", "early-w", "early-unif")


def timed_train(model, loader, epochs, **kw):
    start = time.process_time()
    train(model, loader, epochs, **kw)
    return time.process_time() - start


def run_seed(name: str, seed: int, targets: list[float], e: int, f: int) -> dict[tuple[str, float], tuple[float, float]]:
    """(route, target) -> (test accuracy, CPU seconds of training)."""
    split = load_digits(seed=seed, size=INPUT_SHAPES[name][-1])
    x1 = split.x_test[:1]
    torch.manual_seed(seed)
    init = ZOO[name]()
    base, early = copy.deepcopy(init), copy.deepcopy(init)  # the same start for every route
    t_full = timed_train(base, split.train_loader(64, seed), e)
    t_one = timed_train(early, split.train_loader(64, seed), 1)
    scoring = split.train_loader(128, seed, shuffle=False)
    reports = {"full": af.score(base, scoring, progress=False), "early-act": af.score(early, scoring, progress=False),
               "early-w": af.score(early, progress=False)}
    reports["early-unif"] = reports["early-act"]
    out = {}
    for target in targets:
        for route in ROUTES:
            src = base if route == "full" else early
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                pruned, _ = af.prune(src, reports[route], target=target, unit="flops", example_inputs=x1,
                                     allocation="uniform" if route == "early-unif" else "afie",
                                     calibrate=split.train_loader(64, seed))
            torch.manual_seed(seed + 1)
            epochs = f if route == "full" else e + f - 1
            t = timed_train(pruned, split.train_loader(64, seed + 1), epochs, lr=1e-3)
            spent = (t_full if route == "full" else t_one) + t
            out[route, target] = (accuracy(pruned, split.x_test, split.y_test), spent)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="digits_cnn")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--targets", default="0.3,0.5,0.7")
    ap.add_argument("--epochs", type=int, default=20, help="E: full training epochs")
    ap.add_argument("--finetune", type=int, default=5, help="F: fine-tuning epochs after pruning")
    args = ap.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    targets = [float(t) for t in args.targets.split(",")]
    rows = []
    for name in args.models.split(","):
        runs = [run_seed(name, seed, targets, args.epochs, args.finetune) for seed in range(args.seeds)]
        for target in targets:
            cells = []
            for route in ROUTES:
                acc = [100 * r[route, target][0] for r in runs]
                cpu = statistics.mean(r[route, target][1] for r in runs)
                sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
                cells.append(f"{statistics.mean(acc):.1f} ± {sd:.1f} ({cpu:.0f} s)")
            rows.append([name, f"{target:.0%}", *cells])
            print(rows[-1], file=sys.stderr, flush=True)
    print(table(["model", "FLOPs cut", *ROUTES], rows))
    print(f"\nE={args.epochs}, F={args.finetune}, {args.seeds} seeds: final test accuracy %, mean ± std "
          f"(CPU seconds of training, mean); {time.perf_counter() - start:.0f} s wall")


if __name__ == "__main__":
    main()
