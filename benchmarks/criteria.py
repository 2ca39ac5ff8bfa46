"""Which filters to remove inside a layer, and AFIE's layer allocation against a uniform one.

On scikit-learn's digits: for each seed, train digits_cnn, score it on the training set,
then for every (allocation, criterion) prune 30/50/70% of the filters, fine-tune on a
fixed short schedule, and record test accuracy. Prints mean ± std over the seeds.

    python benchmarks/criteria.py            # 5 seeds, about 3 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import afie_fast as af
from afie_fast.data import load_digits
from afie_fast.models import digits_cnn
from afie_fast.training import accuracy, train

CRITERIA = ("l1", "variance", "independence", "random")
ALLOCATIONS = ("afie", "uniform")
TARGETS = (0.3, 0.5, 0.7)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=20, help="training epochs of the base model")
    p.add_argument("--finetune-epochs", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    tuned: dict[tuple, list[float]] = {}
    raw: dict[tuple, list[float]] = {}
    base_acc = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        split = load_digits(seed=seed)
        model = train(digits_cnn(), split.train_loader(64, seed), args.epochs)
        base_acc.append(accuracy(model, split.x_test, split.y_test))
        report = af.score(model, split.train_loader(256, seed, shuffle=False), progress=False,
                          criteria=("l1", "variance", "independence"))
        x = split.x_test[:1]
        for target in TARGETS:
            for alloc in ALLOCATIONS:
                for crit in CRITERIA:
                    pruned, _ = af.prune(model, report, target=target, example_inputs=x, criterion=crit,
                                         allocation=alloc, seed=seed)
                    raw.setdefault((alloc, crit, target), []).append(accuracy(pruned, split.x_test, split.y_test))
                    torch.manual_seed(seed)
                    ft = train(copy.deepcopy(pruned), split.train_loader(64, seed + 100), args.finetune_epochs, lr=1e-3)
                    tuned.setdefault((alloc, crit, target), []).append(accuracy(ft, split.x_test, split.y_test))
        print(f"seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True)

    def cell(v):
        return f"{100 * statistics.mean(v):5.1f} ± {100 * statistics.stdev(v) if len(v) > 1 else 0:4.1f}"

    print(f"\ndigits_cnn on sklearn digits, {args.seeds} seeds; unpruned test accuracy "
          f"{cell(base_acc)} %; fine-tune {args.finetune_epochs} epochs")
    for title, table in (("test accuracy after fine-tuning (%)", tuned), ("test accuracy right after pruning (%)", raw)):
        print(f"\n{title}")
        print("| allocation | criterion    | " + " | ".join(f"{t:.0%} filters" for t in TARGETS) + " |")
        print("|---|---|" + "---|" * len(TARGETS))
        for alloc in ALLOCATIONS:
            for crit in CRITERIA:
                print(f"| {alloc:<10} | {crit:<12} | " + " | ".join(cell(table[(alloc, crit, t)]) for t in TARGETS) + " |")
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
