"""AFIEReport: the paper's ratio allocation, counts, save/load, summary, plot."""
import json
import math

import pytest
import torch

import afie_fast as af
from afie_fast.report import MAX_RATIO
from nets import ARCHS, loader, randomised


@pytest.fixture(scope="module")
def report():
    torch.manual_seed(0)
    return af.score(randomised(ARCHS["resnet_bottleneck"]()), loader(n_batches=2), progress=False)


def synthetic(afies, widths):
    layers = [af.LayerScore(f"l{i}", c, a * c, a, (1.0,), {}, 0, math.log(c) / c) for i, (a, c) in enumerate(zip(afies, widths))]
    return af.AFIEReport(layers, source="weights")


@pytest.mark.parametrize("target", [0.1, 0.3, 0.5, 0.7])
def test_ratios_follow_the_paper(report, target):
    ratios = report.ratios(target)
    widths = {n: ls.n_filters for n, ls in report.layers.items()}
    afie = {n: ls.afie for n, ls in report.layers.items()}
    total = sum(widths.values())
    assert sum(ratios[n] * widths[n] for n in ratios) == pytest.approx(target * total, rel=1e-12)
    a_max = max(afie.values())
    uncapped = [n for n in ratios if ratios[n] < MAX_RATIO - 1e-12]
    lam = ratios[uncapped[0]] * afie[uncapped[0]] / a_max
    for n in ratios:  # λ_l = min(λ_min AFIE_max / AFIE_l, 0.99) with one λ_min
        assert ratios[n] == pytest.approx(min(lam * a_max / afie[n], MAX_RATIO), rel=1e-12)
        assert 0 <= ratios[n] <= MAX_RATIO


def test_ratios_with_caps_and_zero_afie():
    rep = synthetic([0.01, 0.02, 0.5, 0.0], [10, 20, 30, 5])
    ratios = rep.ratios(0.6)
    assert ratios["l3"] == MAX_RATIO
    assert ratios["l0"] == MAX_RATIO  # the lowest AFIE hits the cap
    assert sum(ratios[f"l{i}"] * c for i, c in enumerate([10, 20, 30, 5])) == pytest.approx(0.6 * 65)


@pytest.mark.parametrize("target", [0.0, 0.25, 0.5, 0.8])
def test_counts_hit_the_total_exactly(report, target):
    counts = report.counts(target)
    total = sum(ls.n_filters for ls in report)
    assert sum(counts.values()) == round(target * total)
    ratios = report.ratios(target)
    for n, ls in report.layers.items():
        assert 0 <= counts[n] <= ls.n_filters - 1
        assert abs(counts[n] - ratios[n] * ls.n_filters) <= 1.0 + 1e-9


def test_infeasible_target_names_the_maximum(report):
    mx = report.max_target()
    with pytest.raises(ValueError, match=f"largest feasible target is {mx:.4f}"):
        report.ratios(min(1.0, mx + 0.005))
    with pytest.raises(ValueError, match="fraction"):
        report.ratios(-0.1)


def test_save_load_round_trip(report, tmp_path):
    path = report.save(tmp_path / "r.json")
    back = af.AFIEReport.load(path)
    assert back.to_dict() == report.to_dict()
    for a, b in zip(report, back):
        assert a.afie == b.afie and a.spectrum == b.spectrum  # bit-exact floats


def test_load_rejects_foreign_truncated_and_newer(report, tmp_path):
    good = (tmp_path / "r.json")
    report.save(good)
    text = good.read_text()
    (tmp_path / "trunc.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="not valid JSON"):
        af.AFIEReport.load(tmp_path / "trunc.json")
    (tmp_path / "foreign.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not an afie_fast report"):
        af.AFIEReport.load(tmp_path / "foreign.json")
    newer = json.loads(text)
    newer["version"] = 99
    (tmp_path / "newer.json").write_text(json.dumps(newer))
    with pytest.raises(ValueError, match="newer"):
        af.AFIEReport.load(tmp_path / "newer.json")
    broken = json.loads(text)
    del broken["layers"][0]["afie"]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="corrupt"):
        af.AFIEReport.load(tmp_path / "broken.json")


def test_summary_lists_every_layer(report):
    text = report.summary()
    for name, ls in report.layers.items():
        assert name in text
        assert f"{ls.afie:.5f}" in text and f"{ls.shape_baseline:.5f}" in text


def test_plot_writes_png(report, tmp_path):
    path = report.plot(tmp_path / "afie.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_value_spectra_get_the_policy_asked(gen):
    # A weights report's conv on one input channel has one singular value: AFIE 0 by shape
    # alone. The paper's allocation would cap it at 0.99 (63 of alexnet_mnist's 64 filters).
    from afie_fast.models import digits_cnn

    torch.manual_seed(0)
    rep = af.score(digits_cnn(), progress=False)
    assert [ls.degenerate for ls in rep] == [True, False, False, False]
    widths = {n: ls.n_filters for n, ls in rep.layers.items()}
    total = sum(widths.values())
    for target in (0.3, 0.5):
        cap, uniform, whole = (rep.counts(target, degenerate=p) for p in ("cap", "uniform", "whole"))
        assert cap["0"] == 31 and whole["0"] == 0 and abs(uniform["0"] - target * 32) <= 1
        for counts in (cap, uniform, whole):
            assert sum(counts.values()) == round(target * total)
        ratios = rep.ratios(target)  # the default: left whole, the rest take its share as the paper solves them
        assert ratios["0"] == 0 and sum(ratios[n] * widths[n] for n in ratios) == pytest.approx(target * total)
        assert rep.ratios(target, degenerate="uniform")["0"] == target
    assert "one-value spectra" in rep.summary() and "left whole (degenerate='whole')" in rep.summary()
    with pytest.raises(ValueError, match=r"largest feasible target is 0\.8\d+ .*'whole'"):
        rep.ratios(0.95, degenerate="whole")
    with pytest.raises(ValueError, match="degenerate must be one of"):
        rep.ratios(0.5, degenerate="ignore")


def test_prune_gives_one_value_spectra_the_policy_asked():
    from afie_fast.models import digits_cnn

    torch.manual_seed(0)
    model = digits_cnn().eval()
    rep, x = af.score(model, progress=False), torch.zeros(1, 1, 8, 8)
    kept = {p: af.prune(model, rep, target=0.3, example_inputs=x, degenerate=p, progress=False)[1].kept["0"]
            for p in ("cap", "uniform", "whole")}
    assert kept == {"cap": (32, 1), "uniform": (32, 22), "whole": (32, 32)}
    with pytest.raises(ValueError, match="degenerate must be one of"):
        af.prune(model, rep, target=0.3, example_inputs=x, degenerate="nope")
