"""Augmentation speed: cifarx's augmentations against kornia, torchvision.transforms.v2 and timm,
side by side in one run, on a batch of CIFAR-sized images on the CPU.

For each augmentation, every candidate that can do it transforms the same batch (100 images of
3x32x32, float in [0, 1]; test images of CIFAR-10 when a data dir is given, else uniform noise):

- cifarx: the built-in plugin, as training calls it (parameters drawn per image from the run's
  torch.Generator, batched tensor code: affine_grid-style sampling grids and grid_sample, ...);
- kornia: kornia.augmentation's module (per-image parameters, drawn from torch's global RNG:
  no torch.Generator can be passed);
- kornia fn: kornia's functional ops (rotate, warp_affine, warp_perspective, adjust_*,
  gaussian_blur2d) with per-image parameter tensors drawn here from a torch.Generator;
- tv batch: torchvision.transforms.v2 called once on the batch, as it is meant to be on a batch:
  ONE parameter set for all 100 images (global RNG), so it does not meet "per image";
- tv loop: the same transform called on each image in a Python loop (per-image parameters,
  global RNG);
- timm: timm.data.Mixup for mixup and cutmix, mode "batch" (one lam per batch) and "elem" (a lam
  per image, drawn in a Python loop; numpy's global RNG).

Candidates alternate for --rounds rounds and the best of each counts (the machine is shared).
Reported: images per second; "-" where the library has no such operation.

    python bench/aug_speed.py [--data-dir DIR] [--threads 1] [--batch 100] [--rounds 3]

kornia is optional here (`pip install -c constraints.txt 'cifarx[bench]'`); without it its
columns read "not installed".
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from cifarx.plugin_api.registry import catalog

COLUMNS = ("cifarx", "kornia", "kornia fn", "tv batch", "tv loop", "timm batch", "timm elem")
# (the augmentation, its options as cifarx takes them): the defaults, made to apply always where
# a plugin has a probability, so that every candidate does the same work on every image.
AUGS = {
    "rotation": {"degrees": 15.0},
    "affine": {"scale": 0.1, "translate": 0.1, "shear": 10.0},
    "perspective": {"distortion": 0.5, "p": 1.0},
    "color-jitter": {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.05},
    "grayscale": {"p": 1.0},
    "noise": {"sigma": 0.05},
    "salt-pepper": {"amount": 0.05},
    "blur": {"sigma": 1.0, "p": 1.0},
    "erasing": {"p": 1.0},
    "mixup": {"alpha": 1.0},
    "cutmix": {"alpha": 1.0},
}


def images_per_second(fn, batch: int, min_seconds: float) -> float:
    for _ in range(3):  # warm-up
        fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return calls * batch / elapsed


def cifarx_candidates(x, y, gen):
    found = catalog()
    candidates = {}
    for name, options in AUGS.items():
        aug = found.get("augmentation", name)
        values = {**{k: o.default for k, o in aug.options.items()}, **options}
        if aug.stage == "mix":
            candidates[name] = lambda a=aug, v=values: a.apply(x, y, gen, **v)
        else:
            candidates[name] = lambda a=aug, v=values: a.apply(x, gen, **v)
    return candidates


def kornia_candidates(x, y, gen):
    """kornia's augmentation modules (global RNG) and functional ops (our generator)."""
    import kornia
    import kornia.augmentation as K
    from kornia.geometry import transform as T

    n, _, h, w = x.shape
    labels = y.argmax(1)

    def draw(low, high, *shape):
        return low + (high - low) * torch.rand(*(shape or (n,)), generator=gen)

    centre = torch.tensor([[(w - 1) / 2, (h - 1) / 2]]).expand(n, 2)

    def affine():
        scale = draw(0.9, 1.1)[:, None].expand(n, 2)
        shift = torch.stack([draw(-0.1, 0.1) * w, draw(-0.1, 0.1) * h], 1)
        m = T.get_affine_matrix2d(shift, centre, scale, torch.zeros(n), draw(-10, 10),
                                  draw(-10, 10))
        return T.warp_affine(x, m[:, :2], (h, w), align_corners=False)

    def perspective():
        corners = torch.tensor([[0.0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]])
        half = torch.tensor([(w - 1) / 2, (h - 1) / 2])
        sign = torch.tensor([[1, 1], [-1, 1], [-1, -1], [1, -1]])
        moved = corners + sign * draw(0, 0.5, n, 4, 2) * half
        return T.warp_perspective(x, T.get_perspective_transform(corners.expand(n, 4, 2), moved),
                                  (h, w), align_corners=False)

    def jitter():
        out = kornia.enhance.adjust_brightness(x, draw(-0.2, 0.2))
        out = kornia.enhance.adjust_contrast(out, draw(0.8, 1.2))
        out = kornia.enhance.adjust_saturation(out, draw(0.8, 1.2))
        return kornia.enhance.adjust_hue(out, draw(-0.05, 0.05) * 2 * math.pi)

    def blur():
        sigma = draw(0, 1)[:, None].clamp_min(1e-3).expand(n, 2)
        return kornia.filters.gaussian_blur2d(x, (7, 7), sigma)

    modules = {
        "rotation": K.RandomRotation(15.0, p=1.0),
        "affine": K.RandomAffine(0.0, translate=(0.1, 0.1), scale=(0.9, 1.1),
                                 shear=(-10.0, 10.0, -10.0, 10.0), p=1.0),
        "perspective": K.RandomPerspective(0.5, p=1.0),
        "color-jitter": K.ColorJitter(0.2, 0.2, 0.2, 0.05, p=1.0),
        "grayscale": K.RandomGrayscale(p=1.0),
        "noise": K.RandomGaussianNoise(std=0.05, p=1.0),
        "salt-pepper": K.RandomSaltAndPepperNoise(amount=0.05, salt_vs_pepper=0.5, p=1.0),
        "blur": K.RandomGaussianBlur((7, 7), (0.1, 1.0), p=1.0),
        "erasing": K.RandomErasing(p=1.0),
        "mixup": K.RandomMixUpV2(p=1.0),
        "cutmix": K.RandomCutMixV2(p=1.0),
    }
    module_calls = {name: (lambda m=m: m(x, labels)) if name in ("mixup", "cutmix") else
                    (lambda m=m: m(x)) for name, m in modules.items()}
    functional = {
        "rotation": lambda: T.rotate(x, draw(-15, 15), align_corners=False),
        "affine": affine,
        "perspective": perspective,
        "color-jitter": jitter,
        "grayscale": lambda: kornia.color.rgb_to_grayscale(x).expand_as(x),
        "blur": blur,
    }
    return module_calls, functional


def torchvision_candidates(x, y):
    from torchvision.transforms import v2

    transforms = {
        "rotation": v2.RandomRotation(15),
        "affine": v2.RandomAffine(0, translate=(0.1, 0.1), scale=(0.9, 1.1),
                                  shear=(-10, 10, -10, 10)),
        "perspective": v2.RandomPerspective(0.5, p=1.0),
        "color-jitter": v2.ColorJitter(0.2, 0.2, 0.2, 0.05),
        "grayscale": v2.RandomGrayscale(p=1.0),
        "noise": v2.GaussianNoise(sigma=0.05),
        "blur": v2.GaussianBlur(7, sigma=(0.1, 1.0)),
        "erasing": v2.RandomErasing(p=1.0),
    }
    labels = y.argmax(1)
    batch = {name: (lambda t=t: t(x)) for name, t in transforms.items()}
    batch["mixup"] = lambda m=v2.MixUp(alpha=1.0, num_classes=y.shape[1]): m(x, labels)
    batch["cutmix"] = lambda m=v2.CutMix(alpha=1.0, num_classes=y.shape[1]): m(x, labels)
    per_image = {name: (lambda t=t: torch.stack([t(image) for image in x]))
                 for name, t in transforms.items()}
    return batch, per_image


def timm_candidates(x, y):
    from timm.data import Mixup

    labels = y.argmax(1)
    found = {}
    for mode in ("batch", "elem"):
        for name, alphas in (("mixup", (1.0, 0.0)), ("cutmix", (0.0, 1.0))):
            mix = Mixup(mixup_alpha=alphas[0], cutmix_alpha=alphas[1], mode=mode,
                        label_smoothing=0.0, num_classes=y.shape[1])
            # timm mixes in place: each call gets a fresh copy (0.1 ms, counted)
            found.setdefault(f"timm {mode}", {})[name] = lambda m=mix: m(x.clone(), labels)
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="CIFAR-10 (cifar-10-batches-py) for real images")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=0.5, help="per measurement")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.data_dir:
        data = catalog().get("dataset", "cifar10").load(args.data_dir, "batch1")
        x = data.test_images[:args.batch].float() / 255
        labels = data.test_labels[:args.batch]
    else:
        x = torch.rand(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        labels = torch.arange(args.batch) % 10
    y = torch.nn.functional.one_hot(labels, 10).float()
    gen = torch.Generator().manual_seed(0)

    columns = {"cifarx": cifarx_candidates(x, y, gen)}
    try:
        columns["kornia"], columns["kornia fn"] = kornia_candidates(x, y, gen)
    except ImportError:
        columns["kornia"] = columns["kornia fn"] = None
    columns["tv batch"], columns["tv loop"] = torchvision_candidates(x, y)
    columns.update(timm_candidates(x, y))

    best: dict[tuple[str, str], float] = {}
    for round_ in range(args.rounds):
        for name in AUGS:
            for column, candidates in columns.items():
                if candidates and name in candidates:
                    speed = images_per_second(candidates[name], args.batch, args.seconds)
                    best[name, column] = max(best.get((name, column), 0.0), speed)
        print(f"round {round_ + 1} of {args.rounds} done", flush=True)

    source = "CIFAR-10 test images" if args.data_dir else "noise"
    print(f"\nimages per second, batch of {args.batch} ({source}, 3x32x32), {args.threads} "
          f"thread(s), torch {torch.__version__}\n")
    print("| augmentation | " + " | ".join(COLUMNS) + " |")
    print("| --- |" + " ---: |" * len(COLUMNS))
    for name in AUGS:
        cells = []
        for column in COLUMNS:
            if columns.get(column) is None:
                cells.append("not installed")
            elif (name, column) in best:
                cells.append(f"{best[name, column]:,.0f}")
            else:
                cells.append("-")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
