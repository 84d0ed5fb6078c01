"""load_pretrained: published state dicts (torchvision, timm, safetensors), our dense format, wrappers."""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torchvision

from halp.models import create_model
from halp.models.pretrained import load_pretrained


def _trained_tv(num_classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(1)
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    with torch.no_grad():  # make BN statistics non-default so that they are checked too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(7)
    return model.eval()


def _assert_same(src: torch.nn.Module, dst: torch.nn.Module, shape=(2, 3, 64, 64)) -> None:
    a, b = src.state_dict(), dst.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    x = torch.randn(*shape)
    with torch.no_grad():
        assert torch.equal(src.eval()(x), dst.eval()(x))


def test_torchvision_plain_state_dict(tmp_path):
    src = _trained_tv()
    path = tmp_path / "resnet18.pth"
    torch.save(src.state_dict(), path)
    dst = create_model("torchvision:resnet18", num_classes=10)
    report = load_pretrained(dst, path)
    _assert_same(src, dst)
    assert report.format == "torch" and report.container == () and report.stripped == ()
    assert report.tensors == len(src.state_dict()) and report.source == "plain state dict"


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefix_stripped(tmp_path, prefix):
    src = _trained_tv()
    path = tmp_path / "ddp.pth"
    torch.save({prefix + k: v for k, v in src.state_dict().items()}, path)
    dst = create_model("torchvision:resnet18", num_classes=10)
    report = load_pretrained(dst, path)
    _assert_same(src, dst)
    assert "".join(report.stripped) == prefix


def test_own_dense_format(tmp_path):
    src = _trained_tv()
    path = tmp_path / "dense" / "torchvision_resnet18-abc.pt"
    path.parent.mkdir()
    torch.save({"model": src.state_dict(), "metrics": {"top1": 91.5, "top5": 99.0, "loss": 0.3}}, path)
    dst = create_model("torchvision:resnet18", num_classes=10)
    report = load_pretrained(dst, str(path))
    _assert_same(src, dst)
    assert report.container == ("model",)


def test_state_dict_container_and_module_prefix(tmp_path):
    src = _trained_tv()
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}, "epoch": 3}, path)
    dst = create_model("torchvision:resnet18", num_classes=10)
    report = load_pretrained(dst, path)
    _assert_same(src, dst)
    assert report.container == ("state_dict",) and report.stripped == ("module.",)


def test_missing_num_batches_tracked_is_tolerated(tmp_path):
    src = _trained_tv()
    path = tmp_path / "old.pth"
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, path)
    dst = create_model("torchvision:resnet18", num_classes=10)
    report = load_pretrained(dst, path)
    assert report.tensors == len(sd) and len(report.kept) == 20
    for k, v in sd.items():
        assert torch.equal(dst.state_dict()[k], v)


def test_classifier_mismatch_names_key_and_shapes(tmp_path):
    path = tmp_path / "imagenet.pth"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=1000).state_dict(), path)
    dst = create_model("torchvision:resnet18", num_classes=10)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError) as e:
        load_pretrained(dst, path)
    msg = str(e.value)
    assert "fc.weight" in msg and "(1000, 512)" in msg and "(10, 512)" in msg
    assert "number of classes differs" in msg
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())  # untouched


def test_stem_channel_mismatch_explained(tmp_path):
    path = tmp_path / "rgb.pth"
    torch.save(_trained_tv().state_dict(), path)
    dst = create_model("torchvision:resnet18", num_classes=10, in_chans=1)
    with pytest.raises(ValueError, match=r"conv1\.weight.*input channels differ"):
        load_pretrained(dst, path)


def test_missing_and_unexpected_keys(tmp_path):
    sd = _trained_tv().state_dict()
    del sd["layer1.0.conv1.weight"]
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"missing 1 key\(s\): layer1\.0\.conv1\.weight.*unexpected 1 key\(s\): extra"):
        load_pretrained(create_model("torchvision:resnet18", num_classes=10), path)


def test_other_architecture_is_a_key_error(tmp_path):
    path = tmp_path / "r20.pt"
    torch.save(create_model("halp:resnet20", num_classes=10).state_dict(), path)
    with pytest.raises(ValueError, match="missing .* key"):
        load_pretrained(create_model("torchvision:resnet18", num_classes=10), path)


def test_nonexistent_path(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pretrained(create_model("halp:resnet20"), path)


def test_pickled_module_refused(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(create_model("halp:resnet20"), path)
    with pytest.raises(ValueError, match="state_dict"):
        load_pretrained(create_model("halp:resnet20"), path)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "junk.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(ValueError, match="not a state dict"):
        load_pretrained(create_model("halp:resnet20"), path)


def test_halp_model_roundtrip(tmp_path):
    torch.manual_seed(0)
    src = create_model("halp:resnet20", num_classes=10, in_chans=1)
    path = tmp_path / "r20.pt"
    torch.save({"model": src.state_dict(), "metrics": {"top1": 50.0}}, path)
    dst = create_model("halp:resnet20", num_classes=10, in_chans=1)
    load_pretrained(dst, path)
    _assert_same(src, dst, shape=(2, 1, 28, 28))


def test_timm_plain_state_dict(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(2)
    src = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    path = tmp_path / "pytorch_model.bin"
    torch.save(src.state_dict(), path)
    dst = create_model("timm:resnet18", num_classes=10)
    load_pretrained(dst, path)
    _assert_same(src, dst)


def test_timm_classifier_mismatch(tmp_path):
    timm = pytest.importorskip("timm")
    path = tmp_path / "mnv2.bin"
    torch.save(timm.create_model("mobilenetv2_050", pretrained=False, num_classes=1000).state_dict(), path)
    with pytest.raises(ValueError, match=r"classifier\.weight.*number of classes differs"):
        load_pretrained(create_model("timm:mobilenetv2_050", num_classes=10), path)


@pytest.mark.skipif(importlib.util.find_spec("safetensors") is None, reason="safetensors not installed")
def test_safetensors(tmp_path):
    from safetensors.torch import save_file

    timm = pytest.importorskip("timm")
    torch.manual_seed(3)
    src = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = create_model("timm:resnet18", num_classes=10)
    report = load_pretrained(dst, path)
    _assert_same(src, dst)
    assert report.format == "safetensors" and report.source == "safetensors state dict"
