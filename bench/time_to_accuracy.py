"""Time to 94% (90%, 85%) on CIFAR-10 with the recipe studies/cifar10-94.toml, on this machine.

Every variant is the recipe file as shipped with one change, trained and evaluated as `cifarx
sweep` would (the same config, plan, model assembly and training loop), without MLflow:

- ``recipe``: as shipped (bf16 autocast); its shorter budgets (--budgets, iterations of 2,000
  images) give the time to the lower accuracies;
- ``fp32``: in float32;
- ``no-muon``: SGD with Nesterov momentum on the filters too, at the same rates;
- ``no-whiten``: a trained 3x3 conv in place of the frozen whitening layer;
- ``no-dirac``: PyTorch's default init for every conv;
- ``no-tta``: evaluated on the test images alone (no mirrored and shifted views);
- ``no-smoothing``: plain cross-entropy;
- ``zero-pad``: crops padded with zeros rather than the mirrored edge;
- ``ema``: the recipe plus --ema 0.99 (not in the recipe: what averaging adds).

Per run: the wall time from model assembly (whitening included) to the final test accuracy
(the one evaluation, with its test-time views), data loading excluded; the accuracy without
the test-time views is measured on the same model. ``--from-sweep RUN_ID`` takes the recipe's
shipped-budget rows from the trials of `cifarx sweep studies/cifar10-94.toml` instead (their
training loops' time, from each trial's final.json), so the five seeds are not trained twice. Reported per variant:
seeds, the mean test accuracy with its Student-t 95% interval, the mean time, the ratio of
times to the recipe's, and for the recipe a one-sided t-test that its mean exceeds 94% (as the
record holders report theirs). Also: FLOPs per training image (forward and backward, counted by
torch.utils.flop_counter on one batch) and the share of this CPU's measured matmul peak (bf16 and
fp32, 2048x2048) that the recipe reached.

Results go to --out as JSON, one entry per run, written as each finishes; a rerun with the same
--out skips what is there, so an interrupted bench resumes.

    python bench/time_to_accuracy.py --data-dir DIR [--seeds 5] [--variants recipe,fp32,...]
        [--budgets 200,100,50] [--out time_to_accuracy.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from cifarx.studies import study as studies
from cifarx.training import config as cfg, loop

RECIPE = Path(__file__).resolve().parents[1] / "studies" / "cifar10-94.toml"
TARGETS = (0.94, 0.90, 0.85)


def variants(base: cfg.TrainConfig) -> dict[str, cfg.TrainConfig]:
    def with_option(options: tuple[str, ...], text: str) -> tuple[str, ...]:
        key = text.split("=", 1)[0]
        return tuple(o for o in options if o.split("=", 1)[0] != key) + (text,)

    return {
        "recipe": base,
        "fp32": replace(base, precision="fp32"),
        "no-muon": replace(base, optimizer="nesterov"),
        "no-whiten": replace(base, arch_options=with_option(base.arch_options, "whiten=false")),
        "no-dirac": replace(base, arch_options=with_option(base.arch_options, "dirac=false")),
        "no-tta": replace(base, tta="none"),
        "no-smoothing": replace(base, label_smoothing=0.0),
        "zero-pad": replace(base, aug_options=with_option(base.aug_options,
                                                          "crop.padding=zeros")),
        "ema": replace(base, ema=0.99),
    }


def run_once(config: cfg.TrainConfig, data) -> dict:
    from cifarx.inference.predict import evaluate

    plan = cfg.plan(config)
    start = time.perf_counter()
    setup = loop.assemble(plan, data)
    result = loop.train(plan, data, setup)
    wall = time.perf_counter() - start
    _, plain, _ = evaluate(result.model, data.test_images, data.test_labels, plan.device,
                           config.precision, "none")
    return {"test_acc": result.test_acc, "test_acc_no_tta": float(plain), "seconds": wall,
            "train_seconds": result.seconds, "images_per_second": result.images_per_second}


def from_sweep(run_id: str, tracking_uri: str, iters: int, data) -> dict:
    """The recipe's rows from a `cifarx sweep studies/cifar10-94.toml` run: each finished
    trial's final test accuracy, its training loop's time (final.json), and its logged model's
    accuracy without the test-time views."""
    from mlflow import MlflowClient

    from cifarx.inference.predict import evaluate
    from cifarx.tracking.models import load_model

    client = MlflowClient(tracking_uri)
    sweep = client.get_run(run_id)
    trials = client.search_runs([sweep.info.experiment_id],
                                f"tags.`mlflow.parentRunId` = '{run_id}'")
    rows = {}
    for trial in trials:
        if trial.info.status != "FINISHED":
            continue
        final = client.download_artifacts(trial.info.run_id, "final.json")
        timings = json.loads(Path(final).read_text())
        model = load_model(f"runs:/{trial.info.run_id}/model", tracking_uri)
        _, plain, _ = evaluate(model, data.test_images, data.test_labels, torch.device("cpu"),
                               trial.data.params["precision"], "none")
        rows[f"recipe/{iters}/{trial.data.params['seed']}"] = {
            "test_acc": trial.data.metrics["final/test_acc"], "test_acc_no_tta": float(plain),
            "seconds": timings["final/train_seconds"],
            "train_seconds": timings["final/train_seconds"],
            "images_per_second": timings["final/images_per_second"], "sweep": run_id}
    return rows


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of this CPU's best n x n matmul at the current thread count."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def train_flops_per_image(config: cfg.TrainConfig, data, batch: int = 64) -> float:
    """FLOPs of one training image: forward and backward of the recipe's net, counted."""
    from torch.utils.flop_counter import FlopCounterMode

    plan = cfg.plan(replace(config, device="cpu"))
    model = loop.assemble(plan, data).model.float()
    x = model.normalize(data.train_images[:batch].float() / 255)
    with FlopCounterMode(display=False) as counter:
        model.net(x).sum().backward()
    return counter.get_total_flops() / batch


def summary(values: list[float]) -> tuple[float, float, float]:
    """Mean, sd and the Student-t 95% interval's half-width (nan for one value), as sweeps
    compute them."""
    from cifarx.studies.stats import _describe

    d = _describe(values, 0.95)
    return d["mean"], d["std"], (d["ci_high"] - d["ci_low"]) / 2


def above(values: list[float], target: float) -> float:
    """One-sided p-value of "the mean exceeds target" (t-test)."""
    from scipy import stats

    if len(values) < 2:
        return math.nan
    return float(stats.ttest_1samp(values, target, alternative="greater").pvalue)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--variants", default="recipe")
    parser.add_argument("--variant-seeds", type=int, default=1,
                        help="seeds of every variant but the recipe")
    parser.add_argument("--budgets", default="200,100,50",
                        help="iterations of the recipe; the first is the shipped one")
    parser.add_argument("--out", default="time_to_accuracy.json")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--from-sweep", metavar="RUN_ID",
                        help="take the recipe's shipped-budget rows from this sweep's trials")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    args = parser.parse_args()

    study = studies.load(RECIPE)
    base = studies.apply(study.train, str(RECIPE))
    if args.data_dir:
        base = replace(base, data_dir=args.data_dir)
    table = variants(base)
    unknown = set(args.variants.split(",")) - set(table)
    if unknown:
        parser.error(f"unknown variant {sorted(unknown)[0]}; accepted: {', '.join(table)}")
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.exists() else {}
    plan = cfg.plan(base)
    data = plan.load_data()
    if args.from_sweep:
        done.update(from_sweep(args.from_sweep, args.tracking_uri, base.iters, data))
        out.write_text(json.dumps(done, indent=1))

    budgets = [int(b) for b in args.budgets.split(",")]
    jobs = [("recipe", iters, seed) for iters in budgets for seed in range(args.seeds)]
    jobs += [(name, base.iters, seed) for name in args.variants.split(",") if name != "recipe"
             for seed in range(args.variant_seeds)]
    for name, iters, seed in ([] if args.report_only else jobs):
        key = f"{name}/{iters}/{seed}"
        if key in done:
            continue
        config = replace(table[name], iters=iters, eval_every=iters, seed=seed)
        done[key] = run_once(config, data)
        out.write_text(json.dumps(done, indent=1))
        print(f"{key}: {done[key]['test_acc']:.2%} in {done[key]['seconds']:.0f} s", flush=True)

    report(done, base, data)


def report(done: dict, base: cfg.TrainConfig, data):
    groups: dict[tuple[str, int], list[dict]] = {}
    for key, value in done.items():
        name, iters, _ = key.split("/")
        groups.setdefault((name, int(iters)), []).append(value)
    recipe_seconds = summary([r["seconds"] for r in groups.get(("recipe", base.iters), [])
                              ] or [math.nan])[0]
    print(f"\n{'variant':<14}{'iters':>6}{'n':>3}{'test acc (95% CI)':>22}{'no TTA':>8}"
          f"{'seconds':>9}{'x recipe':>9}{'img/s':>7}")
    for (name, iters), rows in sorted(groups.items(), key=lambda g: (g[0][0] != "recipe",
                                                                     g[0][0], -g[0][1])):
        accs = [r["test_acc"] for r in rows]
        mean, _, half = summary(accs)
        seconds = summary([r["seconds"] for r in rows])[0]
        speed = summary([r["images_per_second"] for r in rows])[0]
        plain = [r["test_acc_no_tta"] for r in rows if "test_acc_no_tta" in r]
        plain_text = f"{summary(plain)[0]:>8.2%}" if plain else f"{'':>8}"
        interval = f"± {half:>6.2%}" if half == half else f"{'(n=1)':>8}"
        print(f"{name:<14}{iters:>6}{len(rows):>3}{mean:>12.2%} {interval}{plain_text}"
              f"{seconds:>9.0f}{seconds / recipe_seconds:>9.2f}{speed:>7.0f}")
    for target in TARGETS:
        reached = [(iters, rows) for (name, iters), rows in groups.items()
                   if name == "recipe" and summary([r["test_acc"] for r in rows])[0] >= target]
        if reached:
            iters, rows = min(reached, key=lambda g: g[0])
            seconds = summary([r["seconds"] for r in rows])[0]
            print(f"time to {target:.0%}: {seconds / 60:.1f} min ({iters} iterations, "
                  f"n={len(rows)})")
        else:
            print(f"time to {target:.0%}: not reached by any budget")
    shipped = [r["test_acc"] for r in groups.get(("recipe", base.iters), [])]
    if len(shipped) >= 2:
        print(f"recipe: P(mean <= 94%) by a one-sided t-test: p = {above(shipped, 0.94):.3g}")
    flops = train_flops_per_image(base, data)
    rows = groups.get(("recipe", base.iters), [])
    if rows:
        speed = summary([r["images_per_second"] for r in rows])[0]
        for dtype in (torch.bfloat16, torch.float32):
            peak = matmul_peak(dtype)
            print(f"FLOPs per training image {flops / 1e9:.3f} G; at {speed:.0f} img/s the "
                  f"recipe uses {flops * speed / peak:.0%} of the {str(dtype)[6:]} matmul peak "
                  f"({peak / 1e9:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
