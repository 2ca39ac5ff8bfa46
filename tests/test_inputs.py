"""Models of several inputs (a diffusion U-Net's forward(x, t), an image and its mask):
score() through input_fn returning a tuple or a dict, prune() and save/load through
example_inputs of either kind, recalibrate_bn through input_fn."""
import numpy as np
import pytest
import torch
from torch import nn

import afie_fast as af
import reference


class _TimedUNet(nn.Module):
    """A diffusion-style U-Net: a timestep embedding added to every channel of the middle."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Sequential(nn.Linear(1, 16), nn.SiLU())
        self.inc = nn.Conv2d(3, 16, 3, padding=1)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(32)
        self.temb = nn.Linear(16, 32)
        self.mid = nn.Conv2d(32, 32, 3, padding=1)
        self.up = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.out = nn.Conv2d(32, 3, 3, padding=1)

    def forward(self, x, t, scale=1.0):
        e = self.emb(t[:, None].float() / 1000)
        h1 = torch.relu(self.inc(x))
        h2 = torch.relu(self.norm(self.down(h1)) + self.temb(e)[:, :, None, None])
        h2 = torch.relu(self.mid(h2))
        return scale * self.out(torch.cat([self.up(h2), h1], 1))


def _batches(n=3, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, size, size, generator=g), torch.randint(0, 1000, (8,), generator=g),
             torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def _model():
    torch.manual_seed(0)
    model = _TimedUNet().eval()
    model.norm.running_mean.normal_(), model.norm.running_var.uniform_(0.5, 2)
    return model


@pytest.mark.parametrize("as_kwargs", [False, True])
def test_score_of_a_model_of_several_inputs_matches_reference(as_kwargs):
    model, batches = _model(), _batches()
    input_fn = (lambda b: {"x": b[0], "t": b[1]}) if as_kwargs else (lambda b: (b[0], b[1]))
    report = af.score(model, batches, input_fn=input_fn, positions="all", progress=False)
    outs = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: outs.setdefault(name, []).append(o.detach()))
             for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    with torch.no_grad():
        for x, t, _ in batches:
            model(x, t)
    for h in hooks:
        h.remove()
    assert list(report.layers) == ["inc", "down", "mid", "up", "out"]
    for name, ys in outs.items():
        _, cov = reference.covariance(ys)
        s = np.sqrt(np.clip(np.linalg.eigvalsh(cov), 0, None))
        _, afie = reference.afie(s, cov.shape[0])
        assert reference.rel_err(report.layers[name].afie, afie) < 1e-4, name
        assert report.layers[name].n_samples == sum(y.shape[0] * y.shape[2] * y.shape[3] for y in ys)


def test_the_first_tensor_alone_fails_with_the_way_out():
    with pytest.raises(TypeError, match="input_fn=lambda b: \\(b\\[0\\], b\\[1\\]\\)"):
        af.score(_model(), _batches(1), progress=False)


def test_prune_save_and_load_a_model_of_several_inputs(tmp_path):
    model, batches = _model(), _batches()
    x, t, _ = batches[0]
    report = af.score(model, batches, input_fn=lambda b: (b[0], b[1]), progress=False)
    pruned, stats = af.prune(model, report, target=0.5, example_inputs=(x[:1], t[:1], 2.0), progress=False)
    by_name, stats_kw = af.prune(model, report, target=0.5, example_inputs={"x": x[:1], "t": t[:1]}, progress=False)
    assert stats.kept == stats_kw.kept and stats.kept["down"][1] < 32
    # the timestep projection added to down's channels is cut with them
    assert pruned.temb.out_features == pruned.down.out_channels == pruned.norm.num_features
    assert pruned(x, t).shape == model(x, t).shape
    af.save_pruned(pruned, tmp_path / "unet.safetensors")
    loaded = af.load_pruned(_TimedUNet(), tmp_path / "unet.safetensors").eval()
    torch.testing.assert_close(loaded(x, t), pruned(x, t), rtol=0, atol=0)


def test_plans_of_one_input_tensor_saved_before_several_inputs_still_load(tmp_path):
    batches = _batches()
    x = batches[0][0]
    plain = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3)).eval()
    report = af.score(plain, [x], progress=False)
    pruned, _ = af.prune(plain, report, target=0.5, example_inputs=x[:1], progress=False)
    plan = pruned.afie_fast_plan
    assert plan["inputs"] == {"shape": [1, 3, 12, 12], "dtype": "float32"}
    del plan["inputs"]  # a version-3 plan: one tensor's shape and dtype
    plan.update(version=3, input_shape=[1, 3, 12, 12], input_dtype="float32")
    af.save_pruned(pruned, tmp_path / "v3.safetensors")
    fresh = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3))
    torch.testing.assert_close(af.load_pruned(fresh, tmp_path / "v3.safetensors")(x), pruned(x), rtol=0, atol=0)


def test_recalibrate_bn_through_input_fn():
    model, batches = _model(), _batches(1)
    x, t, _ = batches[0]
    af.recalibrate_bn(model, batches, input_fn=lambda b: (b[0], b[1]), progress=False)
    with torch.no_grad():
        h = model.down(torch.relu(model.inc(x))).double()
    torch.testing.assert_close(model.norm.running_mean.double(), h.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.norm.running_var.double(), h.var((0, 2, 3)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [[1, 2], {"x": "image"}, None, np.zeros((1, 3, 8, 8))])
def test_example_inputs_without_a_tensor_are_refused(bad):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3))
    report = af.score(model, progress=False)
    with pytest.raises(TypeError, match="tuple \\(positional\\) or dict"):
        af.prune(model, report, example_inputs=bad, progress=False)
