"""Damaged files and odd inputs at the public boundary: one clear error naming the
argument, never a silent wrong result or an exception from inside a dependency."""
import json
import os
import shutil
import subprocess

import pytest
import torch
from torch import nn

import afie_fast as af
from afie_fast.report import _digest
from nets import ARCHS, loader, randomised

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def scored():
    torch.manual_seed(0)
    model = randomised(ARCHS["vgg"]()).eval()
    return model, af.score(model, loader(n_batches=2), progress=False)


@pytest.fixture
def saved_report(scored, tmp_path):
    return scored[1].save(tmp_path / "r.json")


def edit(path, change, rehash=False):
    """Change a saved report's JSON; with rehash, as a careful forger would (a valid checksum)."""
    data = json.loads(path.read_text())
    change(data)
    if rehash:
        data["sha256"] = _digest({k: v for k, v in data.items() if k != "sha256"})
    path.write_text(json.dumps(data))
    return path


def test_report_round_trips_with_its_checksum(scored, saved_report):
    loaded = af.AFIEReport.load(saved_report)
    assert loaded.to_dict() == scored[1].to_dict()
    assert len(json.loads(saved_report.read_text())["sha256"]) == 64


@pytest.mark.parametrize("field, value", [("afie", float("nan")), ("afie", -1.0), ("entropy", 1e300)])
def test_edited_report_is_refused_by_checksum_and_by_field(saved_report, field, value):
    def change(d):
        d["layers"][0][field] = value
    with pytest.raises(ValueError, match="r.json: corrupt.*checksum"):
        af.AFIEReport.load(edit(saved_report, change))
    with pytest.raises(ValueError, match="r.json: corrupt afie_fast report.*layer '0'"):
        af.AFIEReport.load(edit(saved_report, change, rehash=True))


def test_shortened_scores_and_unknown_criteria_are_refused(scored, tmp_path):
    with pytest.raises(ValueError, match=r"layer '0': 7 variance scores for 8 filters"):
        af.AFIEReport.load(edit(scored[1].save(tmp_path / "a.json"),
                                lambda d: d["layers"][0]["filter_scores"]["variance"].pop(), rehash=True))
    with pytest.raises(ValueError, match="unknown criterion 'magic'"):
        af.AFIEReport.load(edit(scored[1].save(tmp_path / "b.json"),
                                lambda d: d["layers"][1]["filter_scores"].update(magic=[1.0] * 12), rehash=True))


def test_layer_kinds_are_checked(scored, tmp_path):
    assert [ls.kind for ls in af.AFIEReport.load(scored[1].save(tmp_path / "a.json"))] == ["Conv2d"] * 3
    with pytest.raises(ValueError, match="layer '3': unknown kind 'Conv4d'"):
        af.AFIEReport.load(edit(scored[1].save(tmp_path / "b.json"),
                                lambda d: d["layers"][1].update(kind="Conv4d"), rehash=True))
    with pytest.raises(ValueError, match="KeyError: 'kind'"):  # version 3 records every layer's kind
        af.AFIEReport.load(edit(scored[1].save(tmp_path / "c.json"), lambda d: d["layers"][0].pop("kind"),
                                rehash=True))


def test_version_1_reports_without_checksum_are_validated(scored):
    data = scored[1].to_dict()
    data["version"] = 1
    for layer in data["layers"]:
        assert layer.pop("kind") == "Conv2d"  # recorded from version 3 on
    assert af.AFIEReport.from_dict(data).to_dict()["layers"] == [{**d, "kind": ""} for d in data["layers"]]
    data["layers"][0]["afie"] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        af.AFIEReport.from_dict(data)


def test_garbage_bytes_are_not_a_report(tmp_path):
    path = tmp_path / "junk.json"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match="junk.json: not valid JSON"):
        af.AFIEReport.load(path)


@pytest.fixture
def saved_model(scored, tmp_path):
    model, report = scored
    pruned, _ = af.prune(model, report, target=0.5, example_inputs=X)
    return af.save_pruned(pruned, tmp_path / "p.safetensors")


def test_flipped_tensor_bytes_are_refused(saved_model):
    blob = bytearray(saved_model.read_bytes())
    blob[-5] ^= 0xFF  # inside the last tensor's data
    saved_model.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="p.safetensors: corrupt file"):
        af.load_pruned(ARCHS["vgg"](), saved_model)


def test_edited_plan_is_refused(saved_model):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(saved_model), framework="pt") as f:
        meta = f.metadata()
    plan = json.loads(meta["afie_fast.plan"])
    plan["history"][0][2] = [999]  # an index out of range
    meta["afie_fast.plan"] = json.dumps(plan)
    save_file(load_file(str(saved_model)), str(saved_model), metadata=meta)
    with pytest.raises(ValueError, match="corrupt file"):
        af.load_pruned(ARCHS["vgg"](), saved_model)


def test_prune_argument_types(scored):
    model, report = scored
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got function"):
        af.prune(lambda x: x, report, example_inputs=X)
    with pytest.raises(ValueError, match=r"ignored_layers: \[.nope.\] are not conv or Linear layers"):
        af.prune(model, report, example_inputs=X, ignored_layers=["nope"])
    with pytest.raises(TypeError, match="ignored_layers must be a list"):
        af.prune(model, report, example_inputs=X, ignored_layers="0")
    with pytest.raises(TypeError, match="report must be an AFIEReport"):
        af.AFIEImportance({"0": 1.0})
    with pytest.raises(TypeError, match="pruned must be"):
        af.save_pruned("model", "x.safetensors")
    with pytest.raises(TypeError, match="model must be a fresh instance"):
        af.load_pruned("model", "x.safetensors")


def test_score_arguments(scored):
    model, _ = scored
    with pytest.raises(ValueError, match="max_batches must be a positive int, got True"):
        af.score(model, loader(), max_batches=True, progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda', but this torch"):
            af.score(model, loader(), device="cuda", progress=False)
    with pytest.raises(ValueError, match="device: 'tpu9' is not a torch device"):
        af.score(model, loader(), device="tpu9", progress=False)


def test_unbatched_input_is_refused_even_when_it_fits():
    # (C, H, W) = (8, 4, 4) into a conv of 8 → 4 channels whose unbatched output (4, 4, 4)
    # would read as 4 images of 4 channels: it must not be scored.
    model = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Conv2d(4, 8, 1))
    with pytest.raises(ValueError, match=r"layer '0', batch 0: .*3-D output \(4, 4, 4\).*x.unsqueeze\(0\)"):
        af.score(model, [torch.randn(8, 4, 4)], progress=False)


def test_cli_prune_on_a_model_it_cannot_prune_is_one_line(tmp_path):
    (tmp_path / "output_net.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.c = nn.Conv2d(3, 3, 3, padding=1)\n"
        "    def forward(self, x):\n"
        "        return self.c(x).mean((2, 3))\n")  # its one conv's channels are the output
    exe = shutil.which("afie-fast")
    # The model's module beside whatever path the package itself was found on.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    run = lambda *a: subprocess.run([exe, *a], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = run("score", "output_net:Net", "--input-shape", "3,8,8", "--data", "random", "--batches", "1", "--out", "r.json")
    assert out.returncode == 0, out.stderr
    out = run("prune", "output_net:Net", "--report", "r.json", "--input-shape", "3,8,8", "--out", "p")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    # The error is one line, the last; a loaded machine may show the trace's progress bar before it.
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("afie-fast: error:") and "nothing to prune" in lines[-1]
    assert all(line.startswith("afie_fast prune:") or not line.strip(" \r") for line in lines[:-1]), lines
