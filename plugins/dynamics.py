"""Probes that watch every layer while a net trains: why deep plain nets stop learning.

- ``grad-flow``: the norm and the max of each conv/linear layer's weight gradient every
  ``stride`` iterations; figure: a layers x iterations heatmap (log scale) of the norm.
- ``activations``: per layer, the mean and standard deviation of its output and the share of
  dead units (channels that are zero for every image and position of the batch, after ReLU);
  read in the training forward pass every ``stride`` iterations.
- ``update-ratio``: ``|w_{t+1} - w_t| / |w_t|`` per layer, the step the optimizer actually
  took (learning rate, momentum and weight decay included) relative to the weights; about
  1e-3 is the healthy rule of thumb, far below means the layer does not learn.

Each reads only on the iterations it reports (1 and every ``stride``), returns tensors on
the training device and leaves the host sync to the engine.

And one analysis of a trained model, ``activation-maps`` (seed 004, section 8.1): the feature
maps chosen layers produce for a few test images, and the filters that are dead (a map that
is never positive, for any image: after a ReLU, the filter passes nothing).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor, nn

from cifarx import (Analysis, AnalysisData, Findings, Option, OptionError, Probe, UserError,
                    hookimpl)
from cifarx.plugins.probes import layers_of

History = Mapping[str, list[tuple[int, float]]]
STRIDE = Option(50, int, range="[1, inf)", help="iterations between readings (and iteration 1)")


class Every:
    """Counts training steps; ``due`` on step 1 and every ``stride`` steps. ``ahead`` is what
    a forward hook asks: the step about to run (the probe's read comes after its backward)."""

    def __init__(self, stride: int):
        self.stride, self.step = stride, 0

    def due(self, step: int) -> bool:
        return step == 1 or step % self.stride == 0

    def tick(self) -> bool:
        self.step += 1
        return self.due(self.step)

    @property
    def ahead(self) -> bool:
        return self.due(self.step + 1)


def _weighted(net: nn.Module, probe: str) -> list[tuple[str, nn.Module]]:
    layers = layers_of(net, (nn.Conv2d, nn.Linear))
    if not layers:
        raise UserError(f"{probe}: the network has no Conv2d or Linear layer")
    return layers


def attach_grad_flow(net: nn.Module, stride: int = 50):
    layers, every = _weighted(net, "grad-flow"), Every(stride)

    def read() -> dict[str, Tensor]:
        if not every.tick():
            return {}
        out = {}
        for name, module in layers:
            grad = module.weight.grad
            if grad is not None:
                out[f"grad_flow/norm/{name}"] = torch.linalg.vector_norm(grad)
                out[f"grad_flow/max/{name}"] = torch.linalg.vector_norm(grad, ord=math.inf)
        return out
    return read


def attach_activations(net: nn.Module, stride: int = 50):
    """Hooks on the ReLUs (a net built with modules); without any, on the conv and linear
    outputs, where a unit counts as dead if it is never positive (ReLU would zero it)."""
    every = Every(stride)
    relus = [(n, m) for n, m in net.named_modules() if isinstance(m, (nn.ReLU, nn.ReLU6))]
    watched = relus or _weighted(net, "activations")
    seen: dict[str, Tensor] = {}

    def hook(name: str):
        def record(module, inputs, output):
            if not module.training or not every.ahead or not torch.is_tensor(output):
                return  # evaluations and the steps not reported cost nothing
            x = output.detach().float()
            units = x.transpose(0, 1).flatten(1)  # one row per channel (or feature)
            seen[f"activations/mean/{name}"] = x.mean()
            seen[f"activations/std/{name}"] = x.std()
            seen[f"activations/dead/{name}"] = (units.amax(1) <= 0).float().mean()
        return record

    for name, module in watched:
        module.register_forward_hook(hook(name))

    def read() -> dict[str, Tensor]:
        due = every.tick()
        out = dict(seen) if due else {}
        seen.clear()
        return out
    return read


def attach_update_ratio(net: nn.Module, stride: int = 50):
    """Copies the weights on the reported steps (before the optimizer's step) and, at the next
    step, divides the change by them: the update just applied."""
    layers, every = _weighted(net, "update-ratio"), Every(stride)
    before: dict[str, Tensor] = {}

    def read() -> dict[str, Tensor]:
        due = every.tick()
        out = {}
        for name, module in layers:
            if name in before:
                w = module.weight.detach()
                out[f"update_ratio/{name}"] = (torch.linalg.vector_norm(w - before[name])
                                               / torch.linalg.vector_norm(before[name])
                                               .clamp_min(1e-12))
        before.clear()
        if due:  # the optimizer steps after this read: keep the weights it starts from
            before.update({name: module.weight.detach().clone() for name, module in layers})
        return out
    return read


def _layers_in(history: History, prefix: str) -> list[str]:
    return [key[len(prefix):] for key in history if key.startswith(prefix)]


def heatmap(history: History, prefix: str, title: str, label: str, log: bool = True):
    """Layers (rows, input to output) x reported iterations (columns)."""
    import matplotlib.colors as colors
    import matplotlib.pyplot as plt

    import cifarx.figures  # noqa: F401  (selects the Agg backend)

    layers = _layers_in(history, prefix)
    steps = sorted({s for name in layers for s, _ in history[prefix + name]})
    grid = torch.full((len(layers), len(steps)), math.nan)
    column = {s: j for j, s in enumerate(steps)}
    for i, name in enumerate(layers):
        for s, v in history[prefix + name]:
            grid[i, column[s]] = v
    fig, ax = plt.subplots(figsize=(max(7.0, 0.12 * len(steps) + 3),
                                    max(3.5, 0.25 * len(layers) + 1.5)))
    finite = grid[torch.isfinite(grid) & (grid > 0)] if log else grid[torch.isfinite(grid)]
    norm = (colors.LogNorm(vmin=float(finite.min()), vmax=float(finite.max()))
            if log and finite.numel() and float(finite.min()) < float(finite.max()) else None)
    image = ax.imshow(grid.numpy(), aspect="auto", interpolation="nearest", cmap="magma",
                      norm=norm)
    fig.colorbar(image, ax=ax, label=label)
    tick = max(1, math.ceil(len(layers) / 30))
    ax.set_yticks(range(0, len(layers), tick), layers[::tick], fontsize=7)
    xt = max(1, math.ceil(len(steps) / 10))
    ax.set_xticks(range(0, len(steps), xt), [str(s) for s in steps[::xt]], fontsize=7)
    ax.set_xlabel("iteration")
    ax.set_ylabel("layer (input at the top)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def activations_figure(history: History):
    """The dead-unit share per layer over training, and each layer's std."""
    import matplotlib.pyplot as plt

    import cifarx.figures  # noqa: F401

    fig, (dead, spread) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in _layers_in(history, "activations/dead/"):
        steps, values = zip(*history["activations/dead/" + name])
        dead.plot(steps, values, lw=1, label=name)
        steps, values = zip(*history.get("activations/std/" + name, [(0, math.nan)]))
        spread.plot(steps, values, lw=1, label=name)
    dead.set_title("share of dead units (never positive in the batch)")
    dead.set_ylim(-0.02, 1.02)
    spread.set_title("standard deviation of the activations")
    spread.set_yscale("log")
    for ax in (dead, spread):
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    handles, labels = dead.get_legend_handles_labels()
    if 0 < len(labels) <= 12:
        dead.legend(fontsize=6)
    fig.tight_layout()
    return fig


@hookimpl
def register_probes(register):
    register(Probe(
        name="grad-flow", attach=attach_grad_flow, options={"stride": STRIDE},
        figure=lambda h: heatmap(h, "grad_flow/norm/", "gradient norm per layer",
                                 r"$\|\partial L / \partial W\|_2$"),
        summary="norm and max of every conv/linear layer's weight gradient (grad_flow/norm/"
                "<layer>, grad_flow/max/<layer>) every stride=50 iterations; figure: heatmap"))
    register(Probe(
        name="activations", attach=attach_activations, options={"stride": STRIDE},
        figure=activations_figure,
        summary="per layer: mean, std and dead-unit share of the activations "
                "(activations/{mean,std,dead}/<layer>) every stride=50 training iterations"))
    register(Probe(
        name="update-ratio", attach=attach_update_ratio, options={"stride": STRIDE},
        figure=lambda h: heatmap(h, "update_ratio/", "|update| / |weights| per layer",
                                 "update ratio"),
        summary="|w_{t+1} - w_t| / |w_t| of every conv/linear layer (update_ratio/<layer>), "
                "the step the optimizer took, every stride=50 iterations; figure: heatmap"))


# --- activation maps (an analysis of a trained model) -----------------------------------------

def chosen_layers(net: nn.Module, layers: str) -> list[tuple[str, nn.Module]]:
    """The modules ``layers`` names (a comma list), else the first, a middle and the last
    Conv2d."""
    modules = dict(net.named_modules())
    if layers:
        names = [n.strip() for n in layers.split(",") if n.strip()]
        missing = [n for n in names if n not in modules]
        if missing:
            convs = [n for n, _ in layers_of(net, (nn.Conv2d,))]
            raise OptionError("layers", f"the network has no module {missing[0]!r}; its conv "
                                        f"layers: {', '.join(convs) or 'none'} (see cifarx "
                                        "describe)")
        return [(n, modules[n]) for n in names]
    convs = layers_of(net, (nn.Conv2d,))
    if not convs:
        raise OptionError("layers", "the network has no Conv2d layer; name the modules whose "
                                    "outputs are feature maps")
    picks = sorted({0, len(convs) // 2, len(convs) - 1})
    return [convs[i] for i in picks]


def feature_maps(model: nn.Module, modules: list[nn.Module], images: Tensor) -> list[Tensor]:
    """What each module outputs for ``images`` (in batches), on the CPU, as float32."""
    found: list[list[Tensor]] = [[] for _ in modules]
    hooks = [m.register_forward_hook(lambda mod, args, out, i=i: found[i].append(
        out.detach().float().cpu())) for i, m in enumerate(modules)]
    try:
        with torch.no_grad():
            for batch in images.split(100):
                model(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(parts) for parts in found]


def check_activation_maps(model: nn.Module, data: AnalysisData, layers: str = "",
                          images: int = 2, channels: int = 8):
    picked = chosen_layers(getattr(model, "net", model), layers)
    outputs = feature_maps(model, [m for _, m in picked], data.images[:1])
    flat = [n for (n, _), out in zip(picked, outputs) if out.dim() != 4]
    if flat:
        raise OptionError("layers", f"{flat[0]} does not output feature maps (N x C x H x W); "
                                    "name a conv layer or an activation after one")


def activation_maps(model: nn.Module, data: AnalysisData, layers: str = "", images: int = 2,
                    channels: int = 8) -> Findings:
    """Each chosen layer's feature maps for ``images`` test images of different classes (the
    first ``channels`` channels, each scaled to its own range), and, over every chosen image,
    the share of the layer's channels that are dead: never positive for any image or
    position."""
    import matplotlib.pyplot as plt

    import cifarx.figures  # noqa: F401
    from cifarx.inference.adversarial import figure_rows

    net = getattr(model, "net", model)
    picked = chosen_layers(net, layers)
    outputs = feature_maps(model, [m for _, m in picked], data.images)
    rows = figure_rows(data.labels.cpu(), images)[:images]
    metrics, shown, summary = {}, {}, []
    for (name, _), out in zip(picked, outputs):
        dead = (out.amax(dim=(0, 2, 3)) <= 0).float()
        metrics[f"analysis/activation_maps/dead/{name}"] = float(dead.mean())
        metrics[f"analysis/activation_maps/positive/{name}"] = float((out > 0).float().mean())
        shown[name] = out[rows, :channels].clone()
        summary.append(f"{name} {int(dead.sum())}/{len(dead)} dead")
    k = min(channels, max(o.shape[1] for o in outputs))
    fig, axes = plt.subplots(len(rows) * len(picked), k + 1,
                             figsize=(1.1 * (k + 1), 1.15 * len(rows) * len(picked) + 0.4),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, row in enumerate(rows):
        for j, ((name, _), out) in enumerate(zip(picked, outputs)):
            line = axes[r * len(picked) + j]
            line[0].imshow(data.images[row].float().cpu().permute(1, 2, 0).squeeze().clamp(0, 1),
                           cmap="gray" if data.images.shape[1] == 1 else None)
            line[0].set_title(f"{data.classes[int(data.labels[row])]}\n{name}", fontsize=6)
            never = out.amax(dim=(0, 2, 3)) <= 0
            for c in range(min(k, out.shape[1])):
                line[c + 1].imshow(out[row, c], cmap="viridis")
                line[c + 1].set_title(f"#{c}" + (" dead" if never[c] else ""), fontsize=6,
                                      color="red" if never[c] else "black")
    fig.suptitle("feature maps (each scaled to its own range; dead: never positive)",
                 fontsize=8)
    fig.tight_layout()
    return Findings(figure=fig, metrics=metrics, files={"activation_maps/maps.pt": shown},
                    summary="; ".join(summary) + f" (over {len(data.images)} images)",
                    resolved={} if layers else {"layers": ",".join(n for n, _ in picked)})


@hookimpl
def register_analyses(register):
    register(Analysis(
        name="activation-maps", analyze=activation_maps, check=check_activation_maps,
        options={"layers": Option("", str, help="comma list of modules whose outputs are "
                                                "shown (default: the first, a middle and the "
                                                "last conv)"),
                 "images": Option(2, int, range="[1, 10]", help="test images shown, of "
                                                                "different classes"),
                 "channels": Option(8, int, range="[1, 64]", help="feature maps shown per "
                                                                  "layer and image")},
        summary="the feature maps of chosen layers for a few test images, and the share of "
                "dead filters (analysis/activation_maps/dead/<layer>)"))
