"""The built-in attacks, on a tiny model trained here on synthetic data, without MLflow."""

import inspect
import math
import re

import pytest
import torch

from cifarx import Attack, AttackResult, Option, OptionError, UserError
from cifarx.inference.adversarial import choose, for_attack, resolve_target, selection
from cifarx.plugin_api.options import convert, parse_assignments, parse_number
from cifarx.plugin_api.registry import catalog
from cifarx.training.config import TrainConfig, plan, resolve_plugin_options
from cifarx.training.loop import train

EPS = 1 / 255


@pytest.fixture(scope="module")
def tiny(data_dir):
    """(model, images, labels): table1 trained for 30 iterations, 40 test images it gets right."""
    config = TrainConfig(data_dir=str(data_dir), aug=("normalize",), iters=30, batch_size=20,
                         eval_every=1000, device="cpu", threads=1)
    p = plan(config)
    data = p.load_data()
    model = for_attack(train(p, data).model.to(memory_format=torch.contiguous_format))
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


# What the options schema accepts, in its words (cifarx.plugin_api.options.Option.accepted), and its
# two messages, naming the flag and the value the user typed; test_adversarial and
# test_adversarial_training use them too.
FLOAT = "a number (or a fraction: 8/255)"
WHOLE = "a whole number"
BOOL = "true or false"


def refused(label: str, value: str, owner: str, accepted: str) -> str:
    """The message for a value an option does not accept."""
    return f"{label}={value}: not accepted by {owner}; accepted: {accepted}"


def no_option(label: str, value: str, owner: str, options: str) -> str:
    """The message for an option the plugin does not have (``label`` ends with its name)."""
    name = label.split()[-1].removeprefix("--")
    return f"{label}={value}: {owner} has no option {name!r}; accepted: {options}"


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


@pytest.mark.parametrize("name, texts, message", [
    ("ifgsm", ["eps=0"], refused("--attack-opt eps", "0", "ifgsm", f"{FLOAT} in (0, 1]")),
    ("ifgsm", ["eps=1.5"], refused("--attack-opt eps", "1.5", "ifgsm", f"{FLOAT} in (0, 1]")),
    ("pgd", ["eps=nan"], refused("--attack-opt eps", "nan", "pgd", f"{FLOAT} in (0, 1]")),
    ("pgd", ["eps=1/0"], refused("--attack-opt eps", "1/0", "pgd", f"{FLOAT} in (0, 1]")),
    ("pgd", ["alpha=-0.1"], refused("--attack-opt alpha", "-0.1", "pgd", f"{FLOAT} in (0, 1]")),
    ("ifgsm", ["confidence=1.0"],
     refused("--attack-opt confidence", "1.0", "ifgsm", f"{FLOAT} in (0, 1)")),
    ("fool-noise", ["confidence=0"],
     refused("--attack-opt confidence", "0", "fool-noise", f"{FLOAT} in (0, 1)")),
    ("ifgsm", ["max_steps=0"],
     refused("--attack-opt max_steps", "0", "ifgsm", f"{WHOLE} in [1, inf)")),
    ("pgd", ["steps=2.5"], refused("--attack-opt steps", "2.5", "pgd", f"{WHOLE} in [1, inf)")),
    ("pgd", ["eps=big"], refused("--attack-opt eps", "big", "pgd", f"{FLOAT} in (0, 1]")),
    ("pgd", ["steps=many"], refused("--attack-opt steps", "many", "pgd", f"{WHOLE} in [1, inf)")),
    ("pgd", ["random_start=maybe"], refused("--attack-opt random_start", "maybe", "pgd", BOOL)),
])
def test_bad_option_values_are_user_errors(name, texts, message):
    """The attacks' schema checks the values (the build functions no longer do), and the message
    names the flag and the value the user typed."""
    with pytest.raises(UserError, match=exactly(message)):
        resolve_plugin_options("attack", catalog().get("attack", name), texts)


def test_a_target_that_is_no_class_is_a_user_error(tiny):
    # The schema takes a target as text; the class is resolved against the model's classes.
    values = resolve_plugin_options("attack", catalog().get("attack", "pgd"), ["target=-1"])
    assert values["target"] == "-1"
    with pytest.raises(UserError, match=re.escape("--attack-opt target '-1' is not a class of "
                                                  "this model; accepted: next, 0 to 9")):
        resolve_target(values["target"], tiny[0].classes, "--attack-opt target")
    # A class index the model lacks, given to build directly, is the attack's OptionError.
    model, x, y = tiny
    with pytest.raises(OptionError) as raised:
        build("pgd", model, target=12)(x, y, torch.Generator().manual_seed(0))
    assert (raised.value.option, raised.value.message) == ("target", "the model has classes 0 to 9")


def test_attack_result_checks_its_shapes():
    with pytest.raises(ValueError, match="steps must have shape"):
        AttackResult(torch.zeros(3, 1, 2, 2), torch.zeros(2), torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="start must have the shape"):
        AttackResult(torch.zeros(3, 1, 2, 2), torch.zeros(3), torch.zeros(3, dtype=torch.bool),
                     start=torch.zeros(3, 1, 2, 3))


def test_fractions_options_and_targets_parse():
    assert parse_number("1/255") == 1 / 255
    assert parse_number("0.0039") == 0.0039
    eps = catalog().get("attack", "pgd").options["eps"]
    assert convert(eps, "1/255") == 1 / 255 and convert(eps, " 8/255 ") == 8 / 255
    for bad in ("1/0", "one", "1/2/3", "", "nan", "1/nan"):
        with pytest.raises(ValueError, match=exactly(f"accepted: {FLOAT} in (0, 1]")):
            convert(eps, bad)
    assert parse_assignments("--attack-opt", ["random_start=false", "steps=3", "alpha=2/255",
                                              "mode=x"], None) == {
        None: {"random_start": "false", "steps": "3", "alpha": "2/255", "mode": "x"}}
    values = resolve_plugin_options("attack", catalog().get("attack", "pgd"),
                                    ["random_start=false", "steps=3", "alpha=2/255"])
    assert values["random_start"] is False and values["steps"] == 3
    assert values["alpha"] == 2 / 255
    with pytest.raises(UserError, match="^" + re.escape("--attack-opt 'steps': expected NAME=VALUE")):
        parse_assignments("--attack-opt", ["steps"], None)
    with pytest.raises(UserError, match=exactly("--attack-opt steps=4: steps is given twice ('3' "
                                                "and '4'); give it once")):
        parse_assignments("--attack-opt", ["steps=3", "steps=4"], None)
    classes = ("a", "b", "c")
    assert [resolve_target(t, classes) for t in (None, "next", "2", "b")] == [None, "next", 2, 1]
    with pytest.raises(UserError, match=re.escape("--target '3' is not a class of this model; "
                                                  "accepted: next, 0 to 2, or a name: a, b, c")):
        resolve_target("3", classes)


def test_parse_number_refuses_what_is_not_a_number():
    for bad in ("one", "1/2/3", "", "nan"):
        with pytest.raises(ValueError):
            parse_number(bad)


def test_parse_number_refuses_a_zero_denominator_with_value_error():
    with pytest.raises(ValueError):
        parse_number("1/0")


def test_a_typed_nan_is_refused_like_a_typed_out_of_range_value():
    eps = catalog().get("attack", "pgd").options["eps"]
    with pytest.raises(ValueError, match=exactly(f"accepted: {FLOAT} in (0, 1]")):
        convert(eps, 1.5)  # typed (Python, a study file), out of range: refused
    with pytest.raises(ValueError, match=exactly(f"accepted: {FLOAT} in (0, 1]")):
        convert(eps, math.nan)


def test_options_come_from_the_declared_schema():
    pgd = catalog().get("attack", "pgd")
    options = resolve_plugin_options("attack", pgd, ["eps=0.1"])
    assert options == {"eps": 0.1, "alpha": 2 / 255, "steps": 10, "target": None,
                       "random_start": True}
    with pytest.raises(UserError, match=exactly(no_option("--attack-opt alpha", "0.1", "fgsm",
                                                          "eps"))):
        resolve_plugin_options("attack", catalog().get("attack", "fgsm"), ["alpha=0.1"])
    with pytest.raises(UserError, match=exactly(no_option(
            "--attack-opt gamma", "1", "pgd", "eps, target, alpha, steps, random_start"))):
        resolve_plugin_options("attack", pgd, ["gamma=1"])
    # Names are the declared ones: the old --attack-opt random-start spelling is not one.
    with pytest.raises(UserError, match=exactly(no_option(
            "--attack-opt random-start", "false", "pgd", "eps, target, alpha, steps, random_start"))):
        resolve_plugin_options("attack", pgd, ["random-start=false"])


@pytest.mark.parametrize("name", ["ifgsm", "fgsm", "pgd", "fool-noise"])
def test_each_builtin_attack_declares_what_its_build_takes(name):
    """build receives every declared option: the schema and build's signature agree, defaults
    included (the defaults the schema fills are the ones build documents)."""
    attack = catalog().get("attack", name)
    params = list(inspect.signature(attack.build).parameters.values())[1:]  # after the model
    assert set(attack.options) == {p.name for p in params}
    for p in params:
        assert attack.options[p.name].default == p.default, p.name


def test_a_test_attack_declares_its_options_as_defaults_choices_or_options():
    attack = Attack(name="t", build=lambda model, **kw: None,
                    options={"gain": 0.5, "mode": ("fast", "exact"),
                             "steps": Option(3, int, range="[1, 9]")})
    assert resolve_plugin_options("attack", attack, []) == {"gain": 0.5, "mode": "fast", "steps": 3}
    assert resolve_plugin_options("attack", attack, ["gain=1/4", "mode=exact", "steps=9"]) == \
        {"gain": 0.25, "mode": "exact", "steps": 9}
    with pytest.raises(UserError, match=exactly(refused("--attack-opt mode", "slow", "t",
                                                        "fast, exact"))):
        resolve_plugin_options("attack", attack, ["mode=slow"])


def test_choosing_correctly_classified_images_per_class():
    labels = torch.arange(30) % 3
    predicted = labels.clone()
    predicted[[0, 3, 6, 9, 12, 15, 18]] = 1  # class 0 keeps 3 right of 10
    chosen, spares = choose(predicted, labels, ("a", "b", "c"), ("per_class", 2), seed=0)
    assert labels[chosen].tolist() == [0, 0, 1, 1, 2, 2]
    assert (predicted[chosen] == labels[chosen]).all()
    assert torch.equal(chosen, choose(predicted, labels, ("a", "b", "c"), ("per_class", 2), 0)[0])
    # the spares: every other correctly classified image of each class, none of the chosen
    assert [len(spares[c]) for c in range(3)] == [1, 8, 8]
    assert not set(torch.cat(list(spares.values())).tolist()) & set(chosen.tolist())
    assert all((labels[spares[c]] == c).all() and (predicted[spares[c]] == c).all()
               for c in range(3))
    with pytest.raises(UserError, match="--per-class 4: the model classifies only 3 test images "
                                        "of class 'a' correctly; accepted: --per-class 1 to 3"):
        choose(predicted, labels, ("a", "b", "c"), ("per_class", 4), seed=0)
    skipped, _ = choose(predicted, labels, ("a", "b", "c"), ("per_class", 4), seed=0,
                        skip_class=0)
    assert labels[skipped].tolist() == [1] * 4 + [2] * 4
    assert len(choose(predicted, labels, ("a", "b", "c"), ("all", 0), seed=0)[0]) == 23
    with pytest.raises(UserError, match="--all-test: the model classifies no test image"):
        choose(labels + 1, labels, ("a", "b", "c"), ("all", 0), seed=0)
    with pytest.raises(UserError, match="--count 24: the model classifies only 23"):
        choose(predicted, labels, ("a", "b", "c"), ("count", 24), seed=0)
    assert selection(None, None, False) == ("per_class", 2)
    with pytest.raises(UserError, match="--per-class and --all-test both choose"):
        selection(2, None, True)
    with pytest.raises(UserError, match="--count must be at least 1"):
        selection(None, 0, False)


def test_an_image_that_fails_is_replaced_by_the_next_of_its_class():
    """A fake attack that fails on odd test indices: each failure is replaced by the next spare
    of its class until one succeeds; with no spares left the failure stays, marked failed."""
    from cifarx.inference.adversarial import attack_images

    images = torch.arange(12, dtype=torch.uint8).view(12, 1, 1, 1).expand(12, 3, 2, 2)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    calls = []

    def odd_fails(x, y, generator):
        index = (x[:, 0, 0, 0] * 255).round().long()
        calls.append(index.tolist())
        return AttackResult(x.clone(), torch.ones_like(y), index % 2 == 0)

    chosen = torch.tensor([1, 3, 4, 6, 9, 11])  # class 0: both odd; class 1: both even; ...
    spares = {0: torch.tensor([0, 2]), 1: torch.tensor([5, 7]), 2: torch.tensor([8, 10])}
    result, kept, replaced, _ = attack_images(odd_fails, images, labels, chosen, spares,
                                              torch.device("cpu"), 100, 0)
    assert kept.tolist() == [0, 2, 4, 6, 8, 10] and result.success.all() and replaced == 4
    assert calls == [[1, 3, 4, 6, 9, 11], [0, 2, 8, 10]]
    # no spares (--no-replace, or --count): the failures stay, honestly marked
    result, kept, replaced, _ = attack_images(odd_fails, images, labels, chosen, {},
                                              torch.device("cpu"), 100, 0)
    assert kept.tolist() == chosen.tolist() and replaced == 0
    assert result.success.tolist() == [False, False, True, True, False, False]
    # spares run out: class 0 has one left after the first replacement
    result, kept, replaced, _ = attack_images(odd_fails, images, labels, chosen,
                                              {0: torch.tensor([5 - 5])}, torch.device("cpu"),
                                              100, 0)
    assert kept.tolist()[:2] == [0, 3] and result.success.tolist()[:2] == [True, False]
