"""afie_fast on a CUDA device: score() against plain inference, and the accumulate
kernel's achieved rate against the device's peak.

torch.cuda.Event timing on the current stream, synchronised, warm-up, medians of 5.

    python benchmarks/bench_cuda.py          # needs a CUDA device and a CUDA build
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import afie_fast as af  # noqa: E402
from afie_fast.models import INPUT_SHAPES, ZOO  # noqa: E402
from _timing import table  # noqa: E402

MODELS = {"vgg16_cifar": (8, 256), "resnet50": (4, 64), "alexnet_mnist": (8, 256)}


def cuda_time(fn, repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds of fn() by CUDA events on the current stream."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench_cuda.py needs a CUDA device")
    info = af.backend_info()
    if not info["cuda_compiled"]:
        sys.exit("afie_fast was built without CUDA kernels (build with nvcc on PATH, AFIE_CUDA=ON)")
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.total_memory / 2**30:.0f} GiB, afie_fast {af.__version__}, torch {torch.__version__}\n")

    rows = []
    for name, (n, bs) in MODELS.items():
        model = ZOO[name]().cuda().eval()
        loader = [torch.randn(bs, *INPUT_SHAPES[name], device="cuda") for _ in range(n)]

        @torch.inference_mode()
        def inference():
            for x in loader:
                model(x)

        t_inf = cuda_time(inference)
        t_score = cuda_time(lambda: af.score(model, loader, progress=False))
        rows.append([f"{name}, {n}×{bs}", f"{t_inf * 1e3:.1f} ms", f"{t_score * 1e3:.1f} ms", f"{t_score / t_inf:.2f}×"])
    print("score() against plain inference (every conv scored; eigensolves on the host)")
    print(table(["model, batches×size", "inference", "afie_fast score", "ratio"], rows))

    rows = []
    for c, side, dtype, layout in [(64, 32, torch.float16, "NCHW"), (256, 8, torch.float16, "NCHW"),
                                   (512, 4, torch.bfloat16, "NHWC"), (512, 14, torch.float32, "NCHW"),
                                   (2048, 7, torch.float16, "NHWC")]:
        y = torch.randn(256, c, side, side, device="cuda").to(dtype)
        if layout == "NHWC":
            y = y.contiguous(memory_format=torch.channels_last)
        acc = af.CovarianceAccumulator(c, device="cuda", dtype=torch.float32)
        t = cuda_time(lambda: acc.update(y), repeats=10)
        m = y.shape[0] * side * side
        flops = c * (c + 1) * m  # the symmetric half, multiply + add
        rows.append([f"C={c}, {side}×{side}, N=256, {str(dtype)[6:]}, {layout}", f"{t * 1e3:.2f} ms",
                     f"{flops / t / 1e12:.2f}", f"{y.numel() * y.element_size() / t / 1e9:.0f}"])
    print("\naccumulate kernel (float32 accumulation, CUDA cores; compare with the device's FP32 peak,"
          " about 67 TFLOP/s on an H100 SXM, and its memory bandwidth)")
    print(table(["batch", "time", "TFLOP/s", "input GB/s"], rows))


if __name__ == "__main__":
    main()
