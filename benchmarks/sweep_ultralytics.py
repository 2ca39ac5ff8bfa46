"""prune() at its defaults (target 0.5, unit="flops") over Ultralytics' YOLO detectors,
segmenters and classifiers, built from their model YAMLs (random init: nothing is
downloaded), with prune_residual off (the default) and on. Needs `pip install ultralytics`.

Per row: stats.reached; "FlopCounterMode": 1 − pruned/original MACs as torch counts them;
the share of the MACs in layers a cut can reach; convs left whole; whether every output
tensor (boxes, scores, the features the Detect head returns) kept its shape; whether a
backward still runs through the original and the pruned model, in eval and train mode.

    python benchmarks/sweep_ultralytics.py                      # ~1 min
    python benchmarks/sweep_ultralytics.py --models yolov8s.yaml --size 320
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils._pytree import tree_leaves

import afie_fast as af

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
import reference  # noqa: E402
from _timing import table  # noqa: E402
from conftest import import_torchvision  # noqa: E402  (the shim: torchvision's CUDA wheel beside a CPU torch)

MODELS = ("yolov5n.yaml,yolov8n.yaml,yolov8s.yaml,yolov8n-seg.yaml,yolov8n-cls.yaml,yolov9t.yaml,yolov10n.yaml,"
          "yolo11n.yaml,yolo11n-seg.yaml")


def _shapes(out) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def _backward_runs(model: torch.nn.Module, x: torch.Tensor) -> bool:
    """A backward through an eval-mode and a train-mode forward (what a tracer or an
    exporter, and then training, run): tensors the model cached while scored must allow it."""
    try:
        for training in (False, True):
            model.train(training)
            sum(t.float().mean() for t in tree_leaves(model(x)) if isinstance(t, torch.Tensor)).backward()
        return True
    except RuntimeError:
        return False
    finally:
        model.eval()


def one(name: str, size: int, prune_residual: bool) -> list[str]:
    from ultralytics.nn.tasks import ClassificationModel, DetectionModel, SegmentationModel

    torch.manual_seed(0)
    kind = ClassificationModel if "-cls" in name else SegmentationModel if "-seg" in name else DetectionModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = kind(name, verbose=False).eval()
    x = torch.randn(2, 3, size, size)
    start = time.perf_counter()
    report = af.score(model, [x], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned, stats = af.prune(model, report, target=0.5, unit="flops", example_inputs=x[:1], progress=False,
                                 prune_residual=prune_residual)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        shapes_kept = _shapes(pruned(x)) == _shapes(model(x))
    backward = _backward_runs(model, x) and _backward_runs(pruned, x)
    (before, _), (after, _) = reference.macs_and_params(model, x[:1]), reference.macs_and_params(pruned, x[:1])
    return [name, "on" if prune_residual else "off", f"{stats.reached:.1%}", f"{1 - after / before:.1%}",
            f"{stats.prunable_macs:.0%}", str(len(stats.skipped)), "yes" if shapes_kept else "NO",
            "yes" if backward else "NO", f"{seconds:.1f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--size", type=int, default=160)
    args = ap.parse_args()
    torch.set_num_threads(2)
    import_torchvision()  # before ultralytics imports it
    rows = []
    for name in args.models.split(","):
        for prune_residual in (False, True):
            try:
                rows.append(one(name, args.size, prune_residual))
            except Exception as exc:  # noqa: BLE001 - the error is the result
                rows.append([name, "", f"{type(exc).__name__}: {str(exc)[:150]}", "", "", "", "", "", ""])
            print(rows[-1], file=sys.stderr, flush=True)
    print(table(["model YAML", "prune_residual", "stats.reached", "FlopCounterMode", "prunable MACs", "convs whole",
                 "output shapes kept", "backward after", "score + prune s"], rows))


if __name__ == "__main__":
    main()
