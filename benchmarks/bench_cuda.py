"""afie_fast on a CUDA device: score() against plain inference, and the accumulate
kernel's achieved rates against the device's own ceilings.

Per model, dtype (the model and its inputs cast to it) and memory layout, three loops
over the same loader are timed in interleaved rounds by CUDA events (warm-up, then the
median of the rounds; ratios within a round):

  inference  the model alone;
  hooks      the model with score()'s forward hooks doing everything but the update
             (lattice view, Python dispatch): the cost of being called;
  stream     score()'s streaming pass: the hooks and the co-moment kernels.

"fixed" is the rest of one score(): copying the covariances to the host, the
eigensolves and the report, paid once however long the loader is.

    python benchmarks/bench_cuda.py                # needs a CUDA device and a CUDA build
    python benchmarks/bench_cuda.py --quick        # one model, fewer rounds
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import afie_fast as af  # noqa: E402
from afie_fast import scoring  # noqa: E402
from afie_fast.models import INPUT_SHAPES, ZOO  # noqa: E402
from afie_fast.positions import Lattice, resolve  # noqa: E402
from _timing import table  # noqa: E402


def mobilenet_v2():
    import torchvision

    return torchvision.models.mobilenet_v2(num_classes=1000)


MODELS = {  # name: (constructor, input shape, batch size, batches)
    "vgg16_cifar": (ZOO["vgg16_cifar"], INPUT_SHAPES["vgg16_cifar"], 256, 8),
    "resnet50": (ZOO["resnet50"], INPUT_SHAPES["resnet50"], 64, 8),
    "mobilenet_v2": (mobilenet_v2, (3, 224, 224), 64, 8),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def event_time(fn) -> float:
    """Seconds of fn() between two CUDA events on the current stream (synchronised)."""
    gc.collect()  # never inside a timed call
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def rounds(fns: dict, n: int, warmup: int = 1) -> dict[str, list[float]]:
    for _ in range(warmup):
        for fn in fns.values():
            event_time(fn)
    times = {k: [] for k in fns}
    for _ in range(n):
        for k, fn in fns.items():
            times[k].append(event_time(fn))
    return times


def bench_score(name: str, dtype: torch.dtype, layout: str, n_rounds: int) -> list[str]:
    build, shape, bs, n = MODELS[name]
    fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
    torch.manual_seed(0)
    model = build().cuda().to(dtype=dtype, memory_format=fmt).eval()
    loader = [torch.randn(bs, *shape, device="cuda").to(dtype).contiguous(memory_format=fmt) for _ in range(n)]
    convs = scoring.select_layers(model)
    lattice = Lattice(resolve("auto"), 0)

    @torch.inference_mode()
    def inference():
        for x in loader:
            model(x)

    def view_only(index):
        def hook(module, inputs, output):  # returns None: the output itself flows on
            lattice.view(output, index, 0)
        return hook

    def hooks():  # score()'s hook work without the update
        handles = [c.register_forward_hook(view_only(k)) for k, c in enumerate(convs.values())]
        try:
            inference()
        finally:
            for h in handles:
                h.remove()

    def stream():
        scoring.stream_activations(model, loader, convs, torch.device("cuda"), None, False, None, torch.float32, lattice)

    t = rounds({"inference": inference, "hooks": hooks, "stream": stream}, n_rounds)
    t_score = statistics.median(event_time(lambda: af.score(model, loader, progress=False)) for _ in range(3))
    inf, hk, st = (statistics.median(t[k]) for k in ("inference", "hooks", "stream"))
    ratio = statistics.median(s / i for s, i in zip(t["stream"], t["inference"]))
    return [f"{name}, {n}×{bs}", f"{str(dtype)[6:]}, {layout}", f"{inf / n * 1e3:.2f}", f"{hk / n * 1e3:.2f}",
            f"{st / n * 1e3:.2f}", f"{ratio:.2f}×", f"{(t_score - st) * 1e3:.0f}", f"{t_score / inf:.2f}×"]


def bench_kernel(c: int, side: int, dtype: torch.dtype, layout: str, copy_gbs: float) -> list[str]:
    y = torch.randn(64, c, side, side, device="cuda").to(dtype)
    if layout == "NHWC":
        y = y.contiguous(memory_format=torch.channels_last)
    acc = af.CovarianceAccumulator(c, device="cuda", dtype=torch.float32)
    times = [event_time(lambda: acc.update(y)) for _ in range(12)][2:]
    t = statistics.median(times)
    m = y.shape[0] * side * side
    flops = c * (c + 1) * m  # the upper triangle, multiply and add (3×TF32 does three of these)
    gbs = y.numel() * y.element_size() / t / 1e9
    return [f"C={c}, {side}×{side}, N=64, {str(dtype)[6:]}, {layout}", f"{t * 1e3:.3f} ms", f"{flops / t / 1e12:.1f}",
            f"{gbs:.0f}", f"{gbs / copy_gbs:.0%}"]


def copy_bandwidth() -> float:
    """GB/s of a large device-to-device copy (bytes read + written): the memory ceiling."""
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = statistics.median([event_time(lambda: y.copy_(x)) for _ in range(10)][2:])
    return 2 * x.numel() / t / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="ResNet-50 only, 3 rounds")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_cuda.py needs a CUDA device")
    info = af.backend_info()
    if not info["cuda_compiled"]:
        sys.exit("afie_fast was built without CUDA kernels (build with nvcc on PATH, AFIE_CUDA=ON)")
    props = torch.cuda.get_device_properties(0)
    copy_gbs = copy_bandwidth()
    print(f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
          f"copy {copy_gbs:.0f} GB/s; afie_fast {af.__version__}, torch {torch.__version__}\n")

    rows = []
    for c, side, dtype, layout in [(64, 56, torch.float16, "NHWC"), (256, 28, torch.float16, "NHWC"),
                                   (512, 14, torch.bfloat16, "NHWC"), (1024, 14, torch.float16, "NHWC"),
                                   (2048, 7, torch.float16, "NHWC"), (256, 28, torch.float32, "NCHW"),
                                   (1024, 14, torch.float32, "NCHW")]:
        rows.append(bench_kernel(c, side, dtype, layout, copy_gbs))
    print("accumulate kernel, float32 state (3×TF32 tensor cores): one update() = batch mean, "
          "co-moment, fold")
    print(table(["batch", "time", "TFLOP/s (1×)", "input GB/s", "of copy"], rows), flush=True)

    models = ["resnet50"] if args.quick else list(MODELS)
    n_rounds = 3 if args.quick else args.rounds
    rows = []
    for name in models:
        for dt in DTYPES.values():
            for layout in ("NCHW", "NHWC"):
                rows.append(bench_score(name, dt, layout, n_rounds))
                print(" | ".join(rows[-1]), flush=True)
    print("\nscore() against inference, per batch (ms), positions='auto'; "
          "fixed: ms once per score() (covariances to the host, eigensolves, report)")
    print(table(["model, batches×size", "dtype, layout", "inference", "+ hooks", "stream", "stream / inference",
                 "fixed", "score / inference"], rows))


if __name__ == "__main__":
    main()
