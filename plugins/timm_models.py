"""``timm:<model>``: any timm model by name, with 10 classes, as a comparison model.

Two ways to start, with different costs on a CPU (see the README):

- random init (the default): the model as timm builds it for 32x32 inputs; ResNets get the
  CIFAR stem (a 3x3 stride-1 first conv and no max pool), as their ImageNet stem would shrink a
  32x32 image to 8x8 before the first block. Fixed-size models (ViTs) are built for 32x32.
- ``--pretrained`` (``--arch-opt pretrained=true``): timm's ImageNet weights with the original
  stem, and the images resized to the size the weights were trained at. timm looks in the
  Hugging Face cache first and then online; ``--arch-opt pretrained=FILE`` loads a weights file
  (.safetensors or .pth, as timm saves them) instead.

timm is imported only when a ``timm:`` name is used: it takes a second or two.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
from collections import OrderedDict
from pathlib import Path

from torch import nn

from cifarx import Architecture, Family, Option, OptionError, UserError, hookimpl, rebuilding

OPTIONS = {"pretrained": Option("", str, help="true: timm's weights (its cache, else online); or "
                                            "a weights file; not set: random init"),
           "dropout": Option(0.0, float, range="[0, 1)",
                             help="timm's drop_rate: dropout on the classifier's input, in "
                                  "training only; 0: none")}
LIST_HINT = "list them with: python -c \"import timm; print(timm.list_models('resnet*'))\""


def resolve(model_name: str) -> Architecture:
    import timm

    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=3, cutoff=0.75)
        maybe = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"timm has no model {model_name!r}{maybe} ({LIST_HINT})")

    def build(num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
              pretrained: str = "", dropout: float = 0.0) -> nn.Module:
        # drop_rate only when asked: a model that lacks it still builds with the defaults
        extra = {"drop_rate": dropout} if dropout > 0 else {}
        if pretrained in ("", "false"):
            return build_random(model_name, num_classes, in_channels, image_size, extra)
        return build_pretrained(model_name, num_classes, in_channels, pretrained, extra)

    return Architecture(
        name=f"timm:{model_name}", build=build, options=OPTIONS,
        summary=f"timm's {model_name}, 10 classes: random init with a 32x32 stem, or --pretrained "
                "(ImageNet weights, inputs resized)")


def build_random(model_name: str, num_classes: int, in_channels: int, image_size: int,
                 kwargs: dict | None = None) -> nn.Module:
    import timm
    from timm.models.resnet import ResNet

    kwargs = dict(kwargs or {})
    if timm.get_pretrained_cfg(model_name) is not None and \
            timm.get_pretrained_cfg(model_name).fixed_input_size:
        kwargs["img_size"] = image_size  # a ViT's position embedding is built for one size
    try:
        model = timm.create_model(model_name, num_classes=num_classes, in_chans=in_channels,
                                  **kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise UserError(f"timm:{model_name} cannot be built for {image_size}x{image_size} inputs "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                        "try --pretrained, which resizes the inputs") from None
    if isinstance(model, ResNet):
        cifar_stem(model)
    return model


def cifar_stem(model: nn.Module):
    """A ResNet's stem for 32x32: the first conv 3x3 with stride 1, no max pool (as in the
    CIFAR ResNets of He et al. 2016), so the first block sees 32x32 rather than 8x8."""
    if isinstance(model.conv1, nn.Conv2d):
        old = model.conv1
        model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, stride=1, padding=1,
                                bias=old.bias is not None)
    else:  # a deep stem (resnet*d, resnet10t): three 3x3 convs, the first with stride 2
        first = next(m for m in model.conv1.modules() if isinstance(m, nn.Conv2d))
        first.stride = (1, 1)
    model.maxpool = nn.Identity()


@contextlib.contextmanager
def _quiet_hub():
    """Hugging Face hub logs each retry of an unreachable download; the error says it once."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def cached_weights(model_name: str) -> Path | None:
    """timm's weights for this model in the Hugging Face cache, if they are there."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.get_pretrained_cfg(model_name)
    if cfg is None or not cfg.hf_hub_id:
        return None
    names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors",
                                                              "pytorch_model.bin"]
    for name in names:
        found = try_to_load_from_cache(cfg.hf_hub_id, name)
        if isinstance(found, str):
            return Path(found)
    return None


def build_pretrained(model_name: str, num_classes: int, in_channels: int,
                     pretrained: str, kwargs: dict | None = None) -> nn.Module:
    """timm's model with pretrained weights, behind a resize to the weights' input size."""
    import timm

    if rebuilding():  # cifarx loads a saved model: only the structure, its weights follow
        return with_resize(timm.create_model(model_name, pretrained=False,
                                             num_classes=num_classes, in_chans=in_channels,
                                             **(kwargs or {})))
    if pretrained == "true":
        file = cached_weights(model_name)  # the cache first: offline, the hub retries for a minute
        where = f"the Hugging Face cache ({file})" if file else "the Hugging Face hub or its cache"
    else:
        file = Path(pretrained).expanduser()
        if not file.is_file():
            raise OptionError("pretrained", "no such file; accepted: true (timm's weights, from "
                                            "its cache or online) or a weights file")
        where = str(file)
    overlay = {"file": str(file)} if file else {}
    try:
        with _quiet_hub():
            model = timm.create_model(model_name, pretrained=True, num_classes=num_classes,
                                      in_chans=in_channels, pretrained_cfg_overlay=overlay,
                                      **(kwargs or {}))
    except Exception as exc:  # offline, no weights published, a file of another model, ...
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(f"timm:{model_name}: cannot load pretrained weights from {where} "
                        f"({type(exc).__name__}: {reason}); without internet, download them "
                        "elsewhere and pass the file: --arch-opt pretrained=PATH, or train "
                        "from random init (no --pretrained)") from None
    return with_resize(model)


def with_resize(model: nn.Module) -> nn.Module:
    """``model`` behind a resize to the input size its pretrained weights were made for."""
    size = tuple(model.pretrained_cfg["input_size"][1:])
    return nn.Sequential(OrderedDict([
        ("resize", nn.Upsample(size=size, mode="bilinear", align_corners=False)),
        ("model", model)]))


@hookimpl
def register_architectures(register):
    register(Family(prefix="timm:", resolve=resolve,
                    summary="any timm model as timm:<name> (timm:resnet18, ...), 10 classes; random "
                            "init with a 32x32 stem, or --pretrained with inputs resized"))
