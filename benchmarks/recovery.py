"""Accuracy after pruning on real data (scikit-learn's digits): right after removing
filters (raw, then with BatchNorm recalibration), and after 1, 3 and 10 fine-tuning
epochs with cross-entropy or with distillation from the unpruned model.

For each model and seed: train, score (activations); for each FLOPs target: prune with
the paper's allocation, then fine-tune the recalibrated copy for 10 epochs twice (once per
recipe, same data order), reading the test accuracy after epochs 1, 3 and 10 of that one
cosine schedule. Prints one Markdown table of mean ± std over the seeds.

    python benchmarks/recovery.py                              # 2 models × 5 seeds × 30/50/70%
    python benchmarks/recovery.py --models digits_cnn --seeds 2
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

CHECKPOINTS = (1, 3, 10)


def run_seed(name: str, seed: int, targets: list[float], epochs: int) -> dict[float, dict[str, float]]:
    """Train once, then for each FLOPs target: prune, recalibrate, fine-tune both ways."""
    torch.manual_seed(seed)
    split = load_digits(seed=seed, size=INPUT_SHAPES[name][-1])
    model = train(ZOO[name](), split.train_loader(64, seed), epochs)
    report = af.score(model, split.train_loader(128, seed, shuffle=False), progress=False)
    results = {}
    for target in targets:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            pruned, _ = af.prune(model, report, target=target, unit="flops", example_inputs=split.x_test[:1])
        out = {"original": accuracy(model, split.x_test, split.y_test),
               "raw": accuracy(pruned, split.x_test, split.y_test)}
        af.recalibrate_bn(pruned, split.train_loader(64, seed))
        out["recal"] = accuracy(pruned, split.x_test, split.y_test)
        for recipe, teacher in (("ce", None), ("kd", model)):
            def record(epoch, m, recipe=recipe):
                if epoch in CHECKPOINTS:
                    out[f"{recipe}{epoch}"] = accuracy(m, split.x_test, split.y_test)
            torch.manual_seed(seed + 1)
            train(copy.deepcopy(pruned), split.train_loader(64, seed + 1), max(CHECKPOINTS), lr=1e-3,
                  teacher=teacher, on_epoch=record)
        results[target] = out
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="digits_cnn,alexnet_mnist")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--targets", default="0.3,0.5,0.7")
    ap.add_argument("--epochs", type=int, default=20, help="training epochs before pruning")
    args = ap.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    cols = ["original", "raw", "recal", *(f"{r}{e}" for r in ("ce", "kd") for e in CHECKPOINTS)]
    rows = []
    targets = [float(t) for t in args.targets.split(",")]
    for name in args.models.split(","):
        by_seed = [run_seed(name, seed, targets, args.epochs) for seed in range(args.seeds)]
        for target in targets:
            runs = [r[target] for r in by_seed]
            cells = []
            for c in cols:
                v = [100 * r[c] for r in runs]
                cells.append(f"{statistics.mean(v):.1f} ± {statistics.stdev(v) if len(v) > 1 else 0:.1f}")
            rows.append([name, f"{target:.0%}", *cells])
            print(rows[-1], file=sys.stderr, flush=True)
    head = ["model", "FLOPs cut", "original", "pruned", "+ BN recal", *(f"CE {e} ep" for e in CHECKPOINTS),
            *(f"KD {e} ep" for e in CHECKPOINTS)]
    print(table(head, rows))
    print(f"\n{args.seeds} seeds, test accuracy %, mean ± std; {time.perf_counter() - start:.0f} s on "
          f"{torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
