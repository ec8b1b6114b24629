"""Training speed: cifarx against the student-style baseline, side by side in one run.

Both train the Table-1 net with flip+crop on train batch #1 under the same protocol
(batch 100, test evaluation every 100 iterations) and the same hyperparameters. Reported:

- cifarx (MLflow tracking on) images/s divided by the baseline's images/s (goal >= 1.8x);
- tracking overhead: the time spent in MLflow calls, as a share of the tracked run's time,
  and the wall-time difference between cifarx with and without tracking;
- the channels_last memory layout cifarx uses on the CPU, against PyTorch's default NCHW.

    python bench/train_speed.py [--data-dir DIR] [--iters 2000] [--threads N]
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path

import torch

from cifarx import engine, tracking
from cifarx.data import resolve_data_dir

from baseline import train_baseline


def timed_run(run: tracking.Run) -> list[float]:
    """Wrap every logging method of ``run`` to add its duration to the returned list."""
    spent = [0.0]
    for name in ("log_params", "set_tags", "log_points", "log_figure", "log_dict", "log_dataset",
                 "log_model"):
        method = getattr(run, name)

        @functools.wraps(method)
        def wrapper(*args, method=method, **kwargs):
            t = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - t
        setattr(run, name, wrapper)
    return spent


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = engine.TrainConfig(arch="table1", aug=("flip", "crop"), data_dir=args.data_dir,
                                iters=args.iters, device="cpu", threads=args.threads)
    plan = engine.plan(config)
    data = plan.load_data()
    hp = {k: getattr(plan.config, k) for k in ("optimizer", "lr", "momentum", "weight_decay",
                                               "schedule")}
    print(f"table1 flip+crop, {args.iters} iterations of 100, eval every 100, "
          f"{args.threads} threads, {hp}", flush=True)

    base = train_baseline(resolve_data_dir(args.data_dir), args.iters, 100, 100, hp)
    print(f"baseline (DataLoader, 2 workers): {base['images_per_second']:7.0f} img/s  "
          f"{base['seconds']:6.1f} s  test acc {base['test_acc']:.2%}", flush=True)

    with tempfile.TemporaryDirectory() as store:
        uri = f"sqlite:///{store}/mlflow.db"
        start = time.perf_counter()
        with tracking.start_run(uri, "bench", "cifarx tracked", engine.run_tags(plan)) as run:
            spent = timed_run(run)
            tracked = engine.train(plan, data, run)
        tracked_wall = time.perf_counter() - start  # opening and closing the run included
    print(f"cifarx, tracked:                  {tracked.images_per_second:7.0f} img/s  "
          f"{tracked_wall:6.1f} s  test acc {tracked.test_acc:.2%}  "
          f"(MLflow calls {spent[0]:.2f} s)", flush=True)

    start = time.perf_counter()
    untracked = engine.train(plan, data)
    untracked_wall = time.perf_counter() - start
    print(f"cifarx, no tracking:              {untracked.images_per_second:7.0f} img/s  "
          f"{untracked_wall:6.1f} s  test acc {untracked.test_acc:.2%}", flush=True)

    # The memory layout engine.speed_settings picks for the CPU, against the default NCHW.
    chosen = engine.speed_settings
    engine.speed_settings = lambda device: (False, chosen(device)[1])
    try:
        start = time.perf_counter()
        nchw = engine.train(plan, data)
        nchw_wall = time.perf_counter() - start
    finally:
        engine.speed_settings = chosen
    print(f"cifarx, no tracking, NCHW layout: {nchw.images_per_second:7.0f} img/s  "
          f"{nchw_wall:6.1f} s  test acc {nchw.test_acc:.2%}", flush=True)

    ratio = base["seconds"] / tracked_wall
    print(f"\nspeed-up, cifarx tracked vs baseline (wall time): {ratio:.2f}x  (goal >= 1.8x)")
    print(f"tracking overhead, time in MLflow calls: {spent[0] / tracked_wall:.1%} of the run  "
          f"(goal <= 3%)")
    print(f"tracking overhead, wall time tracked vs untracked: "
          f"{tracked_wall / untracked_wall - 1:+.1%}")
    print(f"channels_last vs NCHW on this CPU (untracked wall time): "
          f"{nchw_wall / untracked_wall:.2f}x")


if __name__ == "__main__":
    main()
