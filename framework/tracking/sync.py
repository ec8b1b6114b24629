"""``cifarx sync``: upload the spool of each run that ended with its server away, into
that same run, in order, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UserError
from . import server
from .server import is_outage, is_server
from .spool import MANIFEST, SPOOL_ENV, Spool, spool_root, upload


# --- cifarx sync ----------------------------------------------------------------------------


@dataclass
class Synced:
    run_id: str
    run_name: str | None
    experiment_id: str | None
    uri: str
    records: int  # uploaded now
    earlier: str | None = None  # when it was synced before (nothing to do now)
    problem: str | None = None  # why it was not synced (the server does not answer, ...)


def spooled() -> list[Spool]:
    """The spools under the spool root that hold records not uploaded yet, oldest first."""
    root = spool_root()
    found = [Spool(p.parent) for p in root.glob(f"*/{MANIFEST}")] if root.is_dir() else []
    return sorted((s for s in found if not s.synced), key=lambda s: s.manifest["created"])


def find(target: str) -> Spool:
    """A spool by its run id or its folder."""
    for folder in (Path(target).expanduser(), spool_root() / target):
        if (folder / MANIFEST).is_file():
            return Spool(folder.absolute())
    raise UserError(f"no spooled run {target!r}: accepted: the id of a run spooled in "
                    f"{spool_root()} (${SPOOL_ENV}), or a spool folder")


def sync(spools: list[Spool], on_run: Callable[[Synced], None] | None = None) -> list[Synced]:
    """Upload each spool into its run on the tracking server it records; one result each.

    A spool being written by a running command, or whose server does not answer, is left as
    it is (``problem``) and can be synced later; a synced spool says so and sends nothing.
    """
    results = []
    for spool in spools:
        result = _sync_one(spool)
        results.append(result)
        if on_run is not None:
            on_run(result)
    return results


def _sync_one(spool: Spool) -> Synced:
    manifest = spool.manifest
    done = Synced(spool.run_id, manifest.get("run_name"), manifest.get("experiment_id"),
                  spool.uri, 0, earlier=spool.synced)
    if spool.synced:
        return done
    if not spool.lock(wait=False):
        done.problem = "a running cifarx is still writing it; sync it when that command ends"
        return done
    try:
        reason = server.silence(spool.uri) if is_server(spool.uri) else None
        if reason is not None:
            done.problem = f"the tracking server {spool.uri} does not answer ({reason})"
            return done
        import mlflow

        from .common import quiet_mlflow
        from .run import Run

        quiet_mlflow()
        mlflow.set_tracking_uri(spool.uri)
        try:
            mlflow.set_experiment(experiment_id=done.experiment_id)  # where a model goes
            done.records = upload(spool, Run(spool.run_id, done.experiment_id)._apply)
        except Exception as exc:
            if not (is_outage(exc) or isinstance(exc, mlflow.exceptions.MlflowException)):
                raise
            message = getattr(exc, "message", None) or str(exc)
            done.problem = (f"stopped after {spool.sent()} of {spool.records()} records: "
                            f"{message.splitlines()[0][:200]}")
            return done
        spool.finish()
        return done
    finally:
        spool.unlock()
