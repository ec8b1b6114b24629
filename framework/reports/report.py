"""``cifarx report``: a sweep, a list of runs or an experiment turned into one HTML page and the
same content as Markdown, both written to a folder and logged to MLflow.

:func:`collect` reads the runs (the only part that talks to MLflow besides :func:`log`),
:func:`build` computes everything (:mod:`cifarx.reports.data`, :mod:`cifarx.studies.compare`), and
:func:`render` fills the Jinja2 templates in ``templates/``: HTML with the figures embedded as
data URIs (it opens offline, on a phone and in print), Markdown with the figures beside it.
"""

from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .. import __version__
from ..errors import UserError
from ..studies.compare import CORRECTIONS
from .data import (CURVES, ENVIRONMENT, SWEEP_TAG, Group, MetricTable, RunRecord, direction_of,
                   find_baseline, group_runs, metrics_of, table)

TEMPLATES = Path(__file__).parent / "templates"
FIGURES_PER_RUN = 12  # logged figures shown per configuration (of its first seed)


@dataclass
class Figure:
    name: str  # file name in the Markdown's figures/ folder
    caption: str
    png: bytes

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode()


@dataclass
class Report:
    title: str
    source: str  # what was reported on, in words
    metric: str
    direction: str
    alpha: float
    confidence: float
    correction: str
    baseline: str | None  # the baseline's label, None: against the best
    protocol: list[tuple[str, str]]  # (param, value) shared by every configuration
    environment: list[tuple[str, str]]  # seeds, device, threads, versions, machine
    groups: list[Group]
    tables: list[MetricTable]
    figures: list[Figure]  # the report's own: curves, differences
    logged: list[tuple[Group, list[Figure]]] = field(default_factory=list)  # runs' own figures
    notes: list[str] = field(default_factory=list)


# -- reading runs -------------------------------------------------------------------------------

def _record(client, run, curves=CURVES) -> RunRecord:
    record = RunRecord(run.info.run_id, run.info.run_name or run.info.run_id[:8],
                       run.info.status, dict(run.data.params), dict(run.data.metrics),
                       dict(run.data.tags))
    if run.info.status == "FINISHED":
        for metric in curves:
            if metric in record.metrics:
                history = client.get_metric_history(run.info.run_id, metric)
                record.curves[metric] = sorted((m.step, m.value) for m in history)
        record.figures = sorted(a.path for a in client.list_artifacts(run.info.run_id,
                                                                      "figures")
                                if a.path.endswith(".png"))
    return record


def collect(uri: str, sweep: str | None = None, runs: list[str] | None = None,
            experiment: str | None = None,
            curves=CURVES) -> tuple[str, list[RunRecord], dict[str, Any]]:
    """The runs to report on: (description, records, the sweep's study or {}), with the
    history of each metric of ``curves``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(uri)
    if sum(x is not None for x in (sweep, runs, experiment)) != 1:
        raise UserError("give exactly one of --sweep RUN_ID, --runs ID,ID,... or "
                        "--experiment NAME")

    def get(run_id: str):
        try:
            return client.get_run(run_id)
        except MlflowException:
            raise UserError(f"no run {run_id!r} in {uri}; accepted: a run id that cifarx "
                            "printed (cifarx ui lists them)") from None

    if sweep is not None:
        parent = get(sweep)
        if parent.data.tags.get(SWEEP_TAG) != "true":
            raise UserError(f"run {sweep} is not a sweep (it has no tag {SWEEP_TAG}); accepted: "
                            "the run id that `cifarx sweep` printed, or use --runs")
        found = client.search_runs([parent.info.experiment_id], max_results=10000,
                                   filter_string=f"tags.`mlflow.parentRunId` = '{sweep}'",
                                   order_by=["attributes.start_time ASC"])
        study = {}
        try:
            study = json.loads(Path(mlflow.artifacts.download_artifacts(
                run_id=sweep, artifact_path="study.json", tracking_uri=uri)).read_text())
        except (MlflowException, OSError):
            pass
        records = _latest([_record(client, r, curves) for r in found])
        name = parent.info.run_name or sweep[:8]
        return f"sweep '{name}' ({sweep[:8]})", records, study
    if runs is not None:
        records = [_record(client, get(run_id), curves) for run_id in runs]
        return f"runs {', '.join(r[:8] for r in runs)}", records, {}
    found_experiment = client.get_experiment_by_name(experiment)
    if found_experiment is None:
        raise UserError(f"no experiment {experiment!r} in {uri}")
    found = client.search_runs([found_experiment.experiment_id], max_results=10000,
                               order_by=["attributes.start_time ASC"])
    # training runs only: not sweeps, reports, attacks or analyses of them
    trained = [r for r in found if r.data.tags.get(SWEEP_TAG) != "true"
               and "cifarx.report" not in r.data.tags and "iters" in r.data.params]
    if not any(r.info.status == "FINISHED" for r in trained):
        raise UserError(f"experiment {experiment!r} has no finished training run to report on")
    return f"experiment {experiment}", _latest([_record(client, r, curves) for r in trained]), {}


def _latest(records: list[RunRecord]) -> list[RunRecord]:
    """A trial run again (a resumed sweep) keeps its latest finished run per trial key."""
    by_trial: dict[str, RunRecord] = {}
    out = []
    for record in records:
        key = record.tags.get("cifarx.trial")
        if key is None:
            out.append(record)
        elif key not in by_trial or record.status == "FINISHED":
            by_trial[key] = record
    return out + list(by_trial.values())


# -- computing ----------------------------------------------------------------------------------

def build(source: str, records: list[RunRecord], study: Mapping[str, Any] | None = None,
          metric: str | None = None, baseline: Mapping[str, Any] | None = None,
          correction: str = "holm", alpha: float = 0.05, confidence: float = 0.95,
          figure_bytes=None, title: str | None = None) -> Report:
    """Everything the report shows. ``figure_bytes(run_id, path)`` fetches a logged figure
    (None: none shown). ``baseline`` (param -> value) names the control; else the study's
    ``baseline``; else each configuration is compared with the best."""
    study = dict(study or {})
    if correction not in CORRECTIONS:
        raise UserError(f"--correction {correction!r} is not accepted; accepted: "
                        f"{', '.join(CORRECTIONS)}")
    if not any(r.status == "FINISHED" for r in records):
        raise UserError(f"{source} has no finished run to report on")
    metric = metric or study.get("metric") or "final/test_acc"
    direction = direction_of(metric, None if metric != study.get("metric")
                             else study.get("direction"))
    groups = group_runs(records)
    baseline = baseline if baseline is not None else study.get("baseline")
    control = find_baseline([g for g in groups if g.runs], baseline) if baseline else None
    names = metrics_of([g for g in groups if g.runs], metric)
    tables = [table([g for g in groups if g.runs], m,
                    direction if m == metric else direction_of(m), control, alpha, correction,
                    confidence) for m in names]
    finished = [r for g in groups for r in g.runs]
    shared = _shared(finished)
    protocol = [(k, v) for k, v in shared.items() if k not in ENVIRONMENT]
    report = Report(title or f"cifarx report: {source}", source, metric, direction, alpha,
                    confidence,
                    correction, control.label if control else None, protocol,
                    _environment(finished), groups, tables, [])
    from .. import figures

    report.figures = [f for f in (_curves(groups, m, figures) for m in CURVES) if f]
    report.figures.append(_differences(tables[0], report, figures))
    if figure_bytes is not None:
        for g in groups:
            if g.runs:
                first = g.runs[0]
                shown = [Figure(_file_name(g, p), f"{Path(p).stem.replace('_', ' ')} "
                                f"(seed {first.seed}, run {first.run_id[:8]})",
                                figure_bytes(first.run_id, p))
                         for p in first.figures[:FIGURES_PER_RUN]]
                if shown:
                    report.logged.append((g, shown))
    missing = [(g, r) for g in groups for r in g.failed]
    if missing:
        report.notes.append(f"{len(missing)} run(s) did not finish and are left out of the "
                            "statistics (listed under Failed runs).")
    return report


def _shared(records: list[RunRecord]) -> dict[str, str]:
    first = records[0].params
    return {k: v for k, v in sorted(first.items())
            if all(r.params.get(k) == v for r in records)}


def _environment(records: list[RunRecord]) -> list[tuple[str, str]]:
    seeds = sorted({r.seed for r in records})
    out = [("seeds", ", ".join(map(str, seeds))), ("runs", str(len(records)))]
    for name, key in (("device", "cifarx.device"), ("threads", "cifarx.threads"),
                      ("host", "cifarx.host"), ("cifarx", "cifarx.version"),
                      ("torch", "cifarx.torch")):
        values = sorted({r.tags[key] for r in records if key in r.tags})
        if values:
            out.append((name, ", ".join(values)))
    plugins = sorted({f"{k.split('.', 2)[2]}: {v}" for r in records for k, v in r.tags.items()
                      if k.startswith("cifarx.plugin.")})
    if plugins:
        out.append(("plugins", "; ".join(plugins)))
    out.append(("data", ", ".join(sorted({r.params.get("data_dir", "?") for r in records}))))
    return out


def _file_name(group: Group, path: str) -> str:
    safe = "".join(c if c.isalnum() else "-" for c in group.label)[:60].strip("-") or "runs"
    return f"{safe}--{Path(path).name}"


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


def _curves(groups: list[Group], metric: str, figures, log: bool = False,
            name: str | None = None) -> Figure | None:
    """The mean curve of ``metric`` per configuration with a band of +-1 std over seeds
    (``log``: a log scale, the band in log space)."""
    import numpy as np

    series = []
    for g in groups:
        curves = [r.curves[metric] for r in g.runs if r.curves.get(metric)]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
        if not steps:
            continue
        stacked = np.array([[dict(c)[s] for s in steps] for c in curves])
        if log:
            stacked = np.log10(np.maximum(stacked, 1e-30))
        series.append((g.label, steps, stacked.mean(0), stacked.std(0, ddof=0), len(curves)))
    if not series:
        return None
    # many configurations: a legend below the plot (inside, it hid the curves) and 20 colours
    many = len(series) > 6
    rows = (len(series) + 1) // 2
    fig, ax = figures.plt.subplots(figsize=(8, 4.2 + 0.16 * rows if many else 4.2))
    colours = figures.plt.get_cmap("tab20" if len(series) > 10 else "tab10")
    for i, (label, steps, mean, std, n) in enumerate(series):
        line, = ax.plot(steps, mean, lw=1.5, label=f"{label} (n={n})",
                        color=colours(i % colours.N), ls="-" if i < colours.N else "--")
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"log10 {metric}" if log else metric)
    ax.grid(alpha=0.3)
    if many:
        ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    else:
        ax.legend(fontsize=7)
    ax.set_title(f"{metric}: mean over seeds, band +-1 std")
    fig.tight_layout()
    name = name or "curve-" + metric.replace("/", "_")
    return Figure(f"{name}.png", f"{metric} over training: the mean of each "
                  "configuration's seeds, with a band of one standard deviation"
                  + (" (log10)" if log else ""), _png(fig))


def _differences(t: MetricTable, report: Report, figures) -> Figure:
    """Each configuration's mean and interval, and its difference from the control."""
    rows = [r for r in t.rows if r.n]
    fig, ax = figures.plt.subplots(figsize=(8, 0.5 * len(rows) + 1.4))
    for y, row in enumerate(reversed(rows)):
        low = row.t_low if math.isfinite(row.t_low) else row.mean
        high = row.t_high if math.isfinite(row.t_high) else row.mean
        control = row.comparison is None
        ax.errorbar(row.mean, y, xerr=[[row.mean - low], [high - row.mean]], fmt="o",
                    color="black" if control else "tab:blue", capsize=3)
        for value in row.values.values():
            ax.plot(value, y, "|", color="gray", ms=10)
    ax.set_yticks(range(len(rows)), [r.group.label + (" (control)" if r.comparison is None
                                                      else "") for r in reversed(rows)],
                  fontsize=7)
    ax.set_xlabel(f"{t.metric}: mean and {report.confidence:.0%} Student-t interval; "
                  "ticks: seeds")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return Figure("means.png", f"{t.metric} per configuration: the mean, its "
                  f"{report.confidence:.0%} interval and each seed", _png(fig))


# -- writing ------------------------------------------------------------------------------------

def _number(value: Any, metric: str = "", digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _p(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    return "< 0.0001" if value < 1e-4 else f"{value:.4f}"


def _verdict(row, t: MetricTable, alpha: float) -> str:
    c = row.comparison
    if c is None:
        return "baseline" if t.control_is_baseline else "best (control)"
    if not c.test:
        return "not tested (fewer than 2 seeds)"
    better = (c.difference > 0) == (t.direction == "maximize")
    if c.significant:
        return ("better" if better else "worse") + f" (p_adj {_p(c.p_adjusted)})"
    return (f"indistinguishable (p_adj {_p(c.p_adjusted)}; could miss "
            f"|diff| < {_number(c.detectable)})")


def render(report: Report, out: Path, generated: str = "") -> tuple[Path, Path]:
    """report.html (figures embedded) and report.md (figures in figures/) under ``out``."""
    import jinja2

    out.mkdir(parents=True, exist_ok=True)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                             autoescape=jinja2.select_autoescape(["html.j2"]),
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(number=_number, p=_p)
    env.globals.update(verdict=lambda row, t: _verdict(row, t, report.alpha))
    context = dict(r=report, generated=generated, version=__version__)
    html = out / "report.html"
    html.write_text(env.get_template("report.html.j2").render(**context))
    (out / "figures").mkdir(exist_ok=True)
    for fig in report.figures + [f for _, figs in report.logged for f in figs]:
        (out / "figures" / fig.name).write_bytes(fig.png)
    md = out / "report.md"
    md.write_text(env.get_template("report.md.j2").render(**context))
    return html, md


def log(uri: str, report: Report, out: Path, sweep: str | None, experiment_of: str) -> str:
    """Log the report's files: into the sweep's run, else into a new ``report`` run in the
    experiment of the runs reported on. Returns the run id."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    if sweep:
        run_id = sweep
    else:
        run = client.create_run(experiment_of, run_name="report",
                                tags={"cifarx.report": "true", "cifarx.version": __version__,
                                      "mlflow.note.content": f"cifarx report of {report.source}"})
        run_id = run.info.run_id
    client.log_artifacts(run_id, str(out), "report")
    if not sweep:
        client.set_terminated(run_id, "FINISHED")
    return run_id
