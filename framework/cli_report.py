"""``cifarx report``: a sweep, runs or an experiment as one HTML page and Markdown."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .cli import TrackingUri, command
from .errors import UserError


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
    from . import report as rep
    from .console import out as console
    from .spool import require_server
    from .tracking import quiet_mlflow, tracking_uri as resolve_uri

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
