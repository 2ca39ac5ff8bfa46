"""The paper's stability claim: is each layer's AFIE after one epoch of training the same
as after full training? And how much of the layer ranking is layer shape alone?

Spearman correlations across layers, for both sources, between AFIE after epoch 1 and
after the last epoch, and between each and the shape-only baseline ln(p)/c_l. Because
min-max + softmax confine K_l to [ln p − 0.12, ln p], layers of different widths are
ordered by shape before any training; the informative part is the order among layers
of equal shape, reported as "same-shape pairs kept".

    python benchmarks/stability.py                          # digits_cnn and alexnet_mnist
    python benchmarks/stability.py --models digits_cnn --json
"""
from __future__ import annotations

import argparse
import itertools
import json
import math

import numpy as np
import torch

import afie_fast as af
from afie_fast.data import load_digits
from afie_fast.models import INPUT_SHAPES, ZOO
from afie_fast.training import accuracy, train

EPOCHS = {"digits_cnn": 20, "alexnet_mnist": 8}


def spearman(a, b) -> float:
    """Spearman's rho (average ranks for ties); NaN when either side is constant."""
    def ranks(x):
        x = np.asarray(x, dtype=np.float64)
        order = x.argsort(kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=np.float64)
        for v in np.unique(x):  # average the ranks of ties
            r[x == v] = r[x == v].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def same_shape_pairs(early: dict, late: dict, shape: dict) -> tuple[int, int]:
    """Pairs of equal-shape layers whose AFIE order is the same early and late."""
    kept = total = 0
    for a, b in itertools.combinations(early, 2):
        if shape[a] == shape[b] and early[a] != early[b]:
            total += 1
            kept += (early[a] < early[b]) == (late[a] < late[b])
    return kept, total


def measure(name: str, epochs: int, seed: int) -> dict:
    torch.manual_seed(seed)
    size = INPUT_SHAPES[name][-1]
    split = load_digits(seed=seed, size=size)
    model = ZOO[name](num_classes=10)
    loader = split.train_loader(64, seed)
    score_loader = split.train_loader(256, seed, shuffle=False)
    snapshots = {}
    train(model, loader, 1, lr=1e-3)
    snapshots["epoch1"] = {src: af.score(model, score_loader if src == "activations" else None, progress=False)
                           for src in ("activations", "weights")}
    train(model, loader, epochs - 1, lr=1e-3)
    snapshots["final"] = {src: af.score(model, score_loader if src == "activations" else None, progress=False)
                          for src in ("activations", "weights")}
    out = {"model": name, "epochs": epochs, "test_accuracy": accuracy(model, split.x_test, split.y_test), "sources": {}}
    for src in ("activations", "weights"):
        early = {ls.name: ls.afie for ls in snapshots["epoch1"][src]}
        late = {ls.name: ls.afie for ls in snapshots["final"][src]}
        base = {ls.name: ls.shape_baseline for ls in snapshots["final"][src]}
        shape = {ls.name: (ls.n_filters, len(ls.spectrum)) for ls in snapshots["final"][src]}
        gap = max(math.log(len(ls.spectrum)) - ls.entropy for r in snapshots.values() for ls in r[src])
        kept, total = same_shape_pairs(early, late, shape)
        out["sources"][src] = {
            "afie_epoch1": early, "afie_final": late, "shape_baseline": base,
            "rho_epoch1_final": spearman(list(early.values()), list(late.values())),
            "rho_epoch1_shape": spearman(list(early.values()), list(base.values())),
            "rho_final_shape": spearman(list(late.values()), list(base.values())),
            "max_gap_below_ln_p": gap, "same_shape_pairs_kept": kept, "same_shape_pairs": total,
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="digits_cnn,alexnet_mnist")
    p.add_argument("--epochs", type=int, help="override the per-model epoch count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(2)
    results = [measure(m, args.epochs or EPOCHS[m], args.seed) for m in args.models.split(",")]
    if args.json:
        print(json.dumps(results))
        return
    print("| model | source | epochs | test acc | ρ(epoch 1, final) | ρ(epoch 1, ln p/c) | ρ(final, ln p/c) "
          "| same-shape pairs kept | max ln p − K |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for src, s in r["sources"].items():
            print(f"| {r['model']} | {src} | {r['epochs']} | {r['test_accuracy']:.1%} | {s['rho_epoch1_final']:.3f} | "
                  f"{s['rho_epoch1_shape']:.3f} | {s['rho_final_shape']:.3f} | "
                  f"{s['same_shape_pairs_kept']}/{s['same_shape_pairs']} | {s['max_gap_below_ln_p']:.4f} |")


if __name__ == "__main__":
    main()
