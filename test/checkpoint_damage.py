"""Damaged copies of the demo checkpoints, and configs pointing at them, for the bad-input tests."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "mixed_precision_config.yaml"
WEIGHTS_FILE = "model.safetensors"


def copy_checkpoint(source: Path, target: Path) -> Path:
    """A copy of a checkpoint folder (config, tokenizer, tensors)."""
    shutil.copytree(source, target)
    return target


def edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """Rewrite ``folder``'s ``model.safetensors`` after ``edit`` changed its tensors in place."""
    tensors = load_file(str(folder / WEIGHTS_FILE))
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    return folder


def damaged_copy(demo: dict[str, Path], precision: str, work: Path,
                 edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of the demo checkpoint of ``precision`` under ``work`` with its tensors edited."""
    return edit_tensors(copy_checkpoint(demo[precision], work / f"damaged-{precision}"), edit)


def shipped_mapping(demo: dict[str, Path], **changes: object) -> dict:
    """The shipped config with absolute demo folders; ``weight_mapping`` changes merge, other keys replace."""
    data = yaml.safe_load(SHIPPED.read_text())
    mp = data["mixed_precision"]
    mp.update({f"{p}_path": str(path) for p, path in demo.items()})
    for key, value in changes.items():
        if key == "weight_mapping":
            mp["weight_mapping"] = {**mp["weight_mapping"], **value}  # type: ignore[dict-item]
        else:
            mp[key] = value
    return data


def write_config(work: Path, data: dict) -> Path:
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
