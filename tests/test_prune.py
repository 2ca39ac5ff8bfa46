"""prune(): physically smaller models through torch-pruning."""
import copy
import warnings

import numpy as np
import pytest
import torch
import torch_pruning as tp
from torch import nn

import afie_fast as af
from afie_fast.models import digits_cnn
from nets import ARCHS, loader, randomised
import reference

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))


def scored(arch, **kw):
    torch.manual_seed(0)
    model = randomised(ARCHS[arch]())
    return model, af.score(model, loader(n_batches=2), progress=False, **kw)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_pruned_model_runs_smaller_and_original_untouched(arch):
    model, report = scored(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    y0 = model.eval()(X)
    pruned, stats = af.prune(model, report, target=0.5, example_inputs=X)
    assert pruned(X).shape == y0.shape
    macs, params = reference.macs_and_params(pruned, X)
    assert (stats.macs_after, stats.params_after) == (macs, params)
    assert stats.params_after < stats.params_before and stats.macs_after < stats.macs_before
    assert sum(p.numel() for p in pruned.parameters()) == params
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the caller's model is untouched
    assert torch.equal(model(X), y0)
    for name, (b, a) in stats.kept.items():
        assert dict(pruned.named_modules())[name].out_channels == a <= b


def test_counts_follow_the_report_and_lowest_filters_go():
    model, report = scored("vgg")
    counts = report.counts(0.5)
    for criterion in ("l1", "variance"):
        pruned, stats = af.prune(model, report, target=0.5, example_inputs=X, criterion=criterion)
        assert stats.reached == pytest.approx(sum(counts.values()) / sum(ls.n_filters for ls in report))
        for name, ls in report.layers.items():
            conv, new = dict(model.named_modules())[name], dict(pruned.named_modules())[name]
            assert new.out_channels == ls.n_filters - counts[name]
            scores = (conv.weight.detach().double().abs().sum((1, 2, 3)) if criterion == "l1"
                      else torch.tensor(ls.filter_scores["variance"]))
            keep = sorted(sorted(range(ls.n_filters), key=lambda j: (scores[j].item(), j))[counts[name]:])
            # Which filters survived, in every layer: their biases are distinct random values
            # (weights lose input channels after the first layer, biases do not).
            torch.testing.assert_close(new.bias, conv.bias[keep])
            if name == "0":  # the first conv keeps its input channels: whole rows are comparable
                torch.testing.assert_close(new.weight, conv.weight[keep])


def test_random_criterion_is_seeded():
    model, report = scored("vgg")
    a, _ = af.prune(model, report, target=0.4, example_inputs=X, criterion="random", seed=3)
    b, _ = af.prune(model, report, target=0.4, example_inputs=X, criterion="random", seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_independence_criterion():
    model, report = scored("vgg", criteria=("l1", "variance", "independence"))
    pruned, _ = af.prune(model, report, target=0.5, example_inputs=X, criterion="independence")
    first = dict(model.named_modules())["0"]
    k = report.counts(0.5)["0"]
    s = torch.tensor(report.layers["0"].filter_scores["independence"])
    keep = sorted(sorted(range(8), key=lambda j: (s[j].item(), j))[k:])
    torch.testing.assert_close(dict(pruned.named_modules())["0"].weight, first.weight[keep])


def test_residual_stream_whole_unless_asked():
    model, report = scored("resnet_bottleneck")
    pruned, stats = af.prune(model, report, target=0.5, example_inputs=X)
    for name in ("layer1.0.conv3", "layer1.0.downsample.0", "layer2.0.conv3", "stem.0"):
        if name in stats.kept:
            b, a = stats.kept[name]
            assert a == b or name == "stem.0"
    assert stats.kept["layer1.0.conv1"][1] < stats.kept["layer1.0.conv1"][0]  # inner convs are pruned
    assert "layer1.0.conv3" in stats.skipped
    pruned_r, stats_r = af.prune(model, report, target=0.5, example_inputs=X, prune_residual=True)
    assert stats_r.kept["layer1.0.conv3"][1] < stats_r.kept["layer1.0.conv3"][0]
    assert stats_r.kept["layer1.0.conv3"][1] == stats_r.kept["layer1.0.downsample.0"][1]  # one cut for the add
    assert pruned_r(X).shape == (2, 5)


def test_coupled_depthwise_gets_smallest_ratio_and_summed_scores():
    model, report = scored("depthwise_separable")
    pruned, stats = af.prune(model, report, target=0.5, example_inputs=X)
    assert stats.kept["conv"][1] == stats.kept["dw"][1]
    ratios = report.ratios(0.5)
    assert stats.kept["conv"][0] - stats.kept["conv"][1] <= round(min(ratios["conv"], ratios["dw"]) * 16) + 1
    # which filters: lowest summed L1 of the pair
    conv, dw = model.conv, model.dw
    s = conv.weight.detach().double().abs().sum((1, 2, 3)) + dw.weight.detach().double().abs().sum((1, 2, 3))
    k = 16 - stats.kept["conv"][1]
    keep = sorted(sorted(range(16), key=lambda j: (s[j].item(), j))[k:])
    torch.testing.assert_close(pruned.conv.weight, conv.weight[keep])


def test_flops_and_params_targets_within_one_percent():
    torch.manual_seed(0)
    model = digits_cnn()
    x = torch.randn(4, 1, 8, 8)
    report = af.score(model, [x, x + 1], progress=False)
    for unit in ("flops", "params"):
        pruned, stats = af.prune(model, report, target=0.4, unit=unit, example_inputs=x)
        before, after = (stats.macs_before, stats.macs_after) if unit == "flops" else (stats.params_before, stats.params_after)
        assert abs((1 - after / before) - 0.4) <= 0.01
        assert stats.reached == pytest.approx(1 - after / before)


def test_save_load_round_trip_no_pickle(tmp_path):
    model, report = scored("resnet_basic")
    pruned, _ = af.prune(model, report, target=0.5, example_inputs=X)
    path = af.save_pruned(pruned, tmp_path / "pruned.safetensors")
    assert b"pickle" not in path.read_bytes()[:64]
    fresh = randomised(ARCHS["resnet_basic"](), seed=9)  # same architecture, other weights
    loaded = af.load_pruned(fresh, path)
    pruned.eval(), loaded.eval()
    assert torch.equal(loaded(X), pruned(X))
    with pytest.raises(ValueError, match="another model"):
        af.load_pruned(ARCHS["vgg"](), path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a pruned model"):
        af.load_pruned(fresh, tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="returned by afie_fast.prune"):
        af.save_pruned(model, tmp_path / "x.safetensors")


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_prune_and_load_inside_no_grad_or_inference_mode(mode, tmp_path):
    # Users evaluate under no_grad/inference_mode and load there too; the graph trace needs
    # autograd, so prune and load_pruned must not depend on the caller's grad mode.
    model, report = scored("resnet_basic")
    with mode():
        x = X.clone()  # under inference_mode, an inference tensor
        pruned, stats = af.prune(model, report, target=0.5, example_inputs=x)
        loaded = af.load_pruned(randomised(ARCHS["resnet_basic"](), seed=9),
                                af.save_pruned(pruned, tmp_path / "p.safetensors"))
        pruned.eval(), loaded.eval()
        assert torch.equal(loaded(x), pruned(x))
    assert stats.reached > 0.4


def test_a_model_cut_by_torch_pruning_itself_saves_and_loads(tmp_path):
    """pruning_plan makes a plan for a model Torch-Pruning's own MetaPruner cut (the
    benchmarks save their Torch-Pruning baselines so), and load_pruned replays it."""
    from afie_fast.saving import pruning_plan

    torch.manual_seed(0)
    model = randomised(ARCHS["resnet_basic"]()).eval()
    work = randomised(ARCHS["resnet_basic"]()).eval()
    work.load_state_dict(model.state_dict())
    linears = [m for m in work.modules() if isinstance(m, nn.Linear)]
    pruner = tp.pruner.MetaPruner(work, X, tp.importance.MagnitudeImportance(), pruning_ratio=0.4,
                                  ignored_layers=linears)
    pruner.step()
    assert sum(p.numel() for p in work.parameters()) < sum(p.numel() for p in model.parameters())
    work.afie_fast_plan = pruning_plan(model, work, X, pruner.DG.pruning_history())
    path = af.save_pruned(work, tmp_path / "tp.safetensors")
    loaded = af.load_pruned(randomised(ARCHS["resnet_basic"](), seed=3), path)
    assert torch.equal(loaded.eval()(X), work(X))


def test_export_and_trace():
    model, report = scored("concat")
    pruned, _ = af.prune(model, report, target=0.5, example_inputs=X)
    pruned.eval()
    exported = torch.export.export(pruned, (X,))
    torch.testing.assert_close(exported.module()(X), pruned(X))
    with warnings.catch_warnings():  # torch 2.13 deprecates jit.trace; it must still work
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(pruned, X)
    torch.testing.assert_close(traced(X), pruned(X))


def test_onnx_export(tmp_path):
    onnx = pytest.importorskip("onnx", reason="optional extra: pip install 'afie_fast[onnx]'")
    model, report = scored("vgg")
    pruned, _ = af.prune(model, report, target=0.5, example_inputs=X)
    with warnings.catch_warnings():  # the TorchScript exporter (no onnxscript needed) is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(pruned.eval(), (X,), str(tmp_path / "m.onnx"), dynamo=False)
    graph = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(graph)
    weights = {init.name: tuple(init.dims) for init in graph.graph.initializer}
    assert (pruned[0].out_channels, 3, 3, 3) in weights.values()  # the pruned width is what was exported


def test_afie_importance_drives_metapruner():
    model, report = scored("vgg")
    imp = af.AFIEImportance(report, criterion="variance")
    modules = dict(model.named_modules())
    ratios = report.ratios(0.5)
    pruner = tp.pruner.MetaPruner(model, X, importance=imp, pruning_ratio_dict={modules[n]: r for n, r in ratios.items()},
                                  ignored_layers=[modules["9"] if "9" in modules else model[-1]])
    group = next(g for g in pruner.DG.get_all_groups(root_module_types=[nn.Conv2d]) if g[0].dep.target.module is modules["0"])
    scores = imp(group)
    np.testing.assert_allclose(scores.numpy(), np.float32(report.layers["0"].filter_scores["variance"]), rtol=1e-6)
    pruner.step()
    assert model(X).shape == (2, 5)
    assert modules["0"].out_channels < 8  # MetaPruner removed filters by AFIE ratio and importance


def test_bad_inputs():
    model, report = scored("vgg")
    with pytest.raises(ValueError, match="does not match this model"):
        af.prune(ARCHS["resnet_basic"](), report, example_inputs=X)
    wide = nn.Sequential(nn.Conv2d(3, 9, 3, padding=1), nn.BatchNorm2d(9), nn.ReLU(), nn.Conv2d(9, 12, 3, padding=1))
    with pytest.raises(ValueError, match=r"0 \(8 in the report, 9 in the model\)"):
        af.prune(wide, report, example_inputs=X)
    with pytest.raises(ValueError, match="target must be a fraction"):
        af.prune(model, report, target=1.5, example_inputs=X)
    with pytest.raises(ValueError, match="largest feasible target"):
        af.prune(model, report, target=0.99, example_inputs=X)
    weights = af.score(model, progress=False)
    with pytest.raises(ValueError, match="needs variance scores.*with a loader"):
        af.prune(model, weights, criterion="variance", example_inputs=X)
    with pytest.raises(ValueError, match="criteria=.*independence"):
        af.prune(model, report, criterion="independence", example_inputs=X)
    with pytest.raises(ValueError, match="unit"):
        af.prune(model, report, unit="bytes", example_inputs=X)
    with pytest.raises(TypeError, match="example_inputs"):
        af.prune(model, report)  # type: ignore[call-arg]


@pytest.mark.parametrize("how", ["name", "module"])
def test_ignored_layers_stay_whole_by_name_or_module(how):
    model, report = scored("vgg")
    ignored = ["3"] if how == "name" else [model[3]]  # the caller's module: prune works on a copy
    pruned, stats = af.prune(model, report, target=0.4, example_inputs=X, ignored_layers=ignored)
    assert stats.kept["3"] == (12, 12) and stats.skipped["3"].startswith("ignored_layers")
    assert stats.kept["0"][1] < 8


class _Counted(nn.Module):
    """Linear layers nested in a module that uses their weights without calling them
    (attention's projections), a conv subclass, norms, upsampling and pooling (free, as
    FlopCounterMode counts; so is eval-mode attention, one native op it has no formula for)."""

    class WSConv(nn.Conv2d):
        pass

    def __init__(self):
        super().__init__()
        self.conv, self.gn = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.ws, self.bn = self.WSConv(8, 8, 1), nn.BatchNorm2d(8, affine=False)
        self.up, self.pool = nn.Upsample(scale_factor=2), nn.AdaptiveAvgPool2d(4)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4))

    def forward(self, x):
        y = self.pool(self.up(torch.relu(self.bn(self.ws(self.gn(self.conv(x)))))))
        t = y.flatten(2).transpose(1, 2)
        t, _ = self.attn(t, t, t)
        return self.head(t.mean(1))


@pytest.mark.parametrize("batch", [1, 3])
def test_prune_counts_what_flop_counter_mode_counts(batch):
    from afie_fast.counting import Counting

    torch.manual_seed(0)
    model, x = _Counted().eval(), torch.randn(batch, 3, 8, 8)
    attrs = {n: set(vars(m)) for n, m in model.named_modules()}
    with Counting(model) as counting, torch.no_grad():
        model(x)
    assert (counting.measured.macs, counting.measured.params) == reference.macs_and_params(model, x)
    # attention uses out_proj's weights without calling it
    assert counting.measured.calls == {"conv": 1, "ws": 1, "attn.out_proj": 0, "head.1": 1}
    # per layer: what FlopCounterMode counts for each conv and linear alone, per input
    assert counting.measured.layers["conv"][0] == 8 * 3 * 9 * 64
    assert counting.measured.layers["ws"][0] == 8 * 8 * 64
    assert counting.measured.layers["head.1"][0] == 8 * 4
    assert counting.measured.layers["bn"] == (0.0, 0.0)
    assert counting.measured.shape == (batch, 4)
    assert {n: set(vars(m)) for n, m in model.named_modules()} == attrs  # nothing left behind
    assert not any(m._forward_hooks for m in model.modules())


class _Blurred(nn.Module):
    """A functional conv (a fixed blur, as anti-aliased CNNs apply) that no conv module's
    hook sees, before an ordinary CNN."""

    def __init__(self):
        super().__init__()
        self.register_buffer("blur", torch.ones(3, 1, 3, 3) / 9)
        self.body = ARCHS["vgg"]()

    def forward(self, x):
        return self.body(nn.functional.conv2d(x, self.blur, padding=1, groups=3))


class _Gram(nn.Module):
    """Conv outputs that meet in a matmul outside any layer (bilinear pooling)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        t = self.conv(x).flatten(2)
        return t @ t.transpose(1, 2)


def test_counting_by_layers_only_where_they_hold_every_flop():
    from afie_fast.counting import Counting

    torch.manual_seed(0)
    for model, covered in ((ARCHS["vgg"]().eval(), True), (_Gram().eval(), False), (_Blurred().eval(), False)):
        with Counting(model) as exact, torch.no_grad():
            model(X)
        with Counting(model, dispatch=False) as by_layers, torch.no_grad():
            model(X)
        assert exact.measured.by_layers is covered and by_layers.measured.by_layers is None
        assert exact.measured.macs == reference.macs_and_params(model, X)[0]
        assert (by_layers.measured.macs == exact.measured.macs) is covered
    # prune counts the pruned copy op by op when the layers' hooks miss some FLOPs
    model = randomised(_Blurred())
    report = af.score(model, loader(n_batches=2), progress=False)
    pruned, stats = af.prune(model, report, target=0.5, example_inputs=X, progress=False)
    assert (stats.macs_before, stats.macs_after) == (reference.macs_and_params(model, X)[0],
                                                     reference.macs_and_params(pruned.eval(), X)[0])


@pytest.mark.parametrize("enabled", [True, False])
def test_prune_leaves_the_garbage_collector_as_it_found_it(enabled):
    import gc

    model, report = scored("vgg")
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        af.prune(model, report, target=0.5, example_inputs=X)
        assert gc.isenabled() == enabled
        with pytest.raises(ValueError, match="out of reach"):
            af.prune(model, report, target=0.999, unit="flops", example_inputs=X)
        assert gc.isenabled() == enabled
    finally:
        (gc.enable if was else gc.disable)()


def test_prune_progress_bar_counts_the_steps(monkeypatch, recwarn):
    import tqdm.auto

    bars = []

    class Recorded(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            self.phases, self.shown = [], not kwargs.get("disable")
            super().__init__(*args, **kwargs)
            bars.append(self)

        def set_description_str(self, desc=None, refresh=True):
            self.phases.append(desc)
            super().set_description_str(desc, refresh)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorded)
    model, report = scored("resnet_basic")
    warnings.simplefilter("ignore", UserWarning)  # whole filters of so small a net land ~1% off
    af.prune(model, report, target=0.5, unit="flops", example_inputs=X, progress=False)
    assert not bars[-1].shown
    af.prune(model, report, target=0.5, unit="flops", example_inputs=X)
    bar, convs = bars[-1], sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    assert bar.shown and bar.delay == 2.0  # shown only once prune has run 2 s
    assert [p.split(": ")[1] for p in bar.phases] == ["trace", "groups", "cut", "check"]
    # one step for the trace, one per conv or linear read, one per unit cut, one for the check
    assert bar.n == bar.total > convs + 2


@pytest.mark.parametrize("width, groups, multiple, block, k, expected", [
    (32, 1, 4, 1, 10, 8),   # keeps 24, a multiple of the heads
    (32, 2, 4, 1, 7, 4),    # whole positions of 2 groups and a multiple of 4 kept
    (32, 1, 1, 1, 7, 7),
    (7, 2, 2, 1, 5, 0),     # no count keeps an odd width even with whole pairs: nothing, not a hang
    (30, 1, 4, 1, 20, 18),  # keeps 12: a multiple of the heads, though 30 was not
    (32, 1, 1, 4, 10, 8),   # whole blocks of 4 (a pixel shuffle's r² channels)
])
def test_whole_positions_rounds_down_to_a_count_the_unit_can_lose(width, groups, multiple, block, k, expected):
    from types import SimpleNamespace

    from afie_fast.pruning import _whole_positions

    unit = SimpleNamespace(width=width, channel_groups=groups, multiple=multiple, block=block)
    got = _whole_positions(unit, k)
    assert got == expected
    assert got % groups == 0 and got % block == 0 and (got == 0 or (width - got) % multiple == 0)


def test_index_growth_is_bounded_per_group():
    # Torch-Pruning reads an attention's head split as a flatten (channel i → s indices);
    # around a residual stream the indices multiplied block after block until Swin-T's
    # prune() held 24 GiB. Inside _bounded_indices a flatten or a group past the limit
    # raises (groups() turns that into the group's cause), and reset() starts a new count.
    from afie_fast.coupling import _bounded_indices

    flatten = tp.dependency.index_mapping._FlattenIndexMapping
    idxs = [tp._helpers._HybridIndex(idx=i, root_idx=i) for i in range(10)]
    with _bounded_indices(100) as held:
        assert len(flatten(stride=10)(idxs)) == 100
        assert len(flatten(stride=10, reverse=True)(idxs * 50)) == 10  # narrowing (// 10, per root) is never refused
        with pytest.raises(RuntimeError, match="multiply past 100"):
            flatten(stride=11)(idxs)
        group = tp.dependency.Group()
        group.add_dep("a", idxs * 6)
        with pytest.raises(RuntimeError, match="multiply past 100"):
            group.add_dep("b", idxs * 5)
        held.reset()
        group.add_dep("c", idxs * 10)
    assert len(flatten(stride=1000)(idxs)) == 10000  # Torch-Pruning's own again outside


class FixedGather(nn.Module):
    """A channel order held in a buffer (as TinyViT indexes its attention biases): a cut of
    conv1 leaves the index pointing past the narrowed tensor, an IndexError in forward."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 16, 3)
        self.register_buffer("order", torch.arange(8).flip(0))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        y = self.conv2(torch.relu(self.conv1(x))[:, self.order])
        return self.head(self.conv3(torch.relu(y)).mean((2, 3)))


def test_a_cut_whose_forward_raises_index_error_is_left_whole():
    # Tried as a new user would (timm's tiny_vit_5m_224, linear=True): the pruned copy's
    # check let the forward's IndexError escape prune(). Any error a forward raises on a
    # wrong width now marks that cut as one that stops the model from running.
    torch.manual_seed(0)
    model, x = FixedGather().eval(), torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    report = af.score(model, [x], progress=False)
    pruned, stats = af.prune(model, report, target=0.25, unit="filters", example_inputs=x[:1])
    assert "stops the model from running" in stats.skipped["conv1"] and "out of bounds" in stats.skipped["conv1"]
    assert stats.kept["conv1"] == (8, 8) and stats.kept["conv2"][1] < 16
    assert pruned(x).shape == (4, 4)


def test_retraces_do_not_pile_up(monkeypatch):
    # Each retrace (the search for a cut that stops the model from running) left the last
    # graph, its model copy and its autograd graph in reference cycles: Twins-SVT-S peaked
    # at 11.8 GB, 1.3 GB now. At every trace at most one earlier graph may be alive.
    import gc

    from afie_fast import pruning

    real, alive = pruning.build_graph, []

    def counting(*args, **kwargs):
        alive.append(sum(type(o) is tp.DependencyGraph for o in gc.get_objects()))
        return real(*args, **kwargs)

    monkeypatch.setattr(pruning, "build_graph", counting)
    torch.manual_seed(0)
    model, x = FixedGather().eval(), torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    af.prune(model, af.score(model, [x], progress=False), target=0.25, unit="filters", example_inputs=x[:1])
    assert len(alive) > 1 and max(alive) <= 1, alive  # at most one a caller still holds


class _GroupNormed(nn.Module):
    """A ResNet-GN / BiT block (timm's resnetv2_50x1_bit, EfficientNet-GN, diffusion UNets,
    detection heads): convs followed by GroupNorm, whose channels must stay a multiple of
    its groups, each channel in the group it was in; and a residual add."""

    def __init__(self, groups=(8, 4, 8)):
        super().__init__()
        self.stem, self.n0 = nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(groups[0], 32)
        self.a, self.na = nn.Conv2d(32, 48, 3, padding=1), nn.GroupNorm(groups[1], 48)
        self.b, self.nb = nn.Conv2d(48, 32, 1), nn.GroupNorm(groups[2], 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = torch.relu(self.n0(self.stem(x)))
        x = torch.relu(x + self.nb(self.b(torch.relu(self.na(self.a(x))))))
        return self.head(x.mean((2, 3)))


def test_group_norm_keeps_its_groups_whole_and_aligned():
    torch.manual_seed(0)
    model = _GroupNormed().eval()
    for m in model.modules():  # distinct biases: which filters survived, and where
        if isinstance(m, (nn.Conv2d, nn.GroupNorm)):
            nn.init.normal_(m.bias)
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    report = af.score(model, [x], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # whole groups of filters: "the closest … get to 50%"
        pruned, stats = af.prune(model, report, target=0.5, unit="flops", example_inputs=x[:1], prune_residual=True,
                                 progress=False)
    assert abs(stats.reached - 0.5) <= 0.05 and not stats.skipped, stats.summary()
    for conv, norm in [("stem", "n0"), ("a", "na"), ("b", "nb")]:
        old, new, gn = getattr(model, conv), getattr(pruned, conv), getattr(pruned, norm)
        assert new.out_channels < old.out_channels and gn.num_channels == new.out_channels
        g = gn.num_groups
        assert new.out_channels % g == 0
        kept = [int((old.bias == b).nonzero()) for b in new.bias]  # original index of each kept filter
        size, old_size = new.out_channels // g, old.out_channels // g
        # channel j of the cut layer is in group j // size, as its original was in group i // old_size
        assert [i // old_size for i in kept] == [j // size for j in range(new.out_channels)]
        torch.testing.assert_close(gn.bias, getattr(model, norm).bias[kept])
    assert pruned(x).shape == (4, 5)


def test_instance_norm_running_statistics_are_cut_with_its_channels():
    """Torch-Pruning's InstanceNorm pruner cuts weight and bias but not the running
    statistics that track_running_stats=True keeps: the forward then failed, and the conv
    before it was left whole."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.InstanceNorm2d(16, affine=True, track_running_stats=True), nn.ReLU(),
                          nn.Conv2d(16, 8, 1)).eval()
    nn.init.normal_(model[0].bias)
    model[1].running_mean.normal_(), model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    report = af.score(model, [x], progress=False)
    pruned, stats = af.prune(model, report, target=0.5, example_inputs=x[:1], progress=False)
    kept = [int((model[0].bias == b).nonzero()) for b in pruned[0].bias]
    assert 0 < len(kept) < 16 and "0" not in stats.skipped
    for name in ("running_mean", "running_var", "weight", "bias"):
        torch.testing.assert_close(getattr(pruned[1], name), getattr(model[1], name)[kept])
    # in eval mode the norm is per channel: the cut model is the original on the kept channels
    h = model[2](model[1](model[0](x)))[:, kept]
    expected = torch.nn.functional.conv2d(h, model[3].weight[:, kept], model[3].bias)
    torch.testing.assert_close(pruned(x), expected)


@pytest.mark.parametrize("reader", ["channel multiplier", "group norm per channel"])
def test_channels_read_in_groups_of_one_stay_whole_with_that_cause(reader):
    """A conv with a channel multiplier (groups=in_channels, out_channels=k·in_channels)
    and a GroupNorm with one channel per group read their input in groups of one: any cut
    empties a group. Before, the first was a unit that could never be cut, named nowhere,
    the second a cut that broke the forward."""
    torch.manual_seed(0)
    reading = (nn.Conv2d(16, 32, 3, groups=16) if reader == "channel multiplier"
               else nn.Sequential(nn.GroupNorm(16, 16), nn.Conv2d(16, 32, 3)))
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), reading, nn.ReLU(), nn.Conv2d(32, 8, 1)).eval()
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    report = af.score(model, [x], progress=False)
    pruned, stats = af.prune(model, report, target=0.5, example_inputs=x[:1], progress=False)
    assert stats.kept["0"] == (16, 16) and "groups of one" in stats.skipped["0"]
    assert pruned(x).shape == (4, 8, 8, 8)


class _SubPixel(nn.Module):
    """ESPCN/EDSR's sub-pixel upsampler (a conv to C·r² channels, a pixel shuffle to C),
    and a pixel unshuffle (space to depth) before a conv, with a concat of the stem
    beside it: channel blocks of r² become one channel, or one channel a block."""

    def __init__(self, r=2):
        super().__init__()
        self.stem, self.up = nn.Conv2d(3, 12, 3, padding=1), nn.Conv2d(12, 8 * r * r, 3, padding=1)
        self.shuffle, self.mid = nn.PixelShuffle(r), nn.Conv2d(8, 6, 3, padding=1)
        self.unshuffle, self.head = nn.PixelUnshuffle(r), nn.Conv2d(6 * r * r + 12, 5, 1)

    def forward(self, x):
        s = torch.relu(self.stem(x))
        y = torch.relu(self.mid(self.shuffle(self.up(s))))
        return self.head(torch.cat([self.unshuffle(y), s], 1))


def test_pixel_shuffles_cut_whole_blocks_exactly():
    """Before, the conv feeding a pixel shuffle was left whole (its cut, channel by
    channel, broke the next conv) and a pixel unshuffle's input conv was cut as if the
    shuffle kept channels one to one (the same failure). With the blocks that the
    shuffles map zeroed, the cut must leave the outputs unchanged."""
    torch.manual_seed(0)
    model = _SubPixel().eval()
    with torch.no_grad():
        for name, zero in (("up", list(range(4, 8)) + list(range(20, 24))), ("mid", [1, 4]), ("stem", [2, 7, 9, 11])):
            conv = getattr(model, name)  # whole blocks before the shuffle, single channels before the unshuffle
            conv.weight[zero], conv.bias[zero] = 0, 0
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    report = af.score(model, [x], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruned, stats = af.prune(model, report, target=1 / 3, allocation="uniform", example_inputs=x[:1],
                                 progress=False)
    assert stats.kept["up"] == (32, 24) and stats.kept["mid"] == (6, 4) and stats.kept["stem"] == (12, 8), stats.summary()
    assert pruned.mid.in_channels == 6 and pruned.head.in_channels == 4 * 4 + 8
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x))


def test_pixel_shuffle_cuts_replay_on_load(tmp_path):
    torch.manual_seed(0)
    model, x = _SubPixel().eval(), torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    pruned, stats = af.prune(model, af.score(model, [x], progress=False), target=0.5, example_inputs=x[:1],
                             progress=False)
    assert stats.kept["up"][1] % 4 == 0 and stats.kept["up"][1] < 32
    loaded = af.load_pruned(_SubPixel(), af.save_pruned(pruned, tmp_path / "p.safetensors"))
    assert torch.equal(loaded.eval()(x), pruned(x))


class _Detector(nn.Module):
    """Detection-style post-processing: how many boxes it keeps depends on the data (and
    the weights), as in torchvision's and YOLO's detectors in eval mode."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
        self.cls, self.box = nn.Conv2d(32, 1, 1), nn.Conv2d(32, 4, 1)

    def forward(self, x):
        f = self.body(x)
        scores = self.cls(f).sigmoid().flatten(1)
        boxes = self.box(f).flatten(2).transpose(1, 2)
        return [{"boxes": b[s > 0.5], "scores": s[s > 0.5]} for b, s in zip(boxes, scores)]


def test_outputs_whose_size_depends_on_the_data_do_not_read_as_a_broken_cut():
    """The pruned copy keeps other boxes than the original; the size of the output then
    differed and every cut read as breaking the model: "nothing to prune"."""
    torch.manual_seed(0)
    model = _Detector().eval()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.bias)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # about half the positions kept
        model.cls.bias -= model.cls(model.body(x[:1])).median()
    report = af.score(model, [x], progress=False)
    pruned, stats = af.prune(model, report, target=0.5, example_inputs=x[:1], progress=False)
    assert len(pruned(x[:1])[0]["scores"]) != len(model(x[:1])[0]["scores"])  # what made cuts look broken
    assert set(stats.skipped) == {"cls", "box"} and pruned.body[2].out_channels < 32
    zeroed = copy.deepcopy(model)  # removing filters is zeroing them (0 through ReLU: nothing to the next conv)
    for i in (0, 2):
        gone = [k for k, b in enumerate(model.body[i].bias) if not (pruned.body[i].bias == b).any()]
        zeroed.body[i].weight.data[gone], zeroed.body[i].bias.data[gone] = 0, 0
    for got, want in zip(pruned(x), zeroed(x)):
        for key in ("boxes", "scores"):
            torch.testing.assert_close(got[key], want[key])


class _Gated(nn.Module):
    """Gated activations over the two halves of a conv's channels: GLU, and WaveNet's
    tanh(a) · sigmoid(b) after x.chunk(2, 1). Channel k of one half goes with channel k of
    the other; both were left whole."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.a, self.b, self.c = nn.Conv1d(4, 64, 3, padding=1), nn.Conv1d(32, 48, 3, padding=1), nn.Conv1d(48, 8, 1)

    def forward(self, x):
        h = self.a(x)
        if self.kind == "glu":
            h = torch.nn.functional.glu(h, dim=1)
        else:
            p, q = h.chunk(2, dim=1)
            h = torch.tanh(p) * torch.sigmoid(q)
        return self.c(torch.relu(self.b(h))).mean(-1)


@pytest.mark.parametrize("kind", ["glu", "chunk"])
def test_gated_halves_are_cut_in_pairs(kind):
    torch.manual_seed(0)
    model = _Gated(kind).eval()
    for conv in (model.a, model.b):
        nn.init.normal_(conv.bias)
    x = torch.randn(4, 4, 32, generator=torch.Generator().manual_seed(1))
    report = af.score(model, [x], progress=False)
    pruned, stats = af.prune(model, report, target=0.4, example_inputs=x[:1], progress=False)
    assert "a" not in stats.skipped and pruned.a.out_channels < 64, stats.summary()
    kept = [int((model.a.bias == b).nonzero()) for b in pruned.a.bias]
    assert sorted(k for k in kept if k < 32) == sorted(k - 32 for k in kept if k >= 32)  # the same in both halves
    # a removed pair gives 0 (tanh(0) · σ(0), 0 · σ(0)), which adds nothing to b: it is a zeroed pair
    zeroed = copy.deepcopy(model)
    for name in ("a", "b"):
        old, new = getattr(model, name), getattr(pruned, name)
        gone = [k for k, b in enumerate(old.bias) if not (new.bias == b).any()]
        getattr(zeroed, name).weight.data[gone], getattr(zeroed, name).bias.data[gone] = 0, 0
    torch.testing.assert_close(pruned(x), zeroed(x))


class _CRNN(nn.Module):
    """A CRNN (text and sound recognition): conv features of a map four rows high, read
    column by column by a recurrent layer, each column's channels and rows as one vector."""

    def __init__(self, rnn):
        super().__init__()
        self.cnn = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d((2, 1)))
        self.rnn = rnn(32 * 4, 24, num_layers=2, bidirectional=True)
        self.fc = nn.Linear(48, 11)

    def forward(self, x):
        f = self.cnn(x)
        n, c, h, w = f.shape
        y, _ = self.rnn(f.permute(3, 0, 1, 2).reshape(w, n, c * h))
        return self.fc(y)


@pytest.mark.parametrize("rnn", [nn.GRU, nn.LSTM, nn.RNN])
def test_convs_feeding_a_recurrent_layer_are_cut_with_its_inputs(rnn, tmp_path):
    """Torch-Pruning has no GRU or RNN pruner and traced their CPU forward op by op (into a
    gate split it cannot map), and it maps a flatten only from dim 1 of a 4-D tensor: the
    LSTM lost one feature per channel where it had four. The last conv stayed whole."""
    torch.manual_seed(0)
    model = _CRNN(rnn).eval()
    for i in (0, 3):
        nn.init.normal_(model.cnn[i].bias)
    x = torch.randn(4, 1, 16, 32, generator=torch.Generator().manual_seed(1))
    report = af.score(model, [x], progress=False)
    pruned, stats = af.prune(model, report, target=0.5, example_inputs=x[:1], progress=False)
    assert not stats.skipped and pruned.cnn[3].out_channels < 32
    assert pruned.rnn.input_size == 4 * pruned.cnn[3].out_channels and pruned.rnn.hidden_size == 24
    zeroed = copy.deepcopy(model)  # a removed filter gives 0 features, which add nothing to the RNN's input
    for i in (0, 3):
        gone = [k for k, b in enumerate(model.cnn[i].bias) if not (pruned.cnn[i].bias == b).any()]
        zeroed.cnn[i].weight.data[gone], zeroed.cnn[i].bias.data[gone] = 0, 0
    torch.testing.assert_close(pruned(x), zeroed(x))
    loaded = af.load_pruned(_CRNN(rnn).eval(), af.save_pruned(pruned, tmp_path / "crnn.safetensors"))
    torch.testing.assert_close(loaded(x), pruned(x), rtol=0, atol=0)
