"""The `afie-fast` command, run as a user would (a subprocess, outside the source tree)."""
import json
import shutil
import subprocess

import pytest
import torch

import afie_fast as af
from afie_fast.models import digits_cnn


def run(args, cwd):
    exe = shutil.which("afie-fast")
    assert exe, "the afie-fast console script is not installed"
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_demo_end_to_end(tmp_path):
    out = run(["demo", "--out", "demo", "--epochs", "3", "--finetune-epochs", "1", "--quiet"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "+ BatchNorm recalibrated" in out.stdout and "+ fine-tuned 1 ep (cross-entropy)" in out.stdout
    assert "CPU ms/img" in out.stdout
    folder = tmp_path / "demo"
    report = af.AFIEReport.load(folder / "report_activations.json")
    assert report.source == "activations" and len(report) == 4
    assert af.AFIEReport.load(folder / "report_weights.json").source == "weights"
    loaded = af.load_pruned(digits_cnn(), folder / "pruned.safetensors")
    assert loaded(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert (folder / "afie.png").read_bytes()[:4] == b"\x89PNG"


def test_score_and_prune_commands(tmp_path):
    out = run(["score", "digits_cnn", "--data", "digits", "--batches", "2", "--out", "r.json"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "AFIE report (activations, 4 layers)" in out.stdout
    out = run(["score", "digits_cnn", "--json"], tmp_path)
    assert json.loads(out.stdout)["source"] == "weights"
    out = run(["prune", "digits_cnn", "--report", "r.json", "--target", "0.3", "--unit", "flops", "--out", "p"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "MACs" in out.stdout and (tmp_path / "p" / "pruned.safetensors").exists()
    out = run(["prune", "digits_cnn", "--report", "r.json", "--target", "0.3", "--out", "q", "--data", "digits",
               "--finetune-epochs", "1"], tmp_path)
    assert out.returncode == 0, out.stderr
    tuned = af.load_pruned(digits_cnn(), tmp_path / "q" / "pruned.safetensors")
    plain = af.load_pruned(digits_cnn(), tmp_path / "p" / "pruned.safetensors")
    assert not torch.equal(tuned[1].running_mean, plain[1].running_mean)  # recalibrated, then fine-tuned


@pytest.mark.parametrize("args, message", [
    (["score", "no_such_model"], "unknown model"),
    (["score", "vgg16_cifar", "--data", "digits"], "1-channel images"),
    (["prune", "digits_cnn", "--report", "missing.json", "--out", "p"], "missing.json"),
    (["score", "os:getcwd"], "not an nn.Module"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    out = run(args, tmp_path)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().startswith("afie-fast: error:") and message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_help_on_every_command(tmp_path):
    for cmd in ([], ["demo"], ["score"], ["prune"]):
        out = run([*cmd, "--help"], tmp_path)
        assert out.returncode == 0 and "usage: afie-fast" in out.stdout


def test_prune_residual_switch(tmp_path):
    # "auto" (the default) keeps a ResNet's residual streams whole when the target is
    # reachable without them and says so; "true" cuts them; anything else is refused.
    assert run(["score", "resnet18_cifar", "--out", "r.json"], tmp_path).returncode == 0
    args = ["prune", "resnet18_cifar", "--report", "r.json", "--target", "0.3", "--unit", "flops"]
    out = run([*args, "--out", "a"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "residual stream (the target is reachable without it" in out.stdout
    out = run([*args, "--out", "b", "--prune-residual", "true"], tmp_path)
    assert out.returncode == 0 and "residual stream" not in out.stdout
    out = run([*args, "--out", "c", "--prune-residual", "sometimes"], tmp_path)
    assert out.returncode != 0 and "invalid choice: 'sometimes'" in out.stderr
