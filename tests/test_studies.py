"""Study files: parsing, the configurations they expand to, and every bad input as one line."""

from pathlib import Path

import pytest

from cifarx import UserError
from cifarx.studies.configurations import configurations
from cifarx.studies.flags import overrides, with_flags
from cifarx.studies.study import axes_of, from_dict, load, raw_of
from cifarx.training.config import plan

ROOT = Path(__file__).resolve().parents[1]

MINIMAL = '''
experiment = "part1-seeds"
seeds = 3
[train]
arch = "table1"
iters = 2000
eval-every = 100
[grid]
aug = ["raw", "normalize", "normalize,flip", "normalize,flip,crop"]
lr = [0.05, 0.1]
'''


def write(tmp_path, text, name="study.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_issue_s_minimal_study_expands_to_its_grid(tmp_path):
    study = load(write(tmp_path, MINIMAL))
    assert study.experiment == "part1-seeds" and study.seeds == (0, 1, 2)
    points = configurations(study)
    assert len(points) == 8 and axes_of(study) == ["aug", "lr"]
    assert points[0].axes == {"aug": "raw", "lr": 0.05}
    first = points[0].config
    assert (first.arch, first.iters, first.eval_every, first.lr, first.aug) == \
        ("table1", 2000, 100, 0.05, ("raw",))
    assert points[-1].config.aug == ("normalize", "flip", "crop")
    assert len({p.key for p in points}) == 8  # one key per configuration


def test_plugin_options_are_axes_and_fixed_values(tmp_path):
    study = load(write(tmp_path, '''
seeds = [0, 5]
[train]
arch = "convonly"
aug-opt.crop.pad = 2
[grid]
arch-opt.activation = ["relu", "silu"]
arch-opt.init = ["he"]
'''))
    assert study.seeds == (0, 5)
    points = configurations(study)
    assert [p.axes for p in points] == [{"arch-opt.activation": "relu", "arch-opt.init": "he"},
                                        {"arch-opt.activation": "silu", "arch-opt.init": "he"}]
    config = points[1].config
    assert config.arch_options == ("activation=silu", "init=he")
    assert config.aug_options == ("crop.pad=2",)
    assert plan(config).arch_options == {"activation": "silu", "init": "he", "dropout": 0.0,
                                         "batchnorm": True}


def test_listed_configurations_combine_with_the_grid():
    study = from_dict({"configurations": [{"optimizer": "adam", "lr": 1e-3},
                                          {"optimizer": "nesterov", "lr": 0.1}],
                       "grid": {"schedule": ["none", "onecycle"]}})
    points = configurations(study)
    assert [(p.config.optimizer, p.config.lr, p.config.schedule) for p in points] == [
        ("adam", 1e-3, "none"), ("adam", 1e-3, "onecycle"),
        ("nesterov", 0.1, "none"), ("nesterov", 0.1, "onecycle")]


def test_random_search_draws_within_its_ranges_and_repeats_with_its_seed():
    raw = {"search": "random", "trials": 12, "search-seed": 3,
           "random": {"lr": {"log-uniform": [1e-3, 1e-1]}, "momentum": {"uniform": [0.8, 0.95]},
                      "iters": {"int": [10, 20]}, "aug": {"choice": ["flip", "flip,crop"]}}}
    points = configurations(from_dict(raw))
    assert len(points) == 12
    assert all(1e-3 <= p.config.lr <= 1e-1 and 0.8 <= p.config.momentum <= 0.95
               and 10 <= p.config.iters <= 20 for p in points)
    assert {p.config.aug for p in points} == {("flip",), ("flip", "crop")}
    assert [p.axes for p in configurations(from_dict(raw))] == [p.axes for p in points]
    other = configurations(from_dict({**raw, "search-seed": 4}))
    assert [p.axes for p in other] != [p.axes for p in points]


def test_fractions_and_command_line_text_are_typed():
    study = from_dict(with_flags({}, ["lr=1/10,0.2", "iters=5", "aug=flip", "aug=flip,crop"],
                                 ["batch-size=20", "arch-opt.init=he"]))
    points = configurations(study)
    assert [(p.config.lr, p.config.aug) for p in points] == [
        (0.1, ("flip",)), (0.1, ("flip", "crop")), (0.2, ("flip",)), (0.2, ("flip", "crop"))]
    assert points[0].config.iters == 5 and points[0].config.batch_size == 20
    assert points[0].config.arch_options == ("init=he",)


def test_flags_override_the_file(tmp_path):
    study = load(write(tmp_path, MINIMAL))
    raw = with_flags(raw_of(study), ["lr=0.2"], ["aug=flip"])
    changed = overrides(from_dict(raw), seeds=2, experiment="other")
    assert changed.grid == {"lr": ["0.2"]} and changed.train["aug"] == "flip"
    assert changed.seeds == (0, 1) and changed.experiment == "other"
    assert len(configurations(changed)) == 1


def test_the_study_round_trips_through_its_raw_form(tmp_path):
    study = load(write(tmp_path, MINIMAL))
    again = from_dict(raw_of(study))
    assert [p.key for p in configurations(again)] == [p.key for p in configurations(study)]


@pytest.mark.parametrize("name", ["part1", "defaults", "optimizers", "activations", "mixup"])
def test_the_shipped_studies_plan(name):
    study = load(ROOT / "studies" / f"{name}.toml")
    points = configurations(study)
    assert points
    for point in points:
        plan(point.config)  # every name and value accepted
    expected = {"part1": (4, 5), "defaults": (16, 3), "optimizers": (20, 3),
                "activations": (15, 3), "mixup": (3, 3)}[name]
    assert (len(points), len(study.seeds)) == expected


@pytest.mark.parametrize("text, message", [
    ("seeds = [", "not valid TOML"),
    ("colour = 3", "unknown key 'colour'"),
    ("[grid]\nlearning-rate = [0.1]", "unknown option 'learning-rate'"),
    ("[grid]\nseed = [1, 2]", "seeds are given by `seeds`"),
    ("[grid]\nlr = []", "[grid] lr = []; accepted: a non-empty list"),
    ("[grid]\nlr = 0.1", "[grid] lr = 0.1; accepted: a non-empty list"),
    ("[train]\nlr = 0.1\n[grid]\nlr = [0.2]", "lr is both fixed ([train]) and swept"),
    ("seeds = 0", "seeds = 0; accepted: a count >= 1"),
    ("search = \"bayes\"", "search = 'bayes'; accepted: grid, random"),
    ("search = \"random\"\n[random]\nlr = {uniform = [0, 1]}", "needs trials = N"),
    ("search = \"random\"\ntrials = 2\n[random]\nlr = {normal = [0, 1]}", "expected one of"),
    ("search = \"random\"\ntrials = 2\n[random]\nlr = {log-uniform = [0, 1]}",
     "log-uniform needs 0 < low < high"),
    ("[train]\niters = \"many\"", "iters = 'many': not accepted; expected a whole number"),
    ("[grid]\narch-opt = [\"silu\"]", "expected NAME = value"),
    ("[grid]\naug-opt.pad = [2]", "expected PLUGIN.NAME = value"),
])
def test_bad_study_files_are_one_clear_error(tmp_path, text, message):
    with pytest.raises(UserError) as caught:
        for point in configurations(load(write(tmp_path, text))):
            plan(point.config)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_value_an_option_refuses_names_the_configuration():
    from cifarx.studies.sweep_plan import plan_sweep

    study = from_dict({"grid": {"arch-opt.activation": ["relu", "tanh"]}})
    with pytest.raises(UserError, match=r"study \(arch-opt.activation=tanh\): --arch-opt "
                                        r"activation=tanh: not accepted by table1"):
        plan_sweep(study)


def test_a_missing_file_is_one_line(tmp_path):
    with pytest.raises(UserError, match="cannot read it"):
        load(tmp_path / "nope.toml")


def test_a_trials_key_holds_only_the_options_it_changes():
    """A new option with its default must leave every key as it was: sweeps started before it
    still resume."""
    import dataclasses

    from cifarx.studies.configurations import config_key
    from cifarx.training.config import TrainConfig

    base = TrainConfig(arch="table1", lr=0.05, seed=1)
    assert config_key(base) == config_key(TrainConfig(seed=1, lr=0.05))  # table1 is the default
    assert config_key(base) != config_key(dataclasses.replace(base, seed=2))
    Grown = dataclasses.make_dataclass("Grown", [("new_option", float, 0.0)], bases=(TrainConfig,),
                                       frozen=True)
    assert config_key(Grown(arch="table1", lr=0.05, seed=1)) == config_key(base)


RANDOM = '''
search = "random"
trials = 3
[train]
iters = 5
[random]
lr = {log-uniform = [0.01, 0.1]}
weight-decay = {log-uniform = [1e-5, 1e-3]}
'''
LISTED = '''
[[configurations]]
lr = 0.05
weight-decay = 1e-4
[[configurations]]
lr = 0.1
weight-decay = 1e-4
[[configurations]]
lr = 0.1
weight-decay = 1e-3
'''


@pytest.mark.parametrize("text, grid, fixed, expected", [
    # a [random] key: --set fixes it, --grid sweeps it instead
    (RANDOM, [], ["lr=0.02"], {"lr": {"0.02"}, "weight-decay": None}),
    (RANDOM, ["lr=0.02,0.03"], [], {"lr": {"0.02", "0.03"}, "weight-decay": None}),
    # a [[configurations]] key: the configurations that differed only in it are one now
    (LISTED, [], ["lr=0.2"], {"lr": {"0.2"}, "weight-decay": {1e-4, 1e-3}}),
    (LISTED, ["lr=0.2,0.3"], [], {"lr": {"0.2", "0.3"}, "weight-decay": {1e-4, 1e-3}}),
])
def test_flags_win_over_every_table_of_the_file(tmp_path, text, grid, fixed, expected):
    study = load(write(tmp_path, text))
    changed = from_dict(with_flags(raw_of(study), grid, fixed))
    points = configurations(changed)
    for key, values in expected.items():
        if values is None:  # still drawn at random
            assert len({p.axes[key] for p in points}) == len(points)
        else:
            found = {p.axes.get(key, changed.train.get(key)) for p in points}
            # a random search draws from a --grid axis's values
            assert found <= values if changed.search == "random" else found == values
    assert len({p.key for p in points}) == len(points)  # no training twice
    if fixed and text == LISTED:
        assert len(points) == 2


def test_an_option_of_a_plugin_a_configuration_does_not_use_is_left_out_of_it():
    study = from_dict({"search": "random", "trials": 12, "train": {"iters": 5},
                       "grid": {"aug": ["normalize", "normalize,flip"]},
                       "random": {"aug-opt.flip.p": {"uniform": [0.2, 0.8]}}})
    points = configurations(study)
    without = [p for p in points if "flip" not in p.config.aug]
    assert without and all("aug-opt.flip.p" not in p.axes for p in without)
    assert all(p.config.aug_options == () for p in without)
    assert len(without) == 1  # the same training once, not once per draw of p
    for point in points:
        plan(point.config)
        if "flip" in point.config.aug:
            assert point.config.aug_options == (f"flip.p={point.axes['aug-opt.flip.p']!r}",)
    # the default aug (flip, crop) uses flip; a configuration naming another aug does not
    study = from_dict({"grid": {"aug-opt.flip.p": [0.3]},
                       "configurations": [{"aug": "normalize"}, {"lr": 0.2}]})
    assert [(p.axes, p.config.aug_options) for p in configurations(study)] == [
        ({"aug": "normalize"}, ()), ({"lr": 0.2, "aug-opt.flip.p": 0.3}, ("flip.p=0.3",))]
    # a plugin no configuration uses: a misspelling, refused as before
    study = from_dict({"grid": {"aug": ["normalize"], "aug-opt.flp.p": [0.5]}})
    with pytest.raises(UserError, match="'flp' is not among the plugins"):
        plan(configurations(study)[0].config)
