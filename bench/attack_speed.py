"""Attack speed: the batched attack against a per-image loop doing the same work, side by side.

Both run the same attack function (by default ifgsm to 99% confidence with step 1/255, the
assignment's) with the same model on the same test images that the model classifies correctly:
batched, as `cifarx attack` runs it (whole batches, each image stopping on its own); per image,
one image at a time, as a student's loop would. Reported: images/s of each and the ratio (goal
>= 2.5x on the 2-core CPU), and how far the two agree (steps and success per image).

    python bench/attack_speed.py [--model runs:/<id>/model] [--data-dir DIR] [--images 1000]
        [--attack ifgsm] [--eps 1/255] [--batch-size 500] [--threads N] [--device cpu]

Without --model it first trains a table1 net (flip, crop) for --iters iterations, untracked.
"""

from __future__ import annotations

import argparse
import time

import torch

from cifarx.inference import adversarial, predict as inference
from cifarx.plugin_api.registry import catalog
from cifarx.tracking import common, models
from cifarx.training import config as cfg, loop
from cifarx.training.data import resolve_device


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="runs:/<id>/model or a model folder [default: train one]")
    parser.add_argument("--tracking-uri", help="where --model's run is [default: as cifarx]")
    parser.add_argument("--data-dir")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--attack", default="ifgsm")
    parser.add_argument("--eps", default="1/255", help="eps option of the attack")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--iters", type=int, default=500,
                        help="training iterations without --model")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    config = cfg.TrainConfig(arch="table1", aug=("flip", "crop"), data_dir=args.data_dir,
                             iters=args.iters, device=str(device), threads=args.threads)
    plan = cfg.plan(config)
    data = plan.load_data()
    if args.model:
        model = models.load_model(args.model, common.tracking_uri(args.tracking_uri), device)
        source = args.model
    else:
        trained, seconds = timed(lambda: loop.train(plan, data))
        model = trained.model.to(memory_format=torch.contiguous_format)
        source = f"table1 trained here, {args.iters} iterations in {seconds:.0f} s, test " \
                 f"accuracy {trained.test_acc:.2%}"
    model = adversarial.for_attack(model.to(device))

    chosen = catalog().get("attack", args.attack)
    options = cfg.resolve_plugin_options("attack", chosen, [f"eps={args.eps}"])
    attack = chosen.build(model, **options)
    predicted = inference.predict(model, data.test_images, device).cpu().argmax(1)
    indices, _ = adversarial.choose(predicted, data.test_labels, data.classes,
                                    ("count", args.images), args.seed)
    images, labels = data.test_images[indices], data.test_labels[indices]
    print(f"{chosen.name} {options} on {len(indices)} correctly classified test images; model: "
          f"{source}; {device}, {args.threads} threads", flush=True)

    adversarial.generate(attack, images[:8], labels[:8], device, 8, args.seed)  # warm-up
    batched, batched_s = adversarial.generate(attack, images, labels, device, args.batch_size,
                                              args.seed)
    print(f"batched (batches of {args.batch_size}): {len(indices) / batched_s:8.1f} img/s  "
          f"{batched_s:7.1f} s", flush=True)
    single, single_s = adversarial.generate(attack, images, labels, device, 1, args.seed)
    print(f"per image (a loop of batch 1):  {len(indices) / single_s:8.1f} img/s  "
          f"{single_s:7.1f} s", flush=True)

    steps_b = torch.cat([r.steps.cpu() for r in batched])
    steps_1 = torch.cat([r.steps.cpu() for r in single])
    success_b = torch.cat([r.success.cpu() for r in batched])
    success_1 = torch.cat([r.success.cpu() for r in single])
    print(f"\nsame work: mean steps {steps_b.float().mean():.2f} batched, "
          f"{steps_1.float().mean():.2f} per image; same steps for "
          f"{(steps_b == steps_1).float().mean():.1%} of images, same success for "
          f"{(success_b == success_1).float().mean():.1%} (float sums differ by batch size)")
    print(f"speed-up, batched vs per image: {single_s / batched_s:.2f}x  (goal >= 2.5x)")


if __name__ == "__main__":
    main()
