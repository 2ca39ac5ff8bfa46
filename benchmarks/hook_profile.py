"""Where score()'s time goes inside the forward pass: per conv layer, the accumulator
update as it runs in the hook (min over rounds) against the layer's own convolution.

    python benchmarks/hook_profile.py                      # VGG-16/CIFAR, 8 batches of 64
    python benchmarks/hook_profile.py --model resnet50 --batches 4 --batch-size 16
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import afie_fast as af  # noqa: E402
from afie_fast.models import INPUT_SHAPES, ZOO  # noqa: E402
from _timing import table  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vgg16_cifar", choices=sorted(ZOO))
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = ZOO[args.model]().eval()
    g = torch.Generator().manual_seed(0)
    loader = [torch.randn(args.batch_size, *INPUT_SHAPES[args.model], generator=g) for _ in range(args.batches)]
    convs = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    accs = {n: af.CovarianceAccumulator(m.out_channels, compute_dtype=torch.float32) for n, m in convs.items()}
    hook_s = {n: [] for n in convs}
    conv_s = {n: [] for n in convs}
    shapes, started = {}, {}

    def pre(name):
        def f(_m, _i):
            started[name] = time.perf_counter()
        return f

    def post(name):
        def f(_m, _i, y):  # returns None: the output is left alone
            t = time.perf_counter()
            accs[name].update(y)
            conv_s[name][-1] += t - started[name]
            hook_s[name][-1] += time.perf_counter() - t
            shapes[name] = tuple(y.shape)
        return f

    handles = [m.register_forward_pre_hook(pre(n)) for n, m in convs.items()]
    handles += [m.register_forward_hook(post(n)) for n, m in convs.items()]
    with torch.inference_mode():
        for r in range(args.rounds + 1):
            for n in convs:
                hook_s[n].append(0.0), conv_s[n].append(0.0)
            t = time.perf_counter()
            for x in loader:
                model(x)
            forward = time.perf_counter() - t
            if r == 0:  # warm-up
                for n in convs:
                    hook_s[n].clear(), conv_s[n].clear()
    for h in handles:
        h.remove()
    per_batch = lambda v: min(v) / args.batches * 1e3  # noqa: E731
    rows = [[n, str(shapes[n]), f"{per_batch(conv_s[n]):.2f}", f"{per_batch(hook_s[n]):.2f}",
             f"{min(hook_s[n]) / min(conv_s[n]):.2f}"] for n in convs]
    hooks, conv = sum(per_batch(v) for v in hook_s.values()), sum(per_batch(v) for v in conv_s.values())
    rows.append(["all convs", "", f"{conv:.1f}", f"{hooks:.1f}", f"{hooks / conv:.2f}"])
    print(f"{args.model}, {args.batches}×{args.batch_size}, ms per batch (min over {args.rounds} rounds); "
          f"last forward pass with hooks {forward / args.batches * 1e3:.0f} ms per batch")
    print(table(["layer", "output", "conv ms", "update ms", "update / conv"], rows))


if __name__ == "__main__":
    main()
