"""Every convolution kind through one path: Conv1d (a 1-D ResNet with grouped and widening
pointwise convs, a dilated TCN with a depthwise conv), Conv3d (a small video ResNet) and
ConvTranspose2d (a U-Net decoder), scored against a float64 reference of the AFIE
definition with both sources, then pruned to half the FLOPs at the defaults."""
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import afie_fast as af
from afie_fast.accumulator import planar
from afie_fast.observe import Observed
from nets import CONV_KINDS, randomised
from test_architectures import zero_even_channels
import reference

KIND_OF = {"resnet1d": "Conv1d", "tcn": "Conv1d", "resnet3d": "Conv3d", "unet": "Conv2d"}


def build(name, seed=0, n_batches=3):
    torch.manual_seed(seed)
    make, shape = CONV_KINDS[name]
    model = randomised(make(), seed).eval()
    g = torch.Generator().manual_seed(seed + 1)
    return model, [torch.randn(shape, generator=g) for _ in range(n_batches)]


def conv_outputs(model, batches):
    """Each conv's outputs over the batches, in float64, recorded by plain hooks."""
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}
    seen = {n: [] for n in convs}
    hooks = [m.register_forward_hook(lambda _m, _a, y, n=n: seen[n].append(y.detach().double()))
             for n, m in convs.items()]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    return convs, seen


def reference_activations(ys):
    """(spectrum descending, covariance) of a conv's outputs: every (sample, position) of
    (N, C, *positions) is an observation of C channels; eigenvalues below C·ε·max are 0."""
    x = np.concatenate([y.movedim(1, -1).reshape(-1, y.shape[1]).numpy() for y in ys])
    cov = np.atleast_2d(np.cov(x, rowvar=False))
    e = np.linalg.eigvalsh(cov)
    e = np.where(e > len(e) * np.finfo(np.float64).eps * e.max(), e, 0.0)
    return np.sqrt(e)[::-1], cov


def reference_weights(conv):
    """(spectrum, L1 per filter) of the paper's weight matrix: the kernel averaged over every
    spatial axis, one row per filter. A transposed conv's weight is (in, out, *k) (groups 1
    in these nets): its filters are the columns."""
    w = conv.weight.detach().double().numpy()
    if conv.transposed:
        assert conv.groups == 1
        w = np.swapaxes(w, 0, 1)
    m = w.reshape(w.shape[0], w.shape[1], -1).mean(axis=2)
    return np.linalg.svd(m, compute_uv=False), np.abs(w).reshape(w.shape[0], -1).sum(axis=1)


@pytest.mark.parametrize("name", list(CONV_KINDS))
def test_activation_scores_equal_the_float64_reference(name):
    model, batches = build(name)
    convs, ys = conv_outputs(model, batches)
    report = af.score(model, batches, positions="all", precision="float64", progress=False)
    default = af.score(model, batches, progress=False)  # float32 products and the positions budget
    assert list(report.layers) == list(convs)
    for layer, ls in report.layers.items():
        s, cov = reference_activations(ys[layer])
        conv = convs[layer]
        assert ls.kind == type(conv).__name__ and ls.kind in (KIND_OF[name], "ConvTranspose2d")
        assert ls.n_filters == conv.out_channels
        assert ls.n_samples == sum(y.shape[0] * math.prod(y.shape[2:]) for y in ys[layer])
        assert reference.rel_err(ls.spectrum, s) < 1e-6, layer
        k, afie = reference.afie(s, conv.out_channels)
        assert math.isclose(ls.entropy, k, rel_tol=1e-7) and math.isclose(ls.afie, afie, rel_tol=1e-7), layer
        assert reference.rel_err(ls.filter_scores["variance"], np.diag(cov)) < 1e-6, layer
        assert reference.rel_err(ls.filter_scores["l1"], reference_weights(conv)[1]) < 1e-6, layer
        assert math.isclose(default.layers[layer].afie, afie, rel_tol=1e-4), layer
    if name == "resnet1d":  # the widening pointwise Conv1d accumulates its narrower input
        assert Observed(convs["blocks.0.expand"]).via_input and Observed(convs["blocks.1.expand"]).via_input


@pytest.mark.parametrize("name", list(CONV_KINDS))
def test_weight_scores_equal_the_float64_reference(name):
    model, _ = build(name)
    report = af.score(model, progress=False)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}
    assert list(report.layers) == list(convs)
    for layer, ls in report.layers.items():
        s, l1 = reference_weights(convs[layer])
        assert reference.rel_err(ls.spectrum, s) < 1e-9, layer
        k, afie = reference.afie(s, convs[layer].out_channels)
        assert math.isclose(ls.afie, afie, rel_tol=1e-9, abs_tol=1e-15), layer
        assert reference.rel_err(ls.filter_scores["l1"], l1) < 1e-6, layer


def test_transposed_and_pointwise_conv_kinds():
    # A transposed conv's filters are its output channels, grouped or not; a pointwise
    # transposed conv is no position-by-position map of its input, so it is observed directly.
    g = torch.Generator().manual_seed(3)
    up = nn.ConvTranspose1d(6, 8, 3, stride=2, groups=2)
    net = nn.Sequential(nn.Conv1d(3, 6, 3), up, nn.ReLU(), nn.Unflatten(2, (1, 1, -1)),  # (N, 8, L) → (N, 8, 1, 1, L)
                        nn.ConvTranspose3d(8, 4, 1), nn.Conv3d(4, 12, 1))
    report = af.score(net, progress=False)
    assert [ls.kind for ls in report] == ["Conv1d", "ConvTranspose1d", "ConvTranspose3d", "Conv3d"]
    w = up.weight.detach().double()  # (in, out/g, k): filter j of group i is column j of rows i·in/g…
    rows = torch.cat([w[i * 3:(i + 1) * 3].transpose(0, 1) for i in range(2)])  # (out, in/g, k)
    assert reference.rel_err(report.layers["1"].filter_scores["l1"], rows.abs().sum(dim=(1, 2))) < 1e-6
    s = torch.linalg.svdvals(rows.mean(dim=2))
    assert reference.rel_err(report.layers["1"].spectrum, s) < 1e-9
    assert not Observed(net[4]).via_input and Observed(net[5]).via_input
    x = torch.randn(5, 3, 40, generator=g)
    acts = af.score(net, [x], positions="all", precision="float64", progress=False)
    _, ys = conv_outputs(net, [x])
    for layer in acts.layers:
        s, _ = reference_activations(ys[layer])
        assert reference.rel_err(acts.layers[layer].spectrum, s) < 1e-6, layer


@pytest.mark.parametrize("name", list(CONV_KINDS))
@pytest.mark.parametrize("prune_residual", [False, True])
def test_pruning_removes_exactly_the_chosen_channels(name, prune_residual):
    model, batches = build(name)
    report = af.score(zero_even_channels(model), batches, progress=False)
    x = batches[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruned, stats = af.prune(model, report, target=0.25, example_inputs=x, allocation="uniform",
                                 prune_residual=prune_residual, progress=False)
    assert sum(b - a for b, a in stats.kept.values()) > 0, stats.skipped
    torch.testing.assert_close(pruned.eval()(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(CONV_KINDS))
def test_prunes_to_half_the_flops_at_the_defaults_exports_and_reloads(name, tmp_path):
    model, batches = build(name)
    x = batches[0]
    report = af.score(model, batches, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within 1 point of the target: no "closest whole filters" warning
        pruned, stats = af.prune(model, report, target=0.5, unit="flops", example_inputs=x, progress=False)
    pruned.eval()
    (macs0, params0), (macs1, params1) = reference.macs_and_params(model, x), reference.macs_and_params(pruned, x)
    assert (stats.macs_before, stats.macs_after, stats.params_after) == (macs0, macs1, params1)
    assert abs((1 - macs1 / macs0) - 0.5) <= 0.01, stats.summary()
    assert all(a >= 1 for _, a in stats.kept.values()) and params1 < params0
    y = model(x)
    assert pruned(x).shape == y.shape
    exported = torch.export.export(pruned, (x,))
    torch.testing.assert_close(exported.module()(x), pruned(x))
    loaded = af.load_pruned(build(name)[0], af.save_pruned(pruned, tmp_path / "p.safetensors"))
    assert torch.equal(loaded.eval()(x), pruned(x))


@pytest.mark.parametrize("shape,budget", [((2, 4, 5000), 300), ((2, 4, 6, 40, 40), 500), ((2, 4, 3, 7, 2), 5)])
def test_positions_budget_on_signals_and_volumes(shape, budget):
    # A signal is one row of positions and a volume's depth and height one axis of rows:
    # the lattice keeps at most `budget` positions per sample, and over its s² (or s)
    # offsets every position once.
    conv = nn.Conv1d(4, 6, 1, bias=False) if len(shape) == 3 else nn.Conv3d(4, 6, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(6, 4).reshape(conv.weight.shape))
    g = torch.Generator().manual_seed(11)
    x = torch.randn(shape, generator=g)
    plane = planar(x)
    from afie_fast.positions import Lattice, stride_for

    s = stride_for(plane.shape[2], plane.shape[3], budget)
    offsets = min(s, plane.shape[2]) * min(s, plane.shape[3])
    seen = torch.cat([Lattice(budget).view(plane, 0, b).flatten(2) for b in range(offsets)], dim=2)
    assert seen.shape[2] == plane.shape[2] * plane.shape[3]  # every position once
    assert torch.equal(seen[0, 0].sort().values, plane[0, 0].flatten().sort().values)
    report = af.score(nn.Sequential(conv), [x] * 3, positions=budget, progress=False)
    per_sample = report.layers["0"].n_samples / (3 * shape[0])
    assert per_sample <= budget and per_sample >= budget / 4
    full = af.score(nn.Sequential(conv), [x], positions="all", progress=False)
    assert math.isclose(report.layers["0"].afie, full.layers["0"].afie, rel_tol=0.05)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d", "sliced"])
def test_volumes_are_read_in_place_and_accumulate_exactly(layout):
    g = torch.Generator().manual_seed(5)
    y = torch.randn(3, 7, 4, 5, 6, generator=g) * 2 + 1
    if layout == "channels_last_3d":
        y = y.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "sliced":
        y = torch.randn(3, 9, 4, 5, 8, generator=g)[:, 1:8, :, :, ::2]
    plane = planar(y)
    if layout != "sliced":  # depth and height merge without a copy
        assert plane.data_ptr() == y.data_ptr() and plane.shape == (3, 7, 20, y.shape[4])
    acc = af.CovarianceAccumulator(7).update(y)
    mean, cov = reference.covariance(y.movedim(1, -1).reshape(-1, 7)[:, :, None, None])
    torch.testing.assert_close(acc.mean, torch.from_numpy(mean), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(acc.covariance(), torch.from_numpy(cov), rtol=1e-10, atol=1e-12)
    signal = torch.randn(4, 7, 33, generator=g)
    acc1 = af.CovarianceAccumulator(7).update(signal)
    _, cov1 = reference.covariance(signal.unsqueeze(2))
    torch.testing.assert_close(acc1.covariance(), torch.from_numpy(cov1), rtol=1e-10, atol=1e-12)
