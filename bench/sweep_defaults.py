"""Choose the default training hyperparameters by measurement.

Trains an architecture (table1 unless --arch) with each candidate setting under the assignment's
protocol (train batch #1, 2,000 iterations of 100, evaluated every 100) and prints the final test
accuracy of each, best first. Every run is logged to MLflow (experiment "defaults-sweep").

    python bench/sweep_defaults.py --data-dir DIR [--arch table1] [--aug flip,crop] [--seeds 0,1]
        [--threads N] [--precision auto|fp32|bf16]

The README's table: --threads 1 --precision fp32.
"""

from __future__ import annotations

import argparse
import statistics

from cifarx import config as cfg, runs

CANDIDATES = [
    dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="none"),
    dict(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="none"),
    dict(optimizer="nesterov", lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine"),
    dict(optimizer="nesterov", lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="step"),
    dict(optimizer="nesterov", lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="exponential"),
    dict(optimizer="nesterov", lr=0.02, momentum=0.9, weight_decay=5e-4, schedule="onecycle"),
    dict(optimizer="nesterov", lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="onecycle"),
    dict(optimizer="nesterov", lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="onecycle"),
    dict(optimizer="nesterov", lr=0.2, momentum=0.9, weight_decay=5e-4, schedule="onecycle"),
    dict(optimizer="nesterov", lr=0.1, momentum=0.9, weight_decay=0.0, schedule="onecycle"),
    dict(optimizer="nesterov", lr=0.1, momentum=0.9, weight_decay=2e-3, schedule="onecycle"),
    dict(optimizer="adam", lr=1e-3, momentum=0.9, weight_decay=0.0, schedule="none"),
    dict(optimizer="adam", lr=3e-3, momentum=0.9, weight_decay=0.0, schedule="onecycle"),
    dict(optimizer="rmsprop", lr=1e-3, momentum=0.0, weight_decay=0.0, schedule="cosine"),
    dict(optimizer="adagrad", lr=0.05, momentum=0.0, weight_decay=0.0, schedule="none"),
    dict(optimizer="adadelta", lr=1.0, momentum=0.0, weight_decay=0.0, schedule="none"),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--arch", default="table1")
    parser.add_argument("--aug", default="flip,crop")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--precision", default="auto", choices=cfg.PRECISIONS)
    parser.add_argument("--only", help="comma list of candidate numbers (1-based) to run")
    parser.add_argument("--tracking-uri")
    args = parser.parse_args()

    chosen = [int(i) for i in args.only.split(",")] if args.only else range(1, len(CANDIDATES) + 1)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    for number in chosen:
        hp = CANDIDATES[number - 1]
        accs = []
        for seed in seeds:
            config = cfg.TrainConfig(arch=args.arch, aug=cfg.parse_list(args.aug),
                                     data_dir=args.data_dir, seed=seed, threads=args.threads,
                                     precision=args.precision, **hp)
            name = f"#{number} " + " ".join(f"{k}={v}" for k, v in hp.items()) + f" seed={seed}"
            result = runs.train_run(config, runs.Tracking(args.tracking_uri, "defaults-sweep",
                                                          name)).result
            accs.append(result.test_acc)
            print(f"{name}: {result.test_acc:.2%} ({result.seconds:.0f} s)", flush=True)
        results.append((statistics.mean(accs), number, hp, accs))
    print("\nbest first (mean final test accuracy over seeds):")
    for mean, number, hp, accs in sorted(results, key=lambda r: -r[0]):
        print(f"{mean:.2%}  #{number:<2} {hp}  {[f'{a:.2%}' for a in accs]}")


if __name__ == "__main__":
    main()
