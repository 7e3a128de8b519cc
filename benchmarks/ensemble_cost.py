"""What the served fold ensemble with dihedral TTA costs per cell, against the forwards it must run.

    python benchmarks/ensemble_cost.py [--members 4] [--arch resnet18] [--size 64] [--batches 1 8 32]

The ensemble of k members with 8 poses runs k x 8 forwards per cell. Done well, it costs what
those forwards cost: per member, one batch of the 8 poses of every cell. Printed per batch size B
(cells per request batch), in one process, side by side, median of --repeats timings:
- ensemble: FoldEnsemble(k members, dihedral8) on B cells, per cell;
- floor: k forwards of one member on a batch of 8B cells (the same arithmetic, nothing else), per cell;
- naive: k x 8 separate forwards of one member on B cells (one call per member and pose), per cell;
- ratio ensemble / floor (issue 11's aim: at most 1.5) and naive / ensemble.
Random weights (timing does not depend on them), CPU, `--threads` torch threads.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pap_severity.ensemble import FoldEnsemble, dihedral_views
from pap_severity.models import build_model
from pap_severity.pipelines import get_pipeline


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--pipeline", default="combined")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    head = get_pipeline(args.pipeline).head
    members = [build_model(args.arch, "none", head).eval() for _ in range(args.members)]
    ensemble = FoldEnsemble(members, args.pipeline, tta="dihedral8").eval()
    one = members[0]
    k = args.members
    print(f"{k} x {args.arch} @ {args.size} px, pipeline {args.pipeline}, dihedral8, CPU, {args.threads} thread(s)")
    print("| cells per batch | ensemble ms/cell | floor ms/cell | naive ms/cell | ensemble / floor | naive / ensemble |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for b in args.batches:
            x = torch.rand(b, 3, args.size, args.size)
            views = dihedral_views(x)
            t_ens = timed(lambda: ensemble(x), args.repeats) / b
            t_floor = timed(lambda: [one(views) for _ in range(k)], args.repeats) / b
            t_naive = timed(lambda: [one(x) for _ in range(8 * k)], args.repeats) / b
            print(f"| {b} | {t_ens * 1e3:.2f} | {t_floor * 1e3:.2f} | {t_naive * 1e3:.2f} | "
                  f"{t_ens / t_floor:.2f} | {t_naive / t_ens:.2f} |")


if __name__ == "__main__":
    main()
