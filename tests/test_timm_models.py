"""timm:<model>: name resolution, the 32x32 stem, and pretrained weights (offline here)."""

import pytest
import timm
import torch
from torch import nn
from typer.testing import CliRunner

from cifarx import OptionError, UserError
from cifarx.cli import app
from cifarx.plugin_api.registry import catalog
from cifarx.plugins.timm_models import resolve

from test_cli import QUICK, one_line_error


def test_a_timm_name_resolves_through_the_family():
    arch = catalog().get("architecture", "timm:resnet18")
    assert arch.name == "timm:resnet18" and "pretrained" in arch.options
    assert catalog().get("architecture", "timm:resnet18.a1_in1k").name == "timm:resnet18.a1_in1k"


@pytest.mark.parametrize("name, fragments", [
    ("timm:resnet19", ["timm has no model 'resnet19'", "did you mean", "resnet18",
                       "timm.list_models"]),
    ("timm:no_such_thing", ["timm has no model 'no_such_thing'", "timm.list_models"]),
])
def test_unknown_timm_names_say_how_to_find_one(name, fragments):
    with pytest.raises(UserError) as caught:
        catalog().get("architecture", name)
    for fragment in fragments:
        assert fragment in str(caught.value)
    one_line_error(CliRunner().invoke(app, ["describe", name]), *fragments)


def test_the_family_needs_a_model_name():
    with pytest.raises(UserError, match="unknown architecture 'timm:'; available: .*timm:\\*"):
        catalog().get("architecture", "timm:")


def test_resnets_get_a_32x32_stem_with_random_init():
    net = resolve("resnet18").build(num_classes=10)
    assert (net.conv1.kernel_size, net.conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(net.maxpool, nn.Identity)
    assert net.fc.out_features == 10
    features = net.forward_features(torch.randn(1, 3, 32, 32))
    assert features.shape[-2:] == (4, 4)  # 32 / 8, where the ImageNet stem would give 1x1

    deep = resolve("test_resnet").build()  # a deep stem: three 3x3 convs
    first = next(m for m in deep.conv1.modules() if isinstance(m, nn.Conv2d))
    assert first.stride == (1, 1) and isinstance(deep.maxpool, nn.Identity)
    assert deep(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_fixed_size_models_are_built_for_the_image_size():
    net = resolve("test_vit").build(image_size=32)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty Hugging Face cache, so the hub fails at once (no retries)."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def test_pretrained_without_internet_or_cache_is_a_clear_user_error(offline):
    with pytest.raises(UserError) as caught:
        resolve("test_resnet").build(pretrained="true")
    message = str(caught.value)
    assert "timm:test_resnet: cannot load pretrained weights" in message
    assert "--arch-opt pretrained=PATH" in message and "\n" not in message


def test_pretrained_through_the_cli_fails_in_one_line_and_opens_no_run(offline, data_dir, in_tmp):
    result = CliRunner().invoke(app, ["train", "--arch", "timm:test_resnet", "--pretrained",
                                      "--data-dir", data_dir, *QUICK])
    one_line_error(result, "cannot load pretrained weights", "--arch-opt pretrained=PATH")
    assert not (in_tmp / "mlflow.db").exists()


def test_pretrained_is_only_for_architectures_that_have_weights(data_dir, in_tmp):
    result = CliRunner().invoke(app, ["train", "--arch", "convonly", "--pretrained",
                                      "--data-dir", data_dir, *QUICK])
    one_line_error(result, "--arch-opt pretrained=true: convonly has no option 'pretrained'",
                   "accepted: activation, init")


def test_pretrained_weights_load_from_a_local_file_and_inputs_are_resized(tmp_path, offline):
    torch.manual_seed(0)
    imagenet = timm.create_model("test_resnet")  # 1000 classes, as published weights are
    path = tmp_path / "weights.pth"
    torch.save(imagenet.state_dict(), path)

    net = resolve("test_resnet").build(num_classes=10, pretrained=str(path))
    assert list(dict(net.named_children())) == ["resize", "model"]
    model = net.model
    assert torch.equal(model.layer1[0].conv1.weight, imagenet.layer1[0].conv1.weight)
    assert model.conv1[0].stride == (2, 2) and isinstance(model.maxpool, nn.MaxPool2d)  # kept
    assert model.fc.out_features == 10  # a new head for 10 classes
    size = tuple(timm.get_pretrained_cfg("test_resnet").input_size[1:])
    assert net.resize(torch.zeros(1, 3, 32, 32)).shape[-2:] == size
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_a_missing_or_unreadable_weights_file_is_a_user_error(tmp_path, offline):
    with pytest.raises(OptionError, match="pretrained: no such file; accepted: true"):
        resolve("test_resnet").build(pretrained=str(tmp_path / "nothing.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot load pretrained weights from .*garbage.pth"):
        resolve("test_resnet").build(pretrained=str(garbage))


def test_a_model_trained_from_a_weights_file_loads_after_the_file_is_gone(
        tmp_path, offline, data_dir, tracking_uri):
    from cifarx.runs import Tracking, train_run
    from cifarx.tracking.models import load_model
    from cifarx.training.config import TrainConfig

    path = tmp_path / "weights.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), path)
    done = train_run(TrainConfig(arch="timm:test_resnet", arch_options=(f"pretrained={path}",),
                                 data_dir=str(data_dir), iters=2, batch_size=10, eval_every=2,
                                 device="cpu", threads=1), Tracking(tracking_uri, "timm", "t"))
    path.unlink()  # rebuilding takes the structure only: the run's weights fill it
    model = load_model(f"runs:/{done.run_id}/model", tracking_uri)
    pixels = torch.rand(2, 3, 32, 32)
    assert torch.equal(model(pixels), done.result.model.eval()(pixels))
