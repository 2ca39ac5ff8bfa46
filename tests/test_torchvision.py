"""Every torchvision classification CNN family, one small member each: score, prune to a
FLOPs and a filters target, keep the output shape, export, and reload bit-exactly."""
import warnings

import pytest
import torch
from torch import nn

import afie_fast as af
from conftest import import_torchvision
import reference

tv = import_torchvision()

FAMILIES = ["resnet18", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
            "densenet121", "squeezenet1_1", "googlenet", "inception_v3", "shufflenet_v2_x0_5", "regnet_y_400mf",
            "mnasnet0_5", "vgg11_bn", "alexnet", "convnext_tiny"]
# Families whose width sits in nn.Linear MLPs: scored with linear=True.
LINEAR = {"convnext_tiny"}


def make(name):
    torch.manual_seed(0)
    kw = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    return getattr(tv.models, name)(num_classes=10, **kw).eval()


def inputs(name):
    size = 80 if name == "inception_v3" else 64  # Inception v3's stem needs at least 75 pixels
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_family_prunes_exports_and_reloads(name, tmp_path):
    model, x = make(name), inputs(name)
    report = af.score(model, [x], progress=False, linear=name in LINEAR)
    y = model(x)
    for unit, target in (("flops", 0.5), ("filters", 0.3)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "closest whole filters get" miss on these models
            pruned, stats = af.prune(model, report, target=target, unit=unit, example_inputs=x[:1])
        pruned.eval()
        # prune's own count is FlopCounterMode's, before and after
        assert (stats.macs_before, stats.params_before) == reference.macs_and_params(model, x[:1])
        assert (stats.macs_after, stats.params_after) == reference.macs_and_params(pruned, x[:1])
        if unit == "flops":
            assert abs(stats.reached - target) <= 0.02, stats.summary()
        removed = sum(b - a for b, a in stats.kept.values())
        assert removed > 0 and all(a >= 1 for _, a in stats.kept.values())
        assert pruned(x).shape == y.shape
    exported = torch.export.export(pruned, (x,))
    torch.testing.assert_close(exported.module()(x), pruned(x))
    loaded = af.load_pruned(make(name), af.save_pruned(pruned, tmp_path / "p.safetensors"))
    assert torch.equal(loaded.eval()(x), pruned(x))


@pytest.mark.parametrize("name", sorted(LINEAR))
def test_linear_width_family_scored_without_linear_says_why(name):
    model, x = make(name), inputs(name)
    report = af.score(model, [x], progress=False)
    with pytest.raises(ValueError, match=r"nothing to prune.*residual stream.*linear=True"):
        af.prune(model, report, target=0.5, unit="flops", example_inputs=x[:1], prune_residual=False)
    # at the default prune_residual="auto" the residual streams join, and the target is met
    _, stats = af.prune(model, report, target=0.5, unit="flops", example_inputs=x[:1])
    assert stats.residual_streams and abs(stats.reached - 0.5) <= 0.01


def test_squeezenet_classifier_is_never_pruned():
    model, x = make("squeezenet1_1"), inputs("squeezenet1_1")
    report = af.score(model, source="weights", progress=False)
    pruned, stats = af.prune(model, report, target=0.5, example_inputs=x[:1])
    assert stats.kept["classifier.1"] == (10, 10)
    assert pruned(x).shape == (2, 10)
    assert isinstance(pruned.classifier[1], nn.Conv2d)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "densenet121", "googlenet",
                                  "inception_v3", "convnext_tiny"])
def test_cuts_equal_torch_pruning_rebuilding_each_group(name, monkeypatch):
    from test_architectures import assert_same_cut, cut_both_ways

    model = make(name)
    ours, theirs, fixed = cut_both_ways(model, inputs(name)[:1], monkeypatch, target=0.5, unit="flops",
                                        linear=name in LINEAR)
    assert fixed > 0
    assert_same_cut(ours, theirs)


@pytest.mark.slow
def test_video_resnet_r3d_18_scores_exactly_and_prunes_at_the_defaults(tmp_path):
    # torchvision's video ResNet: 20 nn.Conv3d on (N, 3, T, H, W) clips, through the same
    # path as Conv2d: both sources against the float64 reference, then half the FLOPs.
    from test_conv_kinds import conv_outputs, reference_activations, reference_weights

    torch.manual_seed(0)
    model = tv.models.video.r3d_18(num_classes=10).eval()
    x = torch.randn(2, 3, 8, 64, 64, generator=torch.Generator().manual_seed(0))
    convs, ys = conv_outputs(model, [x])
    assert len(convs) == 20
    acts = af.score(model, [x], positions="all", precision="float64", progress=False)
    weights = af.score(model, progress=False)
    for name, conv in convs.items():
        assert acts.layers[name].kind == weights.layers[name].kind == "Conv3d"
        s, _ = reference_activations(ys[name])
        assert reference.rel_err(acts.layers[name].spectrum, s) < 1e-6, name
        assert abs(acts.layers[name].afie / reference.afie(s, conv.out_channels)[1] - 1) < 1e-7, name
        s, _ = reference_weights(conv)
        assert abs(weights.layers[name].afie / reference.afie(s, conv.out_channels)[1] - 1) < 1e-9, name
    report = af.score(model, [x], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruned, stats = af.prune(model, report, target=0.5, unit="flops", example_inputs=x[:1])
    pruned.eval()
    (macs0, _), (macs1, _) = reference.macs_and_params(model, x[:1]), reference.macs_and_params(pruned, x[:1])
    assert abs((1 - macs1 / macs0) - 0.5) <= 0.01, stats.summary()
    assert all(a >= 1 for _, a in stats.kept.values())
    assert pruned(x).shape == model(x).shape
    exported = torch.export.export(pruned, (x[:1],))
    torch.testing.assert_close(exported.module()(x[:1]), pruned(x[:1]))
    loaded = af.load_pruned(tv.models.video.r3d_18(num_classes=10), af.save_pruned(pruned, tmp_path / "p.safetensors"))
    assert torch.equal(loaded.eval()(x), pruned(x))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["swin_t", "vit_b_16"])
def test_transformers_prune_their_mlps_with_linear(name):
    # Tried as a new user would: Swin-T's prune() filled 24 GiB and was killed (Torch-Pruning
    # reads its heads' reshapes as flattens, and the indices multiply block after block),
    # and with linear=True score() refused the layers its forward uses as F.linear(x, w)
    # ("0 observations: score it on more data"). Now: the unused layers are named in a
    # warning, the exploding groups stay whole with their cause, and the MLPs carry 50%.
    torch.manual_seed(0)
    model = getattr(tv.models, name)(num_classes=10).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="never ran as modules"):
        report = af.score(model, [x], progress=False, linear=True)
    pruned, stats = af.prune(model, report, target=0.5, unit="flops", example_inputs=x[:1])
    assert abs(stats.reached - 0.5) <= 0.01, stats.summary()
    assert pruned(x).shape == (2, 10)
    if name == "swin_t":
        assert any("multiply past" in why for why in stats.skipped.values())
        with pytest.raises(ValueError, match="nothing to prune in this SwinTransformer"):  # convs alone: one patch embed
            af.prune(model, af.score(model, [x], progress=False), target=0.5, unit="flops", example_inputs=x[:1])
