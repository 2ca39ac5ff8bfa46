"""score(positions=...): the lattice of spatial positions, and scores against a float64
reference computed on the same positions."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import afie_fast as af
from afie_fast.positions import AUTO_POSITIONS, Lattice, resolve, stride_for
import reference


@pytest.mark.parametrize("h,w", [(1, 1), (7, 7), (13, 29), (56, 56), (112, 112), (224, 224), (3, 500)])
@pytest.mark.parametrize("budget", [1, 5, 64, 1000, 4096])
def test_stride_is_the_smallest_that_fits(h, w, budget):
    s = stride_for(h, w, budget)
    kept = math.ceil(h / s) * math.ceil(w / s)
    assert kept <= budget or s >= max(h, w)  # a 1×1 lattice is as thin as it gets
    if s > 1:
        assert math.ceil(h / (s - 1)) * math.ceil(w / (s - 1)) > budget
    assert stride_for(h, w, None) == 1


def test_lattice_is_a_view_and_covers_every_position_once_in_s2_batches():
    h, w = 23, 17
    index = torch.arange(h * w, dtype=torch.float32).reshape(1, 1, h, w).expand(2, 3, h, w)
    lat = Lattice(budget=20, seed=3)
    s = stride_for(h, w, 20)
    assert s == 5
    seen = []
    for batch in range(s * s):
        v = lat.view(index, layer=4, batch=batch)
        assert v.untyped_storage().data_ptr() == index.untyped_storage().data_ptr()  # no copy
        assert v.shape[2] * v.shape[3] <= 20
        seen += v[0, 0].flatten().tolist()
    assert sorted(seen) == list(range(h * w))
    # a small map is left alone; the offsets depend on the seed
    assert Lattice(20).view(index[:, :, :4, :4], 0, 0).shape == (2, 3, 4, 4)
    offsets = {seed: [Lattice(20, seed).view(index, 0, b)[0, 0, 0, 0].item() for b in range(4)] for seed in range(4)}
    assert len({tuple(v) for v in offsets.values()}) > 1


@pytest.mark.parametrize("bad", ["some", 0, -3, True, 2.5, None])
def test_bad_positions_are_refused(bad):
    with pytest.raises(ValueError, match="positions"):
        resolve(bad)
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="positions"):
        af.score(model, [torch.randn(2, 3, 8, 8)], positions=bad, progress=False)


def big_map_model_and_batches(gen):
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, stride=2, padding=1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model, [torch.randn(4, 3, 70, 70, generator=gen) + 1.0 for _ in range(3)]


def outputs(model, batches):
    outs, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(lambda mod, i, o, name=name: outs.setdefault(name, []).append(o)))
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    return outs


@pytest.mark.parametrize("positions", ["all", 300, "auto"])
def test_scores_match_the_reference_on_the_chosen_positions(gen, positions):
    model, batches = big_map_model_and_batches(gen)
    report = af.score(model, batches, positions=positions, seed=7, progress=False, precision="float64")
    lattice = Lattice(resolve(positions), seed=7)
    for index, (name, ys) in enumerate(outputs(model, batches).items()):
        chosen = [lattice.view(y, index, b) for b, y in enumerate(ys)]
        _, cov = reference.covariance(chosen)
        e = np.clip(np.linalg.eigvalsh(cov), 0, None)
        s = np.sqrt(np.where(e > len(e) * np.finfo(np.float64).eps * e.max(), e, 0.0))
        ls = report.layers[name]
        assert ls.n_samples == sum(c.shape[0] * c.shape[2] * c.shape[3] for c in chosen)
        assert ls.afie == pytest.approx(reference.afie(s, ls.n_filters)[1], rel=1e-9)
        np.testing.assert_allclose(sorted(ls.spectrum), s, rtol=1e-7, atol=1e-9 * s.max())
    full = 3 * 4 * 70 * 70
    first, second = report.layers["0"].n_samples, report.layers["2"].n_samples
    if positions == "all":
        assert (first, second) == (full, 3 * 4 * 35 * 35)
    elif positions == 300:  # a 14×14 lattice of the 70×70 map whatever the offset
        assert first == 3 * 4 * 14 * 14
    else:  # 4900 and 1225 positions per image both exceed the default budget
        assert AUTO_POSITIONS < 35 * 35 and first <= 3 * 4 * AUTO_POSITIONS and second <= 3 * 4 * AUTO_POSITIONS
    assert report.meta["positions"] == positions


def test_thinned_scores_are_deterministic_and_close_to_exact(gen):
    model, batches = big_map_model_and_batches(gen)
    exact = af.score(model, batches, positions="all", progress=False)
    a = af.score(model, batches, positions=300, progress=False)
    b = af.score(model, batches, positions=300, progress=False)
    assert a.to_dict()["layers"] == b.to_dict()["layers"]
    for name in exact.layers:
        assert a.layers[name].afie == pytest.approx(exact.layers[name].afie, rel=1e-2)


def test_cli_positions(tmp_path):
    from afie_fast import cli

    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["score", "digits_cnn", "--positions", "many"])
    assert exc.value.code == 2
    args = cli.build_parser().parse_args(["score", "digits_cnn", "--positions", "32"])
    assert args.positions == 32
