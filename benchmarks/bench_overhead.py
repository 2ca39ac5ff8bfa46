"""score() over plain inference on the models people prune, beside each model's floor,
on an idle machine and with one of the two cores busy in another process.

Per model (random init, eval mode; 4 batches of 16 at 224², VGG-16/CIFAR 8 of 64 at 32²):
  forward MACs    every Conv2d and Linear of one batch
  co-moment MACs  C(C+1)/2 per observation of every conv, after score()'s default positions
                  budget, C the width it accumulates (a widening 1×1 conv's input): what
                  the covariances cost at the least
  floor           1 + co-moment MACs / forward MACs: score()'s ratio if the co-moments ran
                  at the forward's MAC rate and nothing else cost anything
  idle, shared    score() / inference, medians of interleaved rounds (in brackets: the
                  rounds' range); "shared": a busy loop in another process holds one core
                  meanwhile (as DataLoader workers do)

    python benchmarks/bench_overhead.py                      # ~6 min on 2 cores
    python benchmarks/bench_overhead.py --models mobilenet_v2 --repeats 3

The run keeps freed memory in the process (glibc's MALLOC_MMAP_THRESHOLD_, _TRIM_THRESHOLD_
and _TOP_PAD_, set by re-running itself; --system-malloc leaves glibc's defaults): with
them, glibc hands every activation above its mmap threshold back to the OS when it is
freed, so each forward page-faults its activations in again. On EfficientNet-B0 that was
5-7 s of system time in 5 rounds, inference 2.5x slower, and a ratio that moved from
1.37x to 1.59x between runs (1.82-1.85x with the memory kept).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import afie_fast as af
from afie_fast.models import ZOO
from afie_fast.observe import Observed
from afie_fast.positions import AUTO_POSITIONS, stride_for

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from _timing import interleaved, table  # noqa: E402

MODELS = "vgg16_cifar,resnet50,mobilenet_v2,efficientnet_b0,densenet121"
# glibc keeps freed blocks up to 32 MiB in the heap and never trims it (jemalloc and
# tcmalloc behave so by default); read at start-up, hence the re-run.
KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "17179869184",
                     "MALLOC_TOP_PAD_": "1073741824"}


def keep_freed_memory() -> None:
    """Re-run this script with KEEP_FREED_MEMORY in its environment, unless already so."""
    if any(os.environ.get(k) != v for k, v in KEEP_FREED_MEMORY.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **KEEP_FREED_MEMORY})


def build(name: str) -> tuple[nn.Module, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name in ZOO:
        from afie_fast.models import INPUT_SHAPES

        n, size = (8, 64) if name == "vgg16_cifar" else (4, 16)
        return ZOO[name]().eval(), [torch.randn(size, *INPUT_SHAPES[name], generator=g) for _ in range(n)]
    from conftest import import_torchvision  # the test shim: torchvision's CUDA wheel beside a CPU torch

    model = getattr(import_torchvision().models, name)().eval()
    return model, [torch.randn(16, 3, 224, 224, generator=g) for _ in range(4)]


def macs(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(forward MACs, co-moment MACs under the default positions) of one batch."""
    fwd, cov = [0.0], [0.0]

    def hook(m, _i, y):
        if isinstance(m, nn.Conv2d):
            fwd[0] += y.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            n, _, h, w = y.shape
            s = stride_for(h, w, AUTO_POSITIONS)
            c = Observed(m).channels  # a widening 1×1 conv accumulates its input
            cov[0] += n * -(-h // s) * -(-w // s) * c * (c + 1) / 2
        else:
            fwd[0] += y.numel() * m.in_features

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    return fwd[0], cov[0]


def spin() -> None:
    while True:
        pass


def ratios(model: nn.Module, loader: list[torch.Tensor], repeats: int) -> str:
    """score / inference: the median over interleaved rounds, and the rounds' range (how
    much the machine moved the figure in this run)."""
    def inference():
        with torch.inference_mode():
            for x in loader:
                model(x)

    t = interleaved({"inference": inference, "score": lambda: af.score(model, loader, progress=False)}, repeats)
    r = [s / i for s, i in zip(t["score"], t["inference"])]
    return f"{statistics.median(r):.2f}× ({min(r):.2f}–{max(r):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--system-malloc", action="store_true", help="glibc's default allocator settings (see above)")
    args = ap.parse_args()
    if not args.system_malloc:
        keep_freed_memory()
    torch.set_num_threads(2)
    start = time.perf_counter()
    rows = []
    for name in args.models.split(","):
        model, loader = build(name)
        fwd, cov = macs(model, loader[0])
        idle = ratios(model, loader, args.repeats)
        busy = mp.get_context("spawn").Process(target=spin, daemon=True)
        busy.start()
        try:
            shared = ratios(model, loader, args.repeats)
        finally:
            busy.terminate()
            busy.join()
        rows.append([name, f"{fwd / 1e9:.2f} G", f"{cov / 1e9:.2f} G", f"{1 + cov / fwd:.2f}×", idle, shared])
        print(rows[-1], file=sys.stderr, flush=True)
    print(table(["model", "forward MACs / batch", "co-moment MACs / batch", "floor", "score / inference, idle",
                 "shared core"], rows))
    malloc = "glibc defaults" if args.system_malloc else "freed memory kept (MALLOC_* above)"
    print(f"\n{torch.get_num_threads()} threads, {args.repeats} interleaved rounds, medians; default positions "
          f"(≤ {AUTO_POSITIONS} per image and layer); {malloc}; {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
