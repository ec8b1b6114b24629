"""Built-in analyses: what a trained model gets wrong, how sure it is, and what it looks at.

- On the whole test split: ``confusion-matrix``, ``per-class`` (precision, recall, F1 from
  scikit-learn), ``calibration`` (reliability diagram, expected calibration error), and
  ``errors`` (a gallery of the most confident mistakes).
- Attributions, computed with Captum (``captum.attr``) for the true class of each chosen image:
  ``saliency`` (Simonyan et al. 2014), ``guided-backprop`` (Springenberg et al. 2015),
  ``grad-cam`` (Selvaraju et al. 2017) and ``integrated-gradients`` (Sundararajan et al. 2017).
  Each logs its maps as ``attributions/<name>.pt``; ``sanity=true`` adds the
  model-randomization test of Adebayo et al. 2018, and with ``--adversarial`` each maps the
  adversarial images next to their originals.
- Features: ``embedding`` (t-SNE and k-NN accuracy of the penultimate layer's features) and
  ``filters`` (the first conv layer's weights as images).

Captum, scikit-learn and matplotlib are imported inside the functions that use them: every
command that looks up a plugin (``cifarx plugins``, ``cifarx train``) imports this module.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from cifarx import Analysis, AnalysisData, Findings, Option, OptionError, UserError, hookimpl
from cifarx.plugins.probes import layers_of

GALLERY = 20  # images a figure shows at most (the files hold all of them)
BATCH = 50  # images attributed at once
SANITY_THRESHOLD = 0.5  # a method passes when its maps correlate less with the random model's
SANITY = Option(False, bool, help="also run the model-randomization test (Adebayo et al. 2018)")
# The randomization cascade goes down every conv and linear layer; maps are compared at this
# many points of it (evenly spaced, the fully randomized model last): a 26-layer net costs 6
# passes of the method rather than 26, and the curve keeps its shape.
SANITY_POINTS = 6


# --- the model's layers -------------------------------------------------------------------

def network(model: nn.Module) -> nn.Module:
    """The network inside the saved model (after its normalization): layer names are its
    names, as `cifarx describe` lists them."""
    return getattr(model, "net", model)


def _listed(names: list[str], shown: int = 8) -> str:
    if len(names) <= shown:
        return ", ".join(names) or "none"
    return ", ".join(names[:shown - 2]) + f", ... ({len(names) - shown + 2} more), " + \
        ", ".join(names[-2:])


def feature_layer(model: nn.Module, name: str, option: str = "layer") -> tuple[str, nn.Module]:
    """The module ``name`` of the network (for Grad-CAM, one that outputs feature maps), or
    its last Conv2d when ``name`` is empty."""
    net = network(model)
    convs = [n for n, _ in layers_of(net, (nn.Conv2d,))]
    if not name:
        if not convs:
            raise OptionError(option, "the network has no Conv2d layer; name a layer whose "
                                      "output is a feature map")
        return convs[-1], dict(net.named_modules())[convs[-1]]
    module = dict(net.named_modules()).get(name)
    if module is None:
        raise OptionError(option, f"the network has no module {name!r}; its conv layers: "
                                  f"{_listed(convs)} (see cifarx describe)")
    return name, module


def output_of(model: nn.Module, module: nn.Module, images: Tensor, inputs: bool = False
              ) -> Tensor:
    """What ``module`` outputs (or, with ``inputs``, receives) when the model sees ``images``."""
    seen = []
    hook = module.register_forward_pre_hook(lambda m, args: seen.append(args[0])) if inputs \
        else module.register_forward_hook(lambda m, args, out: seen.append(out))
    try:
        with torch.no_grad():
            model(images)
    finally:
        hook.remove()
    if not seen or not isinstance(seen[0], Tensor):
        raise UserError(f"{type(module).__name__} gave no tensor for these images")
    return seen[0]


def probabilities(model: nn.Module, images: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(x).softmax(1) for x in images.split(500)]).cpu()


# --- attributions -------------------------------------------------------------------------

def attributable(model: nn.Module) -> nn.Module:
    """A copy for Captum, computing what the model computes: no in-place activations (Captum's
    backward hooks cannot follow an in-place ReLU)."""
    copied = copy.deepcopy(model)
    for module in copied.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    return copied


def saliency_maps(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
    """max over channels of |d logit_y / d pixel| (Simonyan et al. 2014)."""
    from captum.attr import Saliency

    return Saliency(model).attribute(images, target=targets, abs=True).amax(1)


def guided_backprop_maps(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
    """The gradient with every ReLU passing back only positive gradients where its input was
    positive; max over channels of its magnitude, as for saliency."""
    from captum.attr import GuidedBackprop

    with warnings.catch_warnings():  # Captum says, every time, that it hooks the ReLUs
        warnings.simplefilter("ignore", UserWarning)
        return GuidedBackprop(model).attribute(images, target=targets).abs().amax(1)


def grad_cam_maps(model: nn.Module, images: Tensor, targets: Tensor, layer: str = "") -> Tensor:
    """ReLU of the layer's feature maps weighted by the mean gradient of logit_y over each map,
    upsampled (bilinear) to the image."""
    from captum.attr import LayerAttribution, LayerGradCam

    _, module = feature_layer(model, layer)
    cams = LayerGradCam(model, module).attribute(images, target=targets, relu_attributions=True)
    return LayerAttribution.interpolate(cams, tuple(images.shape[-2:]), "bilinear")[:, 0]


def integrated_gradients_maps(model: nn.Module, images: Tensor, targets: Tensor,
                              steps: int = 50, baseline: str = "black",
                              sanity_steps: int = 16) -> Tensor:
    """The gradient integrated along the straight path from a baseline image, times the
    difference; summed over channels, so that a map sums to logit_y(image) - logit_y(baseline)."""
    from captum.attr import IntegratedGradients

    start = torch.zeros_like(images) if baseline == "black" else torch.full_like(images, 0.5)
    return IntegratedGradients(model).attribute(
        images, baselines=start, target=targets, n_steps=steps,
        internal_batch_size=max(steps, 4 * BATCH)).sum(1)


def attribute(maps: Callable[..., Tensor], model: nn.Module, images: Tensor, targets: Tensor,
              values: dict) -> Tensor:
    """Float32 maps (N, H, W) on the CPU, in batches."""
    return torch.cat([maps(model, x.clone().requires_grad_(), t, **values).detach().float()
                      .cpu() for x, t in zip(images.split(BATCH), targets.split(BATCH))])


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman's rank correlation of each pair of maps, (N, H, W) x 2 -> (N,): Pearson's on
    the ranks, ties given their mean rank. A constant map (no signal) correlates 0."""
    from scipy.stats import rankdata

    ra, rb = (torch.from_numpy(rankdata(m.detach().flatten(1).double().cpu().numpy(), axis=1))
              for m in (a, b))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    scale = ra.norm(dim=1) * rb.norm(dim=1)
    return torch.where(scale > 0, (ra * rb).sum(1) / scale.clamp_min(1e-300), 0.0).float()


def center_share(maps: Tensor) -> Tensor:
    """The share of each |map| in the middle half of the image's height and width, a quarter
    of its area: 25% for a map spread evenly. CIFAR-10's objects are mostly centred, so this is
    a rough gauge of how much a map sits on the object rather than the background."""
    h, w = maps.shape[-2:]
    magnitude = maps.abs()
    middle = magnitude[:, h // 4:h - h // 4, w // 4:w - w // 4].sum((1, 2))
    return middle / magnitude.sum((1, 2)).clamp_min(1e-30)


def randomized_copies(model: nn.Module, seed: int = 0) -> Iterator[tuple[str, nn.Module]]:
    """Cascading randomization (Adebayo et al. 2018): one copy of ``model`` whose conv and
    linear layers are re-initialized (PyTorch's default init, as before training) one more at
    a time, from the output down to the input. Yields (layer name, the copy) after each layer;
    it is one copy, changed in place between yields."""
    randomized = copy.deepcopy(model)
    layers = layers_of(network(randomized), (nn.Conv2d, nn.Linear))
    generator = torch.Generator().manual_seed(seed)
    for name, module in reversed(layers):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (), generator=generator)))
            module.reset_parameters()
        yield name, randomized


def checkpoints(count: int, points: int = SANITY_POINTS) -> set[int]:
    """Which of ``count`` cascade steps (0 = the top layer randomized) are compared: ``points``
    evenly spaced, the last (every layer randomized) always among them."""
    if count <= points:
        return set(range(count))
    return {round(i * (count - 1) / (points - 1)) for i in range(points)}


def sanity_check(name: str, maps: Callable[..., Tensor], model: nn.Module, data: AnalysisData,
                 trained: Tensor, values: dict) -> tuple[dict[str, float], object]:
    """The model-randomization test: randomized copies' maps against the trained model's, by
    rank (of |map|), at :data:`SANITY_POINTS` points of the cascade. Metrics
    ``analysis/<name>/sanity/<layer>`` (the median over the images, once every layer from the
    top down to that one is randomized), ``sanity_spearman`` (the fully randomized copy) and
    ``sanity_passed`` (1 when that is below 0.5). Integrated gradients compares maps of
    ``sanity_steps`` points (its trained maps again too)."""
    if "sanity_steps" in values:  # a rank test needs no fine integral: 16 points, not 50
        values = {**values, "steps": values["sanity_steps"]}
        trained = attribute(maps, model, data.images, data.labels, values)
    trained = trained.abs()
    layers, rhos, examples = [], [], []
    shown = _example_rows(data.labels.cpu())
    count = len(layers_of(network(model), (nn.Conv2d, nn.Linear)))
    compared = checkpoints(count)
    for step, (layer, randomized) in enumerate(randomized_copies(model, data.seed)):
        if step not in compared:
            continue
        randomized_maps = attribute(maps, randomized, data.images, data.labels, values)
        layers.append(layer)
        rhos.append(spearman(trained, randomized_maps.abs()))
        examples.append(randomized_maps[shown])
    flat = randomized_maps.flatten(1)
    medians = [float(r.median()) for r in rhos]
    metrics = {f"analysis/{name}/sanity/{layer}": m for layer, m in zip(layers, medians)}
    metrics[f"analysis/{name}/sanity_spearman"] = medians[-1]
    # the share of the fully randomized model's maps that are constant (say, all 0), which
    # correlate 0 by definition: a method can pass by going blank
    metrics[f"analysis/{name}/sanity_constant"] = float(
        (flat.amax(1) == flat.amin(1)).float().mean())
    metrics[f"analysis/{name}/sanity_passed"] = float(medians[-1] < SANITY_THRESHOLD)
    figure = sanity_figure(name, layers, rhos, data.images[shown].cpu(), trained[shown],
                           examples, shown)
    return metrics, figure


def _example_rows(labels: Tensor, count: int = 3) -> list[int]:
    """A few images of different classes, for the figures that show only some."""
    from cifarx.inference.adversarial import figure_rows

    return figure_rows(labels, count)[:count]


def analyze_attribution(name: str, maps: Callable[..., Tensor], model: nn.Module,
                        data: AnalysisData, sanity: bool = False, **values) -> Findings:
    """Maps of the true class for the chosen images (and their adversarial versions), the
    figure, ``attributions/<name>.pt`` and, with ``sanity``, the randomization test."""
    from cifarx.inference.adversarial import figure_rows

    net = attributable(model)
    maps_of = lambda images, targets: attribute(maps, net, images, targets, values)  # noqa: E731
    labels = data.labels.cpu()
    found = maps_of(data.images, data.labels)
    stored = {"maps": found, "indices": data.indices, "labels": labels}
    central = center_share(found).median().item()
    metrics = {f"analysis/{name}/center_share": central}
    probs = probabilities(net, data.images)
    if data.adversarial is None:
        rows = figure_rows(labels, GALLERY)
        figure = attribution_figure(name, data.images[rows].cpu(), found[rows], labels[rows],
                                    probs[rows], data.classes)
        summary = (f"maps of {len(labels)} images; median share of |map| in the central "
                   f"quarter {central:.0%}")
    else:
        adv_probs = probabilities(net, data.adversarial)
        adv_labels = adv_probs.argmax(1)
        stored["adv_maps"] = maps_of(data.adversarial, data.labels)
        stored["adv_labels"] = adv_labels
        stored["adv_pred_maps"] = maps_of(data.adversarial, adv_labels.to(data.labels.device))
        same = spearman(found.abs(), stored["adv_maps"].abs()).median().item()
        own = spearman(found.abs(), stored["adv_pred_maps"].abs()).median().item()
        metrics[f"analysis/{name}/adv_spearman"] = same
        metrics[f"analysis/{name}/adv_pred_spearman"] = own
        rows = figure_rows(labels, GALLERY // 2)
        figure = adversarial_attribution_figure(
            name, data.images[rows].cpu(), data.adversarial[rows].cpu(), found[rows],
            stored["adv_maps"][rows], stored["adv_pred_maps"][rows], labels[rows],
            adv_labels[rows], probs[rows], adv_probs[rows], data.classes)
        summary = (f"{len(labels)} pairs; median Spearman of the true class's map, original "
                   f"against adversarial, {same:.2f} (against the adversarial class's: "
                   f"{own:.2f})")
    files = {f"attributions/{name}.pt": stored}
    if sanity:
        sanity_metrics, files[f"figures/{name}-sanity.png"] = sanity_check(
            name, maps, net, data, found, values)
        metrics.update(sanity_metrics)
        full = sanity_metrics[f"analysis/{name}/sanity_spearman"]
        summary += (f"; sanity: Spearman {full:.2f} against the randomized model, "
                    f"{'passed' if full < SANITY_THRESHOLD else 'FAILED'} (below "
                    f"{SANITY_THRESHOLD} passes)")
    resolved = {"layer": feature_layer(model, "")[0]} if values.get("layer") == "" else {}
    return Findings(figure=figure, metrics=metrics, files=files, summary=summary,
                    resolved=resolved)


def check_grad_cam(model: nn.Module, data: AnalysisData, layer: str = "", sanity: bool = False):
    name, module = feature_layer(model, layer)
    shape = tuple(output_of(model, module, data.images[:1]).shape)
    if len(shape) != 4:
        convs = [n for n, _ in layers_of(network(model), (nn.Conv2d,))]
        raise OptionError("layer", f"{name} outputs {shape}, not feature maps (N, C, H, W); "
                                   f"its conv layers: {_listed(convs)}")


def check_guided_backprop(model: nn.Module, data: AnalysisData, sanity: bool = False):
    if not any(isinstance(m, nn.ReLU) for m in model.modules()):
        kinds = sorted({type(m).__name__ for m in model.modules()
                        if type(m).__module__.startswith("torch.nn.modules.activation")})
        raise UserError(f"guided-backprop changes how ReLU modules pass gradients back; this "
                        f"model has none (its activations: {', '.join(kinds) or 'none'}); "
                        "use saliency or integrated-gradients")


# --- figures ------------------------------------------------------------------------------

def _image(image: Tensor):
    """(C, H, W) in [0, 1] -> what imshow takes."""
    array = image.detach().float().clamp(0, 1).cpu().numpy()
    return array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)


def _heat(map_: Tensor):
    """|map| scaled to [0, 1] by its 99th percentile, so that one hot pixel does not wash out
    the rest."""
    magnitude = map_.detach().abs().float()
    top = torch.quantile(magnitude.flatten(), 0.99).item()
    return (magnitude / top).clamp(0, 1).numpy() if top > 0 else magnitude.numpy()


def _panel(ax, image=None, heat=None, title="", color="black"):
    if image is not None:
        ax.imshow(_image(image), cmap="gray" if image.shape[0] == 1 else None,
                  interpolation="nearest")
    if heat is not None:
        ax.imshow(_heat(heat), cmap="jet", vmin=0, vmax=1, alpha=0.5 if image is not None else 1,
                  interpolation="bilinear" if image is not None else "nearest")
    ax.set_title(title, fontsize=7, color=color)
    ax.axis("off")


def _caption(classes, label: int, probs: Tensor) -> tuple[str, str]:
    predicted = int(probs.argmax())
    text = f"{classes[label]} {probs[label]:.0%}"
    if predicted != label:
        return text + f"\nsaid {classes[predicted]} {probs[predicted]:.0%}", "red"
    return text, "black"


def attribution_figure(name: str, images: Tensor, maps: Tensor, labels: Tensor, probs: Tensor,
                       classes, per_row: int = 2):
    """For each image: the image (its class and the model's probability for it; in red with
    the model's class when it is wrong), the map, and the map over the image."""
    import matplotlib.pyplot as plt

    import cifarx.figures  # noqa: F401  (selects the Agg backend)

    n = len(images)
    rows = max(1, math.ceil(n / per_row))
    fig, axes = plt.subplots(rows, 3 * per_row, figsize=(3 * per_row * 1.5, rows * 1.6 + 0.5),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        text, color = _caption(classes, int(labels[i]), probs[i])
        row, col = divmod(i, per_row)
        _panel(axes[row, 3 * col], images[i], title=text, color=color)
        _panel(axes[row, 3 * col + 1], heat=maps[i], title=name)
        _panel(axes[row, 3 * col + 2], images[i], maps[i], title="overlay")
    fig.suptitle(f"{name}, for the true class: image | map | overlay", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / (rows * 1.6 + 0.5)))
    return fig


def adversarial_attribution_figure(name, images, adversarial, maps, adv_maps, adv_pred_maps,
                                   labels, adv_labels, probs, adv_probs, classes):
    """One row per pair: the original and its map for the true class; the adversarial image,
    its map for the true class and for the class the model now gives it."""
    import matplotlib.pyplot as plt

    import cifarx.figures  # noqa: F401

    n = len(images)
    fig, axes = plt.subplots(n, 5, figsize=(5 * 1.6, n * 1.7 + 0.6), squeeze=False)
    for i in range(n):
        y, a = int(labels[i]), int(adv_labels[i])
        text, color = _caption(classes, y, probs[i])
        _panel(axes[i, 0], images[i], title=text, color=color)
        _panel(axes[i, 1], images[i], maps[i], title=f"map: {classes[y]}")
        _panel(axes[i, 2], adversarial[i], color="red" if a != y else "black",
               title=f"adversarial: {classes[a]} {adv_probs[i][a]:.0%}")
        _panel(axes[i, 3], adversarial[i], adv_maps[i], title=f"map: {classes[y]}")
        _panel(axes[i, 4], adversarial[i], adv_pred_maps[i], title=f"map: {classes[a]}")
    fig.suptitle(f"{name}: original | its map | adversarial | its map for the true class | "
                 "for its new class", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (n * 1.7 + 0.6)))
    return fig


def sanity_figure(name: str, layers: list[str], rhos: list[Tensor], images: Tensor,
                  trained: Tensor, examples: list[Tensor], rows: list[int], stages: int = 6):
    """Top: the Spearman correlation with the trained model's maps (median and quartiles over
    the images) as the layers are randomized from the top; below, a few images (``rows`` of
    the N) with their trained map and maps at some of the steps."""
    import matplotlib.pyplot as plt

    import cifarx.figures  # noqa: F401

    count = min(stages, len(layers))  # the first and the last step among them
    shown = sorted({round(i * (len(layers) - 1) / max(1, count - 1)) for i in range(count)})
    n = len(images)
    fig = plt.figure(figsize=(max(8.0, 1.4 * (len(shown) + 2)), 3.4 + 1.6 * n))
    grid = fig.add_gridspec(1 + n, len(shown) + 2, height_ratios=[2.2] + [1] * n)
    ax = fig.add_subplot(grid[0, :])
    x = range(len(layers) + 1)
    medians = [1.0] + [float(r.median()) for r in rhos]
    low = [1.0] + [float(r.quantile(0.25)) for r in rhos]
    high = [1.0] + [float(r.quantile(0.75)) for r in rhos]
    ax.plot(x, medians, marker="o", ms=4, label="median over the images")
    ax.fill_between(x, low, high, alpha=0.25, label="quartiles")
    ax.axhline(SANITY_THRESHOLD, color="red", ls="--", lw=1,
               label=f"{SANITY_THRESHOLD}: the method passes when the last point is below")
    ax.set_xticks(x, ["trained"] + layers, rotation=45 if len(layers) < 12 else 90, ha="right",
                  fontsize=7)
    ax.set_xlabel("randomized from the top down to this layer")
    ax.set_ylabel("Spearman correlation with\nthe trained model's |map|")
    ax.set_ylim(min(-0.1, min(low) - 0.05), 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{name}: model-randomization test (Adebayo et al. 2018)")
    for i in range(n):
        _panel(fig.add_subplot(grid[1 + i, 0]), images[i], title="image")
        _panel(fig.add_subplot(grid[1 + i, 1]), heat=trained[i], title="trained")
        for j, stage in enumerate(shown):
            _panel(fig.add_subplot(grid[1 + i, 2 + j]), heat=examples[stage][i],
                   title=f"to {layers[stage]}: {float(rhos[stage][rows[i]]):.2f}")
    fig.tight_layout()
    return fig


# --- the whole test split -----------------------------------------------------------------

def confusion_matrix(model: nn.Module, data: AnalysisData) -> Findings:
    """Accuracy, loss and per-class accuracy on the test split, and its confusion matrix."""
    from cifarx.figures import confusion_matrix as draw
    from cifarx.inference.report import confusion

    report = confusion(data.test_logits, data.test_labels, data.classes)
    metrics = {"test/acc": report.accuracy, "test/loss": report.loss,
               **{f"test/acc/{name}": value for name, value in report.per_class.items()}}
    return Findings(
        figure=draw(report.matrix, data.classes, f"test accuracy {report.accuracy:.2%}"),
        metrics=metrics,
        files={"confusion_matrix.json": {"classes": list(data.classes),
                                         "matrix": report.matrix.tolist()}},
        summary=f"test accuracy {report.accuracy:.2%} (loss {report.loss:.3f})")


def per_class(model: nn.Module, data: AnalysisData) -> Findings:
    """Precision, recall and F1 of each class on the test split (scikit-learn)."""
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_fscore_support

    import cifarx.figures  # noqa: F401

    predicted = data.test_logits.argmax(1).numpy()
    k = len(data.classes)
    scores = precision_recall_fscore_support(data.test_labels.numpy(), predicted,
                                             labels=list(range(k)), zero_division=0)
    names = ("precision", "recall", "f1")
    metrics = {f"analysis/{what}/{c}": float(v)
               for what, values in zip(names, scores[:3]) for c, v in zip(data.classes, values)}
    metrics["analysis/f1_macro"] = float(scores[2].mean())
    fig, ax = plt.subplots(figsize=(max(7.0, 0.8 * k), 4))
    for i, (what, values) in enumerate(zip(names, scores[:3])):
        ax.bar([c + (i - 1) * 0.27 for c in range(k)], values, width=0.27, label=what)
    ax.set_xticks(range(k), data.classes, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, ncols=3)
    ax.set_title(f"per class on the test split; macro F1 {metrics['analysis/f1_macro']:.3f}")
    fig.tight_layout()
    table = {c: {"precision": float(p), "recall": float(r), "f1": float(f), "images": int(n)}
             for c, p, r, f, n in zip(data.classes, *scores)}
    worst = min(table, key=lambda c: table[c]["f1"])
    return Findings(figure=fig, metrics=metrics, files={"per_class.json": table},
                    summary=f"macro F1 {metrics['analysis/f1_macro']:.3f}; lowest F1: {worst} "
                            f"{table[worst]['f1']:.3f}")


def calibration(model: nn.Module, data: AnalysisData, bins: int = 15) -> Findings:
    """Reliability diagram and expected calibration error (Guo et al. 2017): the test images
    binned by the model's confidence, ECE = sum over bins of (share of images) x |accuracy -
    mean confidence|."""
    import matplotlib.pyplot as plt

    import cifarx.figures  # noqa: F401

    confidence, predicted = data.test_logits.softmax(1).max(1)
    correct = (predicted == data.test_labels).double()
    confidence = confidence.double()
    which = (confidence * bins).ceil().long().clamp(1, bins) - 1  # bin b holds (b/B, (b+1)/B]
    count = torch.bincount(which, minlength=bins).double()
    filled = count > 0
    accuracy = torch.bincount(which, correct, minlength=bins) / count.clamp_min(1)
    mean_conf = torch.bincount(which, confidence, minlength=bins) / count.clamp_min(1)
    gaps = (accuracy - mean_conf).abs()
    ece = float((count / count.sum() * gaps).sum())
    worst = float(gaps[filled].max())
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    edges = torch.linspace(0, 1, bins + 1)
    width = 1 / bins
    left.bar(edges[:-1][filled], accuracy[filled], width=width, align="edge", edgecolor="k",
             lw=0.5, label="accuracy")
    left.bar(edges[:-1][filled], (mean_conf - accuracy)[filled], bottom=accuracy[filled],
             width=width, align="edge", color="red", alpha=0.3, label="gap to confidence")
    left.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    left.set_xlabel("confidence (probability of the predicted class)")
    left.set_ylabel("accuracy")
    left.set_title(f"reliability: ECE {ece:.2%}, largest gap {worst:.2%}")
    left.legend(fontsize=8)
    right.bar(edges[:-1], count / count.sum(), width=width, align="edge", edgecolor="k", lw=0.5)
    right.axvline(float(confidence.mean()), color="red", ls="--",
                  label=f"mean confidence {float(confidence.mean()):.2%}")
    right.axvline(float(correct.mean()), color="green", ls="--",
                  label=f"accuracy {float(correct.mean()):.2%}")
    right.set_xlabel("confidence")
    right.set_ylabel("share of the test images")
    right.legend(fontsize=8)
    fig.tight_layout()
    return Findings(
        figure=fig,
        metrics={"analysis/ece": ece, "analysis/calibration/max_gap": worst,
                 "analysis/calibration/mean_conf": float(confidence.mean())},
        files={"calibration.json": {"bins": bins, "count": count.long().tolist(),
                                    "accuracy": accuracy.tolist(),
                                    "confidence": mean_conf.tolist(), "ece": ece}},
        summary=f"ECE {ece:.2%} ({bins} bins); mean confidence {float(confidence.mean()):.2%}, "
                f"accuracy {float(correct.mean()):.2%}")


def errors(model: nn.Module, data: AnalysisData) -> Findings:
    """The test images the model gets wrong with the highest confidence (as many as
    ``--images``), with both classes and probabilities; the figure shows the first 20."""
    import matplotlib.pyplot as plt

    import cifarx.figures  # noqa: F401

    probs = data.test_logits.softmax(1)
    confidence, predicted = probs.max(1)
    wrong = (predicted != data.test_labels).nonzero().flatten()
    worst = wrong[confidence[wrong].argsort(descending=True, stable=True)][:len(data.images)]
    rows = [{"index": int(i), "label": data.classes[data.test_labels[i]],
             "predicted": data.classes[predicted[i]], "confidence": float(confidence[i]),
             "true_probability": float(probs[i, data.test_labels[i]])} for i in worst]
    shown = worst[:GALLERY]
    columns = 5
    lines = max(1, math.ceil(len(shown) / columns))
    fig, axes = plt.subplots(lines, columns, figsize=(columns * 2, lines * 2.3 + 0.4),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row, i in zip(axes.flat, rows, shown):
        _panel(ax, data.test_images[i].float() / 255,
               title=f"#{row['index']} said {row['predicted']} {row['confidence']:.0%}\n"
                     f"is {row['label']} {row['true_probability']:.0%}", color="red")
    fig.suptitle(f"the {len(shown)} most confident of {len(wrong):,} mistakes on the test split",
                 fontsize=10)
    fig.tight_layout()
    sure = float((confidence[wrong] >= 0.9).float().mean()) if len(wrong) else 0.0
    return Findings(
        figure=fig, metrics={"analysis/errors": len(wrong), "analysis/errors/confident": sure},
        files={"errors.json": rows},
        summary=f"{len(wrong):,} mistakes, {sure:.1%} of them with confidence >= 90%")


# --- features -----------------------------------------------------------------------------

def features(model: nn.Module, images: Tensor, layer: str = "") -> Tensor:
    """(N, D) features: what the network's last layer receives (or what module ``layer``
    outputs), feature maps averaged over their positions; on the CPU."""
    net = network(model)
    if layer:
        module = dict(net.named_modules()).get(layer)
        if module is None:
            raise OptionError("layer", f"the network has no module {layer!r}; its layers: "
                                       f"{_listed([n for n, _ in net.named_modules() if n])}")
    else:
        weighted = layers_of(net, (nn.Conv2d, nn.Linear))
        if not weighted:
            raise UserError("embedding: the network has no conv or linear layer; name one "
                            "with --analysis-opt embedding.layer=NAME")
        module = weighted[-1][1]
    found = torch.cat([output_of(model, module, x, inputs=not layer) for x in images.split(500)])
    return (found.mean((2, 3)) if found.dim() == 4 else found.flatten(1)).float().cpu()


def check_embedding(model: nn.Module, data: AnalysisData, k: int = 5, perplexity: float = 30.0,
                    layer: str = ""):
    if len(data.images) <= k:
        raise UserError(f"embedding: k-NN with k={k} needs more than {k} images; --images "
                        f"is {len(data.images)}")
    features(model, data.images[:2], layer)


def embedding(model: nn.Module, data: AnalysisData, k: int = 5, perplexity: float = 30.0,
              layer: str = "") -> Findings:
    """t-SNE of the features, coloured by class, and the leave-one-out k-NN accuracy of the
    features (each image classified by the majority class of its k nearest other images)."""
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.manifold import TSNE
    from sklearn.neighbors import KNeighborsClassifier

    import cifarx.figures  # noqa: F401

    found = features(model, data.images, layer).double().numpy()
    labels = data.labels.cpu().numpy()
    n, classes = len(labels), len(data.classes)
    _, neighbours = KNeighborsClassifier(k).fit(found, labels).kneighbors()  # self left out
    votes = np.stack([np.bincount(row, minlength=classes) for row in labels[neighbours]])
    knn = float((votes.argmax(1) == labels).mean())
    used = min(perplexity, (n - 1) / 3)  # t-SNE needs perplexity < N; (N - 1) / 3 is usual
    points = TSNE(2, perplexity=used, init="pca", random_state=data.seed).fit_transform(found)
    fig, ax = plt.subplots(figsize=(7.5, 6))
    for c, name in enumerate(data.classes):
        mine = labels == c
        if mine.any():
            ax.scatter(points[mine, 0], points[mine, 1], s=12, color=plt.get_cmap("tab10")(c % 10),
                       label=name, alpha=0.8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=8, markerscale=1.5, loc="best")
    where = layer or "the last layer's input"
    ax.set_title(f"t-SNE of {where} ({found.shape[1]} features, {n} test images); "
                 f"{k}-NN accuracy {knn:.1%}", fontsize=10)
    fig.tight_layout()
    return Findings(
        figure=fig, metrics={"analysis/knn_acc": knn},
        files={"embedding/embedding.pt": {"points": torch.from_numpy(points).float(),
                                          "features": torch.from_numpy(found).float(),
                                          "indices": data.indices,
                                          "labels": data.labels.cpu()}},
        summary=f"{k}-NN accuracy of {found.shape[1]} features of {where}: {knn:.1%} "
                f"({n} images)", resolved={} if layer else {"layer": "the last layer's input"})


def first_conv(model: nn.Module, layer: str = "") -> tuple[str, nn.Module]:
    if layer:
        name, module = feature_layer(model, layer)
        if not isinstance(module, nn.Conv2d):
            raise OptionError("layer", f"{name} is a {type(module).__name__}, not a Conv2d")
        return name, module
    convs = layers_of(network(model), (nn.Conv2d,))
    if not convs:
        raise UserError("filters: the network has no Conv2d layer")
    return convs[0]


def check_filters(model: nn.Module, data: AnalysisData, layer: str = ""):
    first_conv(model, layer)


def filters(model: nn.Module, data: AnalysisData, layer: str = "") -> Findings:
    """The first conv layer's filters as images, each scaled to fill [0, 1] (RGB when it
    reads three channels, else the mean over the channels it reads, in grey)."""
    import matplotlib.pyplot as plt

    import cifarx.figures  # noqa: F401

    name, conv = first_conv(model, layer)
    weight = conv.weight.detach().float().cpu()
    if weight.shape[1] != 3:
        weight = weight.mean(1, keepdim=True)
    low = weight.amin((1, 2, 3), keepdim=True)
    high = weight.amax((1, 2, 3), keepdim=True)
    shown = (weight - low) / (high - low).clamp_min(1e-12)
    columns = math.ceil(math.sqrt(len(shown)))
    lines = math.ceil(len(shown) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(columns * 0.9, lines * 0.9 + 0.5),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image in zip(axes.flat, shown):
        _panel(ax, image)
    fig.suptitle(f"{name}: {len(shown)} filters {tuple(conv.weight.shape[1:])}", fontsize=9)
    fig.tight_layout()
    return Findings(figure=fig, summary=f"{len(shown)} filters of {name}",
                    resolved={} if layer else {"layer": name})


# --- registration -------------------------------------------------------------------------

def _attribution(name: str, maps: Callable[..., Tensor]):
    def analyze(model, data, sanity=False, **values):
        return analyze_attribution(name, maps, model, data, sanity, **values)
    return analyze


@hookimpl
def register_analyses(register):
    whole = "; on the whole test split"
    register(Analysis(name="confusion-matrix", analyze=confusion_matrix,
                      summary="test accuracy, per-class accuracy, the confusion matrix" + whole))
    register(Analysis(name="per-class", analyze=per_class,
                      summary="precision, recall and F1 of each class (scikit-learn)" + whole))
    register(Analysis(name="calibration", analyze=calibration,
                      options={"bins": Option(15, int, range="[2, 100]",
                                              help="confidence bins")},
                      summary="reliability diagram and expected calibration error "
                              "(analysis/ece)" + whole))
    register(Analysis(name="errors", analyze=errors,
                      summary="gallery of the most confident mistakes on the test split, with "
                              "both classes and probabilities; --images of them in errors.json"))
    register(Analysis(name="saliency", analyze=_attribution("saliency", saliency_maps),
                      options={"sanity": SANITY}, adversarial=True,
                      summary="max over channels of |d logit_y / d pixel| (Captum Saliency); "
                              "attributions/saliency.pt"))
    register(Analysis(name="guided-backprop",
                      analyze=_attribution("guided-backprop", guided_backprop_maps),
                      check=check_guided_backprop, options={"sanity": SANITY}, adversarial=True,
                      summary="guided backpropagation (Captum), max over channels of its "
                              "magnitude; attributions/guided-backprop.pt"))
    register(Analysis(name="grad-cam", analyze=_attribution("grad-cam", grad_cam_maps),
                      check=check_grad_cam, adversarial=True,
                      options={"layer": Option("", str, help="the module whose feature maps "
                                                             "it weighs (default: the last "
                                                             "Conv2d)"),
                               "sanity": SANITY},
                      summary="Grad-CAM (Captum LayerGradCam) of the last conv layer, upsampled "
                              "to the image; attributions/grad-cam.pt"))
    register(Analysis(name="integrated-gradients",
                      analyze=_attribution("integrated-gradients", integrated_gradients_maps),
                      adversarial=True,
                      options={"steps": Option(50, int, range="[2, 1000]",
                                               help="points on the path (Gauss-Legendre)"),
                               "baseline": Option("black", choices=("black", "gray"),
                                                  help="the image the path starts from"),
                               "sanity": SANITY,
                               "sanity_steps": Option(16, int, range="[2, 1000]",
                                                      help="points on the path in the "
                                                           "randomization test (its maps are "
                                                           "compared by rank)")},
                      summary="integrated gradients from a black image (Captum), summed over "
                              "channels; attributions/integrated-gradients.pt"))
    register(Analysis(name="embedding", analyze=embedding, check=check_embedding,
                      options={"k": Option(5, int, range="[1, 100]", help="neighbours for the "
                                                                          "k-NN accuracy"),
                               "perplexity": Option(30.0, float, range="[2, 100]",
                                                    help="t-SNE perplexity (at most (N-1)/3 "
                                                         "is used)"),
                               "layer": Option("", str, help="the module whose output is "
                                                             "embedded (default: what the last "
                                                             "layer receives)")},
                      summary="t-SNE of the penultimate layer's features of the chosen images, "
                              "coloured by class; k-NN accuracy (analysis/knn_acc)"))
    register(Analysis(name="filters", analyze=filters, check=check_filters,
                      options={"layer": Option("", str, help="a Conv2d (default: the first)")},
                      summary="the first conv layer's filters as images"))
