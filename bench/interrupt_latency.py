"""How long an interrupted training takes to end: Ctrl-C (SIGINT) and SIGTERM, each sent once
the run prints its first progress line, with the machine loaded by N busy processes.

    python bench/interrupt_latency.py --data-dir DIR [--load 14] [--arch table1]

Reported: seconds from the signal to the process's exit, its exit status (130, 143) and the
run's final status in MLflow (KILLED). The goal is a few seconds whatever the load.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def busy(seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import time\nend = time.time() + {seconds}\n"
                             "while time.time() < end: pass"])


def interrupted(sig: signal.Signals, args, store: str) -> tuple[float, int, str]:
    log = Path(store) / f"{sig.name}.log"
    command = [sys.executable, "-m", "cifarx", "train", "--arch", args.arch, "--iters", "5000",
               "--threads", "1", "--data-dir", args.data_dir, "--tracking-uri",
               f"sqlite:///{store}/mlflow.db", "--experiment", "interrupt", "--run-name",
               sig.name]
    with open(log, "w") as out:  # SIGINT as a terminal sends it: not ignored in the child
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                    signal.SIG_DFL))
        while "step " not in log.read_text():
            if process.poll() is not None:
                raise SystemExit(f"the training ended early:\n{log.read_text()}")
            time.sleep(0.2)
        time.sleep(2)
        start = time.perf_counter()
        process.send_signal(sig)
        code = process.wait()
        seconds = time.perf_counter() - start
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{store}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("interrupt").experiment_id],
                             filter_string=f"attributes.run_name = '{sig.name}'")[0]
    return seconds, code, run.info.status


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("CIFARX_DATA_DIR"))
    parser.add_argument("--arch", default="table1")
    parser.add_argument("--load", type=int, default=14, help="busy processes beside the run")
    args = parser.parse_args()
    loaders = [busy(600) for _ in range(args.load)]
    try:
        with tempfile.TemporaryDirectory() as store:
            for sig in (signal.SIGINT, signal.SIGTERM):
                seconds, code, status = interrupted(sig, args, store)
                print(f"{sig.name:<8} {seconds:5.1f} s to exit, status {code}, run {status} "
                      f"({args.load} busy processes, load {os.getloadavg()[0]:.1f})", flush=True)
    finally:
        for p in loaders:
            p.kill()


if __name__ == "__main__":
    main()
