"""How fast a sweep runs its trials: workers, the fixed cost of a trial, and Ray against local.

Runs the same 8 short table1 trials (300 iterations of 100, flip+crop, evaluated at the end)
as sweeps into a fresh store: with the local executor and 1 worker, with 2 workers, and (when
Ray is installed) with the ray executor on a local Ray of 2 CPUs. Prints the wall times, the
ratio 1 worker / 2 workers, and the fixed cost of a trial: the sweep's wall time less the
trials' training loops (iterations and evaluations), per trial, with 1 worker (process start
amortized, data load, run creation, model logging), and the bound that thread scaling puts on
the 2-worker speed-up (2 x a trial's loop with all threads / its loop with half).

    python bench/sweep_speed.py --data-dir DIR [--trials 8] [--iters 300] [--skip-ray]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from cifarx.studies.study import from_dict
from cifarx.studies.sweep import sweep_run
from cifarx.studies.sweep_plan import plan_sweep


def timed_sweep(study, executor: str, options: list[str], uri: str) -> tuple[float, list]:
    sweep = plan_sweep(study, executor, options, uri=uri)
    start = time.perf_counter()
    done = sweep_run(sweep)
    wall = time.perf_counter() - start
    failed = [o for o in done.outcomes if o.status != "FINISHED"]
    if failed:
        raise SystemExit(f"{len(failed)} trial(s) failed: {failed[0].error}")
    return wall, [o.metrics["final/train_seconds"] for o in done.outcomes]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()

    def study(name: str):
        return from_dict({"experiment": name, "seeds": args.trials,
                          "train": {"arch": "table1", "aug": "flip,crop", "iters": args.iters,
                                    "eval-every": args.iters, "data-dir": args.data_dir}})

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        variants = [("local, 1 worker", "local", ["workers=1"]),
                    ("local, 2 workers", "local", ["workers=2"])]
        if not args.skip_ray:
            variants.append(("ray, local Ray of 2 CPUs", "ray", ["trial_cpus=1"]))
        results = {}
        for i, (label, executor, options) in enumerate(variants):
            wall, train = timed_sweep(study(f"speed-{i}"), executor, options, uri)
            results[label] = (wall, train)
            print(f"{label}: {args.trials} trials in {wall:.1f} s "
                  f"(training loops {sum(train):.1f} s in all)", flush=True)
    one, two = results["local, 1 worker"][0], results["local, 2 workers"][0]
    print(f"2 workers against 1: {one / two:.2f}x faster")
    # One worker trains with every thread, two with half each: two workers can gain at most
    # what a trial loses by having half the threads.
    loop_all = sum(results["local, 1 worker"][1]) / args.trials
    loop_half = sum(results["local, 2 workers"][1]) / args.trials
    print(f"training loop of a trial: {loop_all:.1f} s with all threads (1 worker), "
          f"{loop_half:.1f} s with half (2 workers): at most {2 * loop_all / loop_half:.2f}x "
          f"from 2 workers")
    wall, train = results["local, 1 worker"]
    fixed = (wall - sum(train)) / args.trials
    share = fixed / (fixed + sum(train) / args.trials)
    print(f"fixed cost of a trial (1 worker): {fixed:.2f} s = {share:.1%} of a "
          f"{args.iters}-iteration trial")
    if "ray, local Ray of 2 CPUs" in results:
        ray_wall = results["ray, local Ray of 2 CPUs"][0]
        print(f"ray against local (2 workers): {ray_wall / two:.2f}x the wall time "
              f"({ray_wall / two - 1:+.1%})")


if __name__ == "__main__":
    main()
