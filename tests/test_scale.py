"""Scale-out and memory: gloo ranks merge to the single-process result; memory is flat."""
import json
import os
import subprocess
import sys
import textwrap


WORKER = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    import afie_fast as af
    sys.path.insert(0, {tests!r})
    from nets import ARCHS, loader, randomised

    rank, world = int(sys.argv[1]), int(sys.argv[2])
    torch.manual_seed(0)
    model = randomised(ARCHS["resnet_bottleneck"]())
    batches = loader(n_batches=6, batch=8)
    if world > 1:
        dist.init_process_group("gloo", init_method="file://" + {store!r}, rank=rank, world_size=world)
        mine = batches[rank::world]
    else:
        mine = batches
    report = af.score(model, mine, progress=False, distributed=world > 1)
    with open(os.path.join({out!r}, f"report_{{world}}_{{rank}}.json"), "w") as f:
        json.dump(report.to_dict(), f)
    if world > 1:
        dist.destroy_process_group()
""")


def run_worker(script, args, cwd):
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_gloo_ranks_equal_one_process(tmp_path):
    tests = os.path.dirname(__file__)
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=tests, store=str(tmp_path / "store"), out=str(tmp_path)))
    procs = [run_worker(script, [r, 2], tmp_path) for r in range(2)] + [run_worker(script, [0, 1], tmp_path)]
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
    single = json.loads((tmp_path / "report_1_0.json").read_text())
    ranks = [json.loads((tmp_path / f"report_2_{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["layers"] == ranks[1]["layers"]  # every rank gets the same report
    for a, b in zip(ranks[0]["layers"], single["layers"]):
        assert a["n_samples"] == b["n_samples"]
        assert abs(a["afie"] - b["afie"]) <= 1e-10 * abs(b["afie"])
        assert max(abs(x - y) for x, y in zip(a["spectrum"], b["spectrum"])) <= 1e-10 * max(b["spectrum"])


MEMORY = textwrap.dedent("""
    import resource, sys
    import torch
    import afie_fast as af
    from torch import nn
    n = int(sys.argv[1])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1))
    def batches():  # made lazily: the loader itself holds nothing
        g = torch.Generator().manual_seed(1)
        for _ in range(n):
            yield torch.randn(32, 3, 32, 32, generator=g)
    af.score(model, batches(), progress=False)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


def test_peak_memory_flat_in_the_number_of_batches(tmp_path):
    # Each batch makes 2 × 8 MiB of conv outputs; keeping them would add ~800 MiB over 50.
    script = tmp_path / "mem.py"
    script.write_text(MEMORY)
    peaks = {}
    for n in (1, 50):
        out = subprocess.run([sys.executable, str(script), str(n)], cwd=tmp_path, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        peaks[n] = int(out.stdout.strip()) / 1024  # KiB → MiB
    assert peaks[50] - peaks[1] < 40, peaks
