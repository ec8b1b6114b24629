"""Built-in probes: the gradient magnitudes of assignment part 2.

- ``grad-max``: G = max_i |dL/dw_i| of the first and last conv layers, every iteration.
- ``grad-norm``: the L2 norm of the gradient of every conv and linear layer, every N iterations.

Both read ``weight.grad`` after backward and return 0-dim tensors on the training device; the
engine moves them to the host in batches, so a probe adds a few small kernels per step and no
host sync.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor, nn

from cifarx import Option, OptionError, Probe, UserError, hookimpl

History = Mapping[str, list[tuple[int, float]]]


def layers_of(net: nn.Module, types: tuple[type, ...]) -> list[tuple[str, nn.Module]]:
    """Modules of these types that have a weight, in the order the network registers them
    (for a sequential net, the order the input meets them)."""
    return [(name, module) for name, module in net.named_modules()
            if isinstance(module, types) and isinstance(getattr(module, "weight", None),
                                                        nn.Parameter)]


def _some(names: list[str], shown: int = 8) -> str:
    if len(names) <= shown:
        return ", ".join(names)
    return ", ".join(names[:shown - 2]) + f", ... ({len(names) - shown + 2} more), " + \
        ", ".join(names[-2:])


def named_weight(net: nn.Module, name: str, option: str) -> nn.Parameter:
    """The weight of module ``name``, or a UserError naming the conv layers there are."""
    module = dict(net.named_modules()).get(name)
    convs = [n for n, _ in layers_of(net, (nn.Conv2d,))]
    if module is None:
        raise OptionError(option, f"the network has no module {name!r}; its conv layers: "
                                  f"{_some(convs) or 'none'} (see cifarx describe)")
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter):
        raise OptionError(option, f"{name} ({type(module).__name__}) has no weight; its conv "
                                  f"layers: {_some(convs) or 'none'}")
    return weight


def attach_grad_max(net: nn.Module, first: str = "", last: str = ""):
    """Watch the first and last Conv2d (or the modules named ``first`` and ``last``)."""
    convs = layers_of(net, (nn.Conv2d,))
    if not convs and not (first and last):
        raise UserError("grad-max: the network has no Conv2d layer; name the layers to watch "
                        "with --probe-opt grad-max.first=NAME and --probe-opt grad-max.last=NAME")
    first_weight = named_weight(net, first, "first") if first else convs[0][1].weight
    last_weight = named_weight(net, last, "last") if last else convs[-1][1].weight
    watched = {"grad_max/first_conv": first_weight, "grad_max/last_conv": last_weight}

    def read() -> dict[str, Tensor]:
        # the infinity norm is max |g| in one kernel; a layer without a gradient is skipped
        return {key: torch.linalg.vector_norm(weight.grad, ord=math.inf)
                for key, weight in watched.items() if weight.grad is not None}
    return read


def attach_grad_norm(net: nn.Module, stride: int = 50):
    """Every conv and linear layer, at iteration 1 and every ``stride`` iterations."""
    every = stride
    layers = layers_of(net, (nn.Conv2d, nn.Linear))
    if not layers:
        raise UserError("grad-norm: the network has no Conv2d or Linear layer")
    step = 0

    def read() -> dict[str, Tensor]:
        nonlocal step
        step += 1
        if step != 1 and step % every:
            return {}
        # keys in depth order: the figure reads the depth from the order they first appear
        return {f"grad_norm/{name}": torch.linalg.vector_norm(module.weight.grad)
                for name, module in layers if module.weight.grad is not None}
    return read


def grad_max_figure(history: History):
    """Both G curves over the iterations, on a log scale (zeros cannot be drawn: counted)."""
    import matplotlib.pyplot as plt

    import cifarx.figures  # noqa: F401  (selects the Agg backend)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, label in (("grad_max/first_conv", "first conv"), ("grad_max/last_conv", "last conv")):
        points = history.get(key, [])
        drawn = [(s, v) for s, v in points if v > 0 and math.isfinite(v)]
        if len(drawn) < len(points):
            label += f" ({len(points) - len(drawn)} iterations with G = 0 or not finite, not drawn)"
        if drawn:
            steps, values = zip(*drawn)
            window = len(drawn) // 50  # over many iterations, the raw curve is a band: add a trend
            raw, = ax.plot(steps, values, lw=0.6, alpha=0.4 if window > 1 else 1, label=label)
            if window > 1:
                logs = torch.tensor(values, dtype=torch.float64).log10()
                trend = 10 ** logs.unfold(0, window, 1).mean(1)  # geometric mean, as on the axis
                ax.plot(steps[window - 1:], trend.tolist(), lw=1.6, color=raw.get_color(),
                        label=f"{label.split(' (')[0]}, mean of {window}")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel(r"$G = \max_i |\partial L / \partial w_i|$")
    ax.set_title("gradient magnitude of the first and last conv layers")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    return fig


def grad_norm_figure(history: History, snapshots: int = 5):
    """Gradient norm against layer depth, one line per moment of training."""
    import matplotlib.pyplot as plt

    import cifarx.figures  # noqa: F401  (selects the Agg backend)

    keys = [key for key in history if key.startswith("grad_norm/")]
    steps = sorted({step for key in keys for step, _ in history[key]})
    if len(steps) > snapshots:
        steps = sorted({steps[round(i * (len(steps) - 1) / (snapshots - 1))]
                        for i in range(snapshots)})
    by_key = {key: dict(history[key]) for key in keys}
    fig, ax = plt.subplots(figsize=(max(8.0, 0.3 * len(keys)), 5))
    colors = plt.get_cmap("viridis")
    drawable = False
    for i, step in enumerate(steps):
        values = [by_key[key].get(step, math.nan) for key in keys]
        drawable |= any(v > 0 and math.isfinite(v) for v in values)
        ax.plot(range(len(keys)), values, marker="o", ms=3, lw=1,
                color=colors(i / max(1, len(steps) - 1)), label=f"iteration {step}")
    tick_every = max(1, math.ceil(len(keys) / 40))
    ax.set_xticks(range(0, len(keys), tick_every),
                  [key[len("grad_norm/"):] for key in keys[::tick_every]], rotation=90, fontsize=7)
    if drawable:  # a log axis cannot show only zeros (a dead net) or only NaN (a diverged one)
        ax.set_yscale("log")
    ax.set_xlabel("layer, input to output")
    ax.set_ylabel(r"$\|\partial L / \partial W\|_2$")
    ax.set_title("gradient norm per layer")
    ax.grid(alpha=0.3, which="both")
    if steps:
        ax.legend()
    fig.tight_layout()
    return fig


@hookimpl
def register_probes(register):
    register(Probe(
        name="grad-max", attach=attach_grad_max, figure=grad_max_figure,
        options={"first": Option("", str, help="the module of the first layer (default: the "
                                               "first Conv2d)"),
                 "last": Option("", str, help="the module of the last layer (default: the "
                                              "last Conv2d)")},
        summary="G = max|dL/dw| of the first and last conv layers every iteration "
                "(grad_max/first_conv, grad_max/last_conv); options first=, last= (module names)"))
    register(Probe(
        name="grad-norm", attach=attach_grad_norm, figure=grad_norm_figure,
        options={"stride": Option(50, int, range="[1, inf)",
                                  help="iterations between readings (and iteration 1)")},
        summary="L2 norm of the gradient of every conv and linear layer (grad_norm/<layer>) at "
                "iteration 1 and every stride=50 iterations; figure: norm per layer depth"))
