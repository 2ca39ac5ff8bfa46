"""Where score()'s time goes beyond inference, phase by phase, as fractions of inference
on the same batches (the models and batches of bench_overhead.py; min over rounds, each
round one inference and one score):

  updates       the accumulator updates (every _ext.comoments_update call), and the
                co-moment rate they reached (C(C+1)/2 MACs per observation)
  hooks, other  the rest of the pass over inference: the hooks' Python, the lattice
                views, and what the updates cost the forward around them
  congruences   the widening layers' covariances mapped after the pass (output_moments)
  eigensolves   every layer's eigenvalues (_ext.eigh_many)
  rest          everything else after the pass (copies, filter scores, the report)

    python benchmarks/score_phases.py                        # ~2 min on 2 cores
    python benchmarks/score_phases.py --models mobilenet_v2 --rounds 5

Freed memory stays in the process as in bench_overhead.py (see there).
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

import afie_fast as af
from afie_fast import _ext, scoring

sys.path.insert(0, str(Path(__file__).parent))
from _timing import table  # noqa: E402
from bench_overhead import MODELS, build, keep_freed_memory, macs  # noqa: E402

spent: dict[str, float] = collections.defaultdict(float)


def timed(module, attr: str, key: str) -> None:
    """Replace module.attr by a wrapper that adds its wall time to spent[key]."""
    fn = getattr(module, attr)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[key] += time.perf_counter() - t

    setattr(module, attr, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    keep_freed_memory()
    torch.set_num_threads(2)
    timed(scoring, "stream_activations", "pass")
    timed(scoring, "_activation_scores", "after")
    timed(scoring, "output_moments", "congruences")
    timed(_ext, "eigh_many", "eigensolves")
    timed(_ext, "comoments_update", "updates")  # the accumulator calls it through the module
    rows = []
    for name in args.models.split(","):
        model, loader = build(name)
        _, cov = macs(model, loader[0])

        def inference():
            with torch.inference_mode():
                for x in loader:
                    model(x)

        inference(), af.score(model, loader, progress=False)  # warm-up
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            spent.clear()
            t = time.perf_counter()
            inference()
            spent["inference"] = time.perf_counter() - t
            t = time.perf_counter()
            af.score(model, loader, progress=False)
            spent["score"] = time.perf_counter() - t
            for k, v in spent.items():
                best[k] = min(best.get(k, v), v)
        i = best["inference"]
        rows.append([name, f"{i:.3f} s", f"{best['score'] / i:.2f}×", f"{best['updates'] / i:.2f}",
                     f"{cov * len(loader) / best['updates'] / 1e9:.0f}",
                     f"{(best['pass'] - i - best['updates']) / i:.2f}", f"{best['congruences'] / i:.2f}",
                     f"{best['eigensolves'] / i:.2f}",
                     f"{(best['score'] - best['pass'] - best['congruences'] - best['eigensolves']) / i:.2f}"])
        print(rows[-1], file=sys.stderr, flush=True)
    print(table(["model", "inference", "score / inference", "updates", "updates GMAC/s", "hooks, other",
                 "congruences", "eigensolves", "rest"], rows))
    print(f"\n{torch.get_num_threads()} threads; min over {args.rounds} rounds of each phase, as fractions of "
          "inference (the minima need not come from one round, so the columns need not add up to the ratio)")


if __name__ == "__main__":
    main()
