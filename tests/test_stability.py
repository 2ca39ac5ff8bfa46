"""The paper's stability claim on real data (scikit-learn digits), as benchmarks/stability.py
measures it: what the README reports is asserted here with a fixed seed."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "stability.py"


@pytest.fixture(scope="module")
def digits_result(tmp_path_factory):
    out = subprocess.run([sys.executable, str(SCRIPT), "--models", "digits_cnn", "--epochs", "6", "--json"],
                         capture_output=True, text=True, cwd=tmp_path_factory.mktemp("stab"), timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)[0]


@pytest.mark.parametrize("source", ["activations", "weights"])
def test_layer_ranking_after_one_epoch_is_the_final_one(digits_result, source):
    s = digits_result["sources"][source]
    assert s["rho_epoch1_final"] == pytest.approx(1.0)


@pytest.mark.parametrize("source", ["activations", "weights"])
def test_ranking_is_mostly_layer_shape(digits_result, source):
    s = digits_result["sources"][source]
    # K sits within 0.12 nats below ln p, so AFIE ≈ ln(p)/c: wider layers always score lower.
    assert 0 <= s["max_gap_below_ln_p"] <= 0.12
    assert s["rho_final_shape"] >= 0.89
    afie, base = s["afie_final"], s["shape_baseline"]
    for a in afie:
        for b in afie:
            if base[a] > base[b] + 0.12 / 32:
                assert afie[a] > afie[b]


def test_weights_ranking_equals_the_shape_baseline(digits_result):
    s = digits_result["sources"]["weights"]
    assert s["rho_final_shape"] == pytest.approx(1.0)
    # the first conv sees one input channel: its averaged kernel is a column, one singular value
    assert s["afie_final"]["0"] == 0.0 and s["shape_baseline"]["0"] == 0.0 == math.log(1) / 32


def test_equal_shape_layers_keep_their_order(digits_result):
    s = digits_result["sources"]["activations"]
    assert s["same_shape_pairs"] == 2 and s["same_shape_pairs_kept"] == 2
