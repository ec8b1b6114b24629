"""`cifarx train --adv-train` and `--adv-data`, on synthetic data."""

import math

import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient

from cifarx import Attack, AttackResult, Augmentation, Option, UserError, hookimpl
from cifarx.inference.adversarial import check_training_attack, perturb
from cifarx.plugin_api.registry import catalog
from cifarx.runs import Tracking, train_run
from cifarx.training.config import TrainConfig, plan
from cifarx.training.data import TrainingImages
from cifarx.training.loop import train

from test_adversarial import last_run_id, runs_in
from test_attacks import FLOAT, WHOLE, exactly, no_option, refused
from test_cli import cli, one_line_error

EXPERIMENT = "adv-train"
QUICK = ["--batch-size", "20", "--eval-every", "1000", "--device", "cpu", "--threads", "1",
         "--experiment", EXPERIMENT]


def quick(data_dir, **overrides) -> TrainConfig:
    settings = dict(data_dir=str(data_dir), aug=("normalize",), iters=30, batch_size=20,
                    eval_every=1000, device="cpu", threads=1)
    return TrainConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def tiny(data_dir):
    """(model in training mode, a batch of 40 training pixels, their labels): table1, which has
    batch norm, trained for 30 iterations."""
    p = plan(quick(data_dir))
    data = p.load_data()
    model = train(p, data).model.train()
    model.zero_grad(set_to_none=True)  # the last step's: a gradient found later came after
    return model, data.train_images[:40].float() / 255, data.train_labels[:40]


def test_perturbing_a_batch_leaves_the_model_exactly_as_it_was(tiny):
    model, x, y = tiny
    frozen = model.net.fc2.bias
    frozen.requires_grad_(False)  # a frozen parameter stays frozen
    try:
        fgsm = check_training_attack(model, catalog().get("attack", "fgsm"), {"eps": 4 / 255},
                                     model.classes, x[:2], y[:2], seed=0)
        seen = []

        def spy(images, labels, generator):  # what the attack sees: the Attack contract's model
            seen.append((model.training, any(p.requires_grad for p in model.parameters())))
            return fgsm(images, labels, generator)

        before = {k: v.clone() for k, v in model.state_dict().items()}
        adv, fooled = perturb(model, spy, x, y, torch.Generator().manual_seed(0))
        assert seen == [(False, False)]
        assert model.training  # back in training mode ...
        assert [p.requires_grad for p in model.parameters()].count(False) == 1 and \
            not frozen.requires_grad  # ... with its flags as they were
        assert all(p.grad is None for p in model.parameters())
        after = model.state_dict()  # weights and batch-norm running statistics alike
        assert all(torch.equal(before[k], after[k]) for k in before)
    finally:
        frozen.requires_grad_(True)

    # Really adversarial: within the L-inf ball, not the clean images, and the model does worse.
    delta = (adv - x).abs()
    assert delta.max() <= 4 / 255 + 1e-6 and delta.flatten(1).amax(1).min() > 3.9 / 255
    assert adv.min() >= 0 and adv.max() <= 1 and not adv.requires_grad
    model.eval()
    with torch.no_grad():
        clean_logits, adv_logits = model(x), model(adv)
    model.train()
    assert F.cross_entropy(adv_logits, y) > F.cross_entropy(clean_logits, y)
    assert torch.equal(fooled, adv_logits.argmax(1) != y)
    assert (adv_logits.argmax(1) == y).float().mean() < (clean_logits.argmax(1) == y).float().mean()


def backward_attack(model, eps: float = 0.01):
    """A plugin attack that calls backward() (it may: the parameters need no gradient)."""
    def attack(images, labels, generator=None):
        x = images.clone().requires_grad_(True)
        F.cross_entropy(model(x), labels).backward()
        adv = (images + eps * x.grad.sign()).clamp(0, 1)
        return AttackResult(adv, torch.ones_like(labels), torch.ones_like(labels, dtype=torch.bool))
    return attack


def test_an_attack_calling_backward_puts_no_gradient_in_the_parameters(tiny):
    model, x, y = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    perturb(model, backward_attack(model), x, y, torch.Generator())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class Marking:
    """An attack that turns images grey (0.5, which no uint8 pixel is), and augmentations that
    record what each stage hands on."""

    def __init__(self):
        self.attacked, self.pixels, self.normalized = [], [], []

    @hookimpl
    def register_attacks(self, register):
        def build(model, value: float = 0.5):
            def attack(images, labels, generator):
                self.attacked.append(images.clone())
                return AttackResult(torch.full_like(images, value),
                                    torch.ones_like(labels), labels % 2 == 0)
            return attack
        register(Attack(name="test-grey", build=build, options={"value": Option(0.5, float)}))

    @hookimpl
    def register_augmentations(self, register):
        def record(into):
            def apply(images, generator):
                into.append(images.clone())
                return images
            return apply
        register(Augmentation(name="test-pixels", stage="pixels", apply=record(self.pixels)))
        register(Augmentation(name="test-normalized", stage="normalized",
                              apply=record(self.normalized)))


def test_adv_ratio_replaces_that_part_of_every_batch(data_dir, register_plugin):
    marking = register_plugin(Marking(), "marking")
    p = plan(quick(data_dir, iters=6, aug=("flip", "test-pixels", "raw", "test-normalized"),
                   adv_train="test-grey", adv_ratio=0.25))
    assert p.adv_per_batch == 5
    result = train(p, p.load_data())
    trial = len(marking.attacked) - 6  # the check before training
    assert trial == 1 and len(marking.pixels) == len(marking.normalized) == 6
    for pixels, attacked, seen in zip(marking.pixels, marking.attacked[trial:], marking.normalized):
        # The attack gets the first 5 images after the pixel stage (here after flip) ...
        assert torch.equal(attacked, pixels[:5])
        # ... and its images replace them on the clean images' path (raw: x 255).
        grey = (seen == 0.5 * 255).flatten(1).all(1)
        assert grey.tolist() == [True] * 5 + [False] * 15
        assert torch.equal(seen[5:], pixels[5:] * 255)
    assert [s for s, _ in result.history["train/adv_acc"]] == list(range(1, 7))
    assert all(any(math.isclose(v, i / 5, abs_tol=1e-6) for i in range(6))  # the grey attack's own verdict,
               for _, v in result.history["train/attack_success"])  # on 5 images


def test_adversarial_training_repeats_for_a_seed_and_trains(data_dir):
    p = plan(quick(data_dir, iters=10, adv_train="pgd", attack_options=("steps=2", "eps=4/255")))
    data = p.load_data()
    a, b = train(p, data), train(p, data)
    assert a.history == b.history
    assert len(a.history["train/attack_success"]) == 10
    assert a.test_acc > 0.3  # ten classes: chance is 0.1




def test_attack_params_and_the_resolved_config_keep_the_exact_values(data_dir):
    p = plan(quick(data_dir, adv_train="pgd", attack_options=("eps=4/255",)))
    assert float(p.params()["attack.eps"]) == 4 / 255
    assert float(p.params()["attack.alpha"]) == 2 / 255
    assert plan(p.config).attack_options == p.attack_options  # config.json plans the same run


def test_ratio_params_and_defaults(data_dir):
    p = plan(quick(data_dir, adv_train="pgd", adv_ratio=0.3, attack_options=("eps=4/255",)))
    assert p.adv_per_batch == 6 and p.config.adv_ratio == 0.3
    params = p.params()
    assert params["adv_train"] == "pgd" and params["adv_per_batch"] == 6
    # The attack is built with the typed values, every default filled in ...
    assert p.attack_options == {"eps": 4 / 255, "target": None, "alpha": 2 / 255, "steps": 10,
                                "random_start": True}
    # ... and the params show them as the user would type them, unset ones left out.
    assert math.isclose(float(params["attack.eps"]), 4 / 255, rel_tol=1e-5)
    assert params["attack.steps"] == "10" and params["attack.random_start"] == "true"  # defaults
    assert params["attack.target"] == "(not set)"  # every option is a param
    assert plan(quick(data_dir, adv_train="fgsm")).adv_per_batch == 10  # half by default
    assert plan(quick(data_dir, adv_train="fgsm", adv_ratio=0.025)).adv_per_batch == 1  # 0.5 up
    plain = plan(quick(data_dir)).params()
    assert not {"adv_train", "adv_ratio", "adv_per_batch", "adv_data"} & set(plain)
    assert not any(k.startswith("attack.") for k in plain)


@pytest.mark.parametrize("overrides, message", [
    (dict(adv_train="nope"), "unknown attack 'nope'"),
    (dict(adv_train="fgsm", adv_ratio=0.0), r"--adv-ratio must be in \(0, 1\]"),
    (dict(adv_train="fgsm", adv_ratio=1.5), r"--adv-ratio must be in \(0, 1\]"),
    (dict(adv_train="fgsm", adv_ratio=math.nan), r"--adv-ratio must be in \(0, 1\]"),
    (dict(adv_train="fgsm", adv_ratio=0.02), "--adv-ratio 0.02 of --batch-size 20 replaces no "
                                             "image; accepted: at least 0.05"),
    (dict(adv_ratio=0.5), "--adv-ratio applies to adversarial training; add --adv-train"),
    (dict(attack_options=("eps=0.1",)), "--attack-opt applies to adversarial training"),
    (dict(adv_train="fgsm", attack_options=("steps=3",)),
     exactly(no_option("--attack-opt steps", "3", "fgsm", "eps"))),
    (dict(adv_train="fgsm", attack_options=("eps",)), r"^--attack-opt 'eps': expected NAME=VALUE"),
    (dict(adv_train="fgsm", attack_options=("eps=2",)),
     exactly(refused("--attack-opt eps", "2", "fgsm", f"{FLOAT} in (0, 1]"))),
    (dict(adv_train="pgd", attack_options=("steps=0",)),
     exactly(refused("--attack-opt steps", "0", "pgd", f"{WHOLE} in [1, inf)"))),
    (dict(adv_train="pgd", attack_options=("steps=2", "steps=3")),
     exactly("--attack-opt steps=3: steps is given twice ('2' and '3'); give it once")),
])
def test_bad_adversarial_options_fail_in_the_plan(data_dir, overrides, message):
    with pytest.raises(UserError, match=message):
        plan(quick(data_dir, **overrides))


@pytest.mark.parametrize("args, fragments", [
    (["--adv-train", "nope"], ["unknown attack 'nope'", "fgsm"]),
    (["--adv-train", "pgd", "--adv-ratio", "2"], ["--adv-ratio must be in (0, 1]", "got 2.0"]),
    (["--adv-train", "fgsm", "--attack-opt", "eps=2"],
     ["error: " + refused("--attack-opt eps", "2", "fgsm", f"{FLOAT} in (0, 1]")]),
    (["--adv-train", "pgd", "--attack-opt", "target=zebra"],
     ["error: --attack-opt target 'zebra' is not a class of this model", "airplane"]),
    (["--adv-train", "pgd", "--attack-opt", "target=12"],
     ["error: --attack-opt target '12' is not a class of this model; accepted: next, 0 to 9"]),
    (["--adv-train", "fool-noise"], ["--adv-train fool-noise: the attack starts from images of "
                                     "its own", "fgsm, pgd"]),
    (["--adv-data", "0123456789abcdef0123456789abcdef"],
     ["--adv-data 0123456789abcdef0123456789abcdef: no such run"]),
])
def test_bad_adversarial_input_is_one_line_and_opens_no_run(data_dir, tracking_uri, args,
                                                            fragments):
    before = len(runs_in(tracking_uri, EXPERIMENT))
    one_line_error(cli("train", "--data-dir", data_dir, "--iters", "5", *QUICK,
                       "--tracking-uri", tracking_uri, *args), *fragments)
    assert len(runs_in(tracking_uri, EXPERIMENT)) == before


def test_adv_train_run_records_its_options_and_metrics(data_dir, tracking_uri):
    result = cli("train", "--data-dir", data_dir, "--iters", "8", *QUICK, "--tracking-uri",
                 tracking_uri, "--adv-train", "pgd", "--adv-ratio", "0.5", "--attack-opt",
                 "eps=4/255", "--attack-opt", "steps=2")
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri)
    run = client.get_run(last_run_id(result))
    assert run.info.run_name == "table1 (flip,normalize,crop) adv pgd 0.5"
    params = run.data.params
    assert (params["adv_train"], params["adv_ratio"], params["adv_per_batch"]) == ("pgd", "0.5", "10")
    assert math.isclose(float(params["attack.eps"]), 4 / 255, rel_tol=1e-5)  # exact: see
    assert params["attack.steps"] == "2"  # test_attack_params_and_the_resolved_config_keep_...
    assert math.isclose(float(params["attack.alpha"]), 2 / 255, rel_tol=1e-5)  # the default
    assert run.data.tags["cifarx.adv_train"] == "pgd" and "cifarx.adv_data" not in run.data.tags
    for key in ("train/adv_acc", "train/attack_success"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == \
            list(range(1, 9))


def test_training_images_append_the_stored_ones_exactly(data_dir):
    data = plan(quick(data_dir)).load_data()
    stored = torch.rand(7, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([3, 1, 4, 1, 5, 9, 2])
    images = TrainingImages(data.train_images, data.train_labels, torch.device("cpu"), stored,
                            labels)
    n = len(data.train_images)
    assert len(images) == n + 7
    order = torch.randperm(n + 7, generator=torch.Generator().manual_seed(1))
    x, y = images.batch(order)
    back = torch.empty_like(x)
    back[order] = x
    assert torch.equal(back[:n], data.train_images.float() / 255)
    assert torch.equal(back[n:], stored)  # float32, not rounded to 8 bits
    assert torch.equal(y, torch.cat([data.train_labels, labels])[order])
    plain = TrainingImages(data.train_images, data.train_labels, torch.device("cpu"))
    assert torch.equal(plain.batch(order[:20])[0], data.train_images[order[:20]].float() / 255)


@pytest.fixture(scope="module")
def attack_run(data_dir, tracking_uri):
    """(model run id, attack run id): a tiny tracked model and an fgsm set of 20 test images."""
    model_run = train_run(quick(data_dir), Tracking(tracking_uri, EXPERIMENT, "tiny")).run_id
    result = cli("attack", "--model", f"runs:/{model_run}/model", "--attack", "fgsm", "--data-dir",
                 data_dir, "--device", "cpu", "--threads", "1", "--tracking-uri", tracking_uri,
                 "--experiment", EXPERIMENT)
    assert result.exit_code == 0, result.output
    return model_run, last_run_id(result)


def test_adv_data_adds_the_stored_images_to_the_training_data(data_dir, tracking_uri, attack_run,
                                                             register_plugin, tmp_path):
    marking = register_plugin(Marking(), "marking")
    model_run, attack_id = attack_run
    client = MlflowClient(tracking_uri)
    adv_set = torch.load(client.download_artifacts(attack_id, "adversarial/set.pt", str(tmp_path)),
                         weights_only=True)
    # 200 training images and 20 stored ones: 11 batches of 20 see each exactly once.
    result = cli("train", "--data-dir", data_dir, "--iters", "11", *QUICK, "--tracking-uri",
                 tracking_uri, "--aug", "normalize,test-pixels", "--adv-data", attack_id)
    assert result.exit_code == 0, result.output
    assert "cifarx: warning: --adv-data: its 20 images are adversarial versions of 20 test " \
           "images" in result.stderr
    seen = torch.cat(marking.pixels)
    assert len(seen) == 220
    for image in adv_set["adv_images"]:
        assert (seen == image).flatten(1).all(1).sum() == 1
    run = client.get_run(last_run_id(result))
    assert run.data.params["adv_data"] == attack_id and run.data.params["adv_data_images"] == "20"
    assert run.data.params["adv_data_test_images"] == "20"
    assert run.data.tags["cifarx.adv_data"] == attack_id
    assert run.info.run_name == "table1 (test-pixels,normalize) +20 adv"

    # A run without a set, and a set that starts from noise, are refused before any run opens.
    before = len(runs_in(tracking_uri, EXPERIMENT))
    args = ["train", "--data-dir", data_dir, "--iters", "5", *QUICK, "--tracking-uri", tracking_uri]
    one_line_error(cli(*args, "--adv-data", f"{attack_id},{model_run}"),
                   f"--adv-data {model_run}: the run has no adversarial set")
    noise = {**adv_set, "indices": torch.full_like(adv_set["indices"], -1), "attack": "fool-noise"}
    torch.save(noise, tmp_path / "noise.pt")
    one_line_error(cli(*args, "--adv-data", tmp_path / "noise.pt"),
                   "this fool-noise set starts from noise", "no true class")
    assert len(runs_in(tracking_uri, EXPERIMENT)) == before


def test_train_help_lists_the_adversarial_options():
    text = cli("train", "--help").stdout
    for option in ("--adv-train", "--adv-ratio", "--attack-opt", "--adv-data"):
        assert option in text
