"""Channel groups found from the traced graph, checked against the architectures' layer names."""
from __future__ import annotations

import pytest
import torch

from halp.graph import ChannelGraph
from halp.models import create_model


def graph_of(spec: str, shape=(3, 64, 64)) -> ChannelGraph:
    return ChannelGraph.build(create_model(spec, num_classes=10, in_chans=shape[0]), shape)


def group_with(graph: ChannelGraph, layer: str):
    hits = [g for g in graph.groups.values() if layer in g.out_layers]
    assert len(hits) == 1, f"{layer} writes into {len(hits)} groups"
    return hits[0]


@pytest.mark.parametrize("spec", ["torchvision:resnet50", "timm:resnet50"])
def test_resnet50_stage_streams(spec):
    graph = graph_of(spec)
    blocks = {1: 3, 2: 4, 3: 6, 4: 3}
    for stage, n in blocks.items():
        g = group_with(graph, f"layer{stage}.0.downsample.0")
        writers = {f"layer{stage}.0.downsample.0"} | {f"layer{stage}.{b}.conv3" for b in range(n)}
        assert set(g.out_layers) == writers
        assert g.id == f"layer{stage}.0.conv3"
        assert g.width == 64 * 2 ** (stage - 1) * 4
        readers = {f"layer{stage}.{b}.conv1" for b in range(1, n)}
        readers |= ({f"layer{stage + 1}.0.conv1", f"layer{stage + 1}.0.downsample.0"} if stage < 4 else {"fc"})
        assert set(g.in_layers) == readers
        assert set(g.norms) == {f"layer{stage}.0.downsample.1"} | {f"layer{stage}.{b}.bn3" for b in range(n)}
        assert not g.can_vanish
        # inner groups of each bottleneck: own group, may vanish
        for b in range(n):
            for conv in ("conv1", "conv2"):
                inner = group_with(graph, f"layer{stage}.{b}.{conv}")
                assert inner.out_layers == (f"layer{stage}.{b}.{conv}",)
                assert inner.residual_block == f"layer{stage}.{b}"
    assert len(graph.groups) == 1 + 16 * 2 + 4
    assert graph.stem_layers == ["conv1"] and graph.output_layers == ["fc"]
    stem = graph.groups["conv1"]
    assert stem.contains_stem and set(stem.in_layers) == {"layer1.0.conv1", "layer1.0.downsample.0"}


def test_resnet50_geometry_at_224():
    graph = graph_of("torchvision:resnet50", (3, 224, 224))
    L = graph.layers
    assert L["conv1"].input_hw == (224, 224) and L["conv1"].kernel == (7, 7) and L["conv1"].stride == (2, 2)
    assert L["conv1"].in_group is None and L["conv1"].in_channels == 3
    assert L["layer1.0.conv1"].input_hw == (56, 56)
    assert L["layer2.0.conv2"].input_hw == (56, 56) and L["layer2.0.conv2"].output_hw == (28, 28)
    assert L["layer4.2.conv3"].input_hw == (7, 7)
    assert L["layer3.2.conv1"].in_group == "layer3.0.conv3"
    assert L["layer3.2.conv1"].out_group == "layer3.2.conv1"
    assert L["fc"].out_group is None and L["fc"].in_group == "layer4.0.conv3"


@pytest.mark.parametrize("spec,prefix,dw,project,shape", [
    ("torchvision:mobilenet_v2", "features", "conv.1.0", "conv.2", (3, 64, 64)),
    ("halp:mobilenetv2", "features", "conv.1.0", "conv.2.0", (1, 28, 28)),
])
def test_mobilenetv2_depthwise_shares_group_with_expansion(spec, prefix, dw, project, shape):
    graph = graph_of(spec, shape)
    model = graph.model
    checked = 0
    for i, block in enumerate(getattr(model, prefix)):
        expand, dwc, proj = f"{prefix}.{i}.conv.0.0", f"{prefix}.{i}.{dw}", f"{prefix}.{i}.{project}"
        if not hasattr(block, "conv") or graph.layers[expand].depthwise:
            continue  # the stem, the head, and the t=1 block that has no expansion conv
        g = group_with(graph, dwc)
        assert g.id == expand and set(g.out_layers) == {expand, dwc}
        assert g.in_layers == (proj,)
        li = graph.layers[dwc]
        assert li.depthwise and li.in_group == li.out_group == expand
        assert g.can_vanish == bool(block.use_res_connect)
        checked += 1
    assert checked >= 5


def test_mobilenetv1_depthwise_follows_pointwise():
    graph = graph_of("timm:mobilenetv1_100")
    g = group_with(graph, "blocks.1.0.conv_dw")
    assert set(g.out_layers) == {"blocks.0.0.conv_pw", "blocks.1.0.conv_dw"}
    assert g.in_layers == ("blocks.1.0.conv_pw",)
    stem = group_with(graph, "conv_stem")
    assert set(stem.out_layers) == {"conv_stem", "blocks.0.0.conv_dw"} and stem.contains_stem
    assert not any(g.can_vanish for g in graph.groups.values())  # no residuals in MobileNetV1


def test_cifar_resnet_groups():
    graph = graph_of("halp:resnet20", (1, 28, 28))
    stream1 = graph.groups["conv1"]
    assert set(stream1.out_layers) == {"conv1"} | {f"layer1.{b}.conv2" for b in range(3)}
    assert stream1.contains_stem
    stream2 = group_with(graph, "layer2.0.downsample.0")
    assert set(stream2.out_layers) == {"layer2.0.downsample.0"} | {f"layer2.{b}.conv2" for b in range(3)}
    assert sorted(g.id for g in graph.groups.values() if g.can_vanish) == sorted(
        f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3))
    assert graph.layers["conv1"].in_channels == 1


def test_build_rejects_bad_shape():
    with pytest.raises(ValueError, match="C, H, W"):
        ChannelGraph.build(create_model("halp:resnet20"), (28, 28))


def test_graph_does_not_change_model_mode_or_weights():
    model = create_model("halp:resnet20", in_chans=1).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ChannelGraph.build(model, (1, 28, 28))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("spec", ["halp:mobilenetv2", "timm:mobilenetv1_100"])
def test_only_the_group_the_image_conv_writes_is_the_stem(spec):
    # a depthwise conv is fed through the group it shares, so it is no stem (a regression:
    # every group a depthwise conv touched was once taken for the stem and never pruned)
    g = ChannelGraph.build(create_model(spec, num_classes=10, in_chans=3), (3, 32, 32))
    assert [gid for gid, grp in g.groups.items() if grp.contains_stem] == [g.layers[g.stem_layers[0]].out_group]
    assert len(g.stem_layers) == 1
    assert len(g.prunable_groups(include_stem=False)) == len(g.prunable_groups()) - 1
