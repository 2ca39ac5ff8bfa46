"""prune() on the couplings of real architectures, each as a small hand-written motif:
conv heads, channel shuffle, split and slice, grouped convs, Linear MLPs."""
import warnings

import pytest
import torch
from torch import nn

import afie_fast as af
from afie_fast.layers import width
from nets import ARCHS, MOTIFS, CatResidual, ConvNeXtBlock, HiddenTie, loader, randomised
import reference

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))
ALL = {**ARCHS, **MOTIFS}


def build(name, seed=0):
    torch.manual_seed(seed)
    model = randomised(ALL[name]()).eval()
    return model, af.score(model, loader(n_batches=2), progress=False)


def zero_even_channels(model):
    """Make every even-indexed filter of every conv (any rank, transposed too) and Linear
    output exactly 0 (weights, bias, and the BN after it), so that those channels carry
    nothing through the network."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and width(m) >= 2:
                (m.weight[:, ::2] if getattr(m, "transposed", False) else m.weight[::2]).zero_()
                if m.bias is not None:
                    m.bias[::2] = 0
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean[::2] = 0
                if m.bias is not None:
                    m.bias[::2] = 0
    return model


# Weight standardisation's mean and variance run over each filter's inputs, so removing
# even a dead input channel rescales the rest; a transposed attention's softmax runs over
# every channel of a head, dead ones too: no exact cut exists (their own tests follow).
EXACT = [name for name in ALL if name not in ("norm_free", "attention")]


@pytest.mark.parametrize("name", EXACT)
@pytest.mark.parametrize("prune_residual", [False, True])
def test_pruning_removes_exactly_the_chosen_channels(name, prune_residual):
    # If every removed channel is identically zero in the original, the pruned model must
    # compute the same function. A coupling cut wrongly (a shuffle or split mapped as the
    # identity, a group cut unevenly, a head pruned) removes live channels and fails this.
    model, report = build(name)
    zero_even_channels(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruned, stats = af.prune(model, report, target=0.25, example_inputs=X, allocation="uniform",
                                 prune_residual=prune_residual)
    assert sum(b - a for b, a in stats.kept.values()) > 0, stats.skipped
    torch.testing.assert_close(pruned.eval()(X), model(X), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(MOTIFS))
def test_motif_prunes_to_flops_target_keeps_shape_exports_and_reloads(name, tmp_path):
    model, report = build(name)
    y = model(X)
    for unit, target in (("flops", 0.5), ("filters", 0.3)):
        try:
            with warnings.catch_warnings():  # a tiny net's whole filters may land 1-2% off
                warnings.simplefilter("ignore", UserWarning)
                pruned, stats = af.prune(model, report, target=target, unit=unit, example_inputs=X)
        except ValueError as exc:  # only a clearly stated structural limit may stop it
            assert "out of reach" in str(exc) and "left whole" in str(exc)
            continue
        pruned.eval()
        assert pruned(X).shape == y.shape
        assert all(m.out_channels >= 1 for m in pruned.modules() if isinstance(m, nn.Conv2d))
        if unit == "flops":
            assert abs(stats.reached - target) <= 0.05  # one filter of these tiny nets is ~4% of the FLOPs
            # what prune counts is what torch.utils.flop_counter.FlopCounterMode counts
            (before, _), (after, _) = reference.macs_and_params(model, X), reference.macs_and_params(pruned, X)
            assert abs((1 - after / before) - stats.reached) <= 0.005
        exported = torch.export.export(pruned, (X,))
        torch.testing.assert_close(exported.module()(X), pruned(X))
        loaded = af.load_pruned(ALL[name](), af.save_pruned(pruned, tmp_path / f"{name}.safetensors"))
        assert torch.equal(loaded.eval()(X), pruned(X))


@pytest.mark.parametrize("name, head", [("conv_head", "classifier"), ("seg_head", "head")])
def test_layers_whose_channels_reach_the_output_stay_whole(name, head):
    model, report = build(name)
    pruned, stats = af.prune(model, report, target=0.5, example_inputs=X)
    assert stats.kept[head][0] == stats.kept[head][1]
    assert stats.skipped[head] == "its channels reach the model's output"
    assert pruned(X).shape == model(X).shape
    assert any(a < b for b, a in stats.kept.values())  # the body is pruned


@pytest.mark.parametrize("name, whole, pruned_layer", [
    ("shuffle", "stem", "branch.0"),       # the stem's channels are chunked (an equal split) and shuffled
    ("ghost", "primary.0", "conv"),        # the primary conv's channels are concatenated, then sliced
    ("mixconv", "stem", "conv"),           # the stem's channels are split by fixed sizes
])
def test_split_shuffle_and_slice_leave_their_convs_whole_with_a_reason(name, whole, pruned_layer):
    model, report = build(name)
    pruned, stats = af.prune(model, report, target=0.4, example_inputs=X)
    assert stats.kept[whole][0] == stats.kept[whole][1]
    assert any(word in stats.skipped[whole] for word in ("split", "reshape", "channel shuffle"))
    assert stats.kept[pruned_layer][1] < stats.kept[pruned_layer][0]
    assert pruned(X).shape == model(X).shape


def test_grouped_conv_loses_whole_positions_of_every_group():
    model, report = build("resnext")
    pruned, stats = af.prune(model, report, target=0.5, example_inputs=X)
    conv2 = pruned.conv2
    assert conv2.groups == 4
    assert conv2.out_channels < 16 and conv2.out_channels % 4 == 0 and conv2.in_channels % 4 == 0
    # Which filters survived: found by their (distinct, random) biases.
    bias = model.conv2.bias.detach().tolist()
    kept = [bias.index(b) for b in conv2.bias.detach().tolist()]
    positions = [sorted(i % 4 for i in kept if i // 4 == g) for g in range(4)]
    assert all(p == positions[0] for p in positions)  # the same positions in every group
    assert pruned(X).shape == (2, 5)


def test_prunable_share_and_out_of_reach_names_the_cause():
    model, report = build("resnet_basic")
    _, stats = af.prune(model, report, target=0.3, example_inputs=X)
    assert 0 < stats.prunable_macs < 1 and 0 < stats.prunable_params < 1
    assert "prunable:" in stats.summary()
    with pytest.raises(ValueError, match=r"out of reach.*residual stream.*prune_residual=True"):
        af.prune(model, report, target=0.9, unit="flops", example_inputs=X, prune_residual=False)


def test_residual_streams_join_only_when_the_target_needs_them():
    model, report = build("resnet_bottleneck")
    kept = lambda residual, target: af.prune(model, report, target=target, unit="flops", example_inputs=X,
                                              prune_residual=residual, progress=False)[1]
    auto, inner = kept("auto", 0.3), kept(False, 0.3)
    assert auto.kept == inner.kept and not auto.residual_streams
    streams = {n for n, why in inner.skipped.items() if why.startswith("residual stream")}
    assert streams and all("reachable without it" in auto.skipped[n] for n in streams)
    with pytest.raises(ValueError, match=r"out of reach.*the most is 8.*prune_residual=True would add"):
        kept(False, 0.9)
    auto, every = kept("auto", 0.9), kept(True, 0.9)
    assert auto.kept == every.kept and abs(auto.reached - 0.9) <= 0.01
    assert set(auto.residual_streams) == streams
    assert all("out of reach without them (at most 8" in why for why in auto.residual_streams.values())
    assert "residual streams cut" in auto.summary()


def test_a_reachable_target_that_whole_filters_miss_is_a_warning_not_an_error():
    # Whole filters of a tiny net move its FLOPs in steps of a few percent: 30% lands at
    # 27.9%, yet 70% is within reach, so 30% is not "out of reach".
    model, report = build("resnet_basic")
    with pytest.warns(UserWarning, match=r"27.9% is the closest whole filters get to 30%"):
        af.prune(model, report, target=0.3, unit="flops", example_inputs=X, prune_residual=False)


def test_nothing_to_prune_says_why_and_points_at_linear_layers():
    torch.manual_seed(0)
    model = ConvNeXtBlock().eval()
    report = af.score(model, loader(n_batches=1), progress=False)
    with pytest.raises(ValueError, match=r"nothing to prune.*residual stream.*score\(\.\.\., linear=True\)"):
        af.prune(model, report, target=0.5, example_inputs=X, prune_residual=False)
    # at the default the residual stream, all there is to cut without the Linear layers, joins
    pruned, stats = af.prune(model, report, target=0.5, example_inputs=X)
    assert set(stats.residual_streams) == {"stem", "dw"} and stats.kept["stem"] == (16, 8)
    assert pruned(X).shape == model(X).shape


@pytest.mark.parametrize("source", ["activations", "weights"])
def test_linear_mlp_between_depthwise_convs_is_pruned(source):
    torch.manual_seed(0)
    model = ConvNeXtBlock().eval()
    data = loader(n_batches=2) if source == "activations" else None
    report = af.score(model, data, source=source, linear=True, progress=False)
    assert set(report.layers) == {"stem", "dw", "fc1", "fc2", "head"}
    assert report.layers["fc1"].n_filters == 64
    if source == "activations":  # every (batch, row, column) position is an observation of fc1's 64 outputs
        assert report.layers["fc1"].n_samples == 2 * 8 * 4 * 4
    else:  # the paper's weight source for a Linear: singular values of its weight
        s = torch.linalg.svdvals(model.fc1.weight.detach().double())
        torch.testing.assert_close(torch.tensor(report.layers["fc1"].spectrum, dtype=torch.float64), s)
    pruned, stats = af.prune(model, report, target=0.3, unit="flops", example_inputs=X)
    assert stats.kept["fc1"][1] < 64 and pruned.fc1.out_features == pruned.fc2.in_features
    assert stats.skipped["fc2"].startswith("residual") and stats.skipped["head"].endswith("output")
    assert abs(stats.reached - 0.3) <= 0.02
    assert pruned(X).shape == (2, 5)


def test_linear_pruning_removes_exactly_the_chosen_channels():
    torch.manual_seed(0)
    model = zero_even_channels(ConvNeXtBlock().eval())
    report = af.score(model, loader(n_batches=2), linear=True, progress=False)
    pruned, stats = af.prune(model, report, target=0.25, example_inputs=X, allocation="uniform")
    assert stats.kept["fc1"][1] < 64
    torch.testing.assert_close(pruned(X), model(X), rtol=1e-5, atol=1e-5)


class Versioned(nn.Conv2d):
    """A module whose loading needs its state-dict version (as torchvision's MNASNet)."""

    _version = 2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        if local_metadata.get("version") != 2:
            raise ValueError(f"version should be 2, got {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def test_load_pruned_keeps_module_versions(tmp_path):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(Versioned(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 5)).eval()

    model = make()
    report = af.score(model, loader(n_batches=1), progress=False)
    pruned, _ = af.prune(model, report, target=0.4, example_inputs=X)
    loaded = af.load_pruned(make(), af.save_pruned(pruned, tmp_path / "v.safetensors"))
    assert torch.equal(loaded.eval()(X), pruned.eval()(X))


@pytest.mark.parametrize("prune_residual", [False, True])
def test_weight_standardised_convs_cut_their_own_gain(prune_residual, tmp_path):
    # NF-Net convs keep a per-filter gain beside weight and bias; it must lose the same
    # filters. The stem reads the 3 input channels, so its kept weight rows are original
    # rows unchanged: their positions say which gains must remain.
    model, report = build("norm_free")
    pruned, stats = af.prune(model, report, target=0.4, example_inputs=X, allocation="uniform",
                             prune_residual=prune_residual)
    assert stats.kept["stem"][1] < stats.kept["stem"][0] or stats.kept["conv1"][1] < stats.kept["conv1"][0]
    for name, conv in pruned.named_modules():
        if isinstance(conv, nn.Conv2d):
            assert conv.gain.shape == (conv.out_channels, 1, 1, 1), name
    rows = [int(torch.nonzero((model.stem.weight == w).flatten(1).all(1))[0]) for w in pruned.stem.weight]
    torch.testing.assert_close(pruned.stem.gain, model.stem.gain[rows], rtol=0, atol=0)
    assert pruned(X).shape == model(X).shape
    loaded = af.load_pruned(randomised(ALL["norm_free"]()), af.save_pruned(pruned, tmp_path / "p.safetensors"))
    assert torch.equal(loaded.eval()(X), pruned.eval()(X))


def cut_both_ways(model, x, monkeypatch, **kw):
    """prune() as it is, and with every cut made by Torch-Pruning's own get_pruning_group
    (the group rebuilt and the whole graph re-mapped for each); how many groups were fixed
    (cut from the group built at trace time, the rest re-map only their own nodes)."""
    from afie_fast import coupling

    fixed = []
    real = coupling._fixed_mapping
    monkeypatch.setattr(coupling, "_fixed_mapping", lambda group: fixed.append(real(group)) or fixed[-1])
    report = af.score(model, source="weights", progress=False, linear=kw.pop("linear", False))

    def torch_pruning_cut(graph, unit, idxs):
        with coupling._index_mapping([]), coupling._own_parameters_follow():  # a conv's own gain: not Torch-Pruning's
            graph.dg.get_pruning_group(unit.root, unit.handler, idxs).prune()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ours, _ = af.prune(model, report, example_inputs=x, **kw)
        monkeypatch.setattr(coupling.Graph, "prune", torch_pruning_cut)
        theirs, _ = af.prune(model, report, example_inputs=x, **kw)
    return ours, theirs, sum(fixed)


def assert_same_cut(a, b):
    assert a.afie_fast_plan["history"] == b.afie_fast_plan["history"]
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("prune_residual", [False, True])
def test_cuts_equal_torch_pruning_rebuilding_each_group(name, prune_residual, monkeypatch):
    model, _ = build(name)
    ours, theirs, fixed = cut_both_ways(model, X, monkeypatch, target=0.4, prune_residual=prune_residual)
    assert_same_cut(ours, theirs)
    # the fixed path ran (beside rebuilt groups: VGG's flatten, the concats), except where
    # every group passes a split or a concat
    assert fixed > 0 or name in ("mixnet", "res2net", "sknet")


@pytest.mark.parametrize("prune_residual", [False, True])
def test_ghost_halves_are_cut_as_mirrored_pairs(prune_residual):
    # cat([a, depthwise(a)]) gated by an SE and added to the input: concat channel k and
    # k + C/2 come from filter k of the primary conv, so they must go together.
    model, report = build("ghost_se")
    pruned, stats = af.prune(model, report, target=0.5, example_inputs=X, prune_residual=prune_residual)
    kept = {n: a for n, (_, a) in stats.kept.items()}
    assert kept["primary.0"] == kept["cheap.0"] < 6 and kept["expand"] == 2 * kept["primary.0"]
    if prune_residual:
        assert kept["stem"] == 2 * kept["primary2.0"] == 2 * kept["cheap2.0"] < 8
    assert pruned(X).shape == model(X).shape


def test_tied_channels_are_cut_together_only_as_mirrored_copies():
    from afie_fast.coupling import _mirrors

    assert _mirrors({(0, 3), (1, 4), (2, 5)}, 6) == 2
    assert _mirrors({(0, 2), (2, 4), (1, 3), (3, 5)}, 6) == 3
    assert _mirrors({(0, 2)}, 4) == 2           # some channels tied: the others are mirrored alike
    assert _mirrors({(0, 4), (4, 8), (1, 5), (5, 9), (2, 6), (6, 10), (3, 7), (7, 11)}, 16) == 4  # 3 of 4 parts
    assert _mirrors({(0, 1), (2, 3)}, 4) is None  # neighbours tied: no mirrored layout


def test_no_part_of_a_concat_loses_all_its_channels(monkeypatch):
    # Part `a` of the stream scores lowest: a deep cut would take all of it (timm's MixNet
    # projections ended with a conv of no filters). One channel of each part stays.
    torch.manual_seed(0)
    model = CatResidual().eval()
    with torch.no_grad():
        model.a.weight.mul_(0.01)
        model.proj.weight[:2].mul_(0.01)
    report = af.score(model, loader(n_batches=1), progress=False)
    pruned, stats = af.prune(model, report, target=0.7, example_inputs=X, prune_residual=True,
                             allocation="uniform", progress=False)
    assert stats.kept["a"] == (2, 1) and stats.kept["b"][1] >= 1 and stats.kept["proj"][1] >= 2
    assert pruned(X).shape == model(X).shape
    # the last guard, should a cut ever empty a layer anyway, names it
    import afie_fast.pruning as pruning

    monkeypatch.setattr(pruning, "_choose", lambda unit, scores, k: list(range(unit.width)) if k else [])
    with pytest.raises(RuntimeError, match=r"pruning left \['stem', 'proj', 'inner'\] with no filters"):
        af.prune(model, report, target=0.7, example_inputs=X, prune_residual=True, progress=False)


@pytest.mark.filterwarnings("ignore:.*closest whole filters get")  # tiny nets: whole filters land ~1% off
def test_splits_are_cut_with_a_handler_and_left_whole_without(monkeypatch, request):
    from afie_fast import handlers
    from nets import MixedSplit, MixNetBlock, Res2Net, SKNet

    for make in (SKNet, MixNetBlock, Res2Net):
        torch.manual_seed(0)
        model = randomised(make()).eval()
        report = af.score(model, loader(n_batches=2), progress=False)
        pruned, stats = af.prune(model, report, target=0.5, unit="flops", example_inputs=X, progress=False)
        assert abs(stats.reached - 0.5) <= 0.02 and not any("split" in why for why in stats.skipped.values())
        assert pruned(X).shape == model(X).shape
        if make is SKNet:  # the attention's (paths, channels) view followed the cut
            sk = pruned.sk
            assert sk.in_channels == sum(p[0].in_channels for p in sk.paths) < 16
            assert sk.fc_select.out_channels == 2 * sk.paths[0][0].out_channels < 24
    # the handlers kept the split sizes in step with the cut layers
    assert pruned.block.width == pruned.block.convs[0].in_channels < 4
    assert {c.out_channels for c in pruned.block.convs} == {pruned.block.width}  # equal parts stay equal
    assert pruned.block.conv1.out_channels == 4 * pruned.block.width
    # without one, the module stays whole and prune says how to teach it
    monkeypatch.delitem(handlers._HANDLERS, handlers._key(MixedSplit))
    handlers._handler_for_type.cache_clear()
    request.addfinalizer(handlers._handler_for_type.cache_clear)  # runs before monkeypatch restores the handler
    model = randomised(MixNetBlock()).eval()
    report = af.score(model, loader(n_batches=2), progress=False)
    with pytest.raises(ValueError, match=r"nothing to prune.*split .*register_split teaches prune"):
        af.prune(model, report, target=0.2, example_inputs=X, progress=False)


def test_register_split_checks_its_arguments():
    with pytest.raises(TypeError, match="nn.Module subclass"):
        af.register_split(int, sizes=len, update=print)
    with pytest.raises(TypeError, match="callables"):
        af.register_split(nn.Conv2d, sizes=[1, 2], update=print)


def test_attention_heads_narrow_with_the_stream_they_read(monkeypatch, request):
    # Both attentions reshape their heads' output to the input's width: with a handler the
    # stream is cut to a multiple of every head count and the heads follow; without one
    # the stream's cut stops the model from running, and it stays whole.
    from afie_fast import handlers
    from nets import SelfAttention

    model, report = build("attention")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruned, stats = af.prune(model, report, target=0.5, unit="flops", example_inputs=X, progress=False)
    kept = pruned.stem.out_channels
    assert kept < 32 and kept % 4 == 0 and abs(stats.reached - 0.5) <= 0.05, stats.summary()
    for attn, proj in ((pruned.xca, pruned.xca.proj), (pruned.sa, pruned.sa.out)):
        assert attn.qkv.in_features == proj.in_features == proj.out_features == kept
        assert attn.qkv.out_features == 3 * kept
    assert pruned(X).shape == model(X).shape
    monkeypatch.delitem(handlers._HANDLERS, handlers._key(SelfAttention))
    handlers._handler_for_type.cache_clear()
    request.addfinalizer(handlers._handler_for_type.cache_clear)  # before monkeypatch restores the handler
    model, report = build("attention")
    pruned, stats = af.prune(model, report, target=0.2, example_inputs=X, progress=False)
    assert stats.kept["stem"] == (32, 32) and "stops the model from running" in stats.skipped["stem"]
    assert stats.kept["conv"][1] < 16 and pruned(X).shape == model(X).shape


def test_a_channel_concat_after_a_3d_parameter_is_mapped():
    # Torch-Pruning turns off the index mapping of concats downstream of any 3-D parameter
    # (its guard for ViT's class token); the temperature of the attention before this
    # concat is one. Mapped again, cutting exactly the dead filters of the concatenated
    # convs leaves the function unchanged; unmapped, the right conv's cut would hit the
    # wrong inputs of the conv after the concat.
    model, report = build("attention")
    zero_even_channels(model.left), zero_even_channels(model.right)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruned, stats = af.prune(model, report, target=0.25, example_inputs=X, allocation="uniform",
                                 ignored_layers=["stem", "conv"], progress=False)
    assert stats.kept["left"][1] < 8 and stats.kept["right"][1] < 8, stats.summary()
    torch.testing.assert_close(pruned.eval()(X), model(X), rtol=1e-5, atol=1e-5)


def test_an_attention_scored_as_layers_keeps_its_heads_to_the_handler():
    from nets import AttentionStage

    torch.manual_seed(0)
    model = randomised(AttentionStage()).eval()
    report = af.score(model, loader(n_batches=2), linear=True, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruned, stats = af.prune(model, report, target=0.3, example_inputs=X, progress=False)
    assert stats.skipped["xca.qkv"].startswith("an attention's heads")
    assert pruned.xca.qkv.out_features == 3 * pruned.xca.qkv.in_features == 3 * pruned.stem.out_channels
    assert pruned(X).shape == model(X).shape


def _attention_reference(x, wqkv, bqkv, wproj, bproj, heads, transposed, temperature=None, scale=None):
    """Multi-head attention written out head by head in float64 on (B, N, C) tokens: q, k,
    v = x Wᵀ + b split in three, each into ``heads`` equal column blocks; transposed (XCA):
    attention between a head's channels over the tokens, else between tokens over its
    channels."""
    q, k, v = (x @ wqkv.T + bqkv).chunk(3, dim=-1)
    outs = []
    for h, (qh, kh, vh) in enumerate(zip(q.chunk(heads, -1), k.chunk(heads, -1), v.chunk(heads, -1))):
        if transposed:  # (N, d) columns normalised over the tokens; attention d × d
            qn = qh / qh.norm(dim=-2, keepdim=True).clamp_min(1e-12)
            kn = kh / kh.norm(dim=-2, keepdim=True).clamp_min(1e-12)
            attn = torch.softmax(qn.mT @ kn * temperature[h], dim=-1)
            outs.append((attn @ vh.mT).mT)
        else:
            outs.append(torch.softmax(qh @ kh.mT * scale, dim=-1) @ vh)
    return torch.cat(outs, -1) @ wproj.T + bproj


@pytest.mark.parametrize("kind", ["transposed", "self"])
def test_heads_follow_their_input_width_head_by_head(kind):
    # Cut some of the attention's input and output channels as a stream cut would, let the
    # handler narrow the heads, and compare with the attention written out in float64 on
    # the original weights restricted to the channels and head positions that were kept.
    import torch_pruning as tp
    from afie_fast.handlers import handler_for
    from nets import SelfAttention, TransposedAttention

    torch.manual_seed(11)
    dim, heads = 16, 4
    attn = (TransposedAttention if kind == "transposed" else SelfAttention)(dim, heads).double()
    proj = attn.proj if kind == "transposed" else attn.out
    original = {k: v.clone() for k, v in attn.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    dropped = sorted(torch.randperm(dim, generator=g)[:8].tolist())  # the stream keeps 8: 2 per head
    kept = [i for i in range(dim) if i not in dropped]
    tp.prune_linear_in_channels(attn.qkv, dropped)
    tp.prune_linear_out_channels(proj, dropped)
    handler_for(attn).follow(attn)
    assert attn.qkv.out_features == 3 * 8 and proj.in_features == 8
    # which inner positions survived: proj's columns, matched to the original's
    wproj = original[("proj" if kind == "transposed" else "out") + ".weight"][kept]
    inner = [next(j for j in range(dim) if torch.equal(proj.weight[:, i], wproj[:, j])) for i in range(8)]
    assert [len([j for j in inner if j // 4 == h]) for h in range(heads)] == [2] * heads  # equal heads
    rows = [p * dim + j for p in range(3) for j in inner]
    x = torch.randn(3, 10, 8, generator=g, dtype=torch.float64)
    want = _attention_reference(x, original["qkv.weight"][rows][:, kept], original["qkv.bias"][rows],
                                wproj[:, inner], original[("proj" if kind == "transposed" else "out") + ".bias"][kept],
                                heads, kind == "transposed", temperature=original.get("temperature", None),
                                scale=getattr(attn, "scale", None))
    torch.testing.assert_close(attn(x), want, rtol=1e-10, atol=1e-10)


def test_register_heads_checks_its_arguments():
    with pytest.raises(TypeError, match="nn.Module subclass"):
        af.register_heads(int, heads=len, qkv=len, proj=len)
    with pytest.raises(TypeError, match="callables"):
        af.register_heads(nn.Conv2d, heads=4, qkv=len, proj=len)


@pytest.mark.filterwarnings("ignore:.*closest whole filters get")
def test_split_attention_radix_softmax_is_followed_or_named():
    # ResNeSt's attention goes through view (cardinality, radix, C) → transpose → softmax →
    # view back: at cardinality 1 that leaves every channel in place and the radix copies
    # (the groups of its conv) are cut as mirrored positions; at cardinality 2 it permutes
    # the channels, which no cut here follows: those convs stay whole, with that cause.
    from nets import ResNeSt

    for cardinality in (1, 2):
        torch.manual_seed(0)
        model = randomised(ResNeSt(cardinality)).eval()
        report = af.score(model, loader(n_batches=2), progress=False)
        pruned, stats = af.prune(model, report, target=0.4, example_inputs=X, progress=False)
        assert pruned(X).shape == model(X).shape
        splat = pruned.splat
        if cardinality == 1:
            assert "splat.conv" not in stats.skipped and splat.conv.out_channels < 24
            assert splat.conv.out_channels == splat.fc2.out_channels == 2 * splat.fc1.in_channels
        else:
            assert "permutation" in stats.skipped["splat.conv"] and "permutation" in stats.skipped["splat.fc2"]
            assert splat.conv.out_channels == splat.fc2.out_channels == 24


def test_a_channel_shuffle_is_a_permutation_and_stays_whole():
    # view → transpose → view back, like the radix softmax, but it moves the channels: the
    # replay on element numbers sees that, so the conv before it is not cut as if in place.
    from nets import channel_shuffle

    class Shuffled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Linear(8, 5)

        def forward(self, x):
            y = channel_shuffle(torch.relu(self.conv1(x)), 2)
            return self.head(torch.relu(self.conv2(y)).mean(dim=(2, 3)))

    torch.manual_seed(0)
    model = randomised(Shuffled()).eval()
    report = af.score(model, loader(n_batches=2), progress=False)
    pruned, stats = af.prune(model, report, target=0.4, example_inputs=X, progress=False)
    assert "channel permutation" in stats.skipped["conv1"] and pruned.conv1.out_channels == 8
    assert pruned.conv2.out_channels < 8 and pruned(X).shape == model(X).shape


def test_a_width_tied_in_forward_code_is_found_and_left_whole():
    # HiddenTie reshapes a conv's output to the width of its input, read from x.shape: the
    # graph cannot see it, the pruned copy would not run. The unit whose cut alone breaks
    # it is found on fresh copies and left whole, with the cause; the rest is cut.
    torch.manual_seed(0)
    model = randomised(HiddenTie()).eval()
    report = af.score(model, loader(n_batches=2), progress=False)
    pruned, stats = af.prune(model, report, target=0.3, example_inputs=X, progress=False)
    assert stats.kept["stem"] == (12, 12)
    assert stats.skipped["stem"].startswith("its cut stops the model from running (shape")
    assert stats.kept["mid"][1] < 16 and stats.kept["conv"][1] < 8
    assert pruned(X).shape == model(X).shape
    with pytest.raises(ValueError, match="nothing to prune.*stops the model from running"):
        af.prune(model, report, target=0.3, example_inputs=X, progress=False, ignored_layers=["mid", "conv"])


def test_readme_handler_examples_run_as_printed(capsys):
    # The README's register_split / register_heads examples, run as a user pastes them;
    # each says what it prints (a trailing comment, or the comment line after the print).
    import pathlib
    import re

    fence = "`" * 3
    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    blocks = [b for b in re.findall(fence + r"python\n(.*?)" + fence, text, re.S) if "af.register_" in b]
    assert len(blocks) >= 2
    for block in blocks:
        code = "\n".join(line[2:] if line.startswith("  ") else line for line in block.splitlines())
        exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
        printed = capsys.readouterr().out.strip()
        expected = re.search(r"print\(.*?\)\s*#\s*(.+)|print\(.*\)\n\s*#\s*(.+)", code)
        assert printed == (expected.group(1) or expected.group(2)).strip()
