"""``cifarx reproduce assignment``: the CIS680 assignment (parts 1 to 3) trained, attacked and
reported by one command.

The work is two sweeps and a few attack and transfer runs, all in one MLflow experiment:

1. part 1: the Table-1 net with the four pipelines (raw, normalize, +flip, +crop), seeds;
2. part 2: convonly, plain20 and residual with the gradient probe ``grad-max``, seeds;
3. part 3: ``ifgsm`` two images per class on seed 0's model of part 1's last pipeline and of
   each part-2 net (step 1/255 until a wrong class has 99%), then every set fed to every model.

Every step finds its earlier result (a sweep its trials by digest, an attack or transfer its
run by the tag ``cifarx.reproduce``), so an interrupted reproduction run again does only what
is missing. :mod:`cifarx.reports.assignment` writes the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import UserError
from ..studies.compare import same_value

STEP_TAG = "cifarx.reproduce"  # on attack and transfer runs: which step made them
PART1 = {"1.1": "raw", "1.2": "normalize", "1.3": "normalize,flip", "1.4": "normalize,flip,crop"}
PART2 = {"2.1": "convonly", "2.3": "plain20", "2.4": "residual"}
PART2_AUG = "normalize,flip,crop"


@dataclass(frozen=True)
class Protocol:
    """How much is run: seeds per configuration and the training's length."""

    name: str
    seeds: int
    iters: int
    eval_every: int
    workers: int = 2  # trials at once, one CPU thread each


FULL = Protocol("full", seeds=5, iters=2000, eval_every=100)
# about 12 minutes on a 2-core CPU: every step of the full one, shorter and with 2 seeds
QUICK = Protocol("quick", seeds=2, iters=300, eval_every=50)


def studies_of(protocol: Protocol, experiment: str, data_dir: str | None) -> dict[str, Any]:
    """The two sweeps as study files would write them."""
    train = {"iters": protocol.iters, "eval-every": protocol.eval_every, "batch-size": 100,
             "threads": 1, **({"data-dir": data_dir} if data_dir else {})}
    executor = {"name": "local", "workers": protocol.workers}
    return {
        "part1": {"experiment": experiment, "seeds": protocol.seeds,
                  "train": {**train, "arch": "table1"},
                  "grid": {"aug": list(PART1.values())}, "executor": executor},
        "part2": {"experiment": experiment, "seeds": protocol.seeds,
                  "train": {**train, "aug": PART2_AUG, "probe": "grad-max"},
                  "grid": {"arch": list(PART2.values())}, "executor": executor},
    }


@dataclass
class Plan:
    protocol: Protocol
    experiment: str
    uri: str
    sweeps: dict[str, Any]  # part -> SweepPlan
    data_dir: str | None

    def describe(self) -> list[str]:
        from ..studies.sweep_plan import trial_name

        lines = []
        for part, sweep in self.sweeps.items():
            for trial in sweep.trials:
                lines.append(f"{part}  {trial_name(trial.axes, trial.config.seed)}")
        for arch in ("table1", *PART2.values()):
            lines.append(f"part3  ifgsm, 2 images per class, on {arch} (seed 0)")
        n = 1 + len(PART2)
        lines.append(f"part3  transfer: the {n} sets x the {n} models")
        lines.append("report assignment.html, assignment.md")
        return lines


def plan(protocol: Protocol, experiment: str, uri: str, data_dir: str | None,
         catalog=None) -> Plan:
    """Every trial checked (names, options, data dir), no run opened."""
    from ..studies import study as studies
    from ..studies.sweep_plan import plan_sweep

    sweeps = {}
    for part, raw in studies_of(protocol, experiment, data_dir).items():
        study = studies.from_dict(raw, f"the assignment's {part}")
        sweeps[part] = plan_sweep(study, "local", [f"workers={protocol.workers}"], {}, uri,
                                  catalog)
    return Plan(protocol, experiment, uri, sweeps, data_dir)


@dataclass
class Done:
    sweeps: dict[str, str]  # part -> sweep run id
    models: dict[str, str]  # arch (table1 = part 1's last pipeline) -> model URI (seed 0)
    attacks: dict[str, str] = field(default_factory=dict)  # arch -> attack run id
    transfer: str | None = None  # the transfer run's id
    reused: list[str] = field(default_factory=list)  # steps found done earlier
    problems: dict[str, str] = field(default_factory=dict)  # arch -> why its attack failed


def _seed0_models(uri: str, sweep_id: str, key: str, values: dict[str, str]) -> dict[str, str]:
    """The model of seed 0 of each configuration (param ``key``) of a sweep."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    experiment = client.get_run(sweep_id).info.experiment_id
    found: dict[str, str] = {}
    for run in client.search_runs([experiment], max_results=10000,
                                  filter_string=f"tags.`mlflow.parentRunId` = '{sweep_id}' and "
                                                "attributes.status = 'FINISHED' and "
                                                "params.seed = '0'"):
        for name, value in values.items():
            if same_value(value, run.data.params.get(key, "")):
                found[name] = f"runs:/{run.info.run_id}/model"
    return {name: found[name] for name in values if name in found}


def _earlier(uri: str, experiment: str, step: str, signature: str) -> str | None:
    """A FINISHED run of this step made from the same inputs, if one exists."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], max_results=1,
                              filter_string=f"tags.`{STEP_TAG}` = '{step}' and tags."
                                            f"`{STEP_TAG}.inputs` = '{signature}' and "
                                            "attributes.status = 'FINISHED'")
    return runs[0].info.run_id if runs else None


def run(the_plan: Plan, say: Callable[[str], None] = lambda line: None) -> Done:
    """Every step, skipping what an earlier invocation finished."""
    import hashlib

    from ..runs.attack import AttackConfig, attack_run
    from ..runs.common import Tracking
    from ..runs.transfer import TransferConfig, transfer_run
    from ..studies.sweep import sweep_run

    ids = {}
    for part, sweep in the_plan.sweeps.items():
        result = sweep_run(sweep, on_start=lambda run_id, to_run, earlier, part=part: say(
            f"{part}: sweep run {run_id}, {to_run} trial(s) to run ({earlier} done earlier)"))
        failed = [o for o in result.failed]
        if failed:
            raise UserError(f"{part}: {len(failed)} trial(s) failed ({failed[0].error}); run "
                            "the same command again to retry them")
        ids[part] = result.run_id
    models = _seed0_models(the_plan.uri, ids["part1"], "aug", {"table1": PART1["1.4"]})
    models.update(_seed0_models(the_plan.uri, ids["part2"], "arch",
                                {a: a for a in PART2.values()}))
    missing = [a for a in ("table1", *PART2.values()) if a not in models]
    if missing:
        raise UserError(f"no finished seed-0 model of {', '.join(missing)} in the sweeps")
    done = Done(ids, models)
    tracking = lambda step, inputs: Tracking(  # noqa: E731
        the_plan.uri, the_plan.experiment, None,
        tags={STEP_TAG: step, f"{STEP_TAG}.inputs": inputs}, system_metrics=False)
    for arch, model in models.items():
        step, inputs = f"attack-{arch}", hashlib.sha1(model.encode()).hexdigest()[:16]
        earlier = _earlier(the_plan.uri, the_plan.experiment, step, inputs)
        if earlier:
            done.attacks[arch] = earlier
            done.reused.append(step)
            continue
        say(f"part3: ifgsm on {arch} ({model})")
        config = AttackConfig(model=model, attack="ifgsm", per_class=2,
                              attack_options=("eps=1/255", "confidence=0.99"),
                              data_dir=the_plan.data_dir, device="auto")
        try:
            done.attacks[arch] = attack_run(config, tracking(step, inputs)).run_id
        except UserError as exc:  # a weak model (a short protocol): its set is left out
            if arch == "table1":
                raise
            done.problems[arch] = str(exc)
            say(f"part3: no set for {arch}: {exc}")
    sets = tuple(done.attacks.values())
    inputs = hashlib.sha1(",".join(sets + tuple(models.values())).encode()).hexdigest()[:16]
    earlier = _earlier(the_plan.uri, the_plan.experiment, "transfer", inputs)
    if earlier:
        done.transfer = earlier
        done.reused.append("transfer")
    else:
        say("part3: transfer matrix")
        done.transfer = transfer_run(TransferConfig(sets, tuple(models.values())),
                                     tracking("transfer", inputs)).run_id
    return done
