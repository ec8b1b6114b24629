"""`cifarx attack` and `cifarx transfer` through the CLI, with MLflow, on synthetic data."""

import json
import math

import pytest
import torch
from mlflow import MlflowClient

from cifarx.cli.console import transfer_table
from cifarx.inference.adversarial import SET_ARTIFACT, for_attack
from cifarx.plugin_api.registry import catalog
from cifarx.runs import Tracking, train_run
from cifarx.tracking.models import load_model
from cifarx.training.config import TrainConfig, plan

from test_attacks import BOOL, FLOAT, WHOLE, exactly, no_option, refused
from test_cli import cli, one_line_error

SET_KEYS = {"images", "adv_images", "labels", "targets", "adv_labels", "adv_conf", "conf",
            "steps", "success", "linf", "l2", "indices", "classes", "attack", "options",
            "model_uri"}


@pytest.fixture(scope="module")
def models(data_dir, tracking_uri):
    """Two tiny tracked training runs: their run ids. The second trains for 3 iterations only,
    so it gets some originals wrong (a transfer rate counts only those it gets right)."""
    ids = []
    for seed, iters in ((0, 30), (1, 3)):
        config = TrainConfig(data_dir=str(data_dir), aug=("normalize",), iters=iters,
                             batch_size=20, eval_every=1000, device="cpu", threads=1, seed=seed)
        done = train_run(config, Tracking(tracking_uri, "adversarial", f"tiny {seed}"))
        assert done.model_uri == f"runs:/{done.run_id}/model"
        ids.append(done.run_id)
    return ids


def attack(models, data_dir, tracking_uri, *args):
    result = cli("attack", "--model", f"runs:/{models[0]}/model", "--data-dir", data_dir,
                 "--device", "cpu", "--threads", "1", "--tracking-uri", tracking_uri,
                 "--experiment", "adversarial", *args)
    return result


def runs_in(tracking_uri, experiment="adversarial"):
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def download_set(tracking_uri, run_id, tmp_path):
    path = MlflowClient(tracking_uri).download_artifacts(run_id, SET_ARTIFACT, str(tmp_path))
    return torch.load(path, weights_only=True)


def last_run_id(result):
    line = next(l for l in result.stdout.splitlines() if l.startswith("run "))
    return line.split()[1]


def test_attack_logs_a_linked_run_whose_set_round_trips(models, data_dir, tracking_uri, tmp_path):
    result = attack(models, data_dir, tracking_uri, "--eps", "1/255", "--per-class", "2")
    assert result.exit_code == 0, result.output
    assert "ifgsm: each image" in result.stdout and "goal reached on" in result.stdout
    client = MlflowClient(tracking_uri)
    run = client.get_run(last_run_id(result))
    assert run.info.status == "FINISHED"
    assert run.data.tags["cifarx.source_run"] == models[0]
    assert run.data.tags["cifarx.attack"] == "ifgsm"
    assert run.data.params["attack.eps"] == str(1 / 255)
    assert run.data.params["attack.confidence"] == "0.99" and run.data.params["images"] == "20"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "figures")] == \
        ["figures/adversarial.png"]

    adv_set = download_set(tracking_uri, run.info.run_id, tmp_path)
    assert set(adv_set) == SET_KEYS
    assert adv_set["model_uri"] == f"runs:/{models[0]}/model" and adv_set["attack"] == "ifgsm"
    assert adv_set["adv_images"].dtype == torch.float32
    assert adv_set["labels"].bincount().tolist() == [2] * 10

    # The originals are the test images; re-predicting the stored images gives what the attack saw.
    data = plan(TrainConfig(data_dir=str(data_dir))).load_data()
    assert torch.equal(adv_set["images"], data.test_images[adv_set["indices"]].float() / 255)
    assert torch.equal(adv_set["labels"], data.test_labels[adv_set["indices"]])
    model = load_model(f"runs:/{models[0]}/model", tracking_uri).eval()
    with torch.no_grad():
        probs = model(adv_set["adv_images"]).softmax(1)
        clean = model(adv_set["images"]).softmax(1)
    assert torch.equal(probs.argmax(1), adv_set["adv_labels"])
    assert torch.allclose(probs.amax(1), adv_set["adv_conf"], atol=1e-5)
    assert (clean.argmax(1) == adv_set["labels"]).all()  # only images the model got right
    wrong = probs.scatter(1, adv_set["labels"][:, None], 0).amax(1)
    assert torch.equal(adv_set["success"], wrong >= 0.99)  # the independent re-check
    delta = (adv_set["adv_images"] - adv_set["images"]).flatten(1)
    assert torch.allclose(adv_set["linf"], delta.abs().amax(1))
    assert torch.allclose(adv_set["l2"], delta.norm(dim=1))
    # The stored images are the attack's own float32 output, not rounded to 8 bits.
    again = catalog().get("attack", "ifgsm").build(for_attack(model), eps=1 / 255)(
        adv_set["images"], adv_set["labels"], torch.Generator().manual_seed(0))
    assert torch.equal(again.images, adv_set["adv_images"])
    assert torch.equal(again.steps, adv_set["steps"])

    metrics = run.data.metrics
    assert metrics["attack/images"] == 20 and len(adv_set["labels"]) == 20
    assert adv_set["labels"].bincount(minlength=10).tolist() == [2] * 10  # 2 per class kept
    assert metrics["attack/replaced"] >= 0 and run.data.params["replace"] == "true"  # as other booleans
    assert metrics["attack/success_rate"] == pytest.approx(adv_set["success"].float().mean().item())
    assert metrics["attack/mean_steps"] == pytest.approx(adv_set["steps"].float().mean().item())
    assert metrics["attack/linf_max"] == pytest.approx(adv_set["linf"].max().item())
    assert metrics["attack/l2_mean"] == pytest.approx(adv_set["l2"].mean().item(), rel=1e-5)
    assert metrics["attack/seconds"] > 0


def test_transfer_numbers_equal_a_direct_recomputation(models, data_dir, tracking_uri, tmp_path):
    sources = []
    for args in (["--attack", "fgsm", "--eps", "8/255", "--count", "30"],
                 ["--attack", "pgd", "--eps", "0.02", "--steps", "3", "--target", "next"]):
        result = attack(models, data_dir, tracking_uri, *args)
        assert result.exit_code == 0, result.output
        sources.append(last_run_id(result))
    uris = [f"runs:/{m}/model" for m in models]
    result = cli("transfer", "--adversarial", sources[0], "--adversarial", sources[1],
                 "--model", uris[0], "--model", uris[1], "--device", "cpu",
                 "--tracking-uri", tracking_uri, "--experiment", "adversarial")
    assert result.exit_code == 0, result.output
    assert "transfer of adversarial images" in result.stdout

    client = MlflowClient(tracking_uri)
    run = client.get_run(last_run_id(result))
    assert run.data.tags["cifarx.adversarial_runs"] == ",".join(sources)
    report = json.loads(open(client.download_artifacts(run.info.run_id, "transfer.json",
                                                       str(tmp_path))).read())
    assert [a.path for a in client.list_artifacts(run.info.run_id, "figures")] == \
        ["figures/transfer_matrix.png"]
    assert len(report["cells"]) == 4
    for i, source in enumerate(sources):
        adv_set = download_set(tracking_uri, source, tmp_path / source)
        for j, uri in enumerate(uris):
            model = load_model(uri, tracking_uri).eval()
            with torch.no_grad():
                clean = model(adv_set["images"]).argmax(1)
                adv = model(adv_set["adv_images"]).argmax(1)
            labels = adv_set["labels"]
            ok = clean == labels
            fooled = adv_set["adv_labels"] != labels
            expected = {
                "clean_acc": ok.float().mean().item(),
                "adv_acc": (adv == labels).float().mean().item(),
                "transfer_rate": (adv != labels)[ok].float().mean().item(),
                "same_class_rate": (adv == adv_set["adv_labels"])[ok & fooled].float().mean().item()
                if (ok & fooled).any() else None,
            }
            cell = next(c for c in report["cells"] if c["source"] == report["sources"][i]["key"]
                        and c["target"] == report["targets"][j]["key"])
            for name, value in expected.items():
                if value is None:
                    assert cell[name] is None
                    continue
                assert cell[name] == pytest.approx(value)
                assert report["matrix"][name][i][j] == pytest.approx(value)
                key = f"transfer/{cell['source']}/{cell['target']}/{name}"
                assert run.data.metrics[key] == pytest.approx(value)
            if i == 1:  # the targeted set: how often the target model picks the attack's target
                hit = (adv == adv_set["targets"]).float().mean().item()
                assert cell["target_rate"] == pytest.approx(hit)
            if j == 1:  # the weak model gets some originals wrong: they do not count
                assert 0 < cell["clean_acc"] < 1
            if i == j == 0:  # the source model itself: every image it got right, now wrong
                assert cell["clean_acc"] == 1
                success = adv_set["success"].float().mean().item()
                assert cell["transfer_rate"] == pytest.approx(success)


@pytest.mark.parametrize("args, fragments", [
    (["--model", "runs:/0123456789abcdef0123456789abcdef/model"], ["no run '0123456789abcdef0123456789abcdef' in the store"]),
    (["--attack", "nope"], ["unknown attack 'nope'",
                            "available: autoattack, fgsm, fool-noise, ifgsm, pgd"]),
    # The schema checks the values. The flag the user typed (--eps, not --attack-opt eps) is
    # checked in test_an_attack_flag_is_named_in_its_message.
    (["--eps", "0"], [refused("eps", "0", "ifgsm", f"{FLOAT} in (0, 1]")]),
    (["--eps", "2"], [refused("eps", "2", "ifgsm", f"{FLOAT} in (0, 1]")]),
    (["--eps", "1/0"], [refused("eps", "1/0", "ifgsm", f"{FLOAT} in (0, 1]"), "8/255"]),
    (["--confidence", "1"], [refused("confidence", "1", "ifgsm", f"{FLOAT} in (0, 1)")]),
    (["--confidence", "0"], [refused("confidence", "0", "ifgsm", f"{FLOAT} in (0, 1)")]),
    (["--attack-opt", "eps=2"],
     ["error: " + refused("--attack-opt eps", "2", "ifgsm", f"{FLOAT} in (0, 1]")]),
    (["--attack", "pgd", "--attack-opt", "random_start=maybe"],
     ["error: " + refused("--attack-opt random_start", "maybe", "pgd", BOOL)]),
    (["--per-class", "1000"], ["--per-class 1000: the model classifies only", "correctly",
                               "accepted: --per-class 1 to"]),
    (["--count", "5", "--all-test"], ["--count and --all-test both choose the images"]),
    (["--batch-size", "0"], ["--batch-size must be at least 1, got 0"]),
    (["--attack", "fgsm", "--alpha", "1/255"], [no_option("alpha", "1/255", "fgsm", "eps")]),
    (["--attack", "fgsm", "--attack-opt", "alpha=1/255"],
     ["error: " + no_option("--attack-opt alpha", "1/255", "fgsm", "eps")]),
    (["--attack-opt", "eps"], ["error: --attack-opt 'eps': expected NAME=VALUE"]),
    (["--target", "zebra"], ["error: --target 'zebra' is not a class", "airplane"]),
    (["--attack-opt", "target=12"], ["error: --attack-opt target '12' is not a class",
                                     "accepted: next, 0 to 9"]),
])
def test_bad_attack_input_is_one_line_and_opens_no_run(models, data_dir, tracking_uri, args,
                                                        fragments):
    before = len(runs_in(tracking_uri))
    one_line_error(attack(models, data_dir, tracking_uri, *args), *fragments)
    assert len(runs_in(tracking_uri)) == before




@pytest.mark.parametrize("args, message", [
    (["--eps", "2"], refused("--eps", "2", "ifgsm", f"{FLOAT} in (0, 1]")),
    (["--eps", "1/0"], refused("--eps", "1/0", "ifgsm", f"{FLOAT} in (0, 1]")),
    (["--confidence", "1"], refused("--confidence", "1", "ifgsm", f"{FLOAT} in (0, 1)")),
    (["--attack", "pgd", "--steps", "0"], refused("--steps", "0", "pgd", f"{WHOLE} in [1, inf)")),
    (["--attack", "fgsm", "--alpha", "1/255"], no_option("--alpha", "1/255", "fgsm", "eps")),
])
def test_an_attack_flag_is_named_in_its_message(models, data_dir, tracking_uri, args, message):
    one_line_error(attack(models, data_dir, tracking_uri, *args), f"cifarx: error: {message}")


def test_attack_run_and_transfer_run_from_python(models, data_dir, tracking_uri, tmp_path):
    """The runs layer the CLI calls: what it returns is what it logged."""
    from cifarx.inference.transfer import transfer_scores
    from cifarx.runs import AttackConfig, TransferConfig, attack_run, transfer_run

    heard = []
    before = len(runs_in(tracking_uri))
    done = attack_run(AttackConfig(model=f"runs:/{models[0]}/model", attack="fgsm",
                                   attack_options=("eps=4/255",), per_class=1,
                                   data_dir=str(data_dir), device="cpu"),
                      Tracking(tracking_uri, "adversarial", "fgsm from python"), catalog(),
                      lambda n, device: heard.append((n, str(device))))
    assert heard == [(10, "cpu")]  # once, with the run open
    assert len(runs_in(tracking_uri)) == before + 1
    client = MlflowClient(tracking_uri)
    run = client.get_run(done.run_id)
    assert run.info.run_name == "fgsm from python" and run.info.status == "FINISHED"
    assert run.info.experiment_id == done.experiment_id
    assert run.data.tags["cifarx.source_run"] == models[0]
    assert float(run.data.params["attack.eps"]) == 4 / 255
    stored = download_set(tracking_uri, done.run_id, tmp_path)
    assert set(stored) == set(done.adv_set) == SET_KEYS
    for key, value in done.adv_set.items():
        assert torch.equal(stored[key], value) if torch.is_tensor(value) else stored[key] == value
    assert {k: run.data.metrics[k] for k in done.metrics} == pytest.approx(done.metrics)
    assert done.metrics["attack/images"] == 10 and done.adv_set["labels"].tolist() == list(range(10))
    assert (done.adv_set["linf"] <= 4 / 255 + 1e-6).all()

    # The same set twice, by run id and as a set.pt file: two sources with the same numbers.
    path = tmp_path / "copy.pt"
    torch.save(stored, path)
    target = f"runs:/{models[1]}/model"
    moved = transfer_run(TransferConfig(adversarial=(done.run_id, str(path), done.run_id),
                                        models=(target,), device="cpu"),
                         Tracking(tracking_uri, "adversarial"))
    assert [s["ref"] for s in moved.sources] == [done.run_id, str(path)]  # repeats dropped
    assert moved.sources[0]["key"] == done.run_id[:8] and moved.targets[0]["key"] == models[1][:8]
    assert len(moved.cells) == 2
    expected = transfer_scores(stored, for_attack(load_model(target, tracking_uri)),
                               torch.device("cpu"))
    for cell in moved.cells:
        assert {k: v for k, v in cell.items() if k not in ("source", "target")} == \
            pytest.approx(expected, nan_ok=True)
    transfer = client.get_run(moved.run_id)
    assert transfer.info.run_name == "transfer 2 set(s) to 1 model(s)"
    assert transfer.data.tags["cifarx.adversarial_runs"] == f"{done.run_id},{path}"
    assert transfer.data.params[f"model.{models[1][:8]}"] == target


def test_attack_config_option_flags_name_the_flag_in_messages(models, data_dir, tracking_uri):
    from cifarx.errors import UserError
    from cifarx.runs import AttackConfig, attack_run

    config = AttackConfig(model=f"runs:/{models[0]}/model", attack_options=("eps=2",),
                          option_flags={"eps": "--eps"}, data_dir=str(data_dir), device="cpu")
    with pytest.raises(UserError, match=exactly(refused("--eps", "2", "ifgsm",
                                                        f"{FLOAT} in (0, 1]"))):
        attack_run(config, Tracking(tracking_uri, "adversarial"))


def test_a_run_without_a_model_or_a_set_is_one_line(models, data_dir, tracking_uri):
    result = attack(models, data_dir, tracking_uri, "--attack", "fgsm", "--per-class", "1")
    assert result.exit_code == 0, result.output
    attack_run = last_run_id(result)
    one_line_error(cli("attack", "--model", f"runs:/{attack_run}/model", "--data-dir", data_dir,
                       "--tracking-uri", tracking_uri, "--device", "cpu"),
                   f"run {attack_run} (", "has no model at 'model'", "adversarial",
                   "`cifarx train` runs log theirs as runs:/<run id>/model")
    one_line_error(cli("transfer", "--adversarial", models[0], "--model",
                       f"runs:/{models[0]}/model", "--tracking-uri", tracking_uri),
                   f"--adversarial {models[0]}: the run has no adversarial set")
    one_line_error(cli("transfer", "--adversarial", "0123456789abcdef0123456789abcdef", "--model",
                       f"runs:/{models[0]}/model", "--tracking-uri", tracking_uri),
                   "no such run", "accepted: the run id of a `cifarx attack` run")
    one_line_error(cli("transfer", "--adversarial", attack_run, "--model", "runs:/nope/model",
                       "--tracking-uri", tracking_uri), "--model runs:/nope/model: no run 'nope' in the store")


def test_fool_noise_starts_from_noise_and_keeps_it(models, data_dir, tracking_uri, tmp_path):
    result = attack(models, data_dir, tracking_uri, "--attack", "fool-noise", "--eps", "2/255",
                    "--per-class", "1")
    assert result.exit_code == 0, result.output
    adv_set = download_set(tracking_uri, last_run_id(result), tmp_path)
    assert torch.equal(adv_set["targets"], torch.arange(10))  # one image pushed to each class
    assert torch.equal(adv_set["adv_labels"][adv_set["success"]],
                       adv_set["targets"][adv_set["success"]])
    assert adv_set["success"].all() and (adv_set["adv_conf"] >= 0.99).all()
    assert (adv_set["indices"] == -1).all()  # the originals are noise, not test images
    noise = adv_set["images"]
    assert noise.min() >= 0 and noise.max() <= 1 and noise.std() > 0.25  # uniform: std 0.29
    model = load_model(f"runs:/{models[0]}/model", tracking_uri).eval()
    with torch.no_grad():
        assert torch.equal(model(noise).argmax(1), adv_set["labels"])  # the noise's own class
    assert not math.isnan(adv_set["conf"].sum().item())


def test_help_lists_attack_and_transfer_with_their_options():
    assert {"attack", "transfer"} <= set(cli("--help").stdout.split())
    attack_help = cli("attack", "--help").stdout
    for option in ("--model", "--attack", "--eps", "--confidence", "--max-steps", "--alpha",
                   "--steps", "--target", "--attack-opt", "--per-class", "--count", "--all-test",
                   "--batch-size", "--dataset", "--data-dir", "--device", "--seed", "--threads",
                   "--experiment", "--run-name", "--tracking-uri"):
        assert option in attack_help
    transfer_help = cli("transfer", "--help").stdout
    for option in ("--adversarial", "--model", "--device", "--experiment", "--tracking-uri"):
        assert option in transfer_help


def test_transfer_table_is_one_row_per_pair_or_a_matrix():
    from rich.console import Console

    def render(sources, targets):
        cells = [{"source": s["key"], "target": t["key"], "images": 10, "clean_acc": 0.9,
                  "adv_acc": 0.1 * (i + 1), "transfer_rate": 0.5 + 0.1 * i,
                  "same_class_rate": float("nan")}
                 for i, (s, t) in enumerate((s, t) for s in sources for t in targets)]
        console = Console(width=80, record=True)
        console.print(transfer_table(sources, targets, cells))
        return console.export_text()

    sets = [{"key": f"s{i}", "label": f"pgd s{i}"} for i in range(2)]
    models = [{"key": f"m{i}", "label": f"convonly m{i}"} for i in range(3)]
    one = render(sets[:1], models[:1])
    assert "acc adv." in one and "50.0%" in one and "10.0%" in one and "-" in one
    matrix = render(sets, models)
    rows = [line for line in matrix.splitlines() if "pgd s" in line]
    assert len(rows) == 2  # one line per set, a column per model
    assert "50.0% / 10.0%" in rows[0] and "100.0% / 60.0%" in rows[1]
    assert all(f"convonly m{i}" in matrix for i in range(3))
