"""A training against an `mlflow server` killed halfway, against an uninterrupted one.

Cases: (a) the server is restarted ``--restart-after`` seconds after the kill, during the
training; (b) it is not restarted until the training has ended, then `cifarx sync` uploads the
spool; (c, on demand) it is frozen (SIGSTOP: connections hang rather than fail) until the
training has ended, then resumed and synced. Each case's run is compared with the
uninterrupted run's: every metric point (the timing metrics left out), the figures (bytes),
the model (weights), status and name. How long training stalled: the training thread's time
in ``Run.log_points`` (total and longest call), the longest gap between two metric flushes,
and the time from the last step to the end of the run, next to the uninterrupted run's.

    python bench/server_outage.py --data-dir /work/data/cifar [--iters 600] [--eval-every 100]
        [--threads 1] [--restart-after 30] [--cases abc]

It starts its own `mlflow server` (SQLite in a temporary folder, a free port) and spools into
that folder too.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from cifarx.runs import Tracking, train_run
from cifarx.tracking import server as tracking_server, spool
from cifarx.tracking.models import load_model
from cifarx.tracking.run import Run
from cifarx.training.config import TrainConfig

TIMING = ("final/train_seconds", "final/images_per_second")


class Server:
    def __init__(self, folder: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.folder, self.uri, self.process = folder, f"http://127.0.0.1:{self.port}", None

    def start(self, wait: bool = True):
        self.process = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
             f"sqlite:///{self.folder}/mlflow.db", "--artifacts-destination",
             str(self.folder / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"], stdout=open(self.folder / "server.log", "a"),
            stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        self.started = time.perf_counter()
        if wait:
            self.wait()

    def wait(self):
        while tracking_server.silence(self.uri) is not None:
            time.sleep(0.2)
        return time.perf_counter() - self.started

    def kill(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.killed = time.perf_counter()


def train(config: TrainConfig, server: Server, name: str, at_half=None):
    """Train into a run named ``name``; ``at_half()`` runs when the training reaches half of
    its iterations. Returns (done, flush times, seconds from the last flush to the end)."""
    flushes, half = [], config.iters // 2

    def listener(points):
        flushes.append(time.perf_counter())
        nonlocal at_half
        if at_half is not None and max(p[2] for p in points) >= half:
            action, at_half = at_half, None
            action()

    done = train_run(config, Tracking(server.uri, "outage-bench", name, system_metrics=False),
                     [listener])
    return done, flushes, time.perf_counter() - flushes[-1]


def timed_logging():
    """Time each Run.log_points call: what the training thread spends on tracking."""
    calls, log_points = [], Run.log_points

    def timed(self, points):
        started = time.perf_counter()
        log_points(self, points)
        calls.append(time.perf_counter() - started)

    Run.log_points = timed
    return calls


def compare(client, reference: str, run_id: str, uri: str) -> dict:
    """How the run differs from the reference run: metric points, figures, model."""
    ref, run = client.get_run(reference), client.get_run(run_id)
    keys = (set(ref.data.metrics) | set(run.data.metrics)) - set(TIMING)
    history, other = ({k: sorted((m.step, m.value) for m in client.get_metric_history(r, k))
                       for k in keys} for r in (reference, run_id))
    points = sum(len(v) for v in history.values())
    with tempfile.TemporaryDirectory() as tmp:
        figures = {}
        for r in (reference, run_id):
            files = client.list_artifacts(r, "figures")
            figures[r] = {f.path: Path(client.download_artifacts(r, f.path, tmp + "/" + r))
                          .read_bytes() for f in files}
    a, b = (load_model(f"runs:/{r}/model", uri).state_dict() for r in (reference, run_id))
    return {"status": run.info.status, "name": run.info.run_name,
            "metric points": f"{sum(len(v) for v in other.values())} vs {points}",
            "metrics equal": history == other,
            "figures equal": figures[reference] == figures[run_id] and bool(figures[run_id]),
            "model equal": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--iters", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--restart-after", type=float, default=30.0)
    parser.add_argument("--cases", default="ab", help="a: restarted, b: not restarted, "
                        "c: frozen (SIGSTOP) until the training ends [default: ab]")
    args = parser.parse_args()
    config = TrainConfig(arch="table1", iters=args.iters, eval_every=args.eval_every,
                         threads=args.threads, device="cpu", precision="fp32",
                         data_dir=args.data_dir)
    folder = Path(tempfile.mkdtemp(prefix="cifarx-outage-"))
    os.environ[spool.SPOOL_ENV] = str(folder / "spool")
    server = Server(folder)
    server.start()
    print(f"server {server.uri} ({folder})", flush=True)
    from mlflow import MlflowClient

    client = MlflowClient(server.uri)
    calls = timed_logging()

    def row(done, flushes, tail):
        return {"train s": done.result.seconds, "in log_points s": sum(calls),
                "longest log_points s": max(calls),
                "longest gap s": max(map(float.__sub__, flushes[1:], flushes[:-1])),
                "last step to end s": tail}

    def restart_later():
        server.kill()
        threading.Timer(args.restart_after, server.start, kwargs={"wait": False}).start()

    cases = {"a": (f"restarted {args.restart_after:g} s later", restart_later),
             "b": ("not restarted", server.kill),
             "c": ("frozen (SIGSTOP)", lambda: os.killpg(server.process.pid, signal.SIGSTOP))}
    report = {}
    try:
        base = train(config, server, "uninterrupted")
        report["uninterrupted"] = row(*base)
        for key in args.cases:
            name, at_half = cases[key]
            calls.clear()
            done, flushes, tail = train(config, server, name, at_half)
            report[name] = found = row(done, flushes, tail)
            if key == "c":
                os.killpg(server.process.pid, signal.SIGCONT)
            elif server.process.poll() is not None:
                server.start()
            server.wait()
            if (spool.spool_root() / done.run_id / spool.JOURNAL).is_file():
                started = time.perf_counter()
                sync = subprocess.run([sys.executable, "-m", "cifarx", "sync", done.run_id],
                                      capture_output=True, text=True)
                found["sync s"] = time.perf_counter() - started
                found["sync"] = (sync.stdout + sync.stderr).strip().split("; open it")[0]
            found.update(compare(client, base[0].run_id, done.run_id, server.uri))
            print(name, found, flush=True)
    finally:
        server.kill()
    for case, found in report.items():
        print(f"{case}: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in found.items()))


if __name__ == "__main__":
    main()
