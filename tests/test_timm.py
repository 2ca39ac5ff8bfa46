"""timm's CNNs, as a user picks them: couplings Torch-Pruning alone cannot handle (DPN's
concat it cannot map, RexNet whose get_all_groups does not finish, GhostNet's tied halves,
split attention, CSP and OSA concats). Each must prune fast and remove exactly the
channels chosen, or refuse with the reason."""
import warnings

import pytest
import torch

import afie_fast as af
from conftest import import_timm
from test_architectures import zero_even_channels
import reference

timm = import_timm()

MODELS = ["dpn68", "ghostnet_100", "rexnet_100", "resnest14d", "dla34", "cspdarknet53", "selecsls42b",
          "xception41", "regnety_016", "ese_vovnet19b_dw", "mixnet_s", "res2net50_14w_8s", "skresnet18", "cs3darknet_s"]
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def make(name):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10).eval()


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_timm_model_prunes_exactly_the_chosen_channels(name):
    # Every even filter is 0, so a cut of exactly those leaves the function unchanged;
    # a coupling cut wrongly (a tied channel, a concat offset, a split) changes it.
    model = zero_even_channels(make(name))
    report = af.score(model, source="weights", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruned, stats = af.prune(model, report, target=0.25, example_inputs=X[:1], allocation="uniform",
                                 prune_residual=True, progress=False)
    assert sum(b - a for b, a in stats.kept.values()) > 0.1 * sum(b for b, _ in stats.kept.values())
    with torch.no_grad():
        torch.testing.assert_close(pruned.eval()(X), model(X), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dpn68", "ghostnet_100", "rexnet_100"])
def test_timm_model_reaches_a_flops_target(name):
    model = make(name)
    report = af.score(model, source="weights", progress=False)
    pruned, stats = af.prune(model, report, target=0.5, unit="flops", example_inputs=X[:1], progress=False)
    assert abs(stats.reached - 0.5) <= 0.01, stats.summary()
    assert pruned(X).shape == (2, 10)


# One small member of each family people pick today, as a user prunes it: every argument but
# the target at its default (README "timm's CNNs at the defaults").
FAMILIES = ["convnext_atto", "convnextv2_atto", "repvgg_a0", "mobileone_s0", "res2net50_14w_8s", "hrnet_w18_small",
            "mixnet_s", "skresnet18", "resnest14d", "ghostnetv2_100", "tf_efficientnetv2_b0", "repghostnet_050",
            "nf_regnet_b0", "edgenext_xx_small", "resnetv2_50x1_bit", "efficientnet_b0_gn"]


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_family_reaches_half_the_flops_at_the_defaults(name, tmp_path):
    model, x = make(name), X[:1]
    report = af.score(model, [X], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within 1 point: no "closest whole filters" warning
        pruned, stats = af.prune(model, report, target=0.5, unit="flops", example_inputs=x, progress=False)
    pruned.eval()
    (macs0, _), (macs1, _) = reference.macs_and_params(model, x), reference.macs_and_params(pruned, x)
    assert abs((1 - macs1 / macs0) - 0.5) <= 0.01, stats.summary()
    assert all(after >= 1 for _, after in stats.kept.values())
    y = pruned(X)
    assert y.shape == model(X).shape
    exported = torch.export.export(pruned, (x,))
    torch.testing.assert_close(exported.module()(x), pruned(x))
    loaded = af.load_pruned(make(name), af.save_pruned(pruned, tmp_path / "p.safetensors"))
    assert torch.equal(loaded.eval()(X), y)


@pytest.mark.slow
def test_split_transpose_attention_heads_follow_the_stream():
    # EdgeNeXt: its tokens' reshapes keep the channels whole, its equal chunks are cut
    # mirrored, and its transposed attention (reshaped to the input's width, read from
    # x.shape) narrows its heads with the stream (the built-in register_heads handler).
    # The stage whose width (88) its 3 chunks do not divide stays whole, with that cause.
    model = make("edgenext_xx_small")
    report = af.score(model, [X], progress=False)
    pruned, stats = af.prune(model, report, target=0.5, unit="flops", example_inputs=X[:1], progress=False)
    for name, m in pruned.named_modules():
        if type(m).__name__ == "CrossCovarianceAttn":
            width = m.qkv.in_features
            assert width % m.num_heads == 0 and m.qkv.out_features == 3 * width == 3 * m.proj.in_features, name
    assert stats.kept["stages.1.downsample.1"][1] < 48 and stats.kept["stages.3.downsample.1"][1] < 168
    assert stats.kept["stages.2.downsample.1"] == (88, 88) and "split" in stats.skipped["stages.2.downsample.1"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cspdarknet53", "cs3darknet_s"])
def test_csp_stages_are_cut_in_equal_halves(name):
    """CSPNet's stages split conv_exp's output by ``self.expand_chs // 2`` (a handler keeps
    it in step); CS3DarkNet's one-block stages concatenate a half whose width Torch-Pruning
    could not infer before the split was sized. Both stayed whole."""
    model = make(name)
    report = af.score(model, [X], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruned, stats = af.prune(model, report, target=0.5, unit="flops", example_inputs=X[:1], progress=False,
                                 prune_residual=True)
    assert not stats.skipped, stats.skipped
    for stage, before in zip(pruned.stages, model.stages):
        assert stage.expand_chs == stage.conv_exp.conv.out_channels < before.expand_chs
    assert pruned(X).shape == (2, 10)
