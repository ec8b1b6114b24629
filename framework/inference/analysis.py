"""Running analyses: the images they look at, chosen per class by seed, then each analysis run
on the model, timed, and what it found logged into a run.

``cifarx analyze`` and ``cifarx evaluate`` (:func:`cifarx.runs.analyze.analyze_run`) and ``cifarx
train --analyze`` (:func:`cifarx.runs.train.train_run`) share this module: :func:`plan` checks the
names and options, :func:`inputs` chooses the images, :func:`check` lets each analysis refuse the
model (all before a run opens), and :func:`run` runs them into an open run.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..plugin_api import options as opts
from ..plugin_api.options import OptionError
from ..plugin_api.types import Analysis, AnalysisData, Findings, ImageData
from ..tracking.run import Run
from .predict import predict

FLAG = "--analysis-opt"
DEFAULT_IMAGES = 100  # 10 per class: enough for an embedding, cheap for integrated gradients


@dataclass(frozen=True)
class AnalysisPlan:
    """The analyses of a command, by name, with their options checked and defaults filled."""

    analyses: tuple[Analysis, ...]
    options: Mapping[str, Mapping[str, Any]]  # by analysis
    images: int = DEFAULT_IMAGES
    seed: int = 0

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.analyses]

    def plugins(self) -> list[tuple[str, str]]:
        return [("analysis", name) for name in self.names]

    def params(self) -> dict[str, Any]:
        """``analyses`` and every option set as ``analysis.<name>.<option>``; the unset ones
        are logged once the analysis ran, as it resolved them (:func:`log`)."""
        found = {"analyses": ",".join(self.names)}
        for name, values in self.options.items():
            found.update({k: v for k, v in opts.params(f"analysis.{name}", values).items()
                          if v != opts.UNSET})
        return found


def plan(catalog, names, texts=(), images: int = DEFAULT_IMAGES, seed: int = 0,
         adversarial: bool = False, flag: str = "--analysis") -> AnalysisPlan:
    """Look up the analyses and check their options and ``--images``; no model needed.
    ``adversarial``: ``--adversarial`` was given, so every analysis must look at it."""
    names = list(dict.fromkeys(names))
    if not names:
        raise UserError(f"{flag}: name at least one analysis; available: "
                        f"{', '.join(catalog.names('analysis')) or 'none installed'}")
    if images < 1:
        raise UserError(f"--images must be at least 1, got {images}")
    analyses = tuple(catalog.get("analysis", name) for name in names)
    if adversarial:
        refused = [a.name for a in analyses if not a.adversarial]
        if refused:
            accepted = [n for n in catalog.names("analysis")
                        if catalog.get("analysis", n).adversarial]
            raise UserError(f"--adversarial: {', '.join(refused)} "
                            f"{'does' if len(refused) == 1 else 'do'} not look at adversarial "
                            f"images; accepted with --adversarial: {', '.join(accepted)}")
    given = opts.parse_assignments(FLAG, list(texts), [a.name for a in analyses])
    values = {a.name: opts.resolve(a.name, a.options, given[a.name],
                                   lambda option, a=a: opts.flag_label(FLAG, a.name, option))
              for a in analyses}
    return AnalysisPlan(analyses, values, images, seed)


def choose(labels: Tensor, n: int, seed: int) -> Tensor:
    """``n`` indices into ``labels``, as many of each class as there can be, grouped by class.

    The images of each class are taken in a random order fixed by ``seed``, the classes in
    turn (the first of each, then the second, ...): 100 images of 10 classes are 10 of each,
    25 are 3 of the first five classes and 2 of the others.
    """
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    drawn = labels[order]
    rank = torch.empty_like(order)  # each image's place among its class, in the drawn order
    for c in drawn.unique():
        mask = drawn == c
        rank[mask] = torch.arange(int(mask.sum()))
    turn = rank * (int(labels.max()) + 1) + drawn  # by rank first, then by class
    chosen = order[turn.argsort(stable=True)[:n]]
    return chosen[torch.sort(labels[chosen], stable=True).indices]


def prepared(model: nn.Module, device: torch.device) -> nn.Module:
    """A copy of the model as every analysis receives it: eval mode, float32, the usual memory
    layout, on ``device``, parameters needing no gradient (input gradients only)."""
    model = copy.deepcopy(model).to(device, torch.float32, memory_format=torch.contiguous_format)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def predictor(model: nn.Module, device: torch.device, precision: str = "fp32"
              ) -> Callable[[Tensor], Tensor]:
    """The test split's logits, on the CPU: float32 on the saved model as it is, or with
    ``precision`` bf16 as training evaluates (autocast, BatchNorm folded)."""
    fold = precision != "fp32"
    return lambda images: predict(model, images, device, precision, fold=fold).cpu()


def inputs(plan: AnalysisPlan, data: ImageData, device: torch.device,
           adv_set: Mapping[str, Any] | None = None) -> AnalysisData:
    """The images the analyses look at: ``plan.images`` test images chosen per class by
    ``plan.seed``; with ``adv_set`` (``--adversarial``), up to that many of the set's
    originals, chosen the same way, and their adversarial versions."""
    if adv_set is None:
        if plan.images > len(data.test_labels):
            raise UserError(f"--images {plan.images}: the test split has "
                            f"{len(data.test_labels):,} images; accepted: 1 to "
                            f"{len(data.test_labels)}")
        indices = choose(data.test_labels, plan.images, plan.seed)
        images, labels = data.test_images[indices].float().div(255), data.test_labels[indices]
        adversarial = None
    else:
        rows = choose(adv_set["labels"], min(plan.images, len(adv_set["labels"])), plan.seed)
        indices, images, labels = (adv_set[key][rows] for key in ("indices", "images", "labels"))
        adversarial = adv_set["adv_images"][rows].float().to(device)
    return AnalysisData(images=images.to(device), labels=labels.long().to(device),
                        indices=indices.long().cpu(), classes=tuple(data.classes),
                        test_images=data.test_images, test_labels=data.test_labels,
                        seed=plan.seed, adversarial=adversarial)


def _call(analysis: Analysis, fn: Callable, values: Mapping[str, Any], *args):
    """Call an analysis's function; its OptionError names the flag the user typed."""
    try:
        return fn(*args, **values)
    except OptionError as exc:
        raise opts.reword(exc, lambda name: opts.flag_label(FLAG, analysis.name, name),
                          values) from None


def check(plan: AnalysisPlan, model: nn.Module, data: AnalysisData):
    """Each analysis's own check of its options against this model, before a run opens."""
    model = prepared(model, data.images.device)
    data = replace(data, predict=predictor(model, data.images.device))
    for analysis in plan.analyses:
        if analysis.check is not None:
            _call(analysis, analysis.check, plan.options[analysis.name], model, data)


def run(plan: AnalysisPlan, model: nn.Module, data: AnalysisData, run: Run,
        precision: str = "fp32", step: int = 0,
        on_done: Callable[[str, Findings, float], None] | None = None) -> dict[str, Findings]:
    """Run every analysis on ``model`` and log what each found into ``run`` (metrics at
    ``step``), with its time as ``analysis/<name>/seconds``. Each starts from the seed, so
    its result does not depend on the others. ``on_done(name, findings, seconds)`` hears
    each as it ends."""
    device = data.images.device
    model = prepared(model, device)
    data = replace(data, predict=predictor(model, device, precision))  # this model's logits
    found = {}
    for analysis in plan.analyses:
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(plan.seed)
            start = time.perf_counter()
            findings = _call(analysis, analysis.analyze, plan.options[analysis.name], model,
                             data)
            sync()
            seconds = time.perf_counter() - start
        if not isinstance(findings, Findings):
            raise TypeError(f"analysis {analysis.name} returned {type(findings).__name__}, "
                            "not Findings")
        unset = {k: v for k, v in plan.options[analysis.name].items() if v is None or v == ""}
        log(run, analysis.name, findings, seconds, step, unset)
        found[analysis.name] = findings
        if on_done is not None:
            on_done(analysis.name, findings, seconds)
    return found


def log(run: Run, name: str, findings: Findings, seconds: float, step: int = 0,
        unset: Mapping[str, Any] | None = None):
    """Metrics, ``figures/<name>.png`` and the files of one analysis; its ``unset`` options as
    params, with the values the analysis resolved them to (``findings.resolved``)."""
    import matplotlib.pyplot as plt

    if unset:
        run.log_params(opts.params(f"analysis.{name}", {
            k: findings.resolved.get(k, v) for k, v in unset.items()}))

    now = int(time.time() * 1000)
    run.log_points([(key, float(value), step, now) for key, value in findings.metrics.items()]
                   + [(f"analysis/{name}/seconds", seconds, step, now)])
    if findings.figure is not None:
        run.log_figure(findings.figure, f"figures/{name}.png")
    for path, content in findings.files.items():
        if path.endswith(".pt"):
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(tmp) / Path(path).name
                torch.save(content, local)
                run.log_artifact(local, str(Path(path).parent) if "/" in path else None)
        elif path.endswith(".json"):
            run.log_dict(content, path)
        elif isinstance(content, plt.Figure):
            run.log_figure(content, path)
        else:
            run.log_text(str(content), path)
