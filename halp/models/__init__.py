"""Model zoo by name: ``torchvision:<name>``, ``timm:<name>``, our CPU-scale ``halp:<name>`` and
mmdet SSD detectors ``mmdet:<preset or config.py>`` (see :mod:`halp.detection.ssd`; needs the
``det`` extra).

>>> model = create_model("halp:resnet20", num_classes=10, in_chans=1)
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from . import blocks  # noqa: F401  (registers torchvision's and timm's residual blocks)
from .cifar_resnet import CifarResNet
from .mobilenetv2 import CompactMobileNetV2

SOURCES = ("halp", "torchvision", "timm", "mmdet")

_HALP_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a factory ``fn(num_classes, in_chans, **kwargs) -> nn.Module`` as ``halp:<name>``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _HALP_MODELS:
            raise ValueError(f"model halp:{name} is already registered")
        _HALP_MODELS[name] = fn
        return fn

    return deco


for _depth in (20, 32, 44, 56, 110):
    register_model(f"resnet{_depth}")(
        lambda num_classes=10, in_chans=3, width=1.0, _d=_depth: CifarResNet(_d, num_classes, in_chans, width)
    )
register_model("mobilenetv2")(
    lambda num_classes=10, in_chans=3, width=1.0, **kw: CompactMobileNetV2(num_classes, in_chans, width, **kw)
)


def list_models(source: str = "halp") -> list[str]:
    """Names available under ``source`` (for torchvision/timm: their classification models)."""
    if source == "halp":
        return [f"halp:{n}" for n in sorted(_HALP_MODELS)]
    if source == "torchvision":
        import torchvision

        return [f"torchvision:{n}" for n in torchvision.models.list_models(module=torchvision.models)]
    if source == "timm":
        import timm

        return [f"timm:{n}" for n in timm.list_models()]
    if source == "mmdet":
        from ..detection.ssd import PRESETS

        return [f"mmdet:{n}" for n in PRESETS]
    raise ValueError(f"unknown model source {source!r}; choose one of {SOURCES}")


def parse_name(spec: str) -> tuple[str, str]:
    """Split ``"source:name"``; a bare name means ``halp:``."""
    source, sep, name = spec.partition(":")
    if not sep:
        source, name = "halp", spec
    if source not in SOURCES:
        raise ValueError(f"unknown model source {source!r} in {spec!r}; use one of "
                         + ", ".join(f"{s}:<name>" for s in SOURCES))
    if not name:
        raise ValueError(f"model name missing in {spec!r}")
    return source, name


def _replace_input_conv(model: nn.Module, in_chans: int) -> None:
    """Swap the first conv (the stem) for one taking ``in_chans`` channels; torchvision has no knob."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels == in_chans:
                    return
                new = nn.Conv2d(in_chans, child.out_channels, child.kernel_size, child.stride,
                                child.padding, child.dilation, child.groups, child.bias is not None,
                                child.padding_mode)
                setattr(parent, child_name, new)
                return
    raise ValueError("model has no Conv2d to adapt to in_chans")


def create_model(spec: str, num_classes: int = 1000, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """Build a randomly initialised model by name.

    Args:
        spec: ``"halp:resnet20"``, ``"torchvision:resnet50"``, ``"timm:mobilenetv1_100"``,
            ``"mmdet:ssd512_r50"``...
        num_classes: classifier outputs.
        in_chans: image channels (1 for Fashion-MNIST).
        kwargs: passed to the model's constructor (e.g. ``width=0.5`` for ``halp:`` models).

    Pretrained weights are never downloaded here; load a local checkpoint instead.
    """
    source, name = parse_name(spec)
    if source == "halp":
        if name not in _HALP_MODELS:
            raise ValueError(f"unknown model halp:{name}; available: {', '.join(list_models())}")
        return _HALP_MODELS[name](num_classes=num_classes, in_chans=in_chans, **kwargs)
    if source == "torchvision":
        import torchvision

        try:
            model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        except ValueError as e:
            raise ValueError(f"unknown torchvision model {name!r}: {e}") from None
        if in_chans != 3:
            _replace_input_conv(model, in_chans)
        return model
    if source == "mmdet":
        from ..detection.ssd import build_ssd

        return build_ssd(name, num_classes=num_classes, in_chans=in_chans)
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r} (see timm.list_models())")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)


__all__ = ["create_model", "list_models", "register_model", "parse_name", "CifarResNet",
           "CompactMobileNetV2"]
