"""prune() on models whose weights are computed (weight norm, spectral norm, other
parametrizations) or frozen: cut as their plain equivalents are, the caller's model
untouched, and the pruned copy given back what the caller's had."""
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import afie_fast as af
from afie_fast.copying import copy_model
from afie_fast.layers import layers_of
from nets import ARCHS, loader, randomised

SIGNAL = [torch.randn(4, 2, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]


class ResBlock1d(nn.Module):
    """HiFi-GAN's residual block: dilated convs added to their input."""

    def __init__(self, c):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(c, c, 3, dilation=d, padding=d) for d in (1, 3))

    def forward(self, x):
        for conv in self.convs:
            x = x + conv(torch.nn.functional.leaky_relu(x, 0.1))
        return x


def vocoder():
    """A HiFi-GAN-like motif: pre conv, a transposed-conv upsampling, a residual block, a
    post conv to one channel (the model's output, never cut)."""
    return nn.Sequential(nn.Conv1d(2, 32, 7, padding=3), nn.LeakyReLU(0.1),
                         nn.ConvTranspose1d(32, 16, 4, stride=2, padding=1), ResBlock1d(16), nn.LeakyReLU(0.1),
                         nn.Conv1d(16, 24, 3, padding=1), nn.LeakyReLU(0.1), nn.Conv1d(24, 1, 7, padding=3),
                         nn.Tanh())


STYLES = {
    "weight_norm": parametrizations.weight_norm,
    "weight_norm_hook": nn.utils.weight_norm,  # the older API, deprecated but in many checkpoints
    "spectral_norm": parametrizations.spectral_norm,
    "spectral_norm_hook": nn.utils.spectral_norm,
}


def computed_weights(model, style):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for name, m in list(model.named_modules()):
            if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d)):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, STYLES[style](m))
    return model.eval()


def computes_its_weight(layer):
    return parametrize.is_parametrized(layer, "weight") or any(
        type(h).__name__ == "WeightNorm" for h in layer._forward_pre_hooks.values())


@pytest.mark.parametrize("style", list(STYLES))
def test_computed_weights_are_cut_as_their_plain_values(style, tmp_path):
    torch.manual_seed(0)
    model = computed_weights(vocoder(), style)
    model(SIGNAL[0])  # the hook-based norms compute their weight on a forward
    plain = vocoder().eval()
    with torch.no_grad():
        for (name, m), p in zip(layers_of(model).items(), layers_of(plain).values()):
            p.weight.copy_(m.weight)
            p.bias.copy_(m.bias)
    classes = [type(m) for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    y0 = model(SIGNAL[1])
    torch.testing.assert_close(plain(SIGNAL[1]), y0)

    report = af.score(model, SIGNAL, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned, stats = af.prune(model, report, target=0.5, unit="flops", example_inputs=SIGNAL[0][:1], progress=False)
    expected, expected_stats = af.prune(plain, report, target=0.5, unit="flops", example_inputs=SIGNAL[0][:1],
                                        progress=False)

    assert stats.kept == expected_stats.kept and 0.49 <= stats.reached <= 0.51
    assert stats.kept["0"][1] < 32 and stats.kept["5"][1] < 24  # the weight-normed convs are cut
    assert all("output" in why or "residual" in why for why in stats.skipped.values())
    torch.testing.assert_close(pruned(SIGNAL[1]), expected(SIGNAL[1]), rtol=1e-5, atol=1e-6)
    # the caller's model: the same classes, state and outputs
    assert [type(m) for m in model.modules()] == classes
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(SIGNAL[1]), y0)
    # weight norm applied again on the cut layers; a spectral norm left as plain weights, said so
    folded = [str(w.message) for w in caught if "parametrization" in str(w.message)]
    if style.startswith("weight_norm"):
        assert all(computes_its_weight(m) for m in layers_of(pruned).values()) and not folded
    else:
        assert not any(computes_its_weight(m) for m in layers_of(pruned).values())
        assert len(folded) == 1 and "0.weight" in folded[0]
    # and saved and loaded on a fresh instance of the computed-weight model
    path = af.save_pruned(pruned, tmp_path / "pruned.safetensors")
    fresh = computed_weights(vocoder(), style)
    torch.testing.assert_close(af.load_pruned(fresh, path)(SIGNAL[2]), pruned(SIGNAL[2]), rtol=0, atol=0)


def test_the_callers_parametrized_layer_keeps_its_weight():
    """torch's remove_parametrizations deletes the weight's property from the module's
    class, which a deep copy shares: the caller's layer lost its weight."""
    model = nn.Sequential(parametrizations.weight_norm(nn.Conv2d(3, 8, 3)), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    report = af.score(model, [x], progress=False)
    af.prune(model, report, target=0.5, example_inputs=x[:1], progress=False)
    assert model[0].weight.shape == (8, 3, 3, 3)
    model(x)


def test_unstructured_pruning_masks_are_kept_through_the_cut(tmp_path):
    """Masks from torch.nn.utils.prune (a forward pre-hook computes weight = weight_orig ·
    weight_mask): Torch-Pruning's cut could not assign the weight, and every masked conv was
    left whole ("cannot assign 'torch.FloatTensor' as parameter 'weight'")."""
    from torch.nn.utils import prune as masking

    torch.manual_seed(0)
    model = vocoder().eval()
    for i in (0, 5):
        masking.l1_unstructured(model[i], "weight", amount=0.4)
    masks = {i: model[i].weight_mask.clone() for i in (0, 5)}
    plain = copy_model(model)
    for i in (0, 5):
        masking.remove(plain[i], "weight")  # weight = weight_orig · weight_mask, plain
    report = af.score(model, SIGNAL, progress=False)
    pruned, stats = af.prune(model, report, target=0.5, unit="flops", example_inputs=SIGNAL[0][:1], progress=False)
    expected, expected_stats = af.prune(plain, report, target=0.5, unit="flops", example_inputs=SIGNAL[0][:1],
                                        progress=False)
    assert stats.kept == expected_stats.kept and stats.kept["0"][1] < 32 and stats.kept["5"][1] < 24
    torch.testing.assert_close(pruned(SIGNAL[1]), expected(SIGNAL[1]), rtol=0, atol=0)
    # the cut layers keep their masks: the original mask on the kept filters and inputs
    kept_out = [int((model[0].bias == b).nonzero()) for b in pruned[0].bias]
    torch.testing.assert_close(pruned[0].weight_mask, masks[0][kept_out])
    assert pruned[0].weight_orig.requires_grad and hasattr(model[0], "weight_mask")  # the caller's as it was
    fresh = vocoder().eval()
    path = af.save_pruned(pruned, tmp_path / "masked.safetensors")
    torch.testing.assert_close(af.load_pruned(fresh, path)(SIGNAL[2]), pruned(SIGNAL[2]), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["vgg", "resnet_basic"])
@pytest.mark.parametrize("frozen", ["all", "first half"])
def test_frozen_layers_are_cut_and_stay_frozen(arch, frozen):
    """A frozen backbone: autograd records no edge into layers whose parameters need no
    grad, so the trace never saw them (fully frozen: "nothing to prune")."""
    torch.manual_seed(0)
    model = randomised(ARCHS[arch]()).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    report = af.score(model, loader(n_batches=2), progress=False)
    expected, expected_stats = af.prune(model, report, target=0.5, example_inputs=x, progress=False)
    params = list(model.named_parameters())
    for _, p in params if frozen == "all" else params[: len(params) // 2]:
        p.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in params}

    pruned, stats = af.prune(model, report, target=0.5, example_inputs=x, progress=False)
    assert stats.kept == expected_stats.kept
    torch.testing.assert_close(pruned(x), expected(x), rtol=0, atol=0)
    assert {n: p.requires_grad for n, p in pruned.named_parameters()} == flags
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_copy_model_copies_an_attribute_with_an_autograd_history():
    """nn.utils.weight_norm keeps the weight it computes on each forward as a plain
    attribute, an autograd result after a forward with grad: copy.deepcopy refuses it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = nn.Sequential(nn.utils.weight_norm(nn.Conv1d(2, 4, 3)))
    model(SIGNAL[0]).sum().backward()
    assert model[0].weight.grad_fn is not None
    copy = copy_model(model)
    assert copy[0].weight.grad_fn is None and torch.equal(copy[0].weight, model[0].weight)
    assert copy[0].weight_v is not model[0].weight_v
    torch.testing.assert_close(copy(SIGNAL[1]), model(SIGNAL[1]))


@pytest.mark.parametrize("source", ["weights", "activations"])
def test_score_and_prune_leave_a_training_spectral_norm_as_it_was(source):
    """Reading a spectral-normed weight in train mode runs a power iteration that moves
    its vectors: score() and prune() read weights in eval mode."""
    torch.manual_seed(0)
    model = computed_weights(vocoder(), "spectral_norm").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = af.score(model, SIGNAL if source == "activations" else None, source=source, progress=False)
    with pytest.warns(UserWarning, match="parametrization"):
        af.prune(model, report, target=0.3, example_inputs=SIGNAL[0][:1], progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(m.training for m in model.modules())


class _Hidden(nn.Module):
    """A conv whose output reaches the next one past what autograd does not record: a
    stop-gradient, a frozen block under torch.no_grad(), a reentrant checkpoint."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.a, self.b, self.c = nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 3), nn.Conv2d(32, 8, 3)

    def forward(self, x):
        if self.kind == "detach":
            h = torch.relu(self.a(x)).detach()
        elif self.kind == "no_grad":
            with torch.no_grad():
                h = torch.relu(self.a(x))
        else:
            h = torch.utils.checkpoint.checkpoint(lambda t: torch.relu(self.a(t)), x, use_reentrant=True)
        return self.c(torch.relu(self.b(h))).mean((2, 3))


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")  # torch's, on the checkpoint in eval
@pytest.mark.parametrize("kind", ["detach", "no_grad", "checkpoint"])
def test_convs_behind_a_stop_gradient_are_cut(kind):
    """Torch-Pruning's trace is autograd's: conv a was not in its graph, and was silently
    never cut (not even listed in stats.skipped)."""
    torch.manual_seed(0)
    model = _Hidden(kind).eval()
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    report = af.score(model, [x], progress=False)
    pruned, stats = af.prune(model, report, target=0.3, example_inputs=x[:1], progress=False)
    assert pruned.a.out_channels < 16 and pruned.b.in_channels == pruned.a.out_channels, stats.summary()
    # the cut model is the original with the removed filters zeroed (0 through ReLU, nothing to the next conv)
    zeroed = copy_model(model)
    for name in ("a", "b"):
        old, new = getattr(model, name), getattr(pruned, name)
        gone = [i for i, b in enumerate(old.bias) if not (new.bias == b).any()]
        getattr(zeroed, name).weight.data[gone], getattr(zeroed, name).bias.data[gone] = 0, 0
    torch.testing.assert_close(pruned(x), zeroed(x))
    # and torch's own no_grad and checkpoint are as they were
    with torch.no_grad():
        assert not torch.is_grad_enabled()
    w = torch.randn(3, requires_grad=True)
    y = torch.utils.checkpoint.checkpoint(lambda t: t * 2, w, use_reentrant=True)
    assert type(y.grad_fn).__name__ == "CheckpointFunctionBackward"


class _InsideFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module):
        return module(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.inside, self.after = nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3)

    def forward(self, x):
        return self.after(torch.relu(_InsideFunction.apply(x, self.inside))).mean((2, 3))


def test_a_conv_autograd_does_not_record_is_listed_with_why():
    torch.manual_seed(0)
    model = _Wrapped().eval()
    x = torch.randn(4, 3, 12, 12)
    report = af.score(model, [x], progress=False)
    with pytest.raises(ValueError, match=r"not in the traced graph: .*custom autograd Function.*\(inside\)"):
        af.prune(model, report, target=0.3, example_inputs=x[:1], progress=False)
