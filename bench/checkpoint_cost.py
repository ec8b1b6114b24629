"""What checkpointing costs: the time of one checkpoint against the training it protects.

Trains an architecture (residual by default: its checkpoint is the largest of the built-ins)
for --iters iterations with a checkpoint every --every iterations into a fresh store, timing
each checkpoint (the training state gathered, written with torch.save and stored as a run
artifact) apart from the training, then reports the share of training time that a checkpoint
every 500 iterations costs: one checkpoint / (500 x one iteration).

    python bench/checkpoint_cost.py --data-dir DIR [--arch residual] [--iters 200] [--every 50]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from cifarx import runs
from cifarx.runs import Tracking, train_run
from cifarx.training.config import TrainConfig


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--arch", default="residual")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    saves: list[float] = []
    save = runs.save_checkpoint

    def timed(run, snapshot):
        start = time.perf_counter()
        save(run, snapshot)
        saves.append(time.perf_counter() - start)

    runs.save_checkpoint = timed
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(arch=args.arch, data_dir=args.data_dir, iters=args.iters,
                             eval_every=args.iters, checkpoint_every=args.every,
                             threads=args.threads, precision="fp32")
        done = train_run(config, Tracking(f"sqlite:///{tmp}/mlflow.db", "checkpoint-cost",
                                          system_metrics=False))
    result = done.result
    training = result.seconds - sum(saves)  # the loop's time without the checkpoints
    per_iteration = training / result.steps
    checkpoint = statistics.median(saves)
    print(f"{args.arch}: {result.steps} iterations in {training:.1f} s "
          f"({per_iteration * 1000:.0f} ms each, evaluation included); {len(saves)} checkpoints, "
          f"median {checkpoint * 1000:.0f} ms (min {min(saves) * 1000:.0f}, max "
          f"{max(saves) * 1000:.0f})")
    share = checkpoint / (500 * per_iteration)
    print(f"a checkpoint every 500 iterations costs {100 * share:.3g}% of training time "
          "(goal: at most 2%)")


if __name__ == "__main__":
    main()
