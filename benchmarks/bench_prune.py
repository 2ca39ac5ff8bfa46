"""prune() time against its floor: one Torch-Pruning dependency graph and its groups.

prune(unit="flops") traces the model once, reads its couplings into units, searches the
FLOPs target on a cost model of that graph and measures the result once. Its floor is
one `build_dependency` + `get_all_groups` (what any Torch-Pruning user pays); the issue's
bound is 3× that. Both are timed in interleaved rounds on the same model.

    python benchmarks/bench_prune.py                     # ResNet-50/224 and torchvision's families
    python benchmarks/bench_prune.py --models resnet50 --rounds 5
    python benchmarks/bench_prune.py --models densenet201,efficientnet_b7 --size 64   # large graphs
    python benchmarks/bench_prune.py --models timm:rexnet_100,timm:dpn68              # timm's
"""
from __future__ import annotations

import argparse
import contextlib
import signal
import statistics
import sys
import warnings
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn

import afie_fast as af
from afie_fast.coupling import build_graph
from afie_fast.models import resnet50

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from _timing import interleaved, table  # noqa: E402

TORCHVISION = ["resnet18", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2", "mobilenet_v3_large",
               "efficientnet_b0", "densenet121", "squeezenet1_1", "googlenet", "inception_v3", "shufflenet_v2_x1_0",
               "regnet_y_400mf", "mnasnet0_5", "convnext_tiny", "vgg11_bn", "alexnet"]
LINEAR = {"convnext_tiny"}  # its width is in nn.Linear MLPs: scored with linear=True


def build(name: str, size: int | None = None) -> tuple[nn.Module, torch.Tensor]:
    size = size or (299 if name == "inception_v3" else 224)
    if name == "resnet50":
        return resnet50().eval(), torch.randn(1, 3, size, size)
    from conftest import import_timm, import_torchvision  # the shim: torchvision's CUDA wheel beside a CPU torch

    if name.startswith("timm:"):
        return import_timm().create_model(name[5:], pretrained=False).eval(), torch.randn(1, 3, size, size)

    tv = import_torchvision()
    kw = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    return getattr(tv.models, name)(**kw).eval(), torch.randn(1, 3, size, size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(["resnet50", *TORCHVISION]))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=None, help="input pixels (default 224, Inception v3 299)")
    ap.add_argument("--floor-limit", type=int, default=300, help="seconds before the floor is given up")
    args = ap.parse_args()
    torch.set_num_threads(2)
    # Randomly initialised MobileNet v3 runs into denormal floats, which make a CPU forward
    # 50x slower (2 s instead of 40 ms); trained weights do not, so neither should this.
    torch.set_flush_denormal(True)
    rows = []
    for name in args.models.split(","):
        model, x = build(name, args.size)
        report = af.score(model, source="weights", progress=False, linear=name in LINEAR)

        def floor():
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)
            return list(dg.get_all_groups(root_module_types=[nn.Conv2d]))

        given_up = None
        try:
            with time_limit(args.floor_limit):
                floor()
        except ZeroDivisionError:  # Torch-Pruning alone cannot trace a channel shuffle: afie_fast's tolerant trace
            def floor():
                return list(build_graph(model, x).groups([]))
            name += "*"
        except TimeoutError:
            given_up = f"> {args.floor_limit}"
        except Exception as exc:  # noqa: BLE001 - what Torch-Pruning alone raises is the result
            given_up = f"fails ({type(exc).__name__})"

        def run_prune():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return af.prune(model, report, target=0.5, unit="flops", example_inputs=x)

        # prune() pauses the garbage collector and leaves its garbage for after it returns:
        # a collection before each call keeps the floor from paying for it.
        fns = {"prune": run_prune} if given_up else {"floor": floor, "prune": run_prune}
        times = interleaved(fns, repeats=args.rounds, warmup=0, collect=True)
        pruned, stats = run_prune()
        changed = sum(a < b for b, a in stats.kept.values())
        if given_up:
            floor_s, ratio = given_up, "—"
        else:
            floor_s = f"{statistics.median(times['floor']):.2f}"
            ratio = f"{statistics.median(p / f for p, f in zip(times['prune'], times['floor'])):.2f}×"
        rows.append([name, floor_s, f"{statistics.median(times['prune']):.2f}",
                     ratio, f"{stats.reached:.1%}", f"{changed}/{len(stats.kept)}",
                     f"{stats.prunable_macs:.0%}", "cut" if stats.residual_streams else "whole",
                     exports_and_reloads(name.rstrip("*"), pruned, x)])
        print(rows[-1], flush=True)
    print(table(["model", "graph + groups s", "prune(flops 50%) s", "ratio", "FLOPs removed", "convs pruned",
                 "prunable MACs", "residual streams", "export, reload"], rows))


@contextlib.contextmanager
def time_limit(seconds: int):
    """TimeoutError once ``seconds`` have passed (SIGALRM: the main thread, Unix)."""
    def up(*_):
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, up)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def exports_and_reloads(name: str, pruned: nn.Module, x: torch.Tensor) -> str:
    """torch.export gives the same outputs, and save/load gives them bit for bit."""
    import tempfile

    pruned.eval()
    with torch.no_grad():
        y = pruned(x)
    exported = torch.export.export(pruned, (x,))
    ok_export = torch.allclose(exported.module()(x), y, rtol=1e-4, atol=1e-5)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = af.load_pruned(build(name)[0], af.save_pruned(pruned, Path(tmp) / "p.safetensors"))
        with torch.no_grad():
            ok_reload = torch.equal(loaded.eval()(x), y)
    return f"{'yes' if ok_export else 'NO'}, {'bit-exact' if ok_reload else 'DIFFERS'}"


if __name__ == "__main__":
    main()
