"""Probe overhead: training with `--probe grad-max` against without, side by side in one run.

Both train the same architecture on the same data with the same seed and options, tracked into a
temporary MLflow store as `cifarx train` is, and alternate (--repeats) so that a change in the
machine's load hits both; the fastest of each counts. The time is the training loop's (metric
transfers and MLflow batches included; the end-of-run model upload left out). Reported: seconds
per iteration of each, and the overhead (goal <= 10%).

    python bench/probe_overhead.py --data-dir DIR [--arch convonly] [--probe grad-max]
                                   [--iters 300] [--repeats 2] [--threads N]
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace

import torch

from cifarx import runs
from cifarx.plugin_api.registry import catalog
from cifarx.training import config as cfg, loop


def timed(plan: cfg.Plan, data, uri: str, name: str) -> float:
    """Seconds per iteration of one tracked run."""
    job = runs.TrainJob(plan, data, loop.assemble(plan, data), catalog())
    result = runs.train_run(job, runs.Tracking(uri, "bench", name)).result
    return result.seconds / plan.config.iters


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--arch", default="convonly")
    parser.add_argument("--probe", default="grad-max")
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = cfg.TrainConfig(arch=args.arch, data_dir=args.data_dir, iters=args.iters,
                           eval_every=args.iters, device="cpu", threads=args.threads)
    plans = {"no probe": cfg.plan(base),
             f"--probe {args.probe}": cfg.plan(replace(base, probes=cfg.parse_list(args.probe)))}
    data = plans["no probe"].load_data()
    print(f"{args.arch}, flip+crop, {args.iters} iterations of 100, {args.threads} threads, "
          f"{args.repeats} alternating repeats, fastest counts", flush=True)

    best = {name: float("inf") for name in plans}
    with tempfile.TemporaryDirectory() as store:
        uri = f"sqlite:///{store}/mlflow.db"
        for repeat in range(1, args.repeats + 1):
            for name, plan in plans.items():
                seconds = timed(plan, data, uri, name)
                best[name] = min(best[name], seconds)
                print(f"  repeat {repeat}, {name:<22} {seconds:.4f} s/iteration", flush=True)

    without, with_probe = best.values()
    print(f"\nno probe:                {without:.4f} s/iteration")
    print(f"--probe {args.probe + ':':<15} {with_probe:.4f} s/iteration")
    print(f"overhead: {with_probe / without - 1:+.1%}  (goal <= +10%)")


if __name__ == "__main__":
    main()
