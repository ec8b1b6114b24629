"""The report of ``cifarx reproduce assignment``: each question of the assignment in its order,
answered with the figure it asks for and the numbers measured over seeds.

Each answer's sentences are chosen by what was measured (a difference that the seeds cannot
tell from zero is said to be one), never written in advance.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..studies import compare as cmp
from .data import Group, group_runs
from .report import Figure, _curves, _png, collect
from .reproduce import PART1, PART2, Done, Protocol

CURVES = ("train/acc", "test/acc", "grad_max/first_conv", "grad_max/last_conv")
ACC = "final/test_acc"


@dataclass
class Table:
    caption: str
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Section:
    number: str
    title: str
    asked: str  # what the assignment asks, in short
    answer: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)


def pct(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x * 100:.2f}%"


def pts(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x * 100:+.2f} points"


def p_is(p: float) -> str:
    return "p < 0.0001" if p < 1e-4 else f"p = {p:.4f}"


def _values(group: Group, metric: str = ACC) -> dict[int, float]:
    return {r.seed: r.metrics[metric] for r in group.runs if metric in r.metrics}


def _summary(values: dict[int, float]) -> tuple[float, float, float, float]:
    """mean, std, and the 95% Student-t interval."""
    from ..studies.stats import _describe

    d = _describe(list(values.values()), 0.95)
    return d["mean"], d["std"], d["ci_low"], d["ci_high"]


def _by(groups: list[Group], param: str, wanted: dict[str, str]) -> dict[str, Group]:
    from ..studies.compare import same_value

    out = {}
    for key, value in wanted.items():
        for g in groups:
            runs = g.runs or g.failed
            if runs and same_value(value, runs[0].params.get(param, "")):
                out[key] = g
    return out


def _late(record, metric: str, share: float = 0.1) -> float:
    """The mean of a curve over its last ``share`` of steps (train accuracy at the end)."""
    points = record.curves.get(metric) or []
    if not points:
        return math.nan
    tail = points[-max(1, int(len(points) * share)):]
    return sum(v for _, v in tail) / len(tail)


def _median_curve(record, metric: str) -> float:
    values = sorted(v for _, v in record.curves.get(metric) or [])
    return values[len(values) // 2] if values else math.nan


def _mean(xs) -> float:
    xs = [x for x in xs if math.isfinite(x)]
    return sum(xs) / len(xs) if xs else math.nan


def part1(groups: list[Group], figures) -> list[Section]:
    found = _by(groups, "aug", PART1)
    order = list(PART1)
    steps = [(order[i], order[i - 1]) for i in range(1, len(order))]
    tests = [cmp.compare({"now": _values(found[q]), "before": _values(found[p])}, "before")[0]
             for q, p in steps]
    adjusted = cmp.adjust([t.p for t in tests], "holm")
    sections = []
    asked = {"1.1": "Train the Table-1 net on raw images: plot the training accuracy, report "
                    "the final test accuracy.",
             "1.2": "Normalize the images to zero mean and unit deviation instead; explain the "
                    "change.",
             "1.3": "Also flip them at random (50%) during training; explain the change.",
             "1.4": "Also pad by 4 and crop a random 32x32 region during training; explain."}
    why = {"1.2": ("zero-mean, unit-deviation inputs give the first convolution well-scaled "
                   "gradients",
                   "Table 1 puts BatchNorm after every convolution, so only the first "
                   "convolution ever sees the raw scale"),
           "1.3": ("a mirrored image is as likely as the original, so the net sees a new "
                   "image about half the time and memorizes batch #1 less",
                   "the flips did not change what the net learns measurably at this length"),
           "1.4": ("shifts of up to 4 pixels multiply the distinct training images again, and "
                   "the net must find objects wherever they are",
                   "the crops did not change the result measurably at this length")}
    for i, (number, aug) in enumerate(PART1.items()):
        g = found[number]
        mean, std, low, high = _summary(_values(g))
        train = _mean(_late(r, "train/acc") for r in g.runs)
        s = Section(number, f"`--aug {aug}`", asked[number])
        s.answer.append(f"Final test accuracy {pct(mean)} +- {std * 100:.2f} over {len(g.runs)} "
                        f"seeds (95% interval {pct(low)} to {pct(high)}); training accuracy at "
                        f"the end {pct(train)}, a gap of {(train - mean) * 100:.1f} points.")
        if i:
            t, p = tests[i - 1], adjusted[i - 1]
            before = order[i - 1]
            verdict = ("a real gain" if t.significant and t.difference > 0 else
                       "a real loss" if t.significant else "not distinguishable from zero")
            if t.test:
                s.answer.append(f"Against {before}: {pts(t.difference)} (95% interval "
                                f"{pts(t.ci_low)} to {pts(t.ci_high)}), {t.test} t-test "
                                f"{p_is(p)} after Holm's correction over the three steps: "
                                f"{verdict}.")
                gain, none = why[number]
                s.answer.append(f"Why: {gain}." if t.significant and t.difference > 0 else
                                f"Why so little: {none}." if not t.significant else
                                "This step hurt: more seeds or a longer training would tell "
                                "whether it is real.")
        s.figures.append(_curves([found[k] for k in order[max(0, i - 1):i + 1]], "train/acc",
                                 figures, name=f"q{number}-train-acc"))
        sections.append(s)
    return sections


def _layers(arch: str) -> Table | None:
    """The layers of an architecture as built (type, shape), for 2.1's table."""
    try:
        import torch.nn as nn

        from ..plugin_api.registry import catalog

        net = catalog().get("architecture", arch).build(num_classes=10, in_channels=3,
                                                         image_size=32)
    except Exception:  # a table is a courtesy: the report goes on without it
        return None
    rows = []
    for name, module in net.named_modules():
        if list(module.children()):
            continue
        what = type(module).__name__
        if isinstance(module, nn.Conv2d):
            detail = (f"{module.in_channels} -> {module.out_channels}, kernel "
                      f"{module.kernel_size[0]}x{module.kernel_size[1]}, stride "
                      f"{module.stride[0]}, padding {module.padding[0]}")
        elif isinstance(module, (nn.AvgPool2d, nn.MaxPool2d)):
            detail = f"kernel {module.kernel_size}, stride {module.stride}"
        elif isinstance(module, nn.Linear):
            detail = f"{module.in_features} -> {module.out_features}"
        else:
            detail = ""
        rows.append([name, what, detail])
    return Table(f"{arch} as built", ["layer", "type", "shape"], rows)


def _g_figure(groups: list[Group], figures, name: str) -> Figure | None:
    """G of the first (solid) and last (dashed) conv per net over training: the geometric mean
    over seeds, on a log scale, as the assignment asks for it."""
    import numpy as np

    fig, ax = figures.plt.subplots(figsize=(8, 4.2))
    drawn = False
    for g in groups:
        color = None
        for metric, style in (("grad_max/first_conv", "-"), ("grad_max/last_conv", "--")):
            curves = [r.curves[metric] for r in g.runs if r.curves.get(metric)]
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
            logs = np.log10(np.maximum([[dict(c)[s] for s in steps] for c in curves], 1e-30))
            line, = ax.plot(steps, 10 ** logs.mean(0), style, lw=1, color=color,
                            label=f"{g.label}: {metric.split('/')[1].replace('_', ' ')}")
            color, drawn = line.get_color(), True
    if not drawn:
        figures.plt.close(fig)
        return None
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("G = max |dL/dw|")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return Figure(f"{name}.png", "G of the first conv (solid) and the last conv (dashed) over "
                  "training, geometric mean over seeds", _png(fig))


def part2(groups: list[Group], figures) -> list[Section]:
    from scipy import stats

    found = _by(groups, "arch", PART2)
    conv, plain, res = (found[k] for k in PART2)
    g_first = {k: _mean(_median_curve(r, "grad_max/first_conv") for r in g.runs)
               for k, g in found.items()}
    g_last = {k: _mean(_median_curve(r, "grad_max/last_conv") for r in g.runs)
              for k, g in found.items()}
    train = {k: _mean(_late(r, "train/acc") for r in g.runs) for k, g in found.items()}
    sections = []
    values = _values(conv)
    mean, std, low, high = _summary(values)
    s = Section("2.1", "A conv-only net (`--arch convonly`)", "Only convolution, BatchNorm, "
                "ReLU, pooling and softmax; reach 68% test accuracy; give its table, plot the "
                "training accuracy.")
    one_sided = (stats.ttest_1samp(list(values.values()), 0.68, alternative="greater").pvalue
                 if len(values) >= 2 else math.nan)
    s.answer.append(f"Final test accuracy {pct(mean)} +- {std * 100:.2f} over {len(values)} "
                    f"seeds (95% interval {pct(low)} to {pct(high)}). One-sided t-test that the "
                    f"mean exceeds 68%: {p_is(one_sided)}: the goal is "
                    + ("reached." if one_sided < 0.05 else "not shown reached at this length."))
    table = _layers("convonly")
    if table:
        s.tables.append(table)
    s.figures.append(_curves([conv], "train/acc", figures, name="q2.1-train-acc"))
    sections.append(s)
    s = Section("2.2", "G = max|dL/dw| of the first and last conv", "Plot G of the first and "
                "last convolutional layers over training.")
    s.answer.append(f"Median over training, mean over seeds: first conv {g_first['2.1']:.3g}, "
                    f"last conv {g_last['2.1']:.3g} (ratio first/last "
                    f"{g_first['2.1'] / g_last['2.1']:.3g}).")
    s.figures.append(_g_figure([conv], figures, "q2.2-G"))
    sections.append(s)
    ratio = g_first["2.3"] / g_first["2.1"]
    s = Section("2.3", "20 more 5x5 convs, no BatchNorm (`--arch plain20`)", "Plot the "
                "training accuracy and G of the first and last conv; explain what happened.")
    plain_mean = _summary(_values(plain))[0]
    s.answer.append(f"Training accuracy at the end {pct(train['2.3'])} (convonly "
                    f"{pct(train['2.1'])}); test accuracy {pct(plain_mean)}. G of the first "
                    f"conv {g_first['2.3']:.3g}, {ratio:.2g}x convonly's; of the last conv "
                    f"{g_last['2.3']:.3g}.")
    if ratio < 0.1:
        s.answer.append("The gradient vanishes on its way down: without BatchNorm, each of the "
                        "20 extra convolutions multiplies the backward signal by its weights' "
                        "Jacobian, whose scale at this initialisation is below one, so the "
                        "product over 20 layers shrinks the first conv's gradient by orders of "
                        "magnitude and the early layers barely learn.")
    else:
        s.answer.append(f"The first conv's G did not fall below a tenth of convonly's here "
                        f"({ratio:.2g}x): at this length and initialisation the gradient did "
                        "not vanish measurably; compare the training accuracy instead.")
    s.figures.append(_curves([conv, plain], "train/acc", figures, name="q2.3-train-acc"))
    s.figures.append(_g_figure([conv, plain], figures, "q2.3-G"))
    sections.append(s)
    s = Section("2.4", "The fix: identity skips (`--arch residual`)", "Solve it without "
                "removing a conv or adding BatchNorm; explain why it works.")
    res_mean = _summary(_values(res))[0]
    s.answer.append(f"Each of the 20 extra convolutions gets an identity skip, x + s*relu(conv(x)) "
                    f"with a learnable s starting at 0 (ReZero: each block starts as the "
                    f"identity). "
                    f"Training accuracy at the end {pct(train['2.4'])} (plain20 "
                    f"{pct(train['2.3'])}), test accuracy {pct(res_mean)} (plain20 "
                    f"{pct(plain_mean)}); G of the first conv {g_first['2.4']:.3g}, "
                    f"{g_first['2.4'] / g_first['2.1']:.2g}x convonly's.")
    s.answer.append("Why it works: the derivative of x + f(x) is I + f'(x), so the backward "
                    "signal reaches the first conv through the identities undiminished, however "
                    "small the convolutions' own Jacobians are.")
    s.figures.append(_curves([plain, res], "train/acc", figures, name="q2.4-train-acc"))
    s.figures.append(_g_figure([plain, res], figures, "q2.4-G"))
    sections.append(s)
    return sections


def part3(uri: str, done: Done) -> list[Section]:
    import mlflow

    client = mlflow.MlflowClient(uri)

    def artifact(run_id: str, path: str) -> bytes:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                                        tracking_uri=uri)).read_bytes()

    attack = done.attacks["table1"]
    m = client.get_run(attack).data.metrics
    s = Section("3.1", "Adversarial images by iterated FGSM", "Two images per class for the "
                "part-1 model, each stepped by eps*sign(grad) until a wrong class has >= 99%; "
                "show them beside the originals and describe the difference.")
    s.answer.append(f"{m['attack/success_rate']:.0%} of {int(m['attack/images'])} images "
                    f"reached a wrong class at >= 99% confidence, in {m['attack/mean_steps']:.1f} "
                    f"steps of 1/255 on average; the perturbation's L-inf is at most "
                    f"{m['attack/linf_max'] * 255:.0f}/255 (mean {m['attack/linf_mean'] * 255:.1f}"
                    f"/255) and its L2 {m['attack/l2_mean']:.2f} on average.")
    s.answer.append("The difference: every step moves nearly every pixel by 1/255 in the "
                    "direction that raises the loss, so the perturbation is a faint, "
                    "image-wide noise, a few grey levels at most, that the eye does not see "
                    "but that the linear parts of the network add up over thousands of pixels.")
    s.figures.append(Figure("q3.1-adversarial.png", "originals (left), adversarial images "
                            "(right), with the class and confidence the model gives",
                            artifact(attack, "figures/adversarial.png")))
    sections = [s]
    transfer = json.loads(artifact(done.transfer, "transfer.json"))
    source = next(x["key"] for x in transfer["sources"] if x["ref"] == attack)
    target = next(x["key"] for x in transfer["targets"]
                  if x["model_uri"] == done.models["convonly"])
    cell = next(c for c in transfer["cells"] if c["source"] == source and c["target"] == target)
    s = Section("3.2", "The adversarial images fed to the part-2 net", "Report the part-2 "
                "net's accuracy on them and explain why it is low.")
    rate = cell.get("transfer_rate")
    s.answer.append(f"convonly classifies {cell['adv_acc']:.0%} of table1's adversarial images "
                    f"right, against {cell['clean_acc']:.0%} of their originals"
                    + (f"; of the originals it got right, {rate:.0%} are wrong after the attack"
                       if rate is not None else "") + ".")
    s.answer.append("Why: both nets learned similar features from the same images, so a "
                    "direction that raises one's loss raises the other's, and the attack "
                    "overshoots to 99% confidence, well past the first net's decision boundary "
                    "and often past the second's.")
    for arch, why in done.problems.items():
        s.answer.append(f"No adversarial set for {arch} (left out of the table): {why}")
    rows = [[x["label"]] + [pct(next(c["adv_acc"] for c in transfer["cells"]
                                     if c["source"] == x["key"] and c["target"] == t["key"]))
                            for t in transfer["targets"]] for x in transfer["sources"]]
    s.tables.append(Table("accuracy of each model (columns) on each adversarial set (rows)",
                          ["set"] + [t["label"] for t in transfer["targets"]], rows))
    try:
        s.figures.append(Figure("q3.2-transfer.png", "transfer rate and accuracy, every set "
                                "against every model",
                                artifact(done.transfer, "figures/transfer_matrix.png")))
    except Exception:  # one set and one model: no matrix figure
        pass
    sections.append(s)
    return sections


def build(uri: str, done: Done, protocol: Protocol, seconds: float | None = None):
    from .. import figures

    _, runs1, _ = collect(uri, sweep=done.sweeps["part1"], curves=CURVES)
    _, runs2, _ = collect(uri, sweep=done.sweeps["part2"], curves=CURVES)
    sections = part1(group_runs(runs1), figures) + part2(group_runs(runs2), figures)
    sections += part3(uri, done)
    for s in sections:
        s.figures = [f for f in s.figures if f is not None]
    intro = (f"Protocol '{protocol.name}': {protocol.seeds} seeds per configuration, "
             f"{protocol.iters} iterations of 100 images from CIFAR-10's train batch #1, "
             f"evaluated on the test batch every {protocol.eval_every}; cifarx's defaults "
             "otherwise (Nesterov SGD, lr 0.1, one-cycle). Sweeps: part 1 "
             f"{done.sweeps['part1']}, part 2 {done.sweeps['part2']}; attacks "
             f"{', '.join(done.attacks.values())}; transfer {done.transfer}.")
    if seconds is not None:
        intro += f" This invocation took {seconds / 60:.1f} minutes" + (
            f" (it reused what earlier ones finished: {', '.join(done.reused)} and the "
            "sweeps' trials)." if done.reused else ".")
    return intro, sections


def _code(text: str):
    """HTML with `backticked` spans as <code>."""
    from markupsafe import Markup, escape

    parts = str(escape(text)).split("`")
    return Markup("".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts)))


def render(title: str, intro: str, sections: list[Section], out: Path) -> tuple[Path, Path]:
    import jinja2

    from .. import __version__
    from .report import TEMPLATES

    out.mkdir(parents=True, exist_ok=True)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                             autoescape=jinja2.select_autoescape(["html.j2"]),
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["code"] = _code
    context = dict(title=title, intro=intro, sections=sections, version=__version__)
    html = out / "assignment.html"
    html.write_text(env.get_template("assignment.html.j2").render(**context))
    (out / "figures").mkdir(exist_ok=True)
    for s in sections:
        for f in s.figures:
            (out / "figures" / f.name).write_bytes(f.png)
    md = out / "assignment.md"
    md.write_text(env.get_template("assignment.md.j2").render(**context))
    return html, md

