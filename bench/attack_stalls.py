"""ifgsm stalls: which signed-gradient update gets every image to a wrong class at >= 99%.

The assignment's iterated FGSM steps x <- clip(x + eps * sign(grad_x L), 0, 1) with eps = 1/255
until some wrong class has probability >= 0.99, at most 200 steps. The update used to ascend
L = CE(x, y) throughout; once p(true) is ~0 that gradient mostly pushes the true logit further
down and raises the wrong classes in proportion to their probability, so an image can stall split
between two wrong classes while its pixels sit at the clamp (project issue 9). This benchmark runs
the old update and candidates on the same images and prints, per (model, update): the per-image
failure rate, mean steps and mean L-inf size of the change (successful images only).

Images: for each model, the first ``--count`` test images it classifies correctly, in the random
order fixed by ``--seed`` (as ``cifarx attack --count N --seed S`` picks them). All of a model's
images are attacked at once (float32, eval mode, parameters without gradient, on the CPU); each
image stops when it reaches the goal. ``plugin`` is whatever ``cifarx.plugins.attacks.iterate``
does now (to check that the code and the benchmark agree).

``--per-class N --attack-seeds 0,1,2,3`` adds the check that mimics ``cifarx attack`` defaults:
the first N correctly classified test images per class for each seed (no replacement of the
failures), attacked with the plugin's built ``ifgsm``; it prints how many reach the goal.

The candidates (``--updates all``): ``ce`` (the old update); ``top-T`` (CE until some wrong
class has p >= T, then log p of that class: the plugin's rule is ``top-0.7``);
``misclassified-top`` and ``switch-P`` (switch once misclassified, or once p(true) < P);
``top-always``; ``margin`` (CW z_t - z_y); ``ce-then-cw-top``; ``sticky-top`` (no re-choice);
``wrong-share``; ``stall-K`` (switch when CE has not raised the top wrong class for K steps);
``power-k`` and ``ce-then-power-k`` (soft choice: (1/k) log sum_{j != y} p_j^k).

    python bench/attack_stalls.py MODEL.pt [MODEL.pt ...] [--data-dir /work/data/cifar]
        [--count 500] [--seed 0] [--updates ce,plugin,top-0.5,...|all] [--threads 2]
        [--show-failures] [--per-class 2 --attack-seeds 0,1,2,3] [--no-table]

Models are whole pickled modules (``torch.save(model, path)`` of
``cifarx.tracking.models.load_model``); the script uses no CLI, engine or tracking code, only torch
and the model's own classes.
"""

from __future__ import annotations

import argparse
import pickle
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --- data and selection ----------------------------------------------------------------------


def load_test(data_dir: str) -> tuple[Tensor, Tensor]:
    """CIFAR-10's test batch as uint8 (10000, 3, 32, 32) images and int64 labels."""
    root = Path(data_dir).expanduser()
    path = root / "cifar-10-batches-py" / "test_batch"
    if not path.is_file():
        path = root / "test_batch"
    with open(path, "rb") as f:
        content = pickle.load(f, encoding="bytes")
    images = torch.from_numpy(content[b"data"].reshape(-1, 3, 32, 32).copy())
    return images, torch.tensor(content[b"labels"], dtype=torch.int64)


@torch.no_grad()
def predictions(model: nn.Module, images: Tensor, batch: int = 1000) -> Tensor:
    return torch.cat([model(part.float().div(255)).argmax(1) for part in images.split(batch)])


def choose(predicted: Tensor, labels: Tensor, seed: int, count: int | None = None,
           per_class: int | None = None) -> Tensor:
    """As ``cifarx.inference.adversarial.choose``: correctly classified images in a seeded random
    order; the first ``count``, or the first ``per_class`` of each class; sorted by label
    (stable)."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    candidates = order[(predicted == labels)[order]]
    if per_class is not None:
        chosen = torch.cat([candidates[labels[candidates] == c][:per_class]
                            for c in range(int(labels.max()) + 1)])
    else:
        chosen = candidates[:count]
    return chosen[torch.sort(labels[chosen], stable=True).indices]


def prepare(path: str) -> nn.Module:
    """As ``cifarx.inference.adversarial.for_attack``: eval mode, no parameter gradients,
    channels-last."""
    model = torch.load(path, weights_only=False, map_location="cpu")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(memory_format=torch.channels_last)


# --- updates -----------------------------------------------------------------------------------
# Each returns, per image, the objective the step ascends; ``logits`` are those of the images
# still going, ``labels`` their true classes, ``state`` a dict of per-image tensors (the update
# may keep its own there, aligned with the images still going).


def top_wrong(logits: Tensor, labels: Tensor) -> Tensor:
    """The most likely wrong class of each image."""
    return logits.detach().scatter(1, labels[:, None], -torch.inf).argmax(1)


def gather(t: Tensor, idx: Tensor) -> Tensor:
    return t.gather(1, idx[:, None]).squeeze(1)


def ce(logits, labels, state):
    """The old update: ascend CE(x, y) all along."""
    return F.cross_entropy(logits, labels, reduction="none")


def switch_when(threshold: float):
    """CE(x, y) while p(true) >= threshold, then ascend log p of the top wrong class (chosen
    again at each step). threshold 0.5 (~ once misclassified)."""
    def update(logits, labels, state):
        logp = logits.log_softmax(1)
        late = gather(logp, labels).detach().exp() < threshold
        return torch.where(late, gather(logp, top_wrong(logits, labels)), -gather(logp, labels))
    return update


def majority(threshold: float):
    """CE(x, y) until some wrong class has probability >= threshold, then ascend log p of the
    top wrong class (chosen again at each step)."""
    def update(logits, labels, state):
        logp = logits.log_softmax(1)
        t = top_wrong(logits, labels)
        late = gather(logp, t).detach().exp() >= threshold
        return torch.where(late, gather(logp, t), -gather(logp, labels))
    return update


def stall(patience: int):
    """CE(x, y) until the image's top wrong-class probability has not risen for ``patience``
    steps (CE stalls), then, for good, ascend log p of the top wrong class."""
    def update(logits, labels, state):
        logp = logits.log_softmax(1)
        t = top_wrong(logits, labels)
        pt = gather(logp, t).detach().exp()
        better = pt > state["best"]
        state["best"] = torch.maximum(state["best"], pt)
        state["age"] = torch.where(better, 0, state["age"] + 1)
        state["switched"] |= state["age"] >= patience
        return torch.where(state["switched"], gather(logp, t), -gather(logp, labels))
    return update


def misclassified_top(logits, labels, state):
    """CE(x, y) while the image is classified correctly, then log p(top wrong class)."""
    logp = logits.log_softmax(1)
    late = logits.detach().argmax(1) != labels
    return torch.where(late, gather(logp, top_wrong(logits, labels)), -gather(logp, labels))


def top_always(logits, labels, state):
    """log p(top wrong class) from the first step."""
    return gather(logits.log_softmax(1), top_wrong(logits, labels))


def margin(logits, labels, state):
    """CW margin: z_t - z_y with t the top wrong class, from the first step."""
    return gather(logits, top_wrong(logits, labels)) - gather(logits, labels)


def ce_then_margin_top(logits, labels, state):
    """CE(x, y) while correct; then z_t - max_{j != t} z_j (t the top wrong class): pushes t
    above its strongest rival only."""
    t = top_wrong(logits, labels)
    late = logits.detach().argmax(1) != labels
    rival = gather(logits, logits.detach().scatter(1, t[:, None], -torch.inf).argmax(1))
    return torch.where(late, gather(logits, t) - rival,
                       F.cross_entropy(logits, labels, reduction="none"))


def sticky_top(logits, labels, state):
    """CE(x, y) while correct; then log p of the wrong class that was on top when the image was
    first misclassified (never re-chosen)."""
    logp = logits.log_softmax(1)
    late = logits.detach().argmax(1) != labels
    aim = state["aim"]
    fresh = late & (aim < 0)
    aim[fresh] = top_wrong(logits, labels)[fresh]
    return torch.where(late, gather(logp, aim.clamp(min=0)), -gather(logp, labels))


def p_wrong_top(logits, labels, state):
    """CE(x, y) while p(true) >= 0.01, then z_t - logsumexp_{j != y} z_j: the top wrong
    class's share among the wrong classes (y's logit is left alone: p(true) is already ~0)."""
    logp = logits.log_softmax(1)
    t = top_wrong(logits, labels)
    wrong = logits.scatter(1, labels[:, None], -torch.inf)
    share = gather(logits, t) - wrong.logsumexp(1)
    late = gather(logp, labels).detach().exp() < 0.01
    return torch.where(late, share, -gather(logp, labels))


def power(k: float, after_misclassified: bool = False):
    """(1/k) log sum_{j != y} p_j^k: k = 1 is CE(x, y)'s direction (the wrong classes' total),
    k -> inf is log p(top wrong class); in between, its gradient in the logits is q - p with
    q_j ~ p_j^k over the wrong classes: the likelier wrong classes rise, without a hard pick.
    ``after_misclassified``: CE(x, y) while the image is still classified correctly."""
    def update(logits, labels, state):
        logp = logits.log_softmax(1)
        f = (k * logp.scatter(1, labels[:, None], -torch.inf)).logsumexp(1) / k
        if not after_misclassified:
            return f
        late = logits.detach().argmax(1) != labels
        return torch.where(late, f, -gather(logp, labels))
    return update


UPDATES = {
    "ce": ce,
    "misclassified-top": misclassified_top,
    "switch-0.5": switch_when(0.5),
    "switch-0.1": switch_when(0.1),
    "switch-0.01": switch_when(0.01),
    "switch-1e-3": switch_when(1e-3),
    "switch-1e-4": switch_when(1e-4),
    "switch-1e-5": switch_when(1e-5),
    "top-0.3": majority(0.3),
    "top-0.5": majority(0.5),
    "top-0.6": majority(0.6),
    "top-0.7": majority(0.7),
    "top-0.8": majority(0.8),
    "top-0.9": majority(0.9),
    "stall-1": stall(1),
    "stall-3": stall(3),
    "stall-10": stall(10),
    "power-2": power(2),
    "power-3": power(3),
    "power-5": power(5),
    "ce-then-power-2": power(2, True),
    "ce-then-power-3": power(3, True),
    "ce-then-power-5": power(5, True),
    "top-always": top_always,
    "margin": margin,
    "ce-then-cw-top": ce_then_margin_top,
    "sticky-top": sticky_top,
    "wrong-share": p_wrong_top,
}


def reached(logits: Tensor, labels: Tensor, confidence: float) -> Tensor:
    probs = logits.detach().float().softmax(1)
    return probs.scatter(1, labels[:, None], 0.0).amax(1) >= confidence


def run_update(update, model: nn.Module, x: Tensor, labels: Tensor, eps: float,
               confidence: float, max_steps: int) -> tuple[Tensor, Tensor, Tensor]:
    """Batched signed-gradient ascent of ``update``; each image stops on its own.
    (images, steps, success), as the plugin's ``iterate``."""
    n = len(x)
    x = x.detach().clone()
    steps = torch.zeros(n, dtype=torch.long)
    success = torch.zeros(n, dtype=torch.bool)
    active = torch.arange(n)
    state = {"aim": torch.full((n,), -1, dtype=torch.long), "best": torch.zeros(n),
             "age": torch.zeros(n, dtype=torch.long), "switched": torch.zeros(n, dtype=torch.bool)}
    for step in range(max_steps + 1):
        with torch.set_grad_enabled(step < max_steps):
            xa = x[active].requires_grad_(step < max_steps)
            logits = model(xa)
        done = reached(logits, labels[active], confidence)
        success[active] = done
        going = ~done
        if step == max_steps or not going.any():
            break
        sub = {k: v[active[going]] for k, v in state.items()}
        objective = update(logits[going], labels[active][going], sub).sum()
        for k, v in sub.items():
            state[k][active[going]] = v
        (grad,) = torch.autograd.grad(objective, xa)
        active = active[going]
        x[active] = (xa.detach()[going] + eps * grad[going].sign()).clamp_(0, 1)
        steps[active] += 1
    return x, steps, success


def plugin_update():
    """The plugin's ``iterate`` (untargeted), or None when it cannot be imported now."""
    try:
        from cifarx.plugins.attacks import iterate
    except Exception as exc:  # the plugins may be mid-edit
        print(f"(plugin iterate not importable: {type(exc).__name__}: {exc})")
        return None
    return lambda model, x, labels, eps, confidence, max_steps: iterate(
        model, x, labels, None, eps, confidence, max_steps)


def fraction(text: str) -> float:
    if "/" in text:
        a, b = text.split("/")
        return float(a) / float(b)
    return float(text)


def summary(name: str, update: str, x0: Tensor, adv: Tensor, steps: Tensor, success: Tensor,
            seconds: float) -> str:
    n = len(x0)
    linf = (adv - x0).abs().flatten(1).amax(1)
    ok = success
    mean_steps = steps[ok].float().mean().item() if ok.any() else float("nan")
    mean_linf = linf[ok].mean().item() * 255 if ok.any() else float("nan")
    failed = int((~ok).sum())
    return (f"{name:<16} {update:<18} {failed:>5}/{n:<4} {100 * failed / n:6.2f}%"
            f" {mean_steps:9.2f} {mean_linf:10.2f} {steps.float().mean().item():10.2f}"
            f" {int(((steps > 100) | ~ok).sum()):>5} {seconds:7.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="saved models (torch.save of the whole module)")
    parser.add_argument("--data-dir", default="/work/data/cifar")
    parser.add_argument("--count", type=int, default=500, help="images per model")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image order")
    parser.add_argument("--updates", default="ce,plugin",
                        help=f"comma list of: plugin, all, {', '.join(UPDATES)}")
    parser.add_argument("--eps", type=fraction, default=1 / 255)
    parser.add_argument("--confidence", type=float, default=0.99)
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--per-class", type=int, help="also run the per-class check")
    parser.add_argument("--attack-seeds", default="0,1,2,3", help="seeds of the per-class check")
    parser.add_argument("--no-table", action="store_true", help="only the per-class check")
    parser.add_argument("--show-failures", action="store_true",
                        help="list the failed images (index in the set) and where they ended")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.updates.split(",")
    if "all" in names:
        names = [n for n in names if n != "all"] + [n for n in UPDATES if n not in names]
    images, labels = load_test(args.data_dir)

    if not args.no_table:
        print(f"{args.count} images per model (seed {args.seed}); eps {args.eps * 255:g}/255, "
              f"goal {args.confidence:g}, at most {args.max_steps} steps; steps and L-inf "
              "(x255) over successes; 'all steps' over every image; '>100': images that failed or "
              "needed more than 100 steps")
        print(f"{'model':<16} {'update':<18} {'failed':>10} {'rate':>7} {'steps':>9} "
              f"{'L-inf':>10} {'all steps':>10} {'>100':>5} {'sec':>7}")
    for path in args.models:
        model = prepare(path)
        name = Path(path).stem
        predicted = predictions(model, images)
        if not args.no_table:
            idx = choose(predicted, labels, args.seed, count=args.count)
            x0, y = images[idx].float().div(255), labels[idx]
            for update in names:
                start = time.perf_counter()
                if update == "plugin":
                    fn = plugin_update()
                    if fn is None:
                        continue
                    adv, steps, success = fn(model, x0, y, args.eps, args.confidence,
                                             args.max_steps)
                else:
                    adv, steps, success = run_update(UPDATES[update], model, x0, y, args.eps,
                                                     args.confidence, args.max_steps)
                seconds = time.perf_counter() - start
                print(summary(name, update, x0, adv, steps, success, seconds), flush=True)
                if args.show_failures and not success.all():
                    with torch.no_grad():
                        p = model(adv[~success]).softmax(1)
                    wrong = p.scatter(1, y[~success][:, None], 0.0)
                    print("    failed (image: true -> top wrong at p): " + ", ".join(
                        f"{i}: {t} -> {c} at {q:.4f}" for i, t, c, q in zip(
                            (~success).nonzero().flatten().tolist(), y[~success].tolist(),
                            wrong.argmax(1).tolist(), wrong.amax(1).tolist())))
        if args.per_class:
            from cifarx.plugins.attacks import build_ifgsm
            attack = build_ifgsm(model)
            for seed in map(int, args.attack_seeds.split(",")):
                idx = choose(predicted, labels, seed, per_class=args.per_class)
                result = attack(images[idx].float().div(255), labels[idx],
                                torch.Generator().manual_seed(seed))
                print(f"per-class check {name} seed {seed}: {int(result.success.sum())}/{len(idx)}"
                      f" reach {args.confidence:g} (steps max {int(result.steps.max())})",
                      flush=True)


if __name__ == "__main__":
    main()
