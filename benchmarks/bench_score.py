"""afie_fast.score against plain inference and the scorers a user would otherwise write.

All CPU, 2 threads, warm-up, medians. Per model (random init, eval mode, fixed inputs):
  inference     the forward passes alone over the same loader
  afie_fast     af.score(model, loader): every conv's covariance, eigensolve, AFIE
  pure torch    hooks + float64 f @ f.T per batch + torch.linalg.eigvalsh (plainly written)
  HRank-style   hooks + torch.linalg.matrix_rank of every feature map (HRank's importance)
  weights AFIE  the paper's data-free AFIE: af.score(model)
plus the agreement of afie_fast's AFIE with the pure-torch float64 scorer, peak RSS for 1
vs 50 batches (each in its own subprocess), the eigensolves of all layers, the
independence criterion on VGG-16, and CPU latency of pruned VGG-16 against its FLOPs cut.

    python benchmarks/bench_score.py                 # all of it, ~15 min on 2 cores
    python benchmarks/bench_score.py --models vgg16_cifar --skip-memory --skip-prune
"""
from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import afie_fast as af  # noqa: E402
from afie_fast import _ext  # noqa: E402
from afie_fast.models import INPUT_SHAPES, ZOO  # noqa: E402
from _timing import interleaved, median_time, table  # noqa: E402

SETTINGS = {"vgg16_cifar": (8, 64), "resnet50": (4, 16), "alexnet_mnist": (8, 64)}  # (batches, batch size)


def batches_for(name: str, n: int | None = None) -> list[torch.Tensor]:
    count, size = SETTINGS[name]
    g = torch.Generator().manual_seed(0)
    return [torch.randn(size, *INPUT_SHAPES[name], generator=g) for _ in range(n or count)]


@torch.inference_mode()
def inference(model: nn.Module, loader) -> None:
    for x in loader:
        model(x)


def hooked(model: nn.Module, loader, on_output) -> None:
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: on_output(name, o))
             for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        inference(model, loader)
    finally:
        for h in hooks:
            h.remove()


def torch_scorer(model: nn.Module, loader) -> dict[str, float]:
    """What one writes with torch alone: float64 Gram matrices, then eigvalsh."""
    sums: dict[str, list] = {}

    def acc(name, y):
        f = y.permute(1, 0, 2, 3).reshape(y.shape[1], -1).double()
        s = sums.setdefault(name, [0, 0.0, 0.0])
        s[0] += f.shape[1]
        s[1] = s[1] + f.sum(1)
        s[2] = s[2] + f @ f.T

    hooked(model, loader, acc)
    out = {}
    for name, (n, s1, s2) in sums.items():
        mu = s1 / n
        cov = (s2 - n * torch.outer(mu, mu)) / (n - 1)
        e = torch.linalg.eigvalsh(cov).clamp(min=0)
        s = e.sqrt()
        t = (s - s.min()) / (s.max() - s.min()) if s.max() - s.min() > 1e-12 * s.max() else torch.zeros_like(s)
        q = torch.softmax(t, 0)
        out[name] = float(-(q * q.log()).sum()) / y_channels(model, name)
    return out


def y_channels(model: nn.Module, name: str) -> int:
    return dict(model.named_modules())[name].out_channels


def hrank_scorer(model: nn.Module, loader) -> dict[str, torch.Tensor]:
    """HRank (Lin et al., 2020): average rank of each filter's feature maps."""
    ranks: dict[str, torch.Tensor] = {}

    def acc(name, y):
        r = torch.linalg.matrix_rank(y.float()).float().sum(0)
        ranks[name] = ranks.get(name, 0) + r

    hooked(model, loader, acc)
    return ranks


MEMORY_SCRIPT = """
import resource, sys, torch, afie_fast as af
from afie_fast.models import ZOO, INPUT_SHAPES
torch.set_num_threads(2)
name, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = ZOO[name]().eval()
def loader():
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        yield torch.randn(size, *INPUT_SHAPES[name], generator=g)
af.score(model, loader(), progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_mib(name: str, n: int, size: int) -> float:
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, name, str(n), str(size)], capture_output=True, text=True,
                         check=True, cwd="/")
    return int(out.stdout.strip()) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="vgg16_cifar,resnet50,alexnet_mnist")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--skip-hrank", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-prune", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(2)
    print(f"afie_fast {af.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{af.backend_info()['blas_config']}\n")

    rows, agree = [], []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = ZOO[name]().eval()
        loader = batches_for(name)
        n, bs = SETTINGS[name]
        # inference, afie_fast and pure torch in turn each round; ratios within a round
        runs = interleaved({"inf": lambda: inference(model, loader), "af": lambda: af.score(model, loader, progress=False),
                            "torch": lambda: torch_scorer(model, loader)}, args.repeats)
        t_inf, t_af, t_torch = (statistics.median(runs[k]) for k in ("inf", "af", "torch"))
        ratio = {k: statistics.median(a / b for a, b in zip(runs[k], runs["inf"])) for k in ("af", "torch")}
        t_w = median_time(lambda: af.score(model, progress=False), args.repeats)
        t_hr = float("nan") if args.skip_hrank else median_time(lambda: hrank_scorer(model, loader), 1, warmup=0)
        rel = lambda t, r=None: f"{t:.2f} s ({(r if r is not None else t / t_inf):.2f}×)"
        rows.append([f"{name}, {n}×{bs}", f"{t_inf:.2f} s", rel(t_af, ratio["af"]), rel(t_torch, ratio["torch"]),
                     "skipped" if math.isnan(t_hr) else rel(t_hr), f"{t_hr / t_af:.1f}×" if not math.isnan(t_hr) else "-",
                     f"{t_w * 1e3:.0f} ms"])
        # Arithmetic against the reference, which reads every position: positions="all" here
        # (the timed score() uses the default budget, which thins maps over 32×32).
        report = af.score(model, loader, progress=False, positions="all")
        reference = torch_scorer(model, loader)
        exact = af.score(model, loader, progress=False, precision="float64", positions="all")
        agree.append([name, f"{max(abs(ls.afie - reference[ls.name]) / reference[ls.name] for ls in report):.1e}",
                      f"{max(abs(ls.afie - reference[ls.name]) / reference[ls.name] for ls in exact):.1e}"])
    print("score() against plain inference over the same loader (median time, and median of the per-round "
          "ratio to inference)")
    print(table(["model, batches×size", "inference", "afie_fast score", "pure torch f64", "HRank-style",
                 "HRank / afie_fast", "weights AFIE"], rows))
    print("\nagreement with the pure-torch float64 scorer: max relative AFIE difference over layers")
    print(table(["model", "precision='float32' (default)", "precision='float64'"], agree))

    # eigensolves of all VGG-16 layers, and the independence criterion
    model = ZOO["vgg16_cifar"]().eval()
    loader = batches_for("vgg16_cifar")
    covs: dict[str, af.CovarianceAccumulator] = {}

    def accumulate(name, y):  # a hook that returns None leaves the output alone
        covs.setdefault(name, af.CovarianceAccumulator(y.shape[1])).update(y)

    hooked(model, loader, accumulate)
    mats = [acc.covariance() for acc in covs.values()]
    t_ours = median_time(lambda: _ext.eigh_many(mats), 5)
    t_single = median_time(lambda: _ext.eigh_many(mats, single=True), 5)
    t_ref = median_time(lambda: [torch.linalg.eigvalsh(c) for c in mats], 5)
    t_vec = median_time(lambda: _ext.eigh_many(mats, vectors=True), 3)
    pairs = _ext.eigh_many(mats, vectors=True)
    t_loo = median_time(lambda: [_ext.leave_one_out(w, v) for w, v in pairs], 1, warmup=0)
    t_indep = median_time(lambda: af.score(model, loader, progress=False, criteria=("independence",)), 1, warmup=0)
    print("\nVGG-16 (13 convs): eigensolves and the independence criterion")
    print(table(["operation", "afie_fast", "torch.linalg.eigvalsh (float64)"], [
        ["eigenvalues of all 13 covariances, float64", f"{t_ours * 1e3:.1f} ms", f"{t_ref * 1e3:.1f} ms ({t_ref / t_ours:.2f}× ours)"],
        ["eigenvalues, float32 (score()'s default)", f"{t_single * 1e3:.1f} ms", f"({t_ref / t_single:.2f}× ours)"],
        ["eigenpairs of all 13 covariances", f"{t_vec * 1e3:.1f} ms", ""],
        ["leave-one-out spectra, all 4,224 filters", f"{t_loo:.2f} s", ""],
        ["score(criteria=('independence',)) end to end", f"{t_indep:.2f} s", ""]]))

    if not args.skip_memory:
        rows = []
        for name, size in (("vgg16_cifar", 64), ("alexnet_mnist", 64)):
            one, fifty = peak_rss_mib(name, 1, size), peak_rss_mib(name, 50, size)
            rows.append([name, f"{one:.0f} MiB", f"{fifty:.0f} MiB", f"{fifty - one:+.0f} MiB"])
        print("\npeak RSS of score() in a fresh process, 1 vs 50 batches")
        print(table(["model", "1 batch", "50 batches", "difference"], rows))

    if not args.skip_prune:
        model = ZOO["vgg16_cifar"]().eval()
        report = af.score(model, batches_for("vgg16_cifar"), progress=False)
        x = torch.randn(64, 3, 32, 32)
        t0 = median_time(lambda: inference(model, [x]), 7)
        rows = []
        for target in (0.3, 0.5, 0.7):
            pruned, stats = af.prune(model, report, target=target, example_inputs=x[:1])
            t = median_time(lambda: inference(pruned.eval(), [x]), 7)
            flops_cut, lat_cut = 1 - stats.macs_after / stats.macs_before, 1 - t / t0
            rows.append([f"{target:.0%}", f"{flops_cut:.1%}", f"{t0 * 1e3:.1f} → {t * 1e3:.1f} ms", f"{lat_cut:.1%}",
                         f"{lat_cut / flops_cut:.2f}"])
        print("\npruned VGG-16/CIFAR, CPU latency of a batch of 64 against the FLOPs cut")
        print(table(["filters removed", "FLOPs cut", "latency", "latency cut", "latency cut / FLOPs cut"], rows))


if __name__ == "__main__":
    main()
