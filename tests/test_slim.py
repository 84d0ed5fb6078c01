"""Random masks -> physical slimming, on every model the project supports.

Oracles: the masked model (pruned channels zeroed in place) must give the same eval outputs as
the slim model built by Torch-Pruning's surgery; the slim parameter count must equal the count
computed from kept widths; every slim layer must have the (c_in, c_out) the graph predicts; the
slim model must survive torch.save/torch.load and an ONNX export run by onnxruntime.
"""
from __future__ import annotations

import pytest
import torch

from halp.counting import count
from halp.export import export_onnx, load_module, onnx_forward, save_module
from halp.graph import ChannelGraph
from halp.masks import ChannelMasks
from halp.models import create_model
from halp.residual import ConstantResidual, vanished_blocks
from halp.slim import masked_copy, slim_model

from conftest import randomize_norms

# Small inputs keep every model in the default (CI) run; the slow suite repeats at full size.
MODELS = [
    ("torchvision:resnet50", (3, 64, 64)),
    ("torchvision:resnet101", (3, 64, 64)),
    ("torchvision:mobilenet_v2", (3, 64, 64)),
    ("timm:mobilenetv1_100", (3, 64, 64)),
    ("timm:resnet50", (3, 64, 64)),
    ("halp:resnet20", (1, 28, 28)),
    ("halp:resnet56", (1, 28, 28)),
    ("halp:mobilenetv2", (1, 28, 28)),
]
FULL_SIZE = [
    ("torchvision:resnet50", (3, 224, 224)),
    ("torchvision:resnet101", (3, 224, 224)),
    ("torchvision:mobilenet_v2", (3, 224, 224)),
    ("timm:mobilenetv1_100", (3, 224, 224)),
    ("timm:resnet50", (3, 224, 224)),
    ("halp:resnet56", (3, 32, 32)),
]


def one_channel_masks(graph: ChannelGraph, gen: torch.Generator) -> ChannelMasks:
    """Every group (the stem's included) keeps exactly one random channel: the extreme case."""
    keep = {}
    for gid, g in graph.groups.items():
        m = torch.zeros(g.width, dtype=torch.bool)
        m[int(torch.randint(g.width, (1,), generator=gen))] = True
        keep[gid] = m
    return ChannelMasks(keep)


def layer_outputs(model: torch.nn.Module, names, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out, hooks = {}, []
    for n in names:
        hooks.append(model.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: out.__setitem__(n, o.detach().clone())))
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return out


def make_masks(graph: ChannelGraph, kind: str, seed: int) -> ChannelMasks:
    gen = torch.Generator().manual_seed(seed)
    if kind == "one":
        return one_channel_masks(graph, gen)
    if kind == "vanish":
        return ChannelMasks.random(graph, gen, vanish_prob=0.5)
    return ChannelMasks.random(graph, gen)


def build(spec: str, shape: tuple[int, int, int]) -> ChannelGraph:
    torch.manual_seed(0)
    model = randomize_norms(create_model(spec, num_classes=10, in_chans=shape[0]).eval())
    return ChannelGraph.build(model, shape)


def check_slim(graph: ChannelGraph, masks: ChannelMasks, tmp_path, onnx: bool) -> None:
    x = torch.randn(3, *graph.input_shape, generator=torch.Generator().manual_seed(7))
    masked, _ = masked_copy(graph, masks)
    slim = slim_model(graph, masks)
    with torch.no_grad():
        dense_out = graph.model.eval()(x)
        ref = masked.eval()(x)
        out = slim.eval()(x)
    scale = max(float(ref.abs().max()), 1e-12)
    # The masks did change the function (otherwise the comparison below proves nothing).
    assert float((dense_out - ref).abs().max()) > 1e-3 * scale
    # (a) slim == masked within 1e-4 relative, at the output and at every layer's kept channels
    # (with one channel per group a ReLU can silence the network's output; layer by layer cannot).
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * scale)
    gone = vanished_blocks(graph, masks.widths())
    names = [n for n in graph.layers if not any(n.startswith(b + ".") for b in gone)]
    ref_layers, slim_layers = layer_outputs(masked, names, x), layer_outputs(slim, names, x)
    for n in names:
        r = ref_layers[n]
        gid = graph.layers[n].out_group
        if gid is not None:
            r = r[:, masks[gid]]
        torch.testing.assert_close(slim_layers[n], r, rtol=1e-4, atol=1e-4 * max(float(r.abs().max()), 1e-12),
                                   msg=lambda m, n=n: f"layer {n}: {m}")

    # (b) parameter count from the kept widths, and every layer's shape
    widths = masks.widths()
    assert sum(p.numel() for p in slim.parameters()) == count(graph, widths).params
    io = graph.layer_widths(widths)
    for name, li in graph.layers.items():
        if any(name.startswith(b + ".") for b in gone):
            continue
        layer = slim.get_submodule(name)
        got = (layer.in_channels, layer.out_channels) if li.kind == "conv" else (layer.in_features, layer.out_features)
        assert got == io[name], name
    for b in gone:
        assert isinstance(slim.get_submodule(b), ConstantResidual)

    # (c) save/load and ONNX
    path = save_module(slim, tmp_path / "slim.pt")
    loaded = load_module(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), out, rtol=0, atol=0)
    if onnx:
        ox = export_onnx(slim, graph.input_shape, tmp_path / "slim.onnx")
        torch.testing.assert_close(onnx_forward(ox, x), out, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("spec,shape", MODELS, ids=[m for m, _ in MODELS])
def test_random_masks_slim_round_trip(spec, shape, tmp_path):
    graph = build(spec, shape)
    runs = [("random", 0), ("random", 1), ("one", 2)]
    if any(g.can_vanish for g in graph.groups.values()):
        runs.append(("vanish", 3))
    for i, (kind, seed) in enumerate(runs):
        masks = make_masks(graph, kind, seed)
        if kind == "vanish":
            assert vanished_blocks(graph, masks.widths()), "seed should empty some branch"
        check_slim(graph, masks, tmp_path, onnx=(i == 0 or kind == "vanish"))


@pytest.mark.slow
@pytest.mark.parametrize("spec,shape", FULL_SIZE, ids=[m for m, _ in FULL_SIZE])
@pytest.mark.parametrize("seed", [10, 11, 12, 13])
def test_full_size_slim_round_trip(spec, shape, seed, tmp_path):
    graph = build(spec, shape)
    kind = ("random", "one", "vanish", "random")[seed % 4]
    if kind == "vanish" and not any(g.can_vanish for g in graph.groups.values()):
        kind = "random"
    check_slim(graph, make_masks(graph, kind, seed), tmp_path, onnx=True)


def test_slim_leaves_original_untouched():
    graph = build("halp:resnet20", (1, 28, 28))
    before = {k: v.clone() for k, v in graph.model.state_dict().items()}
    slim_model(graph, make_masks(graph, "vanish", 3))
    after = graph.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_vanished_branch_is_identity_plus_constant():
    graph = build("halp:resnet20", (1, 28, 28))
    keep = {gid: torch.ones(g.width, dtype=torch.bool) for gid, g in graph.groups.items()}
    keep["layer1.1.conv1"][:] = False
    slim = slim_model(graph, ChannelMasks(keep))
    block = slim.layer1[1]
    assert isinstance(block, ConstantResidual)
    # Hand-computed constant: conv2 sees zeros, so the branch emits bn2's response to zero input.
    bn = graph.model.layer1[1].bn2
    expected = bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(block.constant.flatten(), expected.detach())
    x = torch.randn(2, 16, 28, 28)
    torch.testing.assert_close(block(x), torch.relu(x + expected.view(1, -1, 1, 1)).detach())


def test_a_vanished_branch_is_read_where_the_model_lives():
    """The measured-feedback loop slims the model while it trains, on a GPU; the probe that reads a
    vanished branch's constant must follow the model's device and dtype (float64 stands in for
    CUDA here: a CPU float32 probe fails on either, as it did on an H200)."""
    graph = build("halp:resnet20", (1, 28, 28))
    graph.model.double()
    keep = {gid: torch.ones(g.width, dtype=torch.bool) for gid, g in graph.groups.items()}
    keep["layer1.1.conv1"][:] = False
    slim = slim_model(graph, ChannelMasks(keep))
    assert isinstance(slim.layer1[1], ConstantResidual)
    assert slim.layer1[1].constant.dtype == torch.float64


def test_empty_non_branch_group_is_rejected():
    graph = build("halp:resnet20", (1, 28, 28))
    keep = {gid: torch.ones(g.width, dtype=torch.bool) for gid, g in graph.groups.items()}
    keep["layer2.0.conv2"][:] = False  # the stage-2 residual stream: the network would be cut
    with pytest.raises(ValueError, match="keep no channel"):
        slim_model(graph, ChannelMasks(keep))
