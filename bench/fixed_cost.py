"""Fixed cost per run: what `cifarx train` spends outside its training iterations, against a
plain student script (bench/baseline.py), side by side in one run.

Each side runs as a fresh process (imports, data, model, tracking, final evaluation and model
logging all included) at two lengths, --short and --long iterations of the part-1 protocol
(table1, flip+crop, batch 100, an evaluation every 100). The time per iteration is the slope
between them and the fixed cost the intercept: ``fixed = t(short) - short * slope``. The sides
alternate for --repeats rounds and the fastest time of each counts. Reported: both fixed costs
and their ratio (goal: cifarx within 2x of the script), and the per-iteration times.

cifarx is timed twice: into a fresh SQLite store in a temporary folder, as the first run on a
machine (the store's schema is created then: part of the cost), and into an existing store, as
every later run (the store made, and cifarx's cache of the installed packages filled, by one
untimed run first).

    python bench/fixed_cost.py --data-dir DIR [--short 100] [--long 400] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent

BASELINE = """
import sys
sys.path.insert(0, {bench!r})
from baseline import train_baseline
from cifarx.training.optim import DEFAULTS
train_baseline({data!r}, {iters}, 100, 100, DEFAULTS)
"""


def timed(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def cifarx(iters: int, data: str, store: str | None = None) -> float:
    """``cifarx train`` into ``store`` (a folder holding mlflow.db), else a fresh one."""
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store or folder}/mlflow.db"}
        cli = Path(sys.executable).with_name("cifarx")
        return timed([str(cli), "train", "--iters", str(iters), "--eval-every", "100",
                      "--data-dir", data, "--device", "cpu"], env)


def script(iters: int, data: str) -> float:
    code = BASELINE.format(bench=str(BENCH), data=data, iters=iters)
    return timed([sys.executable, "-c", code], dict(os.environ))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("CIFARX_DATA_DIR"))
    parser.add_argument("--short", type=int, default=100)
    parser.add_argument("--long", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if not args.data_dir:
        parser.error("--data-dir (or $CIFARX_DATA_DIR): a folder with cifar-10-batches-py/")
    existing = tempfile.mkdtemp(prefix="cifarx-bench-store-")
    cifarx(1, args.data_dir, existing)  # the store made, the package cache filled: untimed
    sides = {"cifarx, new store": cifarx,
             "cifarx, existing store": lambda iters, data: cifarx(iters, data, existing),
             "script": script}
    best = {}
    for _ in range(args.repeats):
        for name, run in sides.items():
            for iters in (args.short, args.long):
                seconds = run(iters, args.data_dir)
                best[name, iters] = min(best.get((name, iters), seconds), seconds)
                print(f"{name} {iters} iterations: {seconds:.1f} s", flush=True)
    shutil.rmtree(existing, ignore_errors=True)
    fixed = {}
    for name in sides:
        short, long = best[name, args.short], best[name, args.long]
        slope = (long - short) / (args.long - args.short)
        fixed[name] = short - args.short * slope
        print(f"{name}: fixed {fixed[name]:.1f} s, {slope * 1000:.0f} ms per iteration")
    for name in ("cifarx, new store", "cifarx, existing store"):
        print(f"fixed cost, {name}: cifarx / script = {fixed[name] / fixed['script']:.2f} "
              "(goal <= 2)")

if __name__ == "__main__":
    main()
