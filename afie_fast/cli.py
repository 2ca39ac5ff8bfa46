"""The `afie-fast` command: demo, score, prune."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch
from torch import nn

DEMO_OUT = "afie-demo"


def _load_model(spec: str, state_dict: str | None) -> tuple[nn.Module, tuple[int, ...] | None]:
    """A zoo name or ``package.module:function``, optionally with a state_dict file."""
    from .models import INPUT_SHAPES, ZOO

    if spec in ZOO:
        model, shape = ZOO[spec](), INPUT_SHAPES[spec]
    elif ":" in spec:
        module_name, _, fn_name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot load model {spec!r}: {exc}") from None
        model, shape = fn(), None
    else:
        raise ValueError(f"unknown model {spec!r}: use a zoo name ({', '.join(ZOO)}) or package.module:function")
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec!r} returned {type(model).__name__}, not an nn.Module")
    if state_dict:
        model.load_state_dict(torch.load(state_dict, map_location="cpu", weights_only=True))
    return model, shape


def _input_shape(arg: str | None, default: tuple[int, ...] | None) -> tuple[int, ...]:
    if arg:
        try:
            return tuple(int(v) for v in arg.split(","))
        except ValueError:
            raise ValueError(f"--input-shape must look like 3,32,32, got {arg!r}") from None
    if default is None:
        raise ValueError("--input-shape C,H,W is needed for a model outside the zoo")
    return default


def _batches(data: str, shape: tuple[int, ...], n: int, batch_size: int, seed: int):
    if data == "digits":
        from .data import load_digits

        if shape[0] != 1:
            raise ValueError(f"--data digits gives 1-channel images, the model takes {shape[0]} channels")
        split = load_digits(seed=seed, size=shape[-1])
        return [x for x, _ in split.train_loader(batch_size, seed)][:n]
    if data == "random":
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(batch_size, *shape, generator=g) for _ in range(n)]
    raise ValueError(f"--data must be 'digits' or 'random', got {data!r}")


def _positions(text: str) -> str | int:
    if text in ("all", "auto"):
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected all, auto or a positive number, got {text!r}")


def cmd_score(args: argparse.Namespace) -> None:
    import afie_fast as af

    model, default_shape = _load_model(args.model, args.state_dict)
    loader = None
    if args.data:
        loader = _batches(args.data, _input_shape(args.input_shape, default_shape), args.batches, args.batch_size, args.seed)
    criteria = tuple(args.criteria.split(",")) if args.criteria else None
    report = af.score(model, loader, progress=not args.json, criteria=criteria, linear=args.linear,
                      positions=args.positions)
    if args.out:
        report.save(args.out)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(report.summary(args.target))
        if args.out:
            print(f"report written to {args.out}")


def cmd_prune(args: argparse.Namespace) -> None:
    import afie_fast as af

    model, default_shape = _load_model(args.model, args.state_dict)
    report = af.AFIEReport.load(args.report)
    shape = _input_shape(args.input_shape, default_shape)
    x = torch.zeros(1, *shape)
    if args.finetune_epochs and args.data != "digits":
        raise ValueError("--finetune-epochs needs labelled data: add --data digits")
    calibrate = _batches(args.data, shape, args.batches, args.batch_size, args.seed) if args.data else None
    pruned, stats = af.prune(model, report, target=args.target, unit=args.unit, example_inputs=x,
                             criterion=args.criterion, prune_residual={"true": True, "false": False}.get(args.prune_residual, "auto"),
                             calibrate=calibrate)
    if args.finetune_epochs:
        from .data import load_digits
        from .training import train

        plan = pruned.afie_fast_plan
        split = load_digits(seed=args.seed, size=shape[-1])
        pruned = train(pruned, split.train_loader(64, args.seed), args.finetune_epochs, lr=1e-3,
                       teacher=model if args.distill else None)
        pruned.afie_fast_plan = plan
    out = Path(args.out)
    path = af.save_pruned(pruned, out / "pruned.safetensors")
    print(stats.summary())
    print(f"pruned model written to {path} (load with afie_fast.load_pruned)")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(Path(args.out), epochs=args.epochs, finetune_epochs=args.finetune_epochs, target=args.target,
             seed=args.seed, progress=not args.quiet, distill=args.distill)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="afie-fast", description="AFIE scoring and pruning of CNN filters.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="train, score, prune and fine-tune a CNN on scikit-learn's digits")
    d.add_argument("--out", default=DEMO_OUT, help=f"output folder (default: {DEMO_OUT})")
    d.add_argument("--epochs", type=int, default=30, help="training epochs (default: 30)")
    d.add_argument("--finetune-epochs", type=int, default=10, help="fine-tuning epochs (default: 10)")
    d.add_argument("--target", type=float, default=0.5, help="fraction of filters to remove (default: 0.5)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.add_argument("--distill", action=argparse.BooleanOptionalAction, default=False,
                   help="fine-tune by distillation from the unpruned model instead of cross-entropy (the default, "
                        "better in benchmarks/recovery.py)")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("score", help="score a model's conv layers with AFIE")
    s.add_argument("model", help="zoo name (digits_cnn, alexnet_mnist, vgg16_cifar, resnet18_cifar, resnet50) "
                                 "or package.module:function")
    s.add_argument("--state-dict", help="weights to load (a state_dict saved with torch.save)")
    s.add_argument("--data", choices=["digits", "random"], help="activations from this data (default: weights only)")
    s.add_argument("--batches", type=int, default=8)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--input-shape", help="C,H,W of one input (zoo models know theirs)")
    s.add_argument("--criteria", help="filter scores to compute, e.g. l1,variance,independence")
    s.add_argument("--linear", action="store_true", help="also score nn.Linear layers (MLP hidden widths)")
    s.add_argument("--positions", default="auto", type=_positions,
                   help="spatial positions per image and layer: all, auto (default: at most 1024) or a number")
    s.add_argument("--target", type=float, default=0.5, help="target for the ratio column (default: 0.5)")
    s.add_argument("--out", help="write the report JSON here")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_score)

    q = sub.add_parser("prune", help="prune a model with a saved report")
    q.add_argument("model")
    q.add_argument("--report", required=True, help="report JSON from `afie-fast score --out`")
    q.add_argument("--state-dict")
    q.add_argument("--target", type=float, default=0.5)
    q.add_argument("--unit", choices=["filters", "flops", "params"], default="filters")
    q.add_argument("--criterion", choices=["l1", "variance", "independence", "random"])
    q.add_argument("--prune-residual", nargs="?", const="true", default="auto", choices=["auto", "true", "false"],
                   help="cut residual streams: auto (default: only when the target needs them), true, false")
    q.add_argument("--input-shape", help="C,H,W of one input (zoo models know theirs)")
    q.add_argument("--data", choices=["digits", "random"],
                   help="recalibrate the pruned model's BatchNorm statistics on this data")
    q.add_argument("--batches", type=int, default=20, help="batches for the recalibration (default: 20)")
    q.add_argument("--batch-size", type=int, default=64)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--finetune-epochs", type=int, default=0, help="fine-tune on --data digits afterwards")
    q.add_argument("--distill", action=argparse.BooleanOptionalAction, default=False,
                   help="fine-tune by distillation from the unpruned model instead of cross-entropy (the default)")
    q.add_argument("--out", required=True, help="output folder")
    q.set_defaults(func=cmd_prune)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError, OSError, ImportError, RuntimeError) as exc:
        print(f"afie-fast: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug or a library's internals: still one line, with where to look
        print(f"afie-fast: error: unexpected {type(exc).__name__}: {exc} (please report it)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("afie-fast: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
