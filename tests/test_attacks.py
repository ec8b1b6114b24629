"""The built-in attacks, on a tiny model trained here on synthetic data, without MLflow."""

import math

import pytest
import torch

from cifarx import AttackResult, UserError
from cifarx.adversarial import (choose, parse_fraction, parse_pairs, prepare, resolve_options,
                                resolve_target, selection)
from cifarx.engine import TrainConfig, plan, train
from cifarx.registry import catalog

EPS = 1 / 255


@pytest.fixture(scope="module")
def tiny(data_dir):
    """(model, images, labels): table1 trained for 30 iterations, 40 test images it gets right."""
    config = TrainConfig(data_dir=str(data_dir), aug=("normalize",), iters=30, batch_size=20,
                         eval_every=1000, device="cpu", threads=1)
    p = plan(config)
    data = p.load_data()
    model = prepare(train(p, data).model.to(memory_format=torch.contiguous_format))
    images = data.test_images.float() / 255
    with torch.no_grad():
        right = model(images).argmax(1) == data.test_labels
    assert right.sum() >= 40
    return model, images[right][:40], data.test_labels[right][:40]


def build(name, model, **options):
    return catalog().get("attack", name).build(model, **options)


def run(name, tiny, seed=0, **options):
    model, x, y = tiny
    return build(name, model, **options)(x, y, torch.Generator().manual_seed(seed))


def probs(model, images):
    with torch.no_grad():
        return model(images).softmax(1)


def test_ifgsm_reaches_the_confidence_and_stops_each_image_there(tiny):
    model, x, y = tiny
    full = run("ifgsm", tiny, eps=EPS, confidence=0.99)
    assert full.success.all() and full.targets is None
    p = probs(model, full.images)
    assert (p.scatter(1, y[:, None], 0).amax(1) >= 0.99).all()  # some wrong class at >= 99%
    assert len(set(full.steps.tolist())) > 1  # images stop at different steps within the batch

    # Stopping early: with a lower step limit, the images that needed no more are unchanged
    # (no step after the goal), the others end as failures and stay in the result.
    limit = int(full.steps.median())
    cut = run("ifgsm", tiny, eps=EPS, confidence=0.99, max_steps=limit)
    finished = full.steps <= limit
    assert finished.any() and (~finished).any()
    assert torch.equal(cut.images[finished], full.images[finished])
    assert torch.equal(cut.steps[finished], full.steps[finished])
    assert not cut.success[~finished].any() and (cut.steps[~finished] == limit).all()
    assert len(cut.images) == len(x)
    before_goal = probs(model, cut.images[~finished])
    assert (before_goal.scatter(1, y[~finished, None], 0).amax(1) < 0.99).all()


@pytest.mark.parametrize("name, options, bound", [
    ("fgsm", dict(eps=8 / 255), lambda r: 8 / 255),
    ("pgd", dict(eps=4 / 255, alpha=1 / 255, steps=6), lambda r: 4 / 255),
    ("ifgsm", dict(eps=2 / 255), lambda r: r.steps.float() * 2 / 255),  # a step moves eps at most
])
def test_adversarial_images_stay_in_pixel_range_and_norm_bound(tiny, name, options, bound):
    result = run(name, tiny, **options)
    x = tiny[1]
    assert result.images.dtype == torch.float32 and result.images.shape == x.shape
    assert result.images.min() >= 0 and result.images.max() <= 1
    linf = (result.images - x).flatten(1).abs().amax(1)
    assert (linf <= bound(result) + 1e-6).all()
    assert (linf > 0).all()


def test_fgsm_equals_one_ifgsm_step(tiny):
    fgsm = run("fgsm", tiny, eps=3 / 255)
    one = run("ifgsm", tiny, eps=3 / 255, confidence=0.999, max_steps=1)
    assert (one.steps == 1).all()
    assert torch.equal(fgsm.images, one.images)
    assert (fgsm.steps == 1).all()
    assert torch.equal(fgsm.success, probs(tiny[0], fgsm.images).argmax(1) != tiny[2])


def test_pgd_stays_in_the_eps_ball_and_repeats_for_a_seed(tiny):
    x = tiny[1]
    eps = 2 / 255
    first = run("pgd", tiny, seed=1, eps=eps, alpha=1 / 255, steps=5)
    again = run("pgd", tiny, seed=1, eps=eps, alpha=1 / 255, steps=5)
    other = run("pgd", tiny, seed=2, eps=eps, alpha=1 / 255, steps=5)
    assert (first.images - x).abs().max() <= eps + 1e-6
    assert torch.equal(first.images, again.images)
    assert not torch.equal(first.images, other.images)  # the random start comes from the seed
    no_start = run("pgd", tiny, eps=eps, alpha=1 / 255, steps=1, random_start=False)
    fgsm = run("fgsm", tiny, eps=1 / 255)  # one pgd step from the image, inside the ball
    assert torch.allclose(no_start.images, fgsm.images)


@pytest.mark.parametrize("name, options", [
    ("ifgsm", dict(target="next")),
    ("ifgsm", dict(target=3)),
    ("pgd", dict(target="next", eps=16 / 255, steps=20)),
    ("fool-noise", dict(eps=2 / 255)),  # each noise image to its label's class
    ("fool-noise", dict(eps=2 / 255, target=7)),
])
def test_targeted_attacks_reach_their_target(tiny, name, options):
    model, x, y = tiny
    if options.get("target") == 3:
        x, y = x[y != 3], y[y != 3]
        tiny = (model, x, y)
    result = run(name, tiny, **options)
    wanted = {"next": (y + 1) % 10, 3: torch.full_like(y, 3), 7: torch.full_like(y, 7),
              None: y}[options.get("target")]
    assert torch.equal(result.targets, wanted)
    p = probs(model, result.images)
    assert result.success.all()
    assert torch.equal(p.argmax(1), wanted)
    if name != "pgd":  # the iterative ones go on to the confidence
        assert (p.gather(1, wanted[:, None]) >= 0.99).all()
    if name == "fool-noise":
        assert result.start is not None and not torch.equal(result.start, x)
        assert (result.images - result.start).abs().max() <= result.steps.max() * 2 / 255 + 1e-6


@pytest.mark.parametrize("name, options, message", [
    ("ifgsm", dict(eps=0), r"--eps must be in \(0, 1\]"),
    ("ifgsm", dict(eps=1.5), r"--eps must be in \(0, 1\]"),
    ("pgd", dict(eps=math.nan), r"--eps must be in \(0, 1\]"),
    ("pgd", dict(alpha=-0.1), r"--alpha must be in \(0, 1\]"),
    ("ifgsm", dict(confidence=1.0), r"--confidence must be in \(0, 1\)"),
    ("fool-noise", dict(confidence=0), r"--confidence must be in \(0, 1\)"),
    ("ifgsm", dict(max_steps=0), "--max-steps must be a whole number >= 1"),
    ("pgd", dict(steps=2.5), "--steps must be a whole number >= 1"),
    ("pgd", dict(target=-1), "--target -1 is not a class"),
    ("pgd", dict(eps="big"), r"--eps must be in \(0, 1\], got big"),
    ("pgd", dict(steps="many"), "--steps must be a whole number >= 1, got many"),
    ("pgd", dict(random_start="maybe"), "random_start=maybe: accepted: true, false"),
])
def test_bad_option_values_are_user_errors(tiny, name, options, message):
    with pytest.raises(UserError, match=message):
        build(name, tiny[0], **options)


def test_attack_result_checks_its_shapes():
    with pytest.raises(ValueError, match="steps must have shape"):
        AttackResult(torch.zeros(3, 1, 2, 2), torch.zeros(2), torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="start must have the shape"):
        AttackResult(torch.zeros(3, 1, 2, 2), torch.zeros(3), torch.zeros(3, dtype=torch.bool),
                     start=torch.zeros(3, 1, 2, 3))


def test_fractions_options_and_targets_parse():
    assert parse_fraction("1/255", "eps") == 1 / 255
    assert parse_fraction("0.0039", "eps") == 0.0039
    for bad in ("1/0", "one", "1/2/3", ""):
        with pytest.raises(UserError, match="accepted: a decimal such as 0.0039 or a fraction"):
            parse_fraction(bad, "eps")
    assert parse_pairs(["random-start=false", "steps=3", "alpha=2/255", "mode=x"]) == {
        "random_start": False, "steps": 3, "alpha": 2 / 255, "mode": "x"}
    with pytest.raises(UserError, match="accepted: name=value"):
        parse_pairs(["steps"])
    classes = ("a", "b", "c")
    assert [resolve_target(t, classes) for t in (None, "next", "2", "b")] == [None, "next", 2, 1]
    with pytest.raises(UserError, match="accepted: next, 0 to 2, or a name: a, b, c"):
        resolve_target("3", classes)


def test_options_come_from_the_build_signature():
    pgd = catalog().get("attack", "pgd")
    options = resolve_options(pgd, {"eps": 0.1})
    assert options == {"eps": 0.1, "alpha": 2 / 255, "steps": 10, "target": None,
                       "random_start": True}
    with pytest.raises(UserError, match="attack fgsm has no option --alpha; its options: --eps"):
        resolve_options(catalog().get("attack", "fgsm"), {"alpha": 0.1})
    with pytest.raises(UserError, match="no option --attack-opt gamma=..."):
        resolve_options(pgd, {"gamma": 1})


def test_choosing_correctly_classified_images_per_class():
    labels = torch.arange(30) % 3
    predicted = labels.clone()
    predicted[[0, 3, 6, 9, 12, 15, 18]] = 1  # class 0 keeps 3 right of 10
    chosen = choose(predicted, labels, ("a", "b", "c"), ("per_class", 2), seed=0)
    assert labels[chosen].tolist() == [0, 0, 1, 1, 2, 2]
    assert (predicted[chosen] == labels[chosen]).all()
    assert torch.equal(chosen, choose(predicted, labels, ("a", "b", "c"), ("per_class", 2), 0))
    with pytest.raises(UserError, match="--per-class 4: the model classifies only 3 test images "
                                        "of class 'a' correctly; accepted: --per-class 1 to 3"):
        choose(predicted, labels, ("a", "b", "c"), ("per_class", 4), seed=0)
    skipped = choose(predicted, labels, ("a", "b", "c"), ("per_class", 4), seed=0, skip_class=0)
    assert labels[skipped].tolist() == [1] * 4 + [2] * 4
    assert len(choose(predicted, labels, ("a", "b", "c"), ("all", 0), seed=0)) == 23
    with pytest.raises(UserError, match="--all-test: the model classifies no test image"):
        choose(labels + 1, labels, ("a", "b", "c"), ("all", 0), seed=0)
    with pytest.raises(UserError, match="--count 24: the model classifies only 23"):
        choose(predicted, labels, ("a", "b", "c"), ("count", 24), seed=0)
    assert selection(None, None, False) == ("per_class", 2)
    with pytest.raises(UserError, match="--per-class and --all-test both choose"):
        selection(2, None, True)
    with pytest.raises(UserError, match="--count must be at least 1"):
        selection(None, 0, False)
