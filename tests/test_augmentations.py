import pytest
import torch

from cifarx import UserError
from cifarx.config import build_pipeline
from cifarx.plugins.augmentations import (Scale, Standardize, channel_stats, fit_raw,
                                          fit_standardize, random_crop, random_flip)
from cifarx.registry import registry


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_flip_mirrors_about_half_of_the_images_exactly():
    images = torch.rand(4000, 3, 4, 5, generator=gen(1))
    out = random_flip(images, gen(2))
    same = (out == images).flatten(1).all(1)
    mirrored = (out == images.flip(-1)).flatten(1).all(1)
    assert bool((same ^ mirrored).all())  # each image is either untouched or exactly mirrored
    assert 0.47 < mirrored.float().mean().item() < 0.53


def test_flip_repeats_for_a_seed():
    images = torch.rand(64, 3, 4, 4)
    assert torch.equal(random_flip(images, gen(5)), random_flip(images, gen(5)))


def test_crop_is_a_shifted_window_of_the_zero_padded_image():
    n, pad = 500, 4
    images = torch.rand(n, 3, 6, 7, generator=gen(1)) + 1  # no zeros inside the image
    out = random_crop(images, gen(3), pad=pad)
    assert out.shape == images.shape
    padded = torch.nn.functional.pad(images, (pad,) * 4)
    shifts = set()
    for i in range(n):
        matches = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                   if torch.equal(out[i], padded[i, :, dy:dy + 6, dx:dx + 7])]
        assert len(matches) == 1
        shifts.add(matches[0])
    assert len(shifts) > 60  # nearly all 81 offsets drawn, each within the padding
    zeros = out == 0
    assert zeros.any() and torch.equal(out[zeros], torch.zeros(int(zeros.sum())))


def test_crop_keeps_channels_together():
    images = torch.arange(3.0).reshape(1, 3, 1, 1).expand(200, 3, 8, 8) + 1
    out = random_crop(images, gen(0))
    nonzero = out != 0
    # wherever a pixel is kept, its three channels keep their own values
    assert torch.equal(out[nonzero], images[nonzero])
    assert torch.equal(nonzero[:, 0], nonzero[:, 1]) and torch.equal(nonzero[:, 1], nonzero[:, 2])


def test_normalize_statistics_come_from_the_training_images():
    images = (torch.rand(300, 3, 8, 8, generator=gen(4)) * torch.tensor([255, 100, 10])
              .view(1, 3, 1, 1)).to(torch.uint8)
    module = fit_standardize(images)
    assert isinstance(module, Standardize)
    z = module(images.float() / 255)
    assert torch.allclose(z.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(z.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-3)
    mean, std = channel_stats(images, chunk=7)  # chunked sums give the same answer
    x = images.double() / 255
    assert torch.allclose(mean, x.mean((0, 2, 3)), atol=1e-9)
    assert torch.allclose(std, x.std((0, 2, 3), unbiased=False), atol=1e-9)


def test_raw_gives_pixel_values_0_to_255():
    module = fit_raw(torch.zeros(1, 3, 2, 2, dtype=torch.uint8))
    assert isinstance(module, Scale)
    assert torch.equal(module(torch.tensor([0.0, 1.0])), torch.tensor([0.0, 255.0]))


def pipeline(*names):
    return build_pipeline(registry().catalog(), names)


def test_order_comes_from_the_plugins_not_from_the_command_line():
    assert pipeline("crop", "flip").names == ["flip", "normalize", "crop"]
    assert pipeline("flip", "crop").names == ["flip", "normalize", "crop"]


def test_flip_and_crop_imply_normalize_unless_raw_is_named():
    assert pipeline("flip").names == ["flip", "normalize"]
    assert pipeline("raw", "flip", "crop").names == ["flip", "raw", "crop"]
    assert pipeline("raw").names == ["raw"]
    assert pipeline().names == ["normalize"]


def test_two_normalizations_are_an_error():
    with pytest.raises(UserError, match="normalizations .*choose one"):
        pipeline("raw", "normalize")


def test_unknown_augmentation_lists_the_available_ones():
    with pytest.raises(UserError, match="unknown augmentation 'rotate'; available: crop, flip"):
        pipeline("flip", "rotate")
