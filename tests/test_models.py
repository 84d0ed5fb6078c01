"""The model zoo by name."""
from __future__ import annotations

import pytest
import torch

from halp.models import create_model, list_models, parse_name


@pytest.mark.parametrize("spec", ["halp:resnet20", "halp:resnet56", "halp:mobilenetv2",
                                  "torchvision:resnet18", "timm:resnet18"])
def test_in_chans_and_classes(spec):
    m = create_model(spec, num_classes=7, in_chans=1).eval()
    with torch.no_grad():
        assert m(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_cifar_resnet_depths_and_width():
    def n_convs(m):
        return sum(isinstance(x, torch.nn.Conv2d) for x in m.modules())
    # 6n+2 layers: 6n+1 convs on the main path (+2 projection shortcuts) and the classifier.
    assert n_convs(create_model("halp:resnet20")) == 19 + 2
    assert n_convs(create_model("halp:resnet56")) == 55 + 2
    wide = create_model("halp:resnet20", width=2.0)
    assert wide.conv1.out_channels == 32 and wide.fc.in_features == 128
    with pytest.raises(ValueError, match="6n\\+2"):
        create_model("halp:resnet21") if "halp:resnet21" in list_models() else \
            __import__("halp.models.cifar_resnet", fromlist=["CifarResNet"]).CifarResNet(21)


def test_names_and_errors():
    assert parse_name("resnet20") == ("halp", "resnet20")
    assert "halp:resnet56" in list_models("halp")
    with pytest.raises(ValueError, match="unknown model source"):
        create_model("keras:resnet50")
    with pytest.raises(ValueError, match="unknown model halp:nope"):
        create_model("halp:nope")
    with pytest.raises(ValueError, match="unknown timm model"):
        create_model("timm:definitely_not_a_model")
    with pytest.raises(ValueError, match="unknown torchvision model"):
        create_model("torchvision:definitely_not_a_model")
