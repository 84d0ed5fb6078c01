"""Loading a published pretrained state dict into a zoo model, so that a run can start from a
pretrained model (``dense.checkpoint=PATH``) instead of training the dense model itself. It reads
the files torchvision and timm publish (plain state dicts, ``.pth``/``.bin``/``.safetensors``), the
project's own dense checkpoints (``{"model": state_dict, "metrics": {...}}``) and files saved from
a DDP- or ``torch.compile``-wrapped model, checks every key and shape against the model before
touching it, and says precisely what does not fit (e.g. a 1000-class classifier for a 10-class
dataset). It only reads a local file: nothing is ever downloaded. Example::

    model = create_model("torchvision:resnet18", num_classes=1000)
    report = load_pretrained(model, "resnet18-f37072fd.pth")  # torchvision's published file
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Keys under which a checkpoint may hold the state dict, tried in this order (nested is fine):
#: ``model`` (ours, torchvision's reference scripts), ``state_dict`` (timm's and Lightning's
#: training checkpoints), ``module`` (some DeepSpeed/DDP dumps).
CONTAINER_KEYS = ("model", "state_dict", "module")
#: Prefixes that wrappers add to every key: DDP / DataParallel, then ``torch.compile``.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_TOLERATED = "num_batches_tracked"  # BatchNorm's step counter, left out of some published files
_SHOW = 5


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_pretrained` read and did."""

    path: Path
    format: str                   # "torch" (torch.save / .pth / .bin) or "safetensors"
    container: tuple[str, ...]    # keys unwrapped to reach the state dict, e.g. ("model",)
    stripped: tuple[str, ...]     # wrapper prefixes removed from every key, e.g. ("module.",)
    tensors: int                  # tensors loaded from the file
    kept: tuple[str, ...] = ()    # model entries the file lacks and that keep their value (num_batches_tracked)

    @property
    def source(self) -> str:
        """The kind of file in words, e.g. ``"halp dense checkpoint"``."""
        if self.format == "safetensors":
            return "safetensors state dict"
        if not self.container:
            return "plain state dict"
        return "state dict under " + "/".join(repr(k) for k in self.container)


def _read(path: Path) -> tuple[Any, str]:
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"{path} is a .safetensors file, but the 'safetensors' package is not "
                              "installed: pip install safetensors") from None
        return load_file(str(path), device="cpu"), "safetensors"
    try:
        return torch.load(path, map_location="cpu", weights_only=True), "torch"
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} holds more than tensors and plain containers (e.g. a pickled whole "
                         f"module or training arguments), which is not loaded for safety; save "
                         f"model.state_dict() instead. torch says: {str(e).splitlines()[0]}") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    keys: list[str] = []
    while isinstance(obj, Mapping) and not _is_state_dict(obj):
        key = next((k for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            odd = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)][:_SHOW]
            raise ValueError(f"{path} is not a state dict (entries that are not tensors: {odd}) and holds "
                             f"none under {list(CONTAINER_KEYS)}")
        keys.append(key)
        obj = obj[key]
    if not isinstance(obj, Mapping):
        where = f" under {'/'.join(keys)}" if keys else ""
        raise ValueError(f"{path} holds a {type(obj).__name__}{where}, not a state dict; "
                         "save model.state_dict() instead")
    return dict(obj), tuple(keys)


def _strip(state: dict[str, torch.Tensor], model_keys: list[str]) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """Remove a wrapper prefix that every key has (and the model's keys do not), repeatedly."""
    stripped: list[str] = []
    while True:
        p = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)
                  and not all(k.startswith(p) for k in model_keys)), None)
        if p is None:
            return state, tuple(stripped)
        state = {k[len(p):]: v for k, v in state.items()}
        stripped.append(p)


def _classifier(model: nn.Module) -> str | None:
    """The name of the model's classifier module (timm's ``get_classifier``, else the last Linear)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    names = {id(m): n for n, m in model.named_modules()}
    if isinstance(head, nn.Module) and id(head) in names:
        return names[id(head)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def _shape_error(model: nn.Module, path: Path, key: str, got: torch.Size, want: torch.Size) -> ValueError:
    msg = f"{path} does not fit the model: {key} has shape {tuple(got)} in the file but {tuple(want)} in the model"
    head = _classifier(model)
    if head is not None and key in (f"{head}.weight", f"{head}.bias") and got[1:] == want[1:]:
        msg += (f". The number of classes differs: the checkpoint was trained for {got[0]} classes, the "
                f"model has {want[0]}. Use a dataset with the checkpoint's {got[0]} classes, or a checkpoint "
                f"trained for {want[0]} classes (e.g. fine-tune it first)")
    elif len(got) == 4 == len(want) and got[1] != want[1] and got[0] == want[0]:
        msg += (f". The input channels differ ({got[1]} in the file, {want[1]} in the model): use data with "
                f"{got[1]} channel(s), or a checkpoint trained on {want[1]}-channel input")
    return ValueError(msg)


def _listing(keys: list[str]) -> str:
    more = f" and {len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def load_pretrained(model: nn.Module, path: str | os.PathLike[str]) -> LoadReport:
    """Load the local state dict at ``path`` into ``model`` (in place), strictly.

    Reads ``torch.save`` files with ``weights_only=True`` and ``.safetensors`` files; unwraps
    :data:`CONTAINER_KEYS`; strips :data:`WRAPPER_PREFIXES`. BatchNorm ``num_batches_tracked``
    missing from the file keeps the model's value, and one the model lacks is ignored.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a state dict; keys are missing or unexpected (a few are named);
            or a tensor's shape differs (the first such key is named with both shapes, with the
            likely cause when it is the classifier or the stem).
        ImportError: a ``.safetensors`` file without the ``safetensors`` package.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"pretrained checkpoint {path} does not exist")
    obj, fmt = _read(path)
    state, container = _unwrap(obj, path)
    target = model.state_dict()
    state, stripped = _strip(state, list(target))

    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target and not k.endswith(_TOLERATED)]
    kept = tuple(k for k in missing if k.endswith(_TOLERATED))
    missing = [k for k in missing if not k.endswith(_TOLERATED)]
    if missing or unexpected:
        parts = [f"missing {len(missing)} key(s): {_listing(missing)}"] if missing else []
        parts += [f"unexpected {len(unexpected)} key(s): {_listing(unexpected)}"] if unexpected else []
        raise ValueError(f"{path} does not fit the model ({type(model).__name__}): " + "; ".join(parts)
                         + ". Is it a checkpoint of the same architecture?")
    for key, want in target.items():
        if key in state and state[key].shape != want.shape:
            raise _shape_error(model, path, key, state[key].shape, want.shape)

    full = {k: state[k] if k in state else target[k] for k in target}
    model.load_state_dict(full, strict=True)
    return LoadReport(path, fmt, container, stripped, tensors=sum(k in state for k in target), kept=kept)


__all__ = ["load_pretrained", "LoadReport", "CONTAINER_KEYS", "WRAPPER_PREFIXES"]
