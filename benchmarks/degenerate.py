"""What a weights report should give a layer whose spectrum has one value, measured on
real MNIST: alexnet_mnist's first conv (one input channel) has AFIE 0 by shape alone, and
the paper's allocation caps it at 0.99 (63 of its 64 filters at a 30% target).

For each seed: train alexnet_mnist for --epochs on --train-images real MNIST images, score
it from its weights (the paper's data-free AFIE), prune --targets of the filters under each
policy ("cap", "uniform", "whole"), recalibrate BatchNorm, fine-tune for --finetune epochs,
and test on the 10,000 MNIST test images. Prints one table of mean ± std over seeds.

    python benchmarks/degenerate.py                       # 2 seeds, 12,000 images, 1 + 1 epochs
    python benchmarks/degenerate.py --seeds 3 --train-images 60000
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch.utils.data import DataLoader, Subset

import afie_fast as af
from afie_fast.data import mnist
from afie_fast.models import alexnet_mnist
from afie_fast.report import DEGENERATE, text_table
from afie_fast.training import accuracy, train


def test_accuracy(model, x, y) -> float:
    return 100 * accuracy(model, x, y, batch_size=1000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--train-images", type=int, default=12_000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--finetune", type=int, default=1)
    ap.add_argument("--targets", default="0.3,0.5")
    args = ap.parse_args()
    torch.set_num_threads(2)
    targets = [float(t) for t in args.targets.split(",")]
    train_set, test_set = mnist("train"), mnist("test")
    x_test, y_test = test_set.tensors
    results: dict[tuple[float, str], list[float]] = {}
    first_conv: dict[tuple[float, str], int] = {}
    base, start = [], time.perf_counter()
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        subset = Subset(train_set, torch.randperm(len(train_set))[:args.train_images].tolist())
        loader = DataLoader(subset, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(seed))
        model = train(alexnet_mnist(), loader, epochs=args.epochs)
        base.append(test_accuracy(model, x_test, y_test))
        report = af.score(model, source="weights", progress=False)
        for target in targets:
            for policy in DEGENERATE:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    pruned, stats = af.prune(model, report, target=target, example_inputs=x_test[:1],
                                             calibrate=loader, degenerate=policy, progress=False)
                train(pruned, loader, epochs=args.finetune)
                results.setdefault((target, policy), []).append(test_accuracy(pruned, x_test, y_test))
                first_conv[target, policy] = stats.kept["0"][1]
        print(f"seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True)
    mean_std = lambda v: f"{statistics.mean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.2f}"
    rows = [(f"{t:.0%}", p, f"{first_conv[t, p]}/64", mean_std(results[t, p])) for t in targets for p in DEGENERATE]
    print(text_table(("filters cut", "degenerate", "conv1 kept", "test acc %"), rows))
    print(f"unpruned: {mean_std(base)} %; {args.seeds} seeds, {args.train_images:,} training images, "
          f"{args.epochs} + {args.finetune} epochs; {time.perf_counter() - start:.0f} s on "
          f"{torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
