"""A tracking server that fails: checked before a command starts, and spooled around mid-run.

- **At start**: :func:`require_server` asks an ``http(s)://`` tracking server for its
  ``/health`` page; no answer within the request timeout is one line of error, before the
  command does any work (MLflow itself would retry for about four minutes).
- **Bounded waits**: :func:`bound_waits` gives MLflow's HTTP settings cifarx's defaults (a
  call gives up after 5 s and one retry, not MLflow's 120 s and seven retries with back-off),
  unless the user set them.
- **During a run**: a run's :class:`Link` sends what the run logs to its server while it
  answers. When a call fails for want of the server (no connection, a timeout, 5xx), the run
  carries on into a :class:`Spool`, a local folder that keeps everything it logs after that
  (metrics, params, tags, files, the model, its end) in order; a thread probes the server, and
  when it answers again the spool is uploaded and the run goes on live.
- **After**: :func:`sync` (``cifarx sync``) uploads the spool of a run that ended with its
  server away into that same run, in order, once: what was uploaded is counted, so a second
  sync (or one interrupted and run again) sends nothing twice.

mlflow, torch, filelock and urllib.request are imported inside the functions that need them:
the CLI imports this module to start.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from . import server
from .server import is_outage, request_timeout

SPOOL_ENV = "CIFARX_SPOOL_DIR"
FORMAT = "cifarx-spool/1"
MANIFEST, JOURNAL, SENT, FILES = "spool.json", "journal.jsonl", "sent.json", "files"

RECHECK_S = 5.0  # how often a lost server is asked whether it is back


def spool_root() -> Path:
    """``$CIFARX_SPOOL_DIR``, else ``$XDG_DATA_HOME/cifarx/spool`` (``~/.local/share/...``):
    data that is not uploaded yet, not a cache."""
    if os.environ.get(SPOOL_ENV):
        return Path(os.environ[SPOOL_ENV]).expanduser().absolute()
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "cifarx" / "spool"


# A record: (kind, payload), what a Run sends (see tracking.Run._apply):
#   params {"params": {k: v}}, tags {"tags": {k: v}}, metrics {"points": [[key, value, step, ms]]},
#   artifact {"file": path, "dir": artifact folder or None}, dataset {"name", "source", "digest",
#   "context"}, model {"model": nn.Module, "packages", "recipe", "example", "step", "tags",
#   "register", "metrics", "dataset"}, end {"status", "end_time"}.
Record = tuple[str, dict[str, Any]]


class Spool:
    """A run's records kept in a folder, ``<spool root>/<run id>/``, until uploaded.

    ``spool.json`` says which run, on which tracking server, and where the spool lives;
    ``journal.jsonl`` holds the records in order, one JSON line each, their files (an
    artifact, a model's weights) under ``files/<record number>/``; ``sent.json`` counts the
    records uploaded. Once all are uploaded the journal and files are deleted and
    ``spool.json`` says when (``synced``). The process writing a spool holds ``.lock``.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.manifest: dict[str, Any] = json.loads((folder / MANIFEST).read_text())
        self._lock = None
        self._count: int | None = None  # records in the journal, once counted

    @classmethod
    def create(cls, run_id: str, run_name: str | None, experiment_id: str | None,
               uri: str) -> Spool:
        """The spool of ``run_id`` (one made earlier in this run's life is continued)."""
        import socket

        folder = spool_root() / run_id
        if (folder / MANIFEST).is_file() and not Spool(folder).synced:
            # left by an earlier process of the run (killed, resumed): go on after its records
            journal = folder / JOURNAL
            if journal.is_file() and not journal.read_bytes().endswith(b"\n"):
                with open(journal, "a") as f:  # a record cut short by a crash: ended
                    f.write("\n")
            return cls(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SENT).unlink(missing_ok=True)
        _write_json(folder / MANIFEST, {
            "format": FORMAT, "run_id": run_id, "run_name": run_name,
            "experiment_id": experiment_id, "tracking_uri": uri, "folder": str(folder),
            "host": socket.gethostname(), "created": _now_iso()})
        return cls(folder)

    @property
    def run_id(self) -> str:
        return self.manifest["run_id"]

    @property
    def uri(self) -> str:
        return self.manifest["tracking_uri"]

    @property
    def synced(self) -> str | None:
        return self.manifest.get("synced")

    def lock(self, wait: bool = True) -> bool:
        """Hold the spool for this process; False when another holds it (``wait=False``)."""
        from filelock import FileLock, Timeout

        self._lock = self._lock or FileLock(str(self.folder / ".lock"))
        try:
            self._lock.acquire(timeout=-1 if wait else 0)
            return True
        except Timeout:
            return False

    def unlock(self):
        if self._lock is not None:
            self._lock.release()

    def records(self) -> int:
        """How many records the journal holds (a line cut short by a crash counts as one)."""
        if self._count is None:
            self._count = sum(1 for _ in self._lines())
        return self._count

    def sent(self) -> int:
        path = self.folder / SENT
        return json.loads(path.read_text())["records"] if path.is_file() else 0

    def add(self, kind: str, payload: dict[str, Any]):
        """Append a record; its files are copied in (a model saved) now."""
        number = self.records()
        stored = _store(kind, payload, self.folder, f"{FILES}/{number:05d}")
        with open(self.folder / JOURNAL, "a") as f:
            f.write(json.dumps({"kind": kind, **stored}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._count = number + 1

    def unsent(self) -> Iterator[tuple[int, Record]]:
        """The records not uploaded yet, each with the count to :meth:`mark_sent` after it."""
        start = self.sent()
        for number, line in enumerate(self._lines()):
            if number >= start and line is not None:
                stored = dict(line)
                kind = stored.pop("kind")
                yield number + 1, (kind, _load(kind, stored, self.folder))

    def mark_sent(self, count: int):
        _write_json(self.folder / SENT, {"records": count, "at": _now_iso()})

    def finish(self):
        """Every record is uploaded: keep only what says so."""
        (self.folder / JOURNAL).unlink(missing_ok=True)
        (self.folder / SENT).unlink(missing_ok=True)
        shutil.rmtree(self.folder / FILES, ignore_errors=True)
        self._count = 0
        self.manifest["synced"] = _now_iso()
        _write_json(self.folder / MANIFEST, self.manifest)

    def _lines(self) -> Iterator[dict[str, Any] | None]:
        """Each line's record; None for a line a crash cut short (its record is lost)."""
        if not (self.folder / JOURNAL).is_file():
            return
        with open(self.folder / JOURNAL) as f:
            for line in f:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    yield None


def _store(kind: str, payload: dict[str, Any], folder: Path, files: str) -> dict[str, Any]:
    """A record's payload as JSON, its files written under ``folder/files``."""
    if kind == "artifact":
        source = Path(payload["file"])
        target = folder / files / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
        return {"file": f"{files}/{source.name}", "dir": payload["dir"]}
    if kind == "model":
        import numpy as np
        import torch

        from . import weights

        where = folder / files
        where.mkdir(parents=True, exist_ok=True)
        model, recipe, example = payload["model"], payload["recipe"], payload["example"]
        if recipe:
            weights.save(model, recipe, where)
        else:  # no recipe to rebuild it from: the module itself, read back by this user's sync
            torch.save(model, where / "model.pt")
        if example is not None:
            np.save(where / "example.npy", example.detach().cpu().float().numpy())
        return {**{k: v for k, v in payload.items() if k not in ("model", "example")},
                "folder": files}
    return payload


def _load(kind: str, stored: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The payload of a stored record, its files read back."""
    if kind == "artifact":
        return {"file": str(folder / stored["file"]), "dir": stored["dir"]}
    if kind == "model":
        import numpy as np
        import torch

        from ..plugin_api.registry import catalog
        from . import weights

        where = folder / stored["folder"]
        if stored["recipe"]:
            model = weights.rebuild(stored["recipe"], where / weights.WEIGHTS,
                                    f"the spooled model of run {folder.name}", catalog(),
                                    torch.device("cpu"))
        else:  # written by this user's own run into their spool
            model = torch.load(where / "model.pt", weights_only=False)
        example = where / "example.npy"
        return {**{k: v for k, v in stored.items() if k != "folder"}, "model": model,
                "example": torch.from_numpy(np.load(example)) if example.is_file() else None}
    return stored


class Link:
    """A run's way to its tracking server: live while the server answers, else its spool.

    ``apply(kind, payload)`` sends a record to the server (:meth:`cifarx.tracking.run.Run._apply`);
    ``unsent()`` gives the records handed to a writer thread and not yet stored, which go to
    the spool first when the server is lost. Every call waits on the server for at most the
    bounded request time (see :func:`bound_waits`); while it is lost, none does.
    """

    def __init__(self, uri: str, run_id: str, run_name: str | None, experiment_id: str | None,
                 apply: Callable[[str, dict[str, Any]], Any],
                 unsent: Callable[[], list[Record]] = list):
        self.uri, self.run_id = uri, run_id
        self.run_name, self.experiment_id = run_name, experiment_id
        self.apply, self.unsent = apply, unsent
        self.spool: Spool | None = None
        self.lost = False
        self._back = threading.Event()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def live(self, recheck: bool = False) -> bool:
        """Whether records go to the server now; a lost server that answers again (seen by
        the watcher, or now with ``recheck``) gets the spool uploaded first."""
        if not self.lost:
            return True
        if recheck and server.silence(self.uri, min(request_timeout(), RECHECK_S, 2.0)) is None:
            self._back.set()
        return self._back.is_set() and self._reconnect()

    def deliver(self, kind: str, payload: dict[str, Any]):
        """Send a record, or spool it while the server is lost (or when this call finds it
        lost). An error the server answered with is raised."""
        if not self.live():
            self.spool.add(kind, payload)
            return
        try:
            self.apply(kind, payload)
        except Exception as exc:
            if not is_outage(exc):
                raise
            self.divert(exc, [(kind, payload)])

    def divert(self, exc: BaseException, records: list[Record]):
        """The server failed (``exc``): from now on records go to the spool, ``records``
        (what the failed call was sending) after what the writer thread had not stored."""
        first = not self.lost
        if self.spool is None:
            self.spool = Spool.create(self.run_id, self.run_name, self.experiment_id, self.uri)
            self.spool.lock()
        self.lost = True
        self._back.clear()
        for record in [*self.unsent(), *records]:
            self.spool.add(*record)
        if first:
            _say(f"cifarx: warning: lost the tracking server {self.uri} ({_reason(exc)}); "
                     f"run {self.run_id} goes on into its spool {self.spool.folder} until the "
                     "server answers again: nothing is lost")
        self._stop.clear()
        if self._watcher is None or not self._watcher.is_alive():
            self._watcher = threading.Thread(target=self._watch, name="cifarx-server-watch",
                                             daemon=True)
            self._watcher.start()

    def close(self) -> Path | None:
        """The run has ended: its spool's folder when records are left in it (for
        ``cifarx sync``), else None."""
        self._stop.set()
        if self.spool is None:
            return None
        try:
            if self.spool.sent() >= self.spool.records():
                self.spool.finish()
                return None
            _say(f"cifarx: run {self.run_id} ended without its tracking server: everything "
                     f"it logged is in {self.spool.folder}; `cifarx sync` uploads it into the "
                     f"same run when {self.uri} answers")
            return self.spool.folder
        finally:
            self.spool.unlock()

    def _watch(self):
        while not self._stop.wait(RECHECK_S):
            if server.silence(self.uri) is None:
                self._back.set()
                return

    def _reconnect(self) -> bool:
        """Upload the spool; True when all of it went (the run is live again)."""
        try:
            count = upload(self.spool, self.apply)
        except Exception as exc:
            if not is_outage(exc):
                raise
            self.divert(exc, [])  # lost again: the watcher looks on
            return False
        self.lost = False
        self._stop.set()
        _say(f"cifarx: the tracking server {self.uri} answers again: {count} spooled "
                 f"record(s) of run {self.run_id} uploaded; logging there again")
        return True


def upload(spool: Spool, apply: Callable[[str, dict[str, Any]], Any]) -> int:
    """Send the spool's records not sent yet, in order, counting each as it is stored; how
    many were sent."""
    count = 0
    for sent, record in spool.unsent():
        apply(*record)
        spool.mark_sent(sent)
        count += 1
    spool.mark_sent(spool.records())  # and a last line that a crash cut short, if any
    return count


def _reason(exc: BaseException) -> str:
    """What a failed call says, short (MLflow's message holds the whole urllib3 story)."""
    text = str(exc)
    for needle, said in [("Connection refused", "connection refused"),
                         ("timed out", f"no answer within {request_timeout():g} s"),
                         ("error responses", "it answers with server errors"),
                         ("Connection reset", "connection reset"),
                         ("Name or service not known", "unknown host")]:
        if needle in text:
            return said
    return text.splitlines()[0][:120] if text else type(exc).__name__


def _say(line: str):
    from ..cli.console import err

    err.print(line, highlight=False, soft_wrap=True)


def _write_json(path: Path, obj: Any):
    """Write ``obj`` so that a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
