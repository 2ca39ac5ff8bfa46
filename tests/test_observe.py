"""Layers whose output covariance is computed from their narrower input (W Σ_x Wᵀ):
which layers qualify, and that the result is the output's covariance, checked against
float64 references of the outputs themselves."""
import numpy as np
import pytest
import torch
from torch import nn

import afie_fast as af
from afie_fast.observe import Observed, through_input
from nets import Expansions
import reference


class StdConv(nn.Conv2d):
    """timm's weight-standardised conv: the forward uses a transformed weight."""

    def forward(self, x):
        w = (self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)) / (self.weight.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


class Plain(nn.Conv2d):
    """A conv that observes its own output (an overridden forward is never routed)."""

    def forward(self, x):
        return super().forward(x)


@pytest.mark.parametrize("layer, routed", [
    (nn.Conv2d(8, 32, 1), True),                     # bottleneck / inverted-residual expansion
    (nn.Conv2d(8, 32, 1, stride=2), True),           # ResNet's downsample
    (nn.Conv2d(8, 32, 1, padding="same"), True),
    (nn.Conv2d(32, 8, 1), False),                    # a reduction: its output is the narrower side
    (nn.Conv2d(8, 8, 1), False),
    (nn.Conv2d(8, 32, 3, padding=1), False),         # a spatial kernel mixes positions
    (nn.Conv2d(8, 32, 1, padding=1), False),         # border outputs see no input
    (nn.Conv2d(8, 32, 1, groups=2), False),
    (StdConv(8, 32, 1), False),
    (nn.Linear(16, 64), True),                       # ConvNeXt's MLP expansion
    (nn.Linear(64, 16), False),
])
def test_which_layers_observe_their_input(layer, routed):
    assert through_input(layer) is routed
    assert Observed(layer).channels == (layer.weight.shape[1] if routed else layer.weight.shape[0])


def test_a_nan_weight_keeps_the_output_path():
    conv = nn.Conv2d(4, 16, 1)
    with torch.no_grad():
        conv.weight[3, 1] = float("nan")
    assert not through_input(conv)


def _outputs(model, batches):
    """Every scored layer's outputs as (observations, channels) float64."""
    outs, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(lambda mod, i, o, name=name: outs.setdefault(name, []).append(
                (o.permute(0, 2, 3, 1) if o.dim() == 4 and isinstance(mod, nn.Conv2d) else o)
                .detach().double().reshape(-1, o.shape[1] if isinstance(mod, nn.Conv2d) else o.shape[-1]))))
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    return {n: torch.cat(ys).numpy() for n, ys in outs.items()}


@pytest.mark.parametrize("channels_last", [False, True])
def test_routed_layers_give_their_outputs_covariance(channels_last):
    torch.manual_seed(3)
    model = Expansions().eval().double()  # float64 outputs: a reference without float32 rounding
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(5, 3, 9, 9, generator=g, dtype=torch.float64) for _ in range(3)]
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        batches = [x.contiguous(memory_format=torch.channels_last) for x in batches]
    assert [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and through_input(m)] == \
        ["expand", "down", "fc1"]
    report = af.score(model, batches, progress=False, linear=True, positions="all", precision="float64")
    for name, y in _outputs(model, batches).items():
        ls = report.layers[name]
        cov = np.cov(y, rowvar=False)
        e = np.clip(np.linalg.eigvalsh(cov), 0, None)
        s = np.sqrt(np.where(e > len(e) * np.finfo(np.float64).eps * e.max(), e, 0.0))
        assert ls.n_samples == y.shape[0]
        np.testing.assert_allclose(ls.filter_scores["variance"], np.diag(cov), rtol=1e-9, atol=1e-12)
        # the spectra: rank ≤ C_in, so a routed layer's spectrum has C_out − C_in zeros
        np.testing.assert_allclose(np.sort(ls.spectrum) ** 2, np.sort(s) ** 2, rtol=0, atol=1e-9 * e.max())
        assert ls.afie == pytest.approx(reference.afie(s, ls.n_filters)[1], rel=1e-6)


def _plain(model):
    """The same model with every conv observing its output."""
    for name, m in list(model.named_modules()):
        for child_name, child in list(m.named_children()):
            if type(child) is nn.Conv2d:
                p = Plain(child.in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                          bias=child.bias is not None)
                p.load_state_dict(child.state_dict())
                setattr(m, child_name, p)
    return model


@pytest.mark.parametrize("positions", ["auto", 20])
def test_routed_equals_observing_the_output_under_a_positions_budget(positions):
    """The input is read at the positions the output's lattice would pick: same observations."""
    torch.manual_seed(5)
    routed = Expansions().eval()
    plain = _plain(Expansions().eval())
    plain.load_state_dict(routed.state_dict())
    g = torch.Generator().manual_seed(6)
    batches = [torch.randn(4, 3, 40, 40, generator=g) for _ in range(5)]
    assert not through_input(plain.expand)
    criteria = ("l1", "variance", "independence")
    a = af.score(routed, batches, progress=False, positions=positions, seed=2, criteria=criteria)
    b = af.score(plain, batches, progress=False, positions=positions, seed=2, criteria=criteria)
    for name in ("expand", "down"):
        la, lb = a.layers[name], b.layers[name]
        assert la.n_samples == lb.n_samples < 5 * 4 * 40 * 40
        for key in ("variance", "independence"):
            np.testing.assert_allclose(la.filter_scores[key], lb.filter_scores[key], rtol=1e-4,
                                       atol=1e-6 * max(lb.filter_scores[key]))
        assert la.afie == pytest.approx(lb.afie, rel=1e-5)


def test_an_unbatched_input_through_a_routed_conv_is_refused_by_name():
    model = nn.Sequential(nn.Conv2d(3, 12, 1))
    with pytest.raises(ValueError, match=r"layer '0', batch 0: the conv gave a 3-D output"):
        af.score(model, [torch.randn(3, 6, 6)], progress=False)


def test_a_conv_called_with_a_keyword_input_is_observed():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.expand = nn.Conv2d(3, 12, 1)

        def forward(self, x):
            return self.expand(input=x)

    torch.manual_seed(7)
    model = Keyword().eval().double()
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    ls = af.score(model, [x], progress=False, precision="float64").layers["expand"]
    _, cov = reference.covariance(model(x))
    np.testing.assert_allclose(ls.filter_scores["variance"], np.diag(cov), rtol=1e-9)
