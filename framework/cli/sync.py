"""``cifarx sync``: upload the runs spooled while their server was away."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..errors import UserError
from .common import command


@command
def sync(
    spooled_run: Annotated[Optional[str], typer.Argument(
        metavar="[RUN_ID|FOLDER]", help="A spooled run: its run id, or its spool folder "
        "(default: every run spooled and not uploaded yet).", show_default=False)] = None,
):
    """Upload the runs that went on into a local spool when their tracking server was lost
    (each into the same run on the server it names; $CIFARX_SPOOL_DIR holds the spools)."""
    from ..tracking.spool import spool_root
    from ..tracking.sync import find, spooled, sync as upload
    from .console import out, ui_hint

    spools = [find(spooled_run)] if spooled_run else spooled()
    if not spools:
        out.print(f"nothing to sync: no spooled run waits in {spool_root()}", highlight=False,
                  soft_wrap=True)
        return

    def heard(done):
        what = f"run {done.run_id} ({done.run_name})"
        if done.problem:
            out.print(f"{what}: [red]not synced[/]: {done.problem}", highlight=False,
                      soft_wrap=True)
        elif done.earlier:
            out.print(f"{what}: synced earlier ({done.earlier}); nothing to send",
                      highlight=False, soft_wrap=True)
        else:
            out.print(f"{what}: {done.records} record(s) uploaded to {done.uri}; "
                      f"{ui_hint(done.uri, done.experiment_id, done.run_id)}", highlight=False,
                      soft_wrap=True)

    left = [done for done in upload(spools, heard) if done.problem]
    if left:
        raise UserError(f"{len(left)} of {len(spools)} spooled run(s) not synced (said above); "
                        "their spools are kept: run `cifarx sync` again")
