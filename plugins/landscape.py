"""The loss surface around a trained model: its landscape along random directions and its
curvature (analyses).

- ``loss-landscape``: the test loss at ``w + a*d1 (+ b*d2)`` over a grid of (a, b), with ``d1``
  and ``d2`` random directions normalized filter by filter to the weights' own norms (Li et al.
  2018, "Visualizing the Loss Landscape of Neural Nets"): without that normalization a net's
  scale invariance (BatchNorm) makes sharp and flat minima incomparable. Bias and BatchNorm
  parameters get no direction, as in the paper. Figure: contour and surface (2-D) or a curve.
- ``hessian``: the Hessian's top eigenvalues by power iteration on Hessian-vector products
  (double backpropagation; deflation for the next ones) and its trace by Hutchinson's
  estimator (the mean of z'Hz over Rademacher vectors z).

Both evaluate the cross-entropy on the first ``images`` test images, in float32, with BatchNorm
in eval mode (the model as it predicts), on a copy of the model.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from torch import Tensor, nn

from cifarx import Analysis, AnalysisData, Findings, Option, hookimpl

BATCH = 500  # images per forward pass


def _subset(data: AnalysisData, images: int) -> tuple[Tensor, Tensor]:
    device = data.images.device
    x = data.test_images[:images].to(device, torch.float32) / 255
    return x, data.test_labels[:images].to(device)


def mean_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The mean cross-entropy over ``x`` in batches (a tensor that keeps its graph)."""
    total = x.new_zeros(())
    for start in range(0, len(x), BATCH):
        logits = model(x[start:start + BATCH])
        total = total + nn.functional.cross_entropy(logits, y[start:start + BATCH],
                                                    reduction="sum")
    return total / len(x)


def _weights(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters()]


def filter_normalized(params: list[Tensor], generator: torch.Generator) -> list[Tensor]:
    """A random direction, one tensor per parameter: Gaussian, then each filter (each slice
    along the first dimension of a weight with 2+ dimensions) scaled to the norm of the same
    filter of the weights; zero for biases and BatchNorm (1-D) parameters."""
    direction = []
    for p in params:
        if p.dim() <= 1:
            direction.append(torch.zeros_like(p))
            continue
        d = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
        d_norm = d.flatten(1).norm(dim=1).clamp_min(1e-12)
        w_norm = p.detach().flatten(1).norm(dim=1)
        direction.append(d * (w_norm / d_norm).view(-1, *[1] * (p.dim() - 1)))
    return direction


def surface(model: nn.Module, x: Tensor, y: Tensor, directions: list[list[Tensor]],
            coordinates: Tensor) -> Tensor:
    """The loss at ``w + sum_k c_k d_k`` for each row ``c`` of ``coordinates``."""
    params = _weights(model)
    origin = [p.detach().clone() for p in params]
    losses = []
    with torch.no_grad():
        for c in coordinates.tolist():
            for p, w, *ds in zip(params, origin, *directions):
                p.copy_(w + sum(ck * dk for ck, dk in zip(c, ds)))
            losses.append(mean_loss(model, x, y).item())
        for p, w in zip(params, origin):
            p.copy_(w)
    return torch.tensor(losses)


def _nonconvex_share(grid: Tensor, step: float) -> float:
    """The share of interior grid points where the finite-difference Hessian of the 2-D slice
    has a clearly negative eigenvalue (below -1e-3 of the largest magnitude)."""
    z = grid.double()
    dxx = (z[2:, 1:-1] - 2 * z[1:-1, 1:-1] + z[:-2, 1:-1]) / step ** 2
    dyy = (z[1:-1, 2:] - 2 * z[1:-1, 1:-1] + z[1:-1, :-2]) / step ** 2
    dxy = (z[2:, 2:] - z[2:, :-2] - z[:-2, 2:] + z[:-2, :-2]) / (4 * step ** 2)
    mean, diff = (dxx + dyy) / 2, torch.sqrt(((dxx - dyy) / 2) ** 2 + dxy ** 2)
    low, high = mean - diff, (mean + diff).abs().max()
    return float((low < -1e-3 * high).double().mean()) if low.numel() else math.nan


def loss_landscape(model: nn.Module, data: AnalysisData, grid: int = 17, span: float = 1.0,
                   dims: int = 2, images: int = 256, seed: int = -1) -> Findings:
    net = copy.deepcopy(model).float().eval()
    x, y = _subset(data, images)
    generator = torch.Generator().manual_seed(data.seed if seed < 0 else seed)
    params = _weights(net)
    directions = [filter_normalized(params, generator) for _ in range(dims)]
    axis = torch.linspace(-span, span, grid)
    if dims == 1:
        coordinates = axis.view(-1, 1)
    else:
        a, b = torch.meshgrid(axis, axis, indexing="ij")
        coordinates = torch.stack([a.flatten(), b.flatten()], 1)
    losses = surface(net, x, y, directions, coordinates)
    center = mean_loss(net, x, y).item()
    near = coordinates.abs().max(1).values <= span / 2 + 1e-9
    rise = float(losses[near].max() - center)
    metrics = {"analysis/landscape_center_loss": center,
               "analysis/landscape_rise": rise,
               "analysis/landscape_max_loss": float(losses.max())}
    if dims == 2:
        surface_grid = losses.view(grid, grid)
        metrics["analysis/landscape_nonconvex_share"] = _nonconvex_share(
            surface_grid, 2 * span / (grid - 1))
    figure = _landscape_figure(axis, losses, dims, grid)
    summary = (f"loss {center:.3f} at the model, up to {center + rise:.3f} within "
               f"{span / 2:g} of it along {dims} filter-normalized direction(s)")
    if dims == 2:
        summary += f"; non-convex at {metrics['analysis/landscape_nonconvex_share']:.0%} of it"
    return Findings(figure=figure, metrics=metrics, summary=summary, files={
        "landscape/landscape.json": {"axis": axis.tolist(), "dims": dims, "images": len(x),
                                     "seed": data.seed if seed < 0 else seed,
                                     "loss": losses.view(*(grid,) * dims).tolist(),
                                     "center_loss": center}})


def _landscape_figure(axis: Tensor, losses: Tensor, dims: int, grid: int):
    import cifarx.figures  # noqa: F401  (selects the Agg backend)
    import matplotlib.pyplot as plt

    if dims == 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(axis, losses)
        ax.set_xlabel("a (filter-normalized direction)")
        ax.set_ylabel("test loss")
        ax.grid(alpha=0.3)
        return fig
    z = losses.view(grid, grid).numpy()
    a, b = torch.meshgrid(axis, axis, indexing="ij")
    fig = plt.figure(figsize=(11, 4.5))
    left = fig.add_subplot(1, 2, 1)
    levels = sorted(set(float(v) for v in torch.quantile(losses, torch.linspace(0, 1, 25))))
    contour = left.contour(a.numpy(), b.numpy(), z, levels=levels if len(levels) > 1 else 10,
                           cmap="viridis")
    left.clabel(contour, fontsize=6, fmt="%.2g")
    left.plot(0, 0, "r+", ms=10)
    left.set_xlabel("a")
    left.set_ylabel("b")
    left.set_title("test loss, contours")
    right = fig.add_subplot(1, 2, 2, projection="3d")
    right.plot_surface(a.numpy(), b.numpy(), z, cmap="viridis", linewidth=0)
    right.set_title("surface")
    fig.tight_layout()
    return fig


# -- curvature ----------------------------------------------------------------------------------

def hvp(loss_of: Callable[[], Tensor], params: list[Tensor]) -> Callable[[list[Tensor]], list]:
    """Hessian-vector products of ``loss_of()`` with respect to ``params``: the gradient is
    built once with its graph, then each product is one more backward pass."""
    grads = torch.autograd.grad(loss_of(), params, create_graph=True)

    def product(vector: list[Tensor]) -> list[Tensor]:
        dot = sum((g * v).sum() for g, v in zip(grads, vector))
        return [h.detach() for h in torch.autograd.grad(dot, params, retain_graph=True)]

    return product


def _dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def _normalized(v: list[Tensor]) -> list[Tensor]:
    norm = torch.sqrt(_dot(v, v)).clamp_min(1e-30)
    return [x / norm for x in v]


def top_eigenvalues(product, params: list[Tensor], k: int = 1, iters: int = 20,
                    tol: float = 1e-4, generator: torch.Generator | None = None
                    ) -> tuple[list[float], list[list[float]]]:
    """The ``k`` eigenvalues of largest magnitude by power iteration, each deflated against
    the ones before (Gram-Schmidt); also each one's estimate per iteration."""
    found: list[list[Tensor]] = []
    values, traces = [], []
    for _ in range(k):
        v = _normalized([torch.randn(p.shape, generator=generator).to(p) for p in params])
        value, trace = 0.0, []
        for _ in range(iters):
            for u in found:
                v = [a - _dot(v, u) * b for a, b in zip(v, u)]
            v = _normalized(v)
            hv = product(v)
            new = float(_dot(hv, v))
            trace.append(new)
            v = _normalized(hv)
            if abs(new - value) <= tol * (abs(value) + 1e-12):
                value = new
                break
            value = new
        found.append(v)
        values.append(value)
        traces.append(trace)
    return values, traces


def hutchinson_trace(product, params: list[Tensor], samples: int = 20,
                     generator: torch.Generator | None = None) -> tuple[float, float]:
    """The trace of the Hessian, E[z'Hz] over Rademacher z: (mean, its standard error)."""
    estimates = []
    for _ in range(samples):
        z = [torch.randint(0, 2, p.shape, generator=generator).to(p) * 2 - 1 for p in params]
        estimates.append(float(_dot(product(z), z)))
    mean = sum(estimates) / len(estimates)
    if len(estimates) < 2:
        return mean, math.nan
    var = sum((e - mean) ** 2 for e in estimates) / (len(estimates) - 1)
    return mean, math.sqrt(var / len(estimates))


def hessian(model: nn.Module, data: AnalysisData, top: int = 1, iters: int = 20,
            samples: int = 20, images: int = 256) -> Findings:
    net = copy.deepcopy(model).float().eval()
    for p in net.parameters():
        p.requires_grad_(True)
    params = [p for p in net.parameters()]
    x, y = _subset(data, images)
    product = hvp(lambda: mean_loss(net, x, y), params)
    generator = torch.Generator().manual_seed(data.seed)
    values, traces = top_eigenvalues(product, params, top, iters, generator=generator)
    trace, error = hutchinson_trace(product, params, samples, generator)
    metrics = {f"analysis/hessian_eig_{i + 1}": v for i, v in enumerate(values)}
    metrics.update({"analysis/hessian_top_eig": values[0], "analysis/hessian_trace": trace,
                    "analysis/hessian_trace_stderr": error})
    import cifarx.figures  # noqa: F401
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, t in enumerate(traces):
        ax.plot(range(1, len(t) + 1), t, marker="o", ms=3, label=f"eigenvalue {i + 1}")
    ax.set_xlabel("power iteration")
    ax.set_ylabel("Rayleigh quotient v'Hv")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"Hessian of the test loss ({len(x)} images); trace {trace:.3g} +- {error:.2g}")
    fig.tight_layout()
    return Findings(figure=fig, metrics=metrics,
                    summary=f"top Hessian eigenvalue {values[0]:.4g}, trace {trace:.4g} "
                            f"(+- {error:.2g}, {samples} Hutchinson samples)")


@hookimpl
def register_analyses(register):
    images = Option(256, int, range="[1, 10000]", help="test images the loss is computed on "
                                                       "(the first ones of the test split)")
    register(Analysis(
        name="loss-landscape", analyze=loss_landscape,
        options={"grid": Option(17, int, range="[3, 101]", help="points per direction"),
                 "span": Option(1.0, float, range="(0, 10]",
                                help="the grid covers [-span, span] along each direction"),
                 "dims": Option(2, int, choices=(1, 2), help="1-D curve or 2-D surface"),
                 "images": images,
                 "seed": Option(-1, int, range="[-1, 1000000]",
                                help="seed of the random directions (-1: --seed)")},
        summary="the test loss along 1 or 2 random filter-normalized directions (Li et al. "
                "2018): contour and surface; rise near the model and non-convex share"))
    register(Analysis(
        name="hessian", analyze=hessian,
        options={"top": Option(1, int, range="[1, 10]", help="eigenvalues to find"),
                 "iters": Option(20, int, range="[1, 1000]", help="power iterations at most"),
                 "samples": Option(20, int, range="[1, 1000]",
                                   help="Hutchinson samples for the trace"),
                 "images": images},
        summary="top Hessian eigenvalue(s) by power iteration on Hessian-vector products and "
                "the trace by Hutchinson's estimator"))
