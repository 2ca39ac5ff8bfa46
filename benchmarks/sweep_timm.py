"""prune() at its defaults (target 0.5, unit="flops") over many timm families, one row each:
what a user gets on a model nobody wrote a test for.

Random init, activations on one batch of 2 at --size px (the model's own size where it
needs one); "FlopCounterMode": 1 − pruned/original MACs as torch counts them.

    python benchmarks/sweep_timm.py                           # the 39 families below, ~2 min
    python benchmarks/sweep_timm.py --models nf_resnet26,resnet18d --size 224
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

import afie_fast as af

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
import reference  # noqa: E402
from _timing import table  # noqa: E402
from conftest import import_timm  # noqa: E402  (the shim: torchvision's CUDA wheel beside a CPU torch)

MODELS = ("resnet18d,seresnext26d_32x4d,ecaresnet26t,res2next50,regnetx_002,regnety_002,regnetz_005,"
          "efficientnet_lite0,mobilenetv3_small_050,mobilenetv4_conv_small,mnasnet_050,fbnetc_100,lcnet_050,"
          "tinynet_e,hardcorenas_a,dla46_c,densenet121,cspresnet50,cs3darknet_s,ese_vovnet19b_dw,gernet_s,"
          "resnetblur18,resnetaa50,nf_resnet26,nf_regnet_b0,hgnet_tiny,hgnetv2_b0,bat_resnext26ts,eca_halonext26ts,"
          "vgg11_bn,fastvit_t8,efficientvit_b0,mobilevit_xxs,inception_next_tiny,starnet_s1,fasternet_t0,rdnet_tiny,"
          "convnext_nano,inception_v3")


def one(timm, name: str, size: int) -> list[str]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    try:
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            y = model(x)
    except Exception:  # noqa: BLE001 - a fixed input size: the model's own
        size = model.default_cfg["input_size"][-1]
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            y = model(x)
    start = time.perf_counter()
    report = af.score(model, [x], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned, stats = af.prune(model, report, target=0.5, unit="flops", example_inputs=x[:1], progress=False)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        shape_kept = pruned(x).shape == y.shape
    (before, _), (after, _) = reference.macs_and_params(model, x[:1]), reference.macs_and_params(pruned, x[:1])
    return [name, str(size), f"{stats.reached:.1%}", f"{1 - after / before:.1%}", "yes" if shape_kept else "NO",
            "cut" if stats.residual_streams else "whole", f"{seconds:.1f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--size", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)  # random-init MobileNets run into denormals (see bench_prune.py)
    timm, rows = import_timm(), []
    for name in args.models.split(","):
        try:
            rows.append(one(timm, name, args.size))
        except Exception as exc:  # noqa: BLE001 - the error is the result
            rows.append([name, "", f"{type(exc).__name__}: {str(exc)[:150]}", "", "", "", ""])
        print(rows[-1], file=sys.stderr, flush=True)
    print(table(["timm model", "px", "stats.reached", "FlopCounterMode", "output shape kept", "residual streams",
                 "score + prune s"], rows))


if __name__ == "__main__":
    main()
