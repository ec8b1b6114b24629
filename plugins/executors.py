"""Built-in executors: where a sweep's trials run.

- ``local``: worker processes on this machine. Each is spawned once (a fresh interpreter) and
  runs trial after trial, so torch, MLflow and the plugins are imported once per worker, not
  once per trial. With several GPUs, worker i sees only GPU i (modulo their number). A script
  that runs a sweep from Python needs ``if __name__ == "__main__":``, as spawned workers import
  the main module again.
- ``ray``: one Ray task per trial, on a Ray cluster or on a local Ray that cifarx starts and
  stops. Needs ``pip install 'cifarx[ray]'``. On a remote cluster, every node must have cifarx
  and the plugins the trials use installed, and reach the tracking store (an ``mlflow server``);
  a cluster with token authentication needs ``RAY_AUTH_MODE=token`` and its token here.

Both report a trial whose worker died (killed by the OS, a segfault) as FAILED, its run ended
FAILED, and carry on. On Ctrl-C, the running trials are interrupted (a KeyboardInterrupt in
their process: ``run_trial`` ends their runs KILLED and they are reported KILLED), workers that
do not end within ``GRACE`` seconds are killed, and the KeyboardInterrupt goes on. The local
workers are in a process group of their own, so that the terminal's Ctrl-C reaches only the
sweep's process, which interrupts each busy worker once.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Iterable, Sized
from multiprocessing.connection import wait
from urllib.parse import urlparse

from cifarx import Executor, Option, OptionError, UserError, hookimpl
from cifarx.studies.trials import Outcome, Trial, run_trial

GRACE = 15.0  # seconds an interrupted trial has to end its run before its worker is killed
PROBE_SECONDS = 3.0  # how long a Ray address may take to answer


def with_threads(trial: Trial, threads: int) -> Trial:
    """``trial`` with ``threads`` CPU threads, unless its config sets them."""
    if trial.config.threads is not None:
        return trial
    return dataclasses.replace(trial, config=dataclasses.replace(trial.config, threads=threads))


def lost(trial: Trial, status: str, error: str) -> Outcome:
    """The outcome of a trial whose worker is gone: the run it opened, if any, ends ``status``
    with the error (it would stay RUNNING, saying nothing, otherwise)."""
    from cifarx.studies.trials import settle

    outcome = Outcome(trial, status, error=error)
    settle(outcome)
    return outcome


# --- local: worker processes on this machine --------------------------------------------------

def serve(conn, env: dict[str, str], selection: list | None = None):
    """A worker: warm up once, then run each trial it is sent until it is sent None.
    ``selection``: cifarx.testing's choice of plugins, rebuilt here (None: what is installed)."""
    os.setpgrp()  # Ctrl-C reaches the sweep's process only; it interrupts the busy workers
    # a sweep started in the background inherits SIGINT ignored: the sweep's interrupt must work
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.update(env)
    try:
        from cifarx import runs  # noqa: F401  torch, MLflow and the plugins, once
        from cifarx.plugin_api import registry  # noqa: F401

        if selection is not None:
            registry.set_registry(registry.selecting(selection))
        registry.catalog()
        while (trial := conn.recv()) is not None:
            conn.send(run_trial(trial))
    except (KeyboardInterrupt, EOFError, BrokenPipeError):
        pass  # interrupted while idle, or the sweep's process is gone


def exit_reason(code: int | None) -> str:
    if code is None:
        return "it stopped answering"
    if code < 0:
        name = signal.Signals(-code).name
        return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    return f"it exited with code {code}"


class Worker:
    """One worker process, and the trial it runs (None: idle)."""

    def __init__(self, context, env: dict[str, str]):
        from cifarx.plugin_api.registry import registry

        self.env = env
        self.conn, theirs = context.Pipe()
        self.process = context.Process(target=serve, args=(theirs, env, registry().portable()),
                                       name="cifarx-worker")
        self.process.start()
        theirs.close()
        self.trial: Trial | None = None

    def give(self, trial: Trial):
        self.trial = trial
        try:
            self.conn.send(trial)
        except OSError:
            pass  # it died: its sentinel tells

    def ready(self, handles) -> bool:
        return self.conn in handles or self.process.sentinel in handles

    def outcome(self, interrupted: bool = False) -> Outcome:
        """Its trial's outcome, once its connection or its process is ready."""
        trial, self.trial = self.trial, None
        try:
            if self.conn.poll():
                return self.conn.recv()
        except (EOFError, OSError):
            pass
        self.process.join(5)
        if interrupted:
            return lost(trial, "KILLED", "interrupted")
        return lost(trial, "FAILED", f"worker died: {exit_reason(self.process.exitcode)}")

    def interrupt(self):
        try:
            os.kill(self.process.pid, signal.SIGINT)
        except ProcessLookupError:
            pass


def visible_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    try:
        import torch
    except ImportError:
        return []
    return [str(i) for i in range(torch.cuda.device_count())]


def run_local(trials: Iterable[Trial], on_outcome, workers: int = 1, threads: int = 0):
    """Run the trials in ``workers`` processes; a dead worker fails its trial and is replaced.

    The next trial is taken only when a worker is free, after the outcome that freed it was
    reported: a search chooses it knowing every result so far.
    """
    count = min(workers, len(trials)) if isinstance(trials, Sized) else workers
    per_trial = threads or max(1, (os.cpu_count() or 1) // max(count, 1))
    todo = (with_threads(t, per_trial) for t in trials)
    gpus = visible_gpus() if count > 1 else []  # with several GPUs, one per worker in turn
    context = multiprocessing.get_context("spawn")
    pool: list[Worker] = []
    try:
        for i, trial in zip(range(count), todo):  # a worker only for a trial there is
            pool.append(Worker(context, {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]}
                               if gpus else {}))
            pool[-1].give(trial)
        while busy := [w for w in pool if w.trial]:
            ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
            for worker in (w for w in busy if w.ready(ready)):
                on_outcome(worker.outcome())
                trial = next(todo, None)
                if trial is not None:
                    if not worker.process.is_alive():  # it died: a new one takes its place
                        worker.conn.close()
                        pool[pool.index(worker)] = worker = Worker(context, worker.env)
                    worker.give(trial)
    except KeyboardInterrupt:
        interrupt(pool, on_outcome)
        raise
    finally:
        stop(pool)


def interrupt(pool: list[Worker], on_outcome):
    """Ctrl-C: interrupt the running trials (run_trial ends their runs KILLED), report them."""
    busy = [w for w in pool if w.trial]
    for worker in busy:
        worker.interrupt()
    deadline = time.monotonic() + GRACE
    while busy and (left := deadline - time.monotonic()) > 0:
        ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy], left)
        for worker in [w for w in busy if w.ready(ready)]:
            busy.remove(worker)
            on_outcome(worker.outcome(interrupted=True))
    for worker in busy:  # past the grace period
        worker.process.kill()
        on_outcome(worker.outcome(interrupted=True))


def stop(pool: list[Worker]):
    """End every worker: idle ones when told to, busy ones (an error in the sweep) interrupted
    first so that their runs end KILLED, and any still alive after the grace period killed."""
    for worker in pool:
        try:
            worker.conn.send(None)
        except OSError:
            pass
        if worker.trial:
            worker.interrupt()
    deadline = time.monotonic() + (GRACE if any(w.trial for w in pool) else 5)
    for worker in pool:
        worker.process.join(max(0.0, deadline - time.monotonic()))
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        worker.conn.close()


# --- ray: one Ray task per trial ----------------------------------------------------------------

def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'cifarx[ray]'") from None
    return ray


def host_port(address: str) -> tuple[str, int]:
    """Where a Ray address answers: ``ray://host[:10001]`` (Ray Client) or ``host[:6379]``."""
    client = address.startswith("ray://")
    parsed = urlparse(address if client else f"//{address}")
    port = parsed.port  # ValueError for a port that is not a number
    if not parsed.hostname:
        raise ValueError(address)
    return parsed.hostname, port or (10001 if client else 6379)


def is_remote(host: str) -> bool:
    return not (host == "localhost" or host.startswith("127.") or
                host in ("::1", "0.0.0.0", socket.gethostname()))


def is_file_store(uri: str) -> bool:
    """A store only this machine can write to: a SQLite file or an mlruns folder."""
    scheme = urlparse(uri).scheme
    return scheme in ("", "file", "sqlite") or len(scheme) == 1  # C:\\... on Windows


def check_ray(trials: list[Trial], address: str = "", trial_cpus: float = 1.0,
              trial_gpus: float = 0.0):
    """Ray is installed, a local Ray can run a trial, or the cluster's address answers and
    its nodes can reach the tracking store."""
    import_ray()
    given = address or os.environ.get("RAY_ADDRESS", "")

    def error(message: str) -> UserError:
        return OptionError("address", message) if address else \
            UserError(f"$RAY_ADDRESS={given}: {message}")

    if not given:
        cpus = os.cpu_count() or 1
        if trial_cpus > cpus:
            raise OptionError("trial_cpus", f"this machine has {cpus} CPUs: a local Ray could "
                                            "never start a trial")
        if trial_gpus > 0 and trial_gpus > len(gpus := visible_gpus()):
            raise OptionError("trial_gpus", f"this machine has {len(gpus)} GPUs: a local Ray "
                                            "could never start a trial")
        return
    if given == "auto":  # a cluster started on this machine (`ray start --head`): Ray finds it
        return
    try:
        host, port = host_port(given)
    except ValueError:
        raise error("expected ray://HOST:PORT (Ray Client) or HOST:PORT") from None
    stores = sorted({t.tracking_uri for t in trials if is_file_store(t.tracking_uri)})
    if is_remote(host) and stores:
        raise error(f"the cluster's nodes cannot write to {stores[0]}, a store on this "
                    f"machine; serve it with `mlflow server --backend-store-uri {stores[0]} "
                    "--host 0.0.0.0` and give --tracking-uri http://THIS_HOST:5000")
    try:
        socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
    except OSError as exc:
        why = f"no answer within {PROBE_SECONDS:g} s" if isinstance(exc, TimeoutError) else \
            exc.strerror or str(exc)
        raise error(f"nothing answers at {host}:{port} ({why}); start the cluster "
                    "(`ray start --head`) or correct the address") from None
    # Something accepts the connection; a Ray head (GCS) and a Ray Client server speak gRPC.
    # Anything else (a web server, a silent listener) would leave ray.init waiting minutes.
    import grpc

    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=PROBE_SECONDS)
    except grpc.FutureTimeoutError:
        raise error(f"{host}:{port} accepts connections but does not answer as Ray does (no "
                    f"gRPC handshake within {PROBE_SECONDS:g} s): is it the head's address "
                    "(`ray start --head` prints it) or a Ray Client's ray://HOST:10001?"
                    ) from None
    finally:
        channel.close()


def connection_problem(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    if "InvalidAuthToken" in text or "uthentication" in text:
        return ("the cluster wants its token (Ray's token authentication): set "
                "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN, or put the token in ~/.ray/auth_token")
    return f"{type(exc).__name__}: {text[:300]}"


def ray_outcome(ray, ref, trial: Trial) -> Outcome:
    try:
        return ray.get(ref)
    except ray.exceptions.TaskCancelledError:
        return lost(trial, "KILLED", "interrupted")
    except ray.exceptions.RayTaskError as exc:  # run_trial raised: cifarx missing on a node, ...
        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
        return lost(trial, "FAILED", f"{type(cause).__name__}: {str(cause).splitlines()[0]}")
    except ray.exceptions.RayError as exc:  # its worker or its node died
        return lost(trial, "FAILED", f"worker died: {type(exc).__name__}: "
                                     f"{str(exc).strip().splitlines()[0]}")


def ray_slots(resources: dict, trial_cpus: float, trial_gpus: float) -> int:
    """Trials a Ray cluster with ``resources`` runs at once."""
    slots = resources.get("CPU", 0) // trial_cpus
    if trial_gpus > 0:
        slots = min(slots, resources.get("GPU", 0) // trial_gpus)
    return max(1, int(slots))


def run_ray(trials: list[Trial], on_outcome, address: str = "", trial_cpus: float = 1.0,
            trial_gpus: float = 0.0):
    """One Ray task per trial. Without an address (nor ``$RAY_ADDRESS``), a local Ray on all
    this machine's cores, stopped at the end; a Ray the process already started is used as it
    is."""
    ray = import_ray()
    todo = iter(trials)
    first = next(todo, None)
    if first is None:
        return
    given = address or os.environ.get("RAY_ADDRESS", "")
    connect = not ray.is_initialized()
    if connect and given:
        try:
            ray.init(address=given, logging_level=logging.WARNING)
        except Exception as exc:
            raise UserError(f"Ray at {given}: {connection_problem(exc)}") from None
    elif connect:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                 logging_level=logging.ERROR)
    pending = {}
    try:
        task = ray.remote(num_cpus=trial_cpus, num_gpus=trial_gpus, max_retries=0)(run_trial)
        # as many tasks as the cluster runs at once, the next one when one ends: a search
        # asks for each trial knowing every result so far
        slots = ray_slots(ray.cluster_resources(), trial_cpus, trial_gpus)

        def submit(trial: Trial):
            trial = with_threads(trial, max(1, int(trial_cpus)))
            pending[task.remote(trial)] = trial

        submit(first)
        for trial in itertools.islice(todo, slots - 1):
            submit(trial)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                on_outcome(ray_outcome(ray, ref, pending.pop(ref)))
                if (trial := next(todo, None)) is not None:
                    submit(trial)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref)  # a KeyboardInterrupt in the task: run_trial ends its run KILLED
        ended, _ = ray.wait(list(pending), num_returns=len(pending), timeout=GRACE) \
            if pending else ([], [])
        for ref, trial in pending.items():
            on_outcome(ray_outcome(ray, ref, trial) if ref in ended else
                       lost(trial, "KILLED", "interrupted"))
        raise
    finally:
        if connect:
            ray.shutdown()


@hookimpl
def register_executors(register):
    register(Executor(
        name="local", run=run_local,
        summary="worker processes on this machine, each running trial after trial",
        options={
            "workers": Option(1, int, range="[1, inf)", help="trials run at once"),
            "threads": Option(0, int, range="[0, inf)", help="CPU threads per trial; 0: the "
                              "machine's cores split between the workers")}))
    register(Executor(
        name="ray", run=run_ray, check=check_ray,
        summary="one Ray task per trial, on a Ray cluster or a local Ray (the ray extra)",
        options={
            "address": Option("", str, help="ray://HOST:PORT or HOST:PORT; empty: $RAY_ADDRESS, "
                              "else a local Ray"),
            "trial_cpus": Option(1.0, float, range="(0, inf)", help="CPUs each trial reserves"),
            "trial_gpus": Option(0.0, float, range="[0, inf)", help="GPUs each trial reserves")}))
