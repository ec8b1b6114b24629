import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from mlflow import MlflowClient

from cifarx import UserError
from cifarx.plugin_api.registry import catalog, registry
from cifarx.plugins.augmentations import (Scale, Standardize, channel_stats, color_jitter,
                                          cutmix, fit_raw, fit_standardize, gaussian_blur,
                                          gaussian_noise, mixup, random_affine, random_crop,
                                          random_erasing, random_flip, random_grayscale,
                                          random_rotation, salt_and_pepper, shift_hue)
from cifarx.training import loop
from cifarx.training.config import TrainConfig, build_pipeline, plan

from test_cli import QUICK, cli, one_line_error


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
    mean, std = channel_stats(images)  # from histograms, exactly the float64 statistics
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
    with pytest.raises(UserError, match="unknown augmentation 'rotate'; available: affine, "
                                         "blur, color-jitter, crop, cutmix, erasing, flip"):
        pipeline("flip", "rotate")


# --- the augmentations with options (issue 13) ----------------------------------------------

PIXELS = ["rotation", "affine", "perspective", "color-jitter", "grayscale", "noise",
          "salt-pepper", "blur"]
RANDOM = PIXELS + ["erasing", "mixup", "cutmix"]
# Options that make an augmentation change every image (its probability at 1).
ALWAYS = {"perspective": {"p": 1.0}, "blur": {"p": 1.0}, "erasing": {"p": 1.0}}
OFF = [("rotation", {"degrees": 0}), ("affine", {"scale": 0, "translate": 0, "shear": 0}),
       ("perspective", {"distortion": 0}), ("perspective", {"p": 0}),
       ("color-jitter", {"brightness": 0, "contrast": 0, "saturation": 0, "hue": 0}),
       ("grayscale", {"p": 0}), ("noise", {"sigma": 0}), ("salt-pepper", {"amount": 0}),
       ("blur", {"sigma": 0}), ("blur", {"p": 0}), ("erasing", {"p": 0}),
       ("erasing", {"area_min": 0, "area_max": 0}), ("mixup", {"alpha": 0}), ("mixup", {"p": 0}),
       ("cutmix", {"alpha": 0}), ("cutmix", {"p": 0})]


def augment(name, images, seed=0, targets=None, **options):
    """The plugin as training calls it, its options' defaults filled in: the images, and for a
    "mix" augmentation (images, soft labels)."""
    aug = catalog().get("augmentation", name)
    values = {key: option.default for key, option in aug.options.items()}
    values.update(ALWAYS.get(name, {}), **options)
    if aug.stage == "mix":
        if targets is None:
            targets = F.one_hot(torch.arange(len(images)) % 10, 10).float()
        return aug.apply(images, targets, gen(seed), **values)
    return aug.apply(images, gen(seed), **values)


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("name", RANDOM)
def test_shape_range_and_the_same_result_for_a_seed(name, channels):
    x = torch.rand(20, channels, 12, 12, generator=gen(1))
    before = x.clone()
    out = augment(name, x, seed=5)
    again, other = augment(name, x, seed=5), augment(name, x, seed=6)
    if catalog().get("augmentation", name).stage == "mix":
        (out, targets), (again, again_targets), (other, _) = out, again, other
        assert targets.shape == (20, 10) and torch.equal(targets, again_targets)
        assert torch.allclose(targets.sum(1), torch.ones(20)) and targets.min() >= 0
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.equal(x, before)  # the input is left as it was
    assert torch.equal(out, again)
    if name in PIXELS:
        assert out.min() >= 0 and out.max() <= 1
    if name == "grayscale" and channels == 1:
        assert torch.equal(out, x)  # already grey
    else:
        assert not torch.equal(out, x) and not torch.equal(out, other)


@pytest.mark.parametrize("name", PIXELS + ["erasing"])
def test_each_image_gets_its_own_parameters(name):
    n = 24
    x = torch.rand(1, 3, 16, 16, generator=gen(2)).expand(n, 3, 16, 16).contiguous()
    out = augment(name, x, seed=3, **({"p": 0.5} if name == "grayscale" else {}))
    distinct = len({tuple(image.flatten().tolist()) for image in out})
    # The same image, n times: each copy comes out differently (grayscale: grey or not; blur:
    # the weakest, sigma below 0.15 pixels, leave an image as it was).
    assert distinct == 2 if name == "grayscale" else distinct >= n - 3 if name == "blur" else \
        distinct == n


@pytest.mark.parametrize("name", ["mixup", "cutmix"])
def test_each_image_gets_its_own_mix(name):
    x = torch.rand(10, 3, 16, 16, generator=gen(2))
    _, targets = augment(name, x, seed=3)
    own = targets.diagonal()  # image i has class i: its own share of the label
    assert len(set(own.tolist())) > 5


@pytest.mark.parametrize("name, options", OFF)
def test_the_value_that_disables_it_gives_the_input_unchanged(name, options):
    x = torch.rand(8, 3, 12, 12, generator=gen(4))
    out = augment(name, x, **options)
    if catalog().get("augmentation", name).stage == "mix":
        out, targets = out
        assert torch.equal(targets, F.one_hot(torch.arange(8), 10).float())
    assert torch.equal(out, x)


def test_rotation_turns_each_image_by_its_own_angle_as_torchvision_would():
    x = torch.rand(6, 3, 16, 16, generator=gen(1))
    out = random_rotation(x, gen(3), degrees=40.0)
    angles = -40 + 80 * torch.rand(6, generator=gen(3))  # the generator's first draw
    for image, rotated, angle in zip(x, out, angles.tolist()):
        expected = TF.rotate(image, angle, interpolation=TF.InterpolationMode.BILINEAR)
        assert torch.allclose(rotated, expected, atol=1e-5)
    odd = torch.rand(6, 3, 15, 15, generator=gen(1))
    centre = random_rotation(odd, gen(3), degrees=180.0)[..., 7, 7]
    assert torch.allclose(centre, odd[..., 7, 7], atol=1e-6)  # the pivot stays


def test_affine_scales_and_shifts_each_image_as_torchvision_would():
    x = torch.rand(5, 3, 16, 20, generator=gen(1))
    out = random_affine(x, gen(3), scale=0.3, translate=0.2, shear=0.0)
    draws = torch.rand(5, 5, generator=gen(3))  # scale, shear x, shear y, x and y shifts
    scales, tx, ty = 0.7 + 0.6 * draws[0], (draws[3] * 0.4 - 0.2) * 20, (draws[4] * 0.4 - 0.2) * 16
    for i in range(5):
        expected = TF.affine(x[i], angle=0.0, translate=[float(tx[i]), float(ty[i])],
                             scale=float(scales[i]), shear=[0.0, 0.0],
                             interpolation=TF.InterpolationMode.BILINEAR)
        assert torch.allclose(out[i], expected, atol=1e-5)


def test_shearing_keeps_the_middle_row_and_column_and_moves_the_rest():
    x = torch.rand(8, 3, 15, 15, generator=gen(1))
    out = random_affine(x, gen(2), scale=0.0, translate=0.0, shear=30.0)
    # x' = x + tan(sx) y and y' = y + tan(sy) x: the centre pixel is the only fixed point
    assert torch.allclose(out[..., 7, 7], x[..., 7, 7], atol=1e-6)
    assert (out - x).abs().flatten(1).amax(1).min() > 0.1


def test_perspective_warps_some_images_and_leaves_the_others():
    x = torch.rand(400, 3, 12, 12, generator=gen(1))
    out = augment("perspective", x, p=0.5)
    same = (out == x).flatten(1).all(1)
    assert 0.42 < same.float().mean() < 0.58
    warped = out[~same]
    # inward corners: the output's corner pixels lie outside the quadrilateral, read as black
    assert (warped[..., 0, 0] < x[~same][..., 0, 0]).float().mean() > 0.9


@pytest.mark.parametrize("part, reference", [
    ("brightness", TF.adjust_brightness), ("contrast", TF.adjust_contrast),
    ("saturation", TF.adjust_saturation)])
def test_color_jitter_factors_are_torchvisions_per_image(part, reference):
    x = torch.rand(6, 3, 8, 8, generator=gen(1))
    options = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0, part: 0.5}
    out = color_jitter(x, gen(3), **options)
    factors = 0.5 + torch.rand(6, generator=gen(3))  # uniform in [1 - 0.5, 1 + 0.5]
    for image, jittered, factor in zip(x, out, factors.tolist()):
        assert torch.allclose(jittered, reference(image, factor), atol=1e-5)


def test_hue_shift_is_torchvisions():
    x = torch.rand(4, 3, 8, 8, generator=gen(1))
    x[0] = 0.4  # grey has no hue
    for shift in (-0.5, -0.2, 0.0, 0.13, 0.5):
        expected = TF.adjust_hue(x, shift)
        assert torch.allclose(shift_hue(x, torch.full((4,), shift)), expected, atol=1e-5)
    out = color_jitter(x, gen(3), brightness=0.0, contrast=0.0, saturation=0.0, hue=0.3)
    shifts = -0.3 + 0.6 * torch.rand(4, generator=gen(3))
    for image, jittered, shift in zip(x, out, shifts.tolist()):
        assert torch.allclose(jittered, TF.adjust_hue(image, shift), atol=1e-5)


def test_color_jitter_on_one_channel_changes_brightness_and_contrast_only():
    x = torch.rand(6, 1, 8, 8, generator=gen(1))
    colour_only = color_jitter(x, gen(3), brightness=0.0, contrast=0.0, saturation=1.0, hue=0.5)
    assert torch.equal(colour_only, x)
    assert not torch.equal(color_jitter(x, gen(3)), x)


def test_grayscale_turns_a_share_p_grey_with_torchvisions_weights():
    x = torch.rand(2000, 3, 4, 4, generator=gen(1))
    out = random_grayscale(x, gen(2), p=0.3)
    grey = (out != x).flatten(1).any(1)
    assert 0.27 < grey.float().mean() < 0.33
    assert torch.allclose(out[grey], TF.rgb_to_grayscale(x[grey], 3), atol=1e-6)
    assert torch.equal(out[~grey], x[~grey])


def test_noise_has_the_standard_deviation_asked_for():
    x = torch.full((200, 3, 16, 16), 0.5)
    delta = gaussian_noise(x, gen(1), sigma=0.05) - x
    assert abs(delta.mean()) < 1e-3 and abs(delta.std() - 0.05) < 1e-3


def test_salt_and_pepper_turns_a_share_of_pixels_white_or_black():
    x = torch.full((100, 3, 32, 32), 0.5)
    out = salt_and_pepper(x, gen(1), amount=0.1, salt=0.25)
    hit = (out != 0.5).any(1)  # (n, h, w): a pixel changes in all its channels or none
    assert torch.equal(hit, (out != 0.5).all(1))
    assert abs(hit.float().mean() - 0.1) < 0.005
    white = (out == 1).all(1)
    assert torch.equal(hit, white | (out == 0).all(1))
    assert abs(white.sum() / hit.sum() - 0.25) < 0.02


def test_blur_is_torchvisions_gaussian_blur_with_each_images_sigma():
    x = torch.rand(6, 3, 16, 16, generator=gen(1))
    out = gaussian_blur(x, gen(3), sigma=1.5, p=1.0)
    sigmas = 1.5 * (1 - torch.rand(6, generator=gen(3)))  # uniform in (0, 1.5]
    for image, blurred, sigma in zip(x, out, sigmas.tolist()):
        assert torch.allclose(blurred, TF.gaussian_blur(image, [11, 11], [sigma, sigma]),
                              atol=1e-5)  # radius 3 sigma: 5 pixels
    flat = torch.full((2, 3, 8, 8), 0.25)
    assert torch.allclose(gaussian_blur(flat, gen(0), sigma=3.0, p=1.0), flat)


def test_erasing_fills_one_rectangle_of_the_asked_size_with_zeros():
    x = torch.rand(300, 3, 20, 20, generator=gen(1)) + 1  # no zeros of its own
    out = random_erasing(x, gen(2), p=0.5, area_min=0.1, area_max=0.3, ratio=2.0)
    erased = out == 0
    assert torch.equal(erased, out != x)
    assert torch.equal(erased[:, :1].expand_as(erased), erased)  # all channels together
    hit = erased[:, 0]
    touched = hit.flatten(1).any(1)
    assert 0.42 < touched.float().mean() < 0.58
    for mask in hit[touched]:
        rows, cols = mask.any(1), mask.any(0)
        assert torch.equal(mask, rows[:, None] & cols[None, :])  # a rectangle
        height, width = int(rows.sum()), int(cols.sum())
        assert 0.1 * 400 - 20 <= height * width <= 0.3 * 400 + 20  # the area, up to rounding
        assert 1 / 2 - 0.2 <= height / width <= 2 + 0.5
    noisy = random_erasing(x, gen(2), p=1.0, value="random")
    assert (noisy != x).any() and not (noisy == 0).any()


def test_mixup_blends_images_and_labels_with_the_same_weights():
    x = torch.rand(10, 3, 8, 8, generator=gen(1))
    labels = torch.arange(10)  # one image per class: the label says who the partner was
    out, mixed = mixup(x, F.one_hot(labels, 10).float(), gen(2), alpha=1.0)
    assert torch.allclose(mixed.sum(1), torch.ones(10))
    lams, partners = [], []
    for i in range(10):
        lam = float(mixed[i, i])
        partner = int((mixed[i] * (labels != i)).argmax()) if lam < 1 else i
        assert (mixed[i] > 0).sum() <= 2
        assert torch.allclose(out[i], lam * x[i] + (1 - lam) * x[partner], atol=1e-6)
        lams.append(lam)
        partners.append(partner)
    assert len(set(partners)) == 10  # a permutation of the batch

    # The loss against the soft labels: lam * CE(own class) + (1 - lam) * CE(partner's class)
    nll = -torch.randn(10, 10, generator=gen(3)).log_softmax(1)
    logits = -nll  # log-probabilities are logits too
    by_hand = sum(lam * float(nll[i, i]) + (1 - lam) * float(nll[i, j])
                  for i, (lam, j) in enumerate(zip(lams, partners))) / 10
    assert math.isclose(float(F.cross_entropy(logits, mixed)), by_hand, rel_tol=1e-5)


def test_mixup_weights_follow_beta_alpha():
    x = torch.rand(2000, 1, 2, 2, generator=gen(1))
    labels = F.one_hot(torch.arange(2000) // 1000, 2).float()  # class 0, then class 1
    # The class-0 share of a class-0 image mixed with a class-1 partner is its lam: in the
    # middle, (0.25, 0.75), with probability 0.172 under Beta(0.2, 0.2) (U-shaped) and 0.859
    # under Beta(4, 4) (bell-shaped), by integrating their densities.
    for alpha, expected in ((0.2, 0.172), (4.0, 0.859)):
        _, mixed = mixup(x, labels, gen(2), alpha=alpha)
        share = mixed[:1000, 0]
        lam = share[share < 1]  # about 500 with a class-1 partner
        assert len(lam) > 400
        middle = ((lam > 0.25) & (lam < 0.75)).float().mean()
        assert abs(middle - expected) < 0.06, (alpha, middle)


def test_cutmix_pastes_a_box_of_the_partner_and_labels_by_its_area():
    x = torch.rand(10, 3, 16, 16, generator=gen(1))
    targets = F.one_hot(torch.arange(10), 10).float()
    out, mixed = cutmix(x, targets, gen(2), alpha=1.0)
    assert torch.allclose(mixed.sum(1), torch.ones(10))
    pasted = 0
    for i in range(10):
        changed = (out[i] != x[i]).any(0)
        share = float(changed.float().mean())
        assert math.isclose(float(mixed[i, i]), 1 - share, abs_tol=1e-6)
        if share:
            pasted += 1
            partner = int((mixed[i] * (torch.arange(10) != i)).argmax())
            rows, cols = changed.any(1), changed.any(0)
            assert torch.equal(changed, rows[:, None] & cols[None, :])  # a box
            assert torch.equal(out[i][:, changed], x[partner][:, changed])
    assert pasted >= 6  # the others: their own partner, or a box of zero pixels


def pipeline_of(*names, texts=()):
    return build_pipeline(registry().catalog(), names, texts)


def test_mix_stage_comes_last_and_the_rest_by_stage():
    found = pipeline_of("mixup", "crop", "rotation", "erasing", "noise", "cutmix")
    assert found.names == ["noise", "rotation", "normalize", "crop", "erasing", "cutmix",
                           "mixup"]
    assert [a.name for a in found.mix] == ["cutmix", "mixup"]
    assert found.options["rotation"] == {"degrees": 15.0, "padding": "zeros"}


def test_bad_augmentation_options_are_one_line_and_open_no_run(data_dir, in_tmp):
    base = ["train", "--data-dir", data_dir, *QUICK]
    one_line_error(cli(*base, "--aug", "erasing", "--aug-opt", "erasing.area_min=0.5",
                       "--aug-opt", "erasing.area_max=0.2"),
                   "--aug-opt erasing.area_min=0.5: must be at most area_max (0.2)")
    one_line_error(cli(*base, "--aug", "rotation", "--aug-opt", "rotation.degrees=200"),
                   "--aug-opt rotation.degrees=200: not accepted by rotation; accepted: a number "
                   "(or a fraction: 8/255) in [0, 180]")
    one_line_error(cli(*base, "--aug", "affine", "--aug-opt", "affine.padding=wrap"),
                   "accepted: zeros, border, reflection")
    one_line_error(cli(*base, "--aug", "mixup", "--aug-opt", "mixup.beta=1"),
                   "mixup has no option 'beta'; accepted: alpha, p")
    assert not (in_tmp / "mlflow.db").exists()


def test_a_run_logs_the_augmentations_and_their_options(data_dir, in_tmp):
    result = cli("train", "--data-dir", data_dir, *QUICK, "--experiment", "augs",
                 "--aug", "rotation,color-jitter,erasing,mixup",
                 "--aug-opt", "rotation.degrees=30", "--aug-opt", "mixup.alpha=0.4")
    assert result.exit_code == 0, result.output
    client = MlflowClient(f"sqlite:///{in_tmp}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("augs").experiment_id])
    params = run.data.params
    assert params["aug"] == "color-jitter,rotation,normalize,erasing,mixup"
    assert params["aug.rotation.degrees"] == "30.0" and params["aug.mixup.alpha"] == "0.4"
    assert params["aug.erasing.value"] == "zero" and params["aug.color-jitter.hue"] == "0.05"
    assert run.info.status == "FINISHED" and 0 <= run.data.metrics["train/acc"] <= 1


def quick(data_dir, **overrides) -> TrainConfig:
    settings = dict(data_dir=str(data_dir), iters=4, batch_size=20, eval_every=1000,
                    device="cpu", threads=1)
    return TrainConfig(**{**settings, **overrides})


def test_soft_labels_reach_the_loss_and_train_acc_counts_the_dominant_one(data_dir,
                                                                          monkeypatch):
    calls = []
    original = F.cross_entropy

    def spy(logits, target, **kwargs):
        if target.dim() == 2:  # the training step's (evaluation passes class indices)
            calls.append((logits.detach().clone(), target.clone()))
        return original(logits, target, **kwargs)

    monkeypatch.setattr(loop.F, "cross_entropy", spy)
    p = plan(quick(data_dir, aug=("cutmix", "mixup")))
    result = loop.train(p, p.load_data())
    assert len(calls) == 4
    for (step, acc), (step_, loss), (logits, targets) in zip(
            result.history["train/acc"], result.history["train/loss"], calls):
        assert torch.allclose(targets.sum(1), torch.ones(20))
        assert (targets.max(1).values < 1).any()  # mixed
        dominant = (logits.argmax(1) == targets.argmax(1)).float().mean()
        assert math.isclose(acc, float(dominant), abs_tol=1e-6)
        by_hand = -(targets * logits.log_softmax(1)).sum(1).mean()
        assert math.isclose(loss, float(by_hand), rel_tol=1e-5)


def test_every_augmentation_trains_and_repeats_exactly_for_a_seed(data_dir):
    p = plan(quick(data_dir, aug=tuple(RANDOM + ["flip", "crop"])))
    data = p.load_data()
    first, second = loop.train(p, data), loop.train(p, data)
    assert first.history == second.history
    assert all(math.isfinite(v) for _, v in first.history["train/loss"])


def test_adversarial_training_with_mixup_attacks_clean_labels_then_mixes(data_dir):
    p = plan(quick(data_dir, aug=("mixup",), adv_train="fgsm", adv_ratio=0.5))
    result = loop.train(p, p.load_data())
    assert len(result.history["train/adv_acc"]) == 4
    assert all(0 <= v <= 1 for _, v in result.history["train/attack_success"])


def test_the_mixup_study_plans_flip_crop_against_mixup_and_cutmix():
    from pathlib import Path

    from cifarx.studies.configurations import configurations
    from cifarx.studies.study import load

    study = load(Path(__file__).resolve().parents[1] / "studies" / "mixup.toml")
    points = configurations(study)
    assert len(study.seeds) == 3
    assert [plan(point.config).pipeline.names for point in points] == [
        ["flip", "normalize", "crop"], ["flip", "normalize", "crop", "mixup"],
        ["flip", "normalize", "crop", "cutmix"]]
    assert {(point.config.arch, point.config.iters) for point in points} == {("table1", 2000)}
