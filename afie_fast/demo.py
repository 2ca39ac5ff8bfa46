"""`afie-fast demo`: the whole job on real data (scikit-learn's digits), end to end."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from .calibration import recalibrate_bn
from .data import load_digits
from .models import digits_cnn
from .pruning import prune
from .saving import save_pruned
from .scoring import score
from .training import accuracy, latency_ms, train


def run_demo(out: Path, epochs: int = 30, finetune_epochs: int = 10, target: float = 0.5, seed: int = 0,
             progress: bool = True, distill: bool = False) -> dict:
    """Train digits_cnn, score it (both sources), prune ``target`` of its filters the
    paper's way, recalibrate BatchNorm, fine-tune (cross-entropy, the better recipe in
    benchmarks/recovery.py; distilling from the unpruned model with ``distill``), print one
    table and write report, pruned model and plot."""
    torch.manual_seed(seed)
    split = load_digits(seed=seed)
    say = print if progress else (lambda *a, **k: None)
    say(f"digits: {len(split.y_train)} train / {len(split.y_test)} test images (8×8, real handwriting)")

    model = train(digits_cnn(), split.train_loader(64, seed), epochs, progress=progress, desc="train")
    acc_before = accuracy(model, split.x_test, split.y_test)

    weights_report = score(model, progress=progress)
    report = score(model, split.train_loader(128, seed, shuffle=False), progress=progress)
    say(report.summary(target))

    x = split.x_test[:1]
    pruned, stats = prune(model, report, target=target, example_inputs=x)
    acc_pruned = accuracy(pruned, split.x_test, split.y_test)
    recalibrate_bn(pruned, split.train_loader(64, seed))  # what prune(..., calibrate=loader) does
    acc_recal = accuracy(pruned, split.x_test, split.y_test)
    tuned = train(copy.deepcopy(pruned), split.train_loader(64, seed + 1), finetune_epochs, lr=1e-3,
                  progress=progress, desc="fine-tune", teacher=model if distill else None)
    tuned.afie_fast_plan = pruned.afie_fast_plan
    acc_tuned = accuracy(tuned, split.x_test, split.y_test)

    batch = split.x_test[:256]
    lat_base, lat_pruned = latency_ms(model, batch), latency_ms(tuned, batch)
    recipe = "distilled" if distill else "cross-entropy"
    rows = [("original", acc_before, stats.params_before, stats.macs_before, lat_base),
            (f"pruned {target:.0%} filters", acc_pruned, stats.params_after, stats.macs_after, lat_pruned),
            ("+ BatchNorm recalibrated", acc_recal, stats.params_after, stats.macs_after, lat_pruned),
            (f"+ fine-tuned {finetune_epochs} ep ({recipe})", acc_tuned, stats.params_after, stats.macs_after,
             lat_pruned)]
    width = max(len(r[0]) for r in rows) + 2
    print()
    print(f"{'model':<{width}}{'test acc':>9}{'params':>10}{'MACs/img':>11}{'CPU ms/img':>12}")
    for name, acc, params, macs, lat in rows:
        print(f"{name:<{width}}{acc:>9.2%}{params:>10,}{macs:>11,}{lat:>12.4f}")
    print()
    print(stats.summary())

    out.mkdir(parents=True, exist_ok=True)
    report.save(out / "report_activations.json")
    weights_report.save(out / "report_weights.json")
    save_pruned(tuned, out / "pruned.safetensors")
    written = [out / "report_activations.json", out / "report_weights.json", out / "pruned.safetensors",
               report.plot(out / "afie.png")]
    print("wrote " + ", ".join(str(p) for p in written))
    return {"acc_before": acc_before, "acc_pruned": acc_pruned, "acc_recalibrated": acc_recal,
            "acc_tuned": acc_tuned, "stats": stats, "latency_ms": (lat_base, lat_pruned)}
