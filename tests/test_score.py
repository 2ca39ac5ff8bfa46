"""score() against an independent float64 reference written plainly here."""
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import afie_fast as af
from afie_fast.training import accuracy
from nets import ARCHS, loader, randomised
import reference


def ref_activation_scores(model, batches):
    """Hooks store every conv output; np.cov, eigvalsh and the formula of DESIGN §2."""
    outs, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(
                lambda mod, i, o, name=name: outs.setdefault(name, []).append(o.detach().double())))
    model.eval()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for h in hooks:
        h.remove()
    ref = {}
    for name, ys in outs.items():
        x = torch.cat([y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]) for y in ys]).numpy()
        cov = np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])
        e = np.linalg.eigvalsh(cov)
        # eigenvalues under the rounding floor C·eps·max are zero (numpy's matrix_rank
        # tolerance, eps of the float32 products score() uses by default)
        s = np.sqrt(np.where(e > len(e) * np.finfo(np.float32).eps * e.max(), e, 0.0))
        ref[name] = (*reference.afie(s, x.shape[1]), s, np.diag(cov), x.shape[0])
    return ref


def ref_weight_scores(model):
    ref = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            w = m.weight.detach().double().mean(dim=(2, 3)).numpy()
            s = np.linalg.svd(w, compute_uv=False)
            ref[name] = (*reference.afie(s, m.out_channels), s)
    return ref


@pytest.mark.parametrize("arch", ["vgg", "resnet_bottleneck", "grouped"])
def test_activations_match_reference(arch):
    torch.manual_seed(0)
    model = randomised(ARCHS[arch]())
    batches = loader(n_batches=3)
    report = af.score(model, batches, progress=False)
    ref = ref_activation_scores(model, batches)
    assert list(report.layers) == list(ref)
    assert report.source == "activations"
    for name, ls in report.layers.items():
        k, afie, s, var, n = ref[name]
        assert ls.n_samples == n
        assert ls.entropy == pytest.approx(k, rel=1e-4)
        assert ls.afie == pytest.approx(afie, rel=1e-4)
        # eigenvalues s² (Weyl: each moves by at most the covariance's own error, float32
        # products ~1e-7·max); the floor may zero an eigenvalue just above it on one side
        e = np.asarray(sorted(ls.spectrum)) ** 2
        np.testing.assert_allclose(e, s**2, rtol=0, atol=2 * len(s) * np.finfo(np.float32).eps * s.max() ** 2)
        np.testing.assert_allclose(ls.filter_scores["variance"], var, rtol=1e-4, atol=1e-8)
        assert ls.shape_baseline == pytest.approx(math.log(ls.n_filters) / ls.n_filters)


@pytest.mark.parametrize("arch", ["vgg", "resnet_bottleneck", "grouped"])
def test_weights_match_reference(arch):
    torch.manual_seed(0)
    model = ARCHS[arch]()
    report = af.score(model, progress=False)
    assert report.source == "weights"
    ref = ref_weight_scores(model)
    for name, ls in report.layers.items():
        k, afie, s = ref[name]
        assert ls.entropy == pytest.approx(k, rel=1e-6)
        assert ls.afie == pytest.approx(afie, rel=1e-6)
        np.testing.assert_allclose(ls.spectrum, s, rtol=1e-6, atol=1e-12)
        conv = dict(model.named_modules())[name]
        np.testing.assert_allclose(ls.filter_scores["l1"], conv.weight.detach().double().abs().sum((1, 2, 3)), rtol=1e-5)
        assert ls.shape_baseline == pytest.approx(math.log(len(s)) / ls.n_filters)


def test_independence_criterion_matches_brute_force():
    torch.manual_seed(0)
    model = randomised(ARCHS["vgg"]())
    batches = loader(n_batches=2)
    report = af.score(model, batches, progress=False, criteria=("independence",))
    for ls in report:
        assert set(ls.filter_scores) == {"independence"}
        assert len(ls.filter_scores["independence"]) == ls.n_filters
    # and explicitly on one layer, deleting each channel in turn
    name = "0"
    acts = []
    h = dict(model.named_modules())[name].register_forward_hook(lambda m, i, o: acts.append(o.double()))
    with torch.no_grad():
        for xb, _ in batches:
            model(xb)
    h.remove()
    x = torch.cat([a.permute(0, 2, 3, 1).reshape(-1, a.shape[1]) for a in acts]).numpy()
    cov = np.cov(x, rowvar=False)
    full = np.sqrt(np.clip(np.linalg.eigvalsh(cov), 0, None)).sum()
    expected = [full - np.sqrt(np.clip(np.linalg.eigvalsh(np.delete(np.delete(cov, j, 0), j, 1)), 0, None)).sum()
                for j in range(cov.shape[0])]
    np.testing.assert_allclose(report.layers[name].filter_scores["independence"], expected, rtol=1e-6, atol=1e-9)


def test_one_batch_of_64_equals_64_batches_of_1():
    torch.manual_seed(0)
    # float64 model: the convs' own rounding then cannot differ between batch sizes.
    model = randomised(ARCHS["vgg"]()).double()
    x = torch.randn(64, 3, 8, 8, dtype=torch.float64)
    one = af.score(model, [x], progress=False)
    many = af.score(model, list(x.split(1)), progress=False)
    for a, b in zip(one, many):
        assert b.afie == pytest.approx(a.afie, rel=1e-10)
        np.testing.assert_allclose(b.spectrum, a.spectrum, rtol=1e-10, atol=1e-12)


def test_layers_selection_and_batch_formats():
    torch.manual_seed(0)
    model = randomised(ARCHS["vgg"]())
    xs = [x for x, _ in loader(n_batches=2)]
    by_tensor = af.score(model, xs, layers=["3"], progress=False)
    assert list(by_tensor.layers) == ["3"]
    by_dict = af.score(model, [{"input": x} for x in xs], layers=lambda n, m: m.out_channels == 12, progress=False)
    by_fn = af.score(model, [{"img": x} for x in xs], input_fn=lambda b: b["img"], layers=["3"], progress=False)
    assert by_dict.layers["3"].afie == by_tensor.layers["3"].afie == by_fn.layers["3"].afie
    limited = af.score(model, xs, max_batches=1, progress=False)
    assert limited.layers["0"].n_samples == xs[0].shape[0] * 64


def test_model_is_unchanged():
    torch.manual_seed(0)
    model = randomised(ARCHS["resnet_bottleneck"]())
    model.train()
    model.layer1.eval()  # a mixed mode must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    af.score(model, loader(n_batches=2), progress=False)
    assert [m.training for m in model.modules()] == modes
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats too
    assert not any(m._forward_hooks for m in model.modules())


class _CachesAnchors(nn.Module):
    """A detector head's habit: a grid it builds in its first forward and keeps."""

    def __init__(self):
        super().__init__()
        self.conv, self.anchors = nn.Conv2d(3, 4, 3, padding=1), None

    def forward(self, x):
        if self.anchors is None or self.anchors.shape[-2:] != x.shape[-2:]:
            self.anchors = torch.arange(x.shape[-2] * x.shape[-1], dtype=x.dtype).view(x.shape[-2:]) / 8
        return (self.conv(x) * self.anchors).mean(dim=(2, 3))


def test_what_a_model_caches_while_scored_stays_usable_for_training():
    """score() and accuracy() run the forward without autograd; under inference_mode a
    tensor the model kept from it could never enter autograd again (YOLOv8's anchors: the
    model's next training step failed)."""
    torch.manual_seed(0)
    model, x = _CachesAnchors(), torch.randn(2, 3, 8, 8)
    af.score(model, [x], progress=False)
    model(x).square().mean().backward()
    assert model.conv.weight.grad is not None
    model.anchors = None
    accuracy(model, x, torch.zeros(2, dtype=torch.long))
    model(x).square().mean().backward()


def test_hooks_removed_and_mode_restored_when_loader_fails():
    torch.manual_seed(0)
    model = randomised(ARCHS["vgg"]()).train()

    def broken():
        yield torch.randn(4, 3, 8, 8)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        af.score(model, broken(), progress=False)
    assert model.training
    assert not any(m._forward_hooks for m in model.modules())


def test_bad_inputs():
    model = randomised(ARCHS["vgg"]())
    with pytest.raises(ValueError, match=r"has no conv \(nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d\) layers to score"):
        af.score(nn.Sequential(nn.Linear(3, 3)), progress=False)
    with pytest.raises(ValueError, match="no batches"):
        af.score(model, [], progress=False)
    with pytest.raises(TypeError, match="got str"):
        af.score(model, ["not a tensor"], progress=False)
    with pytest.raises(ValueError, match=r"\['nope'\] are not conv .* layers of the model"):
        af.score(model, progress=False, layers=["nope"])
    with pytest.raises(ValueError, match="max_batches"):
        af.score(model, loader(), max_batches=0, progress=False)
    with pytest.raises(ValueError, match="source"):
        af.score(model, loader(), source="gradients", progress=False)
    with pytest.raises(ValueError, match="needs a loader"):
        af.score(model, source="activations", progress=False)
    tiny = nn.Sequential(nn.Conv2d(3, 4, 8))  # one image → one 1×1 output: one observation
    with pytest.raises(ValueError, match=r"layer '0': covariance needs at least 2 observations"):
        af.score(tiny, [torch.randn(1, 3, 8, 8)], progress=False)
    bad = torch.randn(2, 3, 8, 8)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer '0', batch 0: .*NaN or Inf"):
        af.score(model, [bad], progress=False)


def test_progress_output(capsys):
    model = randomised(ARCHS["vgg"]())
    af.score(model, loader(n_batches=2), progress=True)
    captured = capsys.readouterr()
    assert "scored 3 conv layers on 2 batches" in captured.out
    assert "afie_fast score" in captured.err  # the tqdm bar


class FunctionalUse(nn.Module):
    """Linears whose weights the forward uses directly (as Swin's qkv, or
    nn.MultiheadAttention's out_proj): their hooks never fire."""

    def __init__(self, every: bool = False):
        super().__init__()
        self.every = every
        self.conv = nn.Conv2d(3, 8, 3)
        self.qkv = nn.Linear(8, 24)
        self.head = nn.Linear(24, 4)

    def forward(self, x):
        if self.every:  # no layer runs as a module
            x = torch.nn.functional.conv2d(x, self.conv.weight, self.conv.bias)
        else:
            x = self.conv(x)
        y = torch.nn.functional.linear(x.mean((2, 3)), self.qkv.weight, self.qkv.bias)
        return torch.nn.functional.linear(y, self.head.weight, self.head.bias) if self.every else self.head(y)


def test_layers_the_forward_never_calls_are_named_and_left_out():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 9, 9, generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match=r"1 of the conv and linear layers never ran as modules .*\(qkv\)"):
        report = af.score(FunctionalUse(), [x, x + 1], progress=False, linear=True)
    assert list(report.layers) == ["conv", "head"] and report.layers["head"].n_samples == 12
    with pytest.raises(ValueError, match="none of the 3 conv and linear layers ran as a module"):
        af.score(FunctionalUse(every=True), [x], progress=False, linear=True)


def test_a_compiled_model_is_scored_and_pruned_through_the_module_it_wraps():
    """Hooks on a torch.compile wrapper made Dynamo break its graph at every layer (a
    warning per hook, a recompile per call) and prefixed every name with "_orig_mod."."""
    torch.manual_seed(0)
    model = randomised(ARCHS["vgg"]()).eval()
    batches = loader(n_batches=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # inductor's imports touch torch.jit
        compiled = torch.compile(model)
    report, expected = af.score(compiled, batches, progress=False), af.score(model, batches, progress=False)
    assert list(report.layers) == list(expected.layers)
    assert [ls.afie for ls in report] == [ls.afie for ls in expected]
    pruned, stats = af.prune(compiled, report, target=0.5, example_inputs=batches[0][0][:1], progress=False)
    assert type(pruned) is type(model) and stats.reached == pytest.approx(0.5, abs=0.02)


def test_a_torchscript_module_is_refused_with_what_to_pass():
    model, x = ARCHS["vgg"]().eval(), [b for b, _ in loader(n_batches=1)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch deprecates TorchScript; users still have it
        scripted, traced = torch.jit.script(model), torch.jit.trace(model, x[0])
    with pytest.raises(TypeError, match="TorchScript.*nn.Module it was scripted"):
        af.score(scripted, x, progress=False)
    with pytest.raises(TypeError, match="TorchScript"):
        af.prune(traced, af.score(model, x, progress=False), example_inputs=x[0][:1])
