"""``cifarx report``: a sweep, runs or an experiment as one HTML page and Markdown."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UserError
from .common import TrackingUri, command


def baseline_of(texts: list[str]) -> dict[str, str]:
    """``--baseline aug=normalize`` (repeatable) as {param: value}."""
    found = {}
    for text in texts:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--baseline {text}: accepted: PARAM=VALUE, e.g. aug=normalize")
        found[key.strip()] = value.strip()
    return found


@command
def report(
    sweep: Annotated[Optional[str], typer.Option(
        help="The run id of a sweep (`cifarx sweep` prints it).", show_default=False)] = None,
    runs: Annotated[Optional[str], typer.Option(
        help="Run ids, comma-separated: training runs to compare.", show_default=False)] = None,
    experiment: Annotated[Optional[str], typer.Option(
        help="Every training run of this MLflow experiment.", show_default=False)] = None,
    baseline: Annotated[Optional[list[str]], typer.Option(
        help="The control: PARAM=VALUE naming one configuration (repeatable), e.g. "
             "aug=normalize. Default: the study's baseline, else the best configuration.",
        show_default=False)] = None,
    metric: Annotated[Optional[str], typer.Option(
        help="The metric the verdict is about (default: the study's, else final/test_acc).",
        show_default=False)] = None,
    correction: Annotated[str, typer.Option(
        help="Multiple-comparison correction: holm, bonferroni or none.")] = "holm",
    alpha: Annotated[float, typer.Option(help="Significance level of the tests.")] = 0.05,
    out: Annotated[Optional[Path], typer.Option(
        help="Folder for report.html, report.md and figures/ (default: ./reports/<name>/).",
        show_default=False)] = None,
    title: Annotated[Optional[str], typer.Option(help="The report's title.",
                                                 show_default=False)] = None,
    tracking_uri: TrackingUri = None,
):
    """Turn finished runs into a report: the protocol, each metric over seeds with intervals,
    every configuration tested against a baseline, curves and the runs' figures."""
    from ..reports import report as rep
    from ..tracking.common import quiet_mlflow, tracking_uri as resolve_uri
    from ..tracking.server import require_server
    from .console import out as console

    if not 0 < alpha < 1:
        raise UserError(f"--alpha must be in (0, 1), got {alpha}")
    ids = [r.strip() for r in runs.split(",") if r.strip()] if runs is not None else None
    if ids is not None and len(ids) < 2:
        raise UserError("--runs takes at least two run ids, comma-separated")
    uri = resolve_uri(tracking_uri)
    require_server(uri)
    quiet_mlflow()
    source, records, study = rep.collect(uri, sweep, ids, experiment)
    import mlflow

    client = mlflow.MlflowClient(uri)

    def figure_bytes(run_id: str, path: str) -> bytes:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                                    tracking_uri=uri)
        return Path(local).read_bytes()

    built = rep.build(source, records, study, metric, baseline_of(baseline or []) or None,
                      correction, alpha, figure_bytes=figure_bytes, title=title)
    name = sweep or experiment or "runs-" + "-".join(i[:8] for i in ids or [])
    folder = out or Path("reports") / name
    html, md = rep.render(built, folder)
    experiment_of = client.get_run(records[0].run_id).info.experiment_id
    run_id = rep.log(uri, built, folder, sweep, experiment_of)
    console.print(f"report: {html}  {md}  (logged to run {run_id}, artifacts report/)",
                  highlight=False, soft_wrap=True)


@command
def reproduce(
    what: Annotated[str, typer.Argument(
        metavar="assignment", help="What to reproduce: assignment (CIS680's parts 1-3).")],
    quick: Annotated[bool, typer.Option(
        "--quick", help="The reduced protocol: 2 seeds of 300 iterations (about 12 minutes "
        "on 2 CPU cores) instead of 5 seeds of 2,000.")] = False,
    seeds: Annotated[Optional[int], typer.Option(
        help="Seeds per configuration (overrides the protocol's).", show_default=False)] = None,
    iters: Annotated[Optional[int], typer.Option(
        help="Training iterations (overrides the protocol's).", show_default=False)] = None,
    workers: Annotated[Optional[int], typer.Option(
        help="Trials at once (default 2, one CPU thread each).", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print every step and exit, opening no run.")] = False,
    data_dir: Annotated[Optional[Path], typer.Option(
        help="Where CIFAR-10 is (default: $CIFARX_DATA_DIR, else ~/.cache/cifarx).",
        show_default=False)] = None,
    experiment: Annotated[Optional[str], typer.Option(
        help="MLflow experiment (default: assignment, or assignment-quick).",
        show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option(
        help="Folder for assignment.html, assignment.md and figures/ (default: "
             "./reports/<experiment>/).", show_default=False)] = None,
    tracking_uri: TrackingUri = None,
):
    """Train, attack and report the whole assignment: part 1's four pipelines, part 2's three
    nets with G, part 3's adversarial images and their transfer, with seeds, into one report
    that answers each question. Run it again to finish an interrupted reproduction."""
    import dataclasses
    import time

    from ..reports import assignment as assignment_report, reproduce as rep
    from ..tracking.common import quiet_mlflow, tracking_uri as resolve_uri
    from ..tracking.server import require_server
    from .console import err, out as console

    if what != "assignment":
        raise UserError(f"cifarx reproduce {what}: accepted: assignment")
    protocol = rep.QUICK if quick else rep.FULL
    for flag, value in (("--seeds", seeds), ("--iters", iters), ("--workers", workers)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    changes = {k: v for k, v in (("seeds", seeds), ("iters", iters), ("workers", workers))
               if v is not None}
    if changes:
        protocol = dataclasses.replace(protocol, name=protocol.name + " (changed)", **changes,
                                       eval_every=min(protocol.eval_every,
                                                      changes.get("iters", protocol.iters)))
    experiment = experiment or ("assignment-quick" if quick else "assignment")
    uri = resolve_uri(tracking_uri)
    require_server(uri)
    quiet_mlflow()
    the_plan = rep.plan(protocol, experiment, uri, str(data_dir) if data_dir else None)
    if dry_run:
        lines = the_plan.describe()
        for line in lines:
            console.print(line, highlight=False)
        console.print(f"{len(lines)} steps (protocol {protocol.name}) into experiment "
                      f"{experiment}; no run opened", highlight=False)
        return
    start = time.time()
    done = rep.run(the_plan, lambda line: err.print(line, highlight=False, soft_wrap=True))
    intro, sections = assignment_report.build(uri, done, protocol, time.time() - start)
    folder = out or Path("reports") / experiment
    html, md = assignment_report.render("CIS680 assignment 2, reproduced by cifarx", intro,
                                        sections, folder)
    import mlflow

    client = mlflow.MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    run = client.create_run(experiment_id, run_name="assignment report",
                            tags={"cifarx.report": "true",
                                  "mlflow.note.content": intro})
    client.log_artifacts(run.info.run_id, str(folder), "report")
    client.set_terminated(run.info.run_id, "FINISHED")
    if done.reused:
        console.print(f"done earlier, not run again: {', '.join(done.reused)}", highlight=False)
    console.print(f"report: {html}  {md}  (run {run.info.run_id})", highlight=False,
                  soft_wrap=True)
