"""``autoattack``: a robustness evaluation in the manner of AutoAttack (Croce and Hein, 2020),
built from the Adversarial Robustness Toolbox's attacks (``pip install 'cifarx[robust]'``).

Each image faces the attacks in turn, and only the images that are still classified
correctly go on to the next: APGD with the cross-entropy loss, APGD with the
difference-of-logits-ratio loss (both step-size free, from a random start in the ball), then
the gradient-free Square attack, which catches a model whose gradients mislead (masking). An
image counts as fooled when one of them finds a misclassified image within ``eps`` of it.

ART rather than torchattacks: torchattacks 3.5.1 (its latest) pins ``requests~=2.25.1``, which
MLflow's dependencies refuse; ART is maintained (LF AI), installs beside them, and its APGD
and Square are the published algorithms. ART has no FAB, and its AutoAttack class adds
DeepFool, which is not bounded by ``eps``: hence this plugin's own sequence of ART attacks.
The standard AutoAttack's targeted APGD-T and FAB-T are replaced by the untargeted DLR loss,
so its robust accuracy may be slightly higher than this one's on the same model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cifarx import Attack, AttackResult, Option, UserError, hookimpl

STAGES = ("apgd-ce", "apgd-dlr", "square")


def import_art():
    try:
        from art.attacks.evasion import AutoProjectedGradientDescent, SquareAttack
        from art.estimators.classification import PyTorchClassifier
    except ImportError:
        raise UserError("the autoattack attack needs the Adversarial Robustness Toolbox: "
                        "pip install 'cifarx[robust]'") from None
    return AutoProjectedGradientDescent, SquareAttack, PyTorchClassifier


def build_autoattack(model: nn.Module, eps: float = 8 / 255, norm: str = "inf",
                     attacks: str = ",".join(STAGES), iters: int = 100, queries: int = 5000,
                     batch: int = 250):
    """The attack function: ``attacks`` (a comma list of :data:`STAGES`) in that order."""
    import numpy as np

    apgd, square, classifier = import_art()
    stages = [s.strip() for s in attacks.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        from cifarx import OptionError

        raise OptionError("attacks", f"{(unknown or [''])[0]!r} is not one of "
                                     f"{', '.join(STAGES)}")
    order = np.inf if norm == "inf" else 2

    def attack(images: Tensor, labels: Tensor, generator: torch.Generator) -> AttackResult:
        device = images.device
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator, device=device))
        np.random.seed(seed)  # ART draws its random starts and squares from numpy
        with torch.no_grad():
            classes = model(images[:1]).shape[1]
        estimator = classifier(model, nn.CrossEntropyLoss(), tuple(images.shape[1:]), classes,
                               clip_values=(0.0, 1.0),
                               device_type="gpu" if device.type == "cuda" else "cpu")
        x = images.detach().float().cpu().numpy()
        y = labels.cpu().numpy()
        adversarial = x.copy()
        steps = np.zeros(len(x), dtype=np.int64)
        robust = estimator.predict(x, batch_size=batch).argmax(1) == y  # still to be fooled
        for stage in stages:
            todo = np.flatnonzero(robust)
            if len(todo) == 0:
                break
            if stage == "square":
                maker = square(estimator, norm=order, eps=eps, max_iter=queries, p_init=0.8,
                               nb_restarts=1, batch_size=batch, verbose=False)
            else:
                loss = "cross_entropy" if stage == "apgd-ce" else "difference_logits_ratio"
                maker = apgd(estimator, norm=order, eps=eps, eps_step=2 * eps, max_iter=iters,
                             targeted=False, nb_random_init=1, batch_size=batch,
                             loss_type=loss, verbose=False)
                steps[todo] += iters
            found = maker.generate(x[todo], y[todo])
            fooled = estimator.predict(found, batch_size=batch).argmax(1) != y[todo]
            within = np.abs(found - x[todo]).reshape(len(todo), -1).max(1) <= eps + 1e-6 \
                if order == np.inf else \
                np.sqrt(((found - x[todo]) ** 2).reshape(len(todo), -1).sum(1)) <= eps + 1e-5
            won = todo[fooled & within]
            adversarial[won] = found[fooled & within]
            robust[won] = False
        return AttackResult(images=torch.from_numpy(adversarial).to(device),
                            steps=torch.from_numpy(steps).to(device),
                            success=torch.from_numpy(~robust).to(device))

    return attack


@hookimpl
def register_attacks(register):
    register(Attack(
        name="autoattack", build=build_autoattack,
        options={"eps": Option(8 / 255, float, range="(0, 16]",
                               help="the radius of the ball (L-inf: 8/255 is the standard; "
                                    "L2: 0.5)"),
                 "norm": Option("inf", choices=("inf", "2"), help="the norm of the ball"),
                 "attacks": Option(",".join(STAGES), str,
                                   help=f"the stages, in order: a comma list of "
                                        f"{', '.join(STAGES)}"),
                 "iters": Option(100, int, range="[1, 10000]", help="APGD's iterations"),
                 "queries": Option(5000, int, range="[1, 100000]",
                                   help="Square's queries per image"),
                 "batch": Option(250, int, range="[1, 10000]", help="images per ART call")},
        summary="robustness evaluation: APGD-CE, APGD-DLR and Square (ART) in turn, each on "
                "the images the previous ones did not fool, within eps"))
