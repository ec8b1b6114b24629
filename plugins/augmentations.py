"""Built-in augmentations: raw / normalize (the model's input scaling), flip and crop, the
geometric, colour and noise ones, erasing, and mixup and cutmix.

A training batch goes: pixels in [0, 1] -> "pixels" stage (flip, rotation, colour, noise, ...)
-> the "normalize" stage's module -> "normalized" stage (crop, erasing) -> "mix" stage (mixup,
cutmix: images and soft labels) -> network. The normalize module is saved inside the model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cifarx import Augmentation, Option, OptionError, hookimpl


class Standardize(nn.Module):
    """Per-channel (x - mean) / std, with statistics measured on the training split."""

    def __init__(self, mean: Tensor, std: Tensor):
        super().__init__()
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1).float())
        self.register_buffer("std", std.reshape(1, -1, 1, 1).float())

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class Scale(nn.Module):
    """Multiply by a constant: ``Scale(255)`` gives the raw pixel values 0..255."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


def channel_stats(images: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation per channel of uint8 images, in [0, 1] units.

    From each channel's histogram of the 256 pixel values: exact, and ten times faster than
    summing the pixels as floats (this runs at the start of every training).
    """
    counts = torch.stack([torch.bincount(channel.reshape(-1), minlength=256)
                          for channel in images.transpose(0, 1)]).cpu().double()
    values = torch.arange(256, dtype=torch.float64) / 255
    n = counts.sum(1)
    mean = counts @ values / n
    variance = (counts * (values - mean[:, None]).square()).sum(1) / n
    return mean, variance.sqrt()


def fit_standardize(train_images: Tensor) -> nn.Module:
    mean, std = channel_stats(train_images)
    return Standardize(mean, std.clamp_min(1e-6))


def fit_raw(train_images: Tensor) -> nn.Module:
    return Scale(255.0)


def random_flip(images: Tensor, generator: torch.Generator, p: float = 0.5,
                alternate: bool = False, indices: Tensor | None = None, epoch: int = 0) -> Tensor:
    """Mirror each image left-right with probability ``p``.

    ``alternate`` (the speed records' alternating flip): in the first epoch an image is
    mirrored with probability ``p``, then in every later epoch exactly when it was not in the
    one before, so that each image is seen both ways in any two epochs in a row. Which images
    start mirrored is a fixed hash of their position in the training set (``indices``).
    """
    if alternate and indices is not None:
        start = (indices * 2654435761 % 2 ** 32).float() / 2 ** 32 < p  # Knuth's hash
        flip = (start ^ bool(epoch % 2)).view(-1, 1, 1, 1)
    else:
        flip = torch.rand(images.shape[0], 1, 1, 1, generator=generator,
                          device=images.device) < p
    return torch.where(flip, images.flip(-1), images)


def random_crop(images: Tensor, generator: torch.Generator, pad: int = 4,
                padding: str = "zeros") -> Tensor:
    """Pad ``pad`` pixels on each side, then cut a random window of the original size.

    It runs after normalization, where zero is the channel mean (or black, with ``raw``);
    ``padding="reflection"`` mirrors the edge instead (the speed records' translate by 2).
    """
    n, c, h, w = images.shape
    if padding == "reflection" and pad >= min(h, w):
        raise ValueError(f"crop: reflection padding of {pad} needs images larger than {pad} "
                         f"pixels, got {h}x{w}")
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect" if padding == "reflection"
                   else "constant")
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # every window: (n, c, 2p+1, 2p+1, h, w), a view
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=images.device)
    # One gather of whole windows: twice as fast as indexing rows and columns separately.
    return windows[torch.arange(n, device=images.device), :, dy, dx]


# --- The augmentations with random parameters -----------------------------------------------
# Each draws its parameters per image from the run's generator, in a few batched tensor ops
# (no loop over images), and returns its input unchanged at the option value that disables it.
# Chosen over kornia, torchvision.transforms.v2 and timm by bench/aug_speed.py (README).

PADDINGS = ("zeros", "border", "reflection")  # grid_sample's: black, edge pixels, mirror
GRAY = (0.2989, 0.587, 0.114)  # luma weights of R, G, B (ITU-R 601), as torchvision's


def uniform(n: int, low: float, high: float, generator: torch.Generator,
            device: torch.device) -> Tensor:
    """``n`` numbers uniform in [low, high)."""
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def chosen(n: int, p: float, generator: torch.Generator, device: torch.device) -> Tensor:
    """Which of ``n`` images an augmentation of probability ``p`` changes, shaped (n, 1, 1, 1)."""
    return (torch.rand(n, generator=generator, device=device) < p).view(n, 1, 1, 1)


def beta(alpha: float, n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """``n`` draws of Beta(alpha, alpha), as G1 / (G1 + G2) with Gamma(alpha) draws:
    torch.distributions takes no generator. In float64, where both gammas underflow to 0 only
    for a tiny alpha (about 1e-6 of the draws at alpha 0.01); such a draw counts as 1."""
    g = torch._standard_gamma(torch.full((2, n), alpha, dtype=torch.float64, device=device),
                              generator=generator)
    return (g[0] / g.sum(0)).nan_to_num(1.0).float()


def warp(images: Tensor, inverse: Tensor, padding: str) -> Tensor:
    """Resample each image through its own 3x3 matrix (n, 3, 3), which maps an output pixel
    (x, y, 1), in pixels from the image's centre (y down), to the input point it reads;
    bilinear, with ``padding`` outside the image."""
    n, _, h, w = images.shape
    ys = (torch.arange(h, device=images.device) - (h - 1) / 2).view(1, h, 1)
    xs = (torch.arange(w, device=images.device) - (w - 1) / 2).view(1, 1, w)
    m = inverse.reshape(n, 9, 1, 1).unbind(1)
    # Written out, not a matmul of every point: 1.5x faster than F.affine_grid on the CPU.
    depth = m[6] * xs + m[7] * ys + m[8]  # 1 for an affine map
    grid = torch.stack([(m[0] * xs + m[1] * ys + m[2]) / depth * (2 / w),  # grid_sample's units
                        (m[3] * xs + m[4] * ys + m[5]) / depth * (2 / h)], -1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding,
                         align_corners=False)


def matrices(n: int, device: torch.device, angle: Tensor | None = None, scale: Tensor | None = None,
             shear_x: Tensor | None = None, shear_y: Tensor | None = None,
             tx: Tensor | None = None, ty: Tensor | None = None) -> Tensor:
    """Per-image affine maps (n, 3, 3) about the image centre: scale, then shear, then rotate
    (angle in degrees), then translate (in pixels)."""
    m = torch.eye(3, device=device).repeat(n, 1, 1)
    if scale is not None:
        m[:, 0, 0], m[:, 1, 1] = scale, scale
    if shear_x is not None:
        shear = torch.eye(3, device=device).repeat(n, 1, 1)
        shear[:, 0, 1], shear[:, 1, 0] = torch.deg2rad(shear_x).tan(), torch.deg2rad(shear_y).tan()
        m = shear @ m
    if angle is not None:
        cos, sin = torch.deg2rad(angle).cos(), torch.deg2rad(angle).sin()
        rotate = torch.eye(3, device=device).repeat(n, 1, 1)
        rotate[:, 0, 0], rotate[:, 0, 1], rotate[:, 1, 0], rotate[:, 1, 1] = cos, sin, -sin, cos
        m = rotate @ m
    if tx is not None:
        m[:, 0, 2], m[:, 1, 2] = tx, ty
    return m


def random_rotation(images: Tensor, generator: torch.Generator, degrees: float = 15.0,
                    padding: str = "zeros") -> Tensor:
    """Rotate each image about its centre by an angle uniform in [-degrees, degrees]."""
    if degrees == 0:
        return images
    n = len(images)
    angle = uniform(n, -degrees, degrees, generator, images.device)
    return warp(images, matrices(n, images.device, angle=-angle), padding)  # the inverse map


def random_affine(images: Tensor, generator: torch.Generator, scale: float = 0.1,
                  translate: float = 0.1, shear: float = 10.0, padding: str = "zeros") -> Tensor:
    """Scale each image by a factor uniform in [1 - scale, 1 + scale], shear it along x and y by
    angles uniform in [-shear, shear] degrees, and shift it by up to ``translate`` of its width
    and height."""
    if scale == translate == shear == 0:
        return images
    n, _, h, w = images.shape
    draw = lambda low, high: uniform(n, low, high, generator, images.device)  # noqa: E731
    forward = matrices(n, images.device, scale=draw(1 - scale, 1 + scale),
                       shear_x=draw(-shear, shear), shear_y=draw(-shear, shear),
                       tx=draw(-translate, translate) * w, ty=draw(-translate, translate) * h)
    return warp(images, torch.linalg.inv(forward), padding)


def random_perspective(images: Tensor, generator: torch.Generator, distortion: float = 0.5,
                       p: float = 0.5, padding: str = "zeros") -> Tensor:
    """With probability ``p``, move each corner of the image inward by up to ``distortion`` of
    half its width and height (at random, per corner) and warp the image to that quadrilateral,
    as torchvision's RandomPerspective does."""
    if distortion == 0 or p == 0:
        return images
    n, _, h, w = images.shape
    corners = torch.tensor([[-1, -1], [1, -1], [1, 1], [-1, 1]], device=images.device)
    half = torch.tensor([(w - 1) / 2, (h - 1) / 2], device=images.device)
    inward = torch.rand(n, 4, 2, generator=generator, device=images.device) * distortion * half
    inputs = corners * half  # (4, 2): where the corners are
    outputs = inputs - corners * inward  # (n, 4, 2): where they go
    # The homography from each output corner (x, y) to its input corner (u, v): eight
    # equations u = (h1 x + h2 y + h3) / (h7 x + h8 y + 1), v likewise, per image.
    x, y = outputs.unbind(-1)
    u, v = inputs.expand(n, 4, 2).unbind(-1)
    zero, one = torch.zeros_like(x), torch.ones_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], -1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], -1)
    solution = torch.linalg.solve(torch.cat([rows_u, rows_v], 1), torch.cat([u, v], 1))
    inverse = torch.cat([solution, one[:, :1]], 1).view(n, 3, 3)
    warped = warp(images, inverse, padding)
    return torch.where(chosen(n, p, generator, images.device), warped, images)


def luma(images: Tensor) -> Tensor:
    """The grey level of each pixel, (n, 1, h, w); a one-channel image is its own."""
    if images.shape[1] != 3:
        return images.mean(1, keepdim=True)
    return (images * images.new_tensor(GRAY).view(1, 3, 1, 1)).sum(1, keepdim=True)


def blend(images: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    return (factor * images + (1 - factor) * other).clamp(0, 1)


def shift_hue(images: Tensor, shift: Tensor) -> Tensor:
    """Add ``shift`` (n,) turns to the hue of RGB images in [0, 1]: to HSV as torchvision does,
    back with the closed form (twice as fast as its table of six cases)."""
    r, g, b = images.unbind(1)
    # Elementwise over the three channels: a max() over dim 1 was a third of the time.
    value, low = torch.maximum(torch.maximum(r, g), b), torch.minimum(torch.minimum(r, g), b)
    chroma = value - low
    gray = chroma == 0
    saturation = chroma / torch.where(gray, 1.0, value)
    inverse = 1 / torch.where(gray, 1.0, chroma)
    hue = torch.where(value == r, (g - b) * inverse,
                      torch.where(value == g, 2.0 + (b - r) * inverse, 4.0 + (r - g) * inverse))
    hue = hue + 6.0 * shift.view(-1, 1, 1)  # in sixths of a turn
    k = (hue.unsqueeze(1) + hue.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)) % 6.0  # R, G, B
    return value.unsqueeze(1) * (1 - saturation.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1))


def color_jitter(images: Tensor, generator: torch.Generator, brightness: float = 0.2,
                 contrast: float = 0.2, saturation: float = 0.2, hue: float = 0.05) -> Tensor:
    """Scale brightness, contrast and saturation by factors uniform in [1 - x, 1 + x] (at
    least 0), then shift the hue by up to ``hue`` of the colour circle, in that order, each
    image by its own factors. One-channel images have no saturation or hue to change."""
    n = len(images)
    colour = images.shape[1] == 3

    def factors(amount):
        return uniform(n, max(0.0, 1 - amount), 1 + amount, generator,
                       images.device).view(n, 1, 1, 1)

    if brightness:
        images = (images * factors(brightness)).clamp(0, 1)
    if contrast:
        images = blend(images, luma(images).mean((2, 3), keepdim=True), factors(contrast))
    if saturation and colour:
        images = blend(images, luma(images), factors(saturation))
    if hue and colour:
        images = shift_hue(images, uniform(n, -hue, hue, generator, images.device))
    return images


def random_grayscale(images: Tensor, generator: torch.Generator, p: float = 0.1) -> Tensor:
    """Turn each image grey with probability ``p`` (its three channels all the luma)."""
    if p == 0 or images.shape[1] == 1:
        return images
    gray = luma(images).expand_as(images)
    return torch.where(chosen(len(images), p, generator, images.device), gray, images)


def gaussian_noise(images: Tensor, generator: torch.Generator, sigma: float = 0.05) -> Tensor:
    """Add noise of standard deviation ``sigma`` to every pixel value, clipped to [0, 1]."""
    if sigma == 0:
        return images
    noise = torch.randn(images.shape, generator=generator, device=images.device)
    return (images + sigma * noise).clamp(0, 1)


def salt_and_pepper(images: Tensor, generator: torch.Generator, amount: float = 0.05,
                    salt: float = 0.5) -> Tensor:
    """Set a share ``amount`` of the pixels (all channels) to white (a share ``salt`` of them)
    or black, each pixel at random."""
    if amount == 0:
        return images
    n, _, h, w = images.shape
    u = torch.rand(n, 1, h, w, generator=generator, device=images.device)
    return torch.where(u < amount, (u < amount * salt).to(images.dtype), images)


def gaussian_blur(images: Tensor, generator: torch.Generator, sigma: float = 1.0,
                  p: float = 0.5) -> Tensor:
    """With probability ``p``, blur each image with a Gaussian of standard deviation uniform
    in (0, sigma] pixels (kernel radius 3 sigma, mirrored at the borders)."""
    if sigma == 0 or p == 0:
        return images
    n, c, h, w = images.shape
    radius = min(math.ceil(3 * sigma), h - 1, w - 1)  # reflect padding needs less than the size
    sigmas = sigma * (1 - torch.rand(n, 1, generator=generator, device=images.device))
    offsets = torch.arange(-radius, radius + 1, device=images.device)
    kernels = torch.exp(-offsets.square() / (2 * sigmas.square()))
    kernels = (kernels / kernels.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n*c, 2r+1)
    # Separable: one grouped convolution along rows, one along columns, every image its own
    # kernel (a group per image and channel).
    x = F.pad(images, (radius,) * 4, mode="reflect").reshape(1, n * c, h + 2 * radius, -1)
    x = F.conv2d(x, kernels.view(n * c, 1, 1, -1), groups=n * c)
    x = F.conv2d(x, kernels.view(n * c, 1, -1, 1), groups=n * c).view(n, c, h, w)
    return torch.where(chosen(n, p, generator, images.device), x, images)


def random_erasing(images: Tensor, generator: torch.Generator, p: float = 0.5,
                   area_min: float = 0.02, area_max: float = 0.33, ratio: float = 3.3,
                   value: str = "zero") -> Tensor:
    """With probability ``p``, erase a rectangle of each image: a share of its area uniform in
    [area_min, area_max], an aspect ratio log-uniform in [1/ratio, ratio], anywhere inside.

    It runs after normalization: ``zero`` fills with the channel means (cutout), ``random``
    with standard normal noise (random erasing's)."""
    if p == 0 or area_max == 0:
        return images
    n, _, h, w = images.shape
    device = images.device
    draw = lambda low, high: uniform(n, low, high, generator, device)  # noqa: E731
    area = draw(area_min, area_max) * (h * w)
    aspect = draw(-math.log(ratio), math.log(ratio)).exp()
    height = (area * aspect).sqrt().round().clamp(1, h)
    width = (area / aspect).sqrt().round().clamp(1, w)
    top = (draw(0, 1) * (h - height + 1)).floor().view(n, 1, 1)
    left = (draw(0, 1) * (w - width + 1)).floor().view(n, 1, 1)
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    inside = (rows >= top) & (rows < top + height.view(n, 1, 1)) & \
        (cols >= left) & (cols < left + width.view(n, 1, 1))
    inside = inside.unsqueeze(1) & chosen(n, p, generator, device)
    fill = images.new_zeros(()) if value == "zero" else \
        torch.randn(images.shape, generator=generator, device=device)
    return torch.where(inside, fill, images)


def check_erasing(p, area_min, area_max, ratio, value):
    if area_min > area_max:
        raise OptionError("area_min", f"must be at most area_max ({area_max:g})")


def mixup(images: Tensor, targets: Tensor, generator: torch.Generator, alpha: float = 1.0,
          p: float = 1.0) -> tuple[Tensor, Tensor]:
    """Mixup (Zhang et al., 2018): with probability ``p``, replace each image and its soft
    label by lam * its own + (1 - lam) * a random partner's from the batch, lam ~ Beta(alpha,
    alpha) drawn per image."""
    if alpha == 0 or p == 0:
        return images, targets
    n = len(images)
    lam = beta(alpha, n, generator, images.device)
    lam = torch.where(chosen(n, p, generator, images.device).view(n), lam, 1.0)
    partner = torch.randperm(n, generator=generator, device=images.device)
    mixed = torch.lerp(images[partner], images, lam.view(n, 1, 1, 1))
    return mixed, torch.lerp(targets[partner], targets, lam.view(n, 1))


def cutmix(images: Tensor, targets: Tensor, generator: torch.Generator, alpha: float = 1.0,
           p: float = 1.0) -> tuple[Tensor, Tensor]:
    """CutMix (Yun et al., 2019): with probability ``p``, paste into each image a box of a
    random partner from the batch, of area (1 - lam) with lam ~ Beta(alpha, alpha) per image,
    centred anywhere (clipped at the borders); the soft label mixes in the partner's by the
    share of pixels the box really took."""
    if alpha == 0 or p == 0:
        return images, targets
    n, _, h, w = images.shape
    device = images.device
    lam = beta(alpha, n, generator, device)
    lam = torch.where(chosen(n, p, generator, device).view(n), lam, 1.0)
    side = (1 - lam).sqrt()
    height, width = (side * h).floor(), (side * w).floor()
    cy = (torch.rand(n, generator=generator, device=device) * h).floor()
    cx = (torch.rand(n, generator=generator, device=device) * w).floor()
    top, bottom = (cy - height // 2).clamp(0, h), (cy - height // 2 + height).clamp(0, h)
    left, right = (cx - width // 2).clamp(0, w), (cx - width // 2 + width).clamp(0, w)
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    box = (rows >= top.view(n, 1, 1)) & (rows < bottom.view(n, 1, 1)) & \
        (cols >= left.view(n, 1, 1)) & (cols < right.view(n, 1, 1))
    partner = torch.randperm(n, generator=generator, device=device)
    mixed = torch.where(box.unsqueeze(1), images[partner], images)
    kept = 1 - (bottom - top) * (right - left) / (h * w)
    return mixed, torch.lerp(targets[partner], targets, kept.view(n, 1))


@hookimpl
def register_augmentations(register):
    register(Augmentation(name="raw", stage="normalize", fit=fit_raw,
                          summary="no normalization: the network sees pixel values 0..255"))
    register(Augmentation(name="normalize", stage="normalize", fit=fit_standardize,
                          summary="zero mean, unit std per channel (training-split statistics); "
                                  "the default"))
    register(Augmentation(
        name="flip", stage="pixels", apply=random_flip,
        options={"p": Option(0.5, float, range="[0, 1]", help="probability of a flip"),
                 "alternate": Option(False, bool, help="each image mirrored in every other "
                                                        "epoch (in the first with probability p)")},
        summary="random horizontal flip, p=0.5, before normalization"))
    register(Augmentation(
        name="crop", stage="normalized", apply=random_crop,
        options={"pad": Option(4, int, range="[0, 16]", help="padding on each side"),
                 "padding": Option("zeros", choices=("zeros", "reflection"),
                                   help="what pads: zeros (the mean colour) or the mirrored "
                                        "edge")},
        summary="pad (pad=4 px, zeros) after normalization, random crop of the original size"))

    # Geometric, colour and noise augmentations work on pixels in [0, 1]; erasing after the
    # normalization, where zero is the mean colour; mixup and cutmix last, on images and labels.
    chance = lambda default, what: Option(default, float, range="[0, 1]",  # noqa: E731
                                          help=f"probability that an image is {what}")
    padding = Option("zeros", choices=PADDINGS, help="outside the image: black, the edge "
                                                     "pixels, or a mirror image")
    register(Augmentation(
        name="rotation", stage="pixels", apply=random_rotation,
        options={"degrees": Option(15.0, float, range="[0, 180]",
                                   help="the angle is uniform in [-degrees, degrees]"),
                 "padding": padding},
        summary="rotate each image by a random angle (bilinear)"))
    register(Augmentation(
        name="affine", stage="pixels", apply=random_affine,
        options={"scale": Option(0.1, float, range="[0, 1)",
                                 help="zoom factor uniform in [1 - scale, 1 + scale]"),
                 "translate": Option(0.1, float, range="[0, 1]",
                                     help="shift up to this share of the width and height"),
                 "shear": Option(10.0, float, range="[0, 60]",
                                 help="x and y shear angles uniform in [-shear, shear] degrees"),
                 "padding": padding},
        summary="random scale, shear and translation of each image (bilinear)"))
    register(Augmentation(
        name="perspective", stage="pixels", apply=random_perspective,
        options={"distortion": Option(0.5, float, range="[0, 1)",
                                      help="each corner moves inward by up to this share of "
                                           "half the image"),
                 "p": chance(0.5, "warped"), "padding": padding},
        summary="random perspective warp: the corners move inward (as torchvision's)"))
    register(Augmentation(
        name="color-jitter", stage="pixels", apply=color_jitter,
        options={"brightness": Option(0.2, float, range="[0, 5]",
                                      help="factor uniform in [1 - x, 1 + x]"),
                 "contrast": Option(0.2, float, range="[0, 5]",
                                    help="factor uniform in [1 - x, 1 + x]"),
                 "saturation": Option(0.2, float, range="[0, 5]",
                                      help="factor uniform in [1 - x, 1 + x]; colour only"),
                 "hue": Option(0.05, float, range="[0, 0.5]",
                               help="shift uniform in [-hue, hue] turns; colour only")},
        summary="random brightness, contrast, saturation and hue, in that order"))
    register(Augmentation(
        name="grayscale", stage="pixels", apply=random_grayscale,
        options={"p": chance(0.1, "made grey")},
        summary="turn images grey at random (three equal channels)"))
    register(Augmentation(
        name="noise", stage="pixels", apply=gaussian_noise,
        options={"sigma": Option(0.05, float, range="[0, 1]",
                                 help="standard deviation, in pixel values [0, 1]")},
        summary="add Gaussian noise to every pixel value, clipped to [0, 1]"))
    register(Augmentation(
        name="salt-pepper", stage="pixels", apply=salt_and_pepper,
        options={"amount": Option(0.05, float, range="[0, 1]",
                                  help="share of the pixels replaced"),
                 "salt": Option(0.5, float, range="[0, 1]",
                                help="share of those that turn white (the others black)")},
        summary="salt-and-pepper noise: random pixels turn white or black"))
    register(Augmentation(
        name="blur", stage="pixels", apply=gaussian_blur,
        options={"sigma": Option(1.0, float, range="[0, 5]",
                                 help="the largest standard deviation, in pixels; each "
                                      "image's is uniform in (0, sigma]"),
                 "p": chance(0.5, "blurred")},
        summary="Gaussian blur of random strength"))
    register(Augmentation(
        name="erasing", stage="normalized", apply=random_erasing, check=check_erasing,
        options={"p": chance(0.5, "erased"),
                 "area_min": Option(0.02, float, range="[0, 1]",
                                    help="smallest share of the image erased"),
                 "area_max": Option(0.33, float, range="[0, 1]",
                                    help="largest share of the image erased"),
                 "ratio": Option(3.3, float, range="[1, 10]",
                                 help="aspect ratio log-uniform in [1/ratio, ratio]"),
                 "value": Option("zero", choices=("zero", "random"),
                                 help="fill: the mean colour, or standard normal noise")},
        summary="random erasing / cutout: a random rectangle filled after normalization "
                "(cutout: area_min=area_max, ratio=1)"))
    register(Augmentation(
        name="mixup", stage="mix", apply=mixup,
        options={"alpha": Option(1.0, float, range="[0, 100]",
                                 help="lam ~ Beta(alpha, alpha) per image; 0: off"),
                 "p": chance(1.0, "mixed")},
        summary="mixup: each image and its label blended with a random partner's"))
    register(Augmentation(
        name="cutmix", stage="mix", apply=cutmix,
        options={"alpha": Option(1.0, float, range="[0, 100]",
                                 help="box area 1 - lam, lam ~ Beta(alpha, alpha) per image; "
                                      "0: off"),
                 "p": chance(1.0, "mixed")},
        summary="cutmix: a box of a random partner pasted in, labels mixed by its area"))
