"""Build the demo checkpoints the shipped ``mixed_precision_config.yaml`` points at.

    python -m sglang.srt.enhanced.tools.demo --out demo [--force]

writes one tiny Qwen2-MoE model (2 layers, hidden 64, 4 routed experts and a shared
expert, seed 0) three times:

- ``demo/bf16``: the bfloat16 release (config, tokenizer, ``model.safetensors``);
- ``demo/fp8``: FP8 e4m3 with block-wise scales (32 x 32 blocks);
- ``demo/gptq-int4``: GPTQ 4-bit, group size 32, symmetric, no act-order.

The build is deterministic (same files every time) and idempotent: a marker file is
written last, and a folder with a complete marker for the same recipe is left alone.
``--force`` rebuilds anyway.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.tools.tiny_models import MODEL_INPUT_NAMES

logger = logging.getLogger(__name__)

__all__ = ["DEMO_FOLDERS", "MARKER", "RECIPE", "build_demo", "demo_paths", "is_complete"]

MARKER = ".demo-complete.json"
LOCK = ".demo.lock"
# Precision (as named in the config file) -> sub-folder.
DEMO_FOLDERS = {"bf16": "bf16", "fp8": "fp8", "int4": "gptq-int4"}
RECIPE: dict[str, Any] = {
    "arch": "qwen2_moe",
    "seed": 0,
    "dtype": "bfloat16",
    "fp8": {"format": "fp8-block", "block_size": [32, 32]},
    # 32 divides every input dim of the tiny model (hidden 64, moe_intermediate 32, shared 64).
    "int4": {"format": "gptq", "bits": 4, "group_size": 32, "sym": True, "desc_act": False},
    "tokenizer_inputs": list(MODEL_INPUT_NAMES),
}


def demo_paths(out: Path) -> dict[str, Path]:
    """Folder of each precision under ``out``, keyed ``bf16`` / ``fp8`` / ``int4``."""
    return {precision: Path(out) / sub for precision, sub in DEMO_FOLDERS.items()}


def is_complete(out: Path) -> bool:
    """True when ``out`` holds a finished build of the current recipe."""
    marker = Path(out) / MARKER
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return recorded == RECIPE and all((p / "config.json").is_file() for p in demo_paths(out).values())


def build_demo(out: Path, *, force: bool = False) -> dict[str, Path]:
    """Write the three demo checkpoints under ``out`` (skipped when already complete); return their folders."""
    out = Path(out)
    paths = demo_paths(out)
    if not force and is_complete(out):
        logger.info("demo checkpoints in %s are complete; nothing to do", out)
        return paths
    if out.exists() and not out.is_dir():
        raise EnhancedError("demo output path exists and is not a folder", culprit=str(out))
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out / LOCK):
        if not force and is_complete(out):  # built by another process while we waited
            return paths
        _build(out, paths)
    return paths


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` so concurrent builds of one folder take turns."""
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(out: Path, paths: dict[str, Path]) -> None:
    from sglang.srt.enhanced.tools.quantize import quantize_checkpoint
    from sglang.srt.enhanced.tools.tiny_models import build_tiny_model

    (out / MARKER).unlink(missing_ok=True)
    for path in paths.values():
        if path.exists():
            shutil.rmtree(path)

    build_tiny_model(
        RECIPE["arch"], paths["bf16"], seed=RECIPE["seed"], dtype=getattr(torch, RECIPE["dtype"])
    )
    fp8 = RECIPE["fp8"]
    quantize_checkpoint(paths["bf16"], paths["fp8"], fp8["format"], block_size=tuple(fp8["block_size"]))
    int4 = {k: v for k, v in RECIPE["int4"].items() if k != "format"}
    quantize_checkpoint(paths["bf16"], paths["int4"], RECIPE["int4"]["format"], **int4)
    (out / MARKER).write_text(json.dumps(RECIPE, indent=2, sort_keys=True) + "\n")
    logger.info("demo checkpoints written to %s", out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sglang.srt.enhanced.tools.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (e.g. demo)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the folder is complete")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        paths = build_demo(args.out, force=args.force)
    except EnhancedError as e:
        parser.exit(2, f"error: {e}\n")
    for precision, path in paths.items():
        print(f"{precision}: {path}")


if __name__ == "__main__":
    main()
