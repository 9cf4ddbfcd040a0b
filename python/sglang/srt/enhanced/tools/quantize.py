"""Write a GPTQ or FP8 copy of a bf16/fp16 safetensors checkpoint (round-to-nearest).

    python -m sglang.srt.enhanced.tools.quantize --src BF16_DIR --dst OUT_DIR --format gptq \\
        --bits 4 --group-size 128 [--asym] [--desc-act] [--checkpoint-format gptq|gptq_v2]
    python -m sglang.srt.enhanced.tools.quantize --src BF16_DIR --dst OUT_DIR --format fp8-block \\
        --block-size 128 128

Only the 2-D linear weights of decoder layers are quantized (attention projections, dense
and shared MLPs, experts); embeddings, lm_head, norms and router gates stay as stored.
The output has the tensors and config files the usual quantization tools write:

- ``gptq``: ``qweight``/``qzeros``/``scales``/``g_idx`` and ``quantize_config.json``;
- ``fp8-block``: float8_e4m3fn ``weight`` + float32 ``weight_scale_inv`` (``quant_method: fp8``);
- ``fp8-channel`` / ``fp8-tensor``: float8_e4m3fn ``weight`` + float32 ``weight_scale``
  (``[out, 1]`` / scalar) with a compressed-tensors ``float-quantized`` config.

Output is deterministic: the same input and options give byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.formats.gptq import GPTQFormat
from sglang.srt.enhanced.mixed_precision.packing import block_shape, pack_int32

logger = logging.getLogger(__name__)

FORMATS = ("gptq", "fp8-block", "fp8-channel", "fp8-tensor")
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
LINEAR_MODULES = frozenset(
    {
        "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "dense",
        "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
        "gate_proj", "up_proj", "down_proj", "gate_up_proj", "w1", "w2", "w3", "fc1", "fc2",
    }
)  # fmt: skip
ROUTER_MODULES = frozenset({"gate", "router", "shared_expert_gate"})
_LAYER_RE = re.compile(r"(^|\.)layers\.\d+\.")
_SKIP_FILES = {"config.json", "quantize_config.json", "model.safetensors.index.json"}


# --------------------------------------------------------------------------------------------
# Which tensors


def is_quantizable(name: str, tensor: torch.Tensor) -> bool:
    """True for the 2-D float linear weights of decoder layers, except router gates."""
    if not name.endswith(".weight") or tensor.dim() != 2 or not tensor.dtype.is_floating_point:
        return False
    if not _LAYER_RE.search(name):
        return False
    module = name.split(".")[-2]
    return module in LINEAR_MODULES and module not in ROUTER_MODULES


# --------------------------------------------------------------------------------------------
# GPTQ (round-to-nearest)


def act_order_g_idx(weight: torch.Tensor, group_size: int, desc_act: bool) -> torch.Tensor:
    """Group of every input column; with ``desc_act`` columns are ranked by decreasing L2 norm.

    Column ``i`` at rank ``r`` (0 = largest norm) belongs to group ``r // group_size``.
    """
    in_features = weight.shape[1]
    gs = in_features if group_size == -1 else group_size
    if not desc_act:
        return (torch.arange(in_features) // gs).to(torch.int32)
    norms = weight.to(torch.float64).pow(2).sum(dim=0)
    order = torch.sort(-norms, stable=True).indices  # column indices, largest norm first
    rank = torch.empty_like(order)
    rank[order] = torch.arange(in_features)
    return (rank // gs).to(torch.int32)


def gptq_quantize_tensor(weight: torch.Tensor, opts: GPTQFormat) -> dict[str, torch.Tensor]:
    """Round-to-nearest GPTQ quantization of one ``[out, in]`` weight.

    Returns ``{"qweight", "qzeros", "scales", "g_idx"}``. Per group and output row the
    range ``[min(x, 0), max(x, 0)]`` is mapped onto ``[0, 2**bits - 1]``; ``sym`` centres it
    at zero ``2**(bits-1)``. Scales are float16 and the integer codes are rounded with the
    stored scale, so every decoded element is within ``scale / 2`` of the input.
    """
    w = weight.to(torch.float32)
    out_f, in_f = w.shape
    maxq = (1 << opts.bits) - 1
    g_idx = act_order_g_idx(w, opts.group_size, opts.desc_act)
    groups = int(g_idx.max()) + 1 if in_f else 1
    gl = g_idx.to(torch.long)
    big = torch.finfo(torch.float32).max
    # Per (out row, group) min and max over the group's columns.
    idx = gl.unsqueeze(0).expand(out_f, in_f)
    xmin = torch.full((out_f, groups), big).scatter_reduce(1, idx, w, "amin").clamp(max=0)
    xmax = torch.full((out_f, groups), -big).scatter_reduce(1, idx, w, "amax").clamp(min=0)
    if opts.sym:
        amax = torch.maximum(-xmin, xmax)
        xmin, xmax = -amax, amax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = fp16_round_up((xmax - xmin) / maxq)
    if opts.sym:
        zero = torch.full_like(xmin, float(1 << (opts.bits - 1)))
    else:
        zero = torch.round(-xmin / scale.to(torch.float32))
        if opts.checkpoint_format == "gptq":
            # v1 stores zero - 1, so a zero of 0 cannot be written: widen the scale so the
            # range fits codes 1..maxq instead (the error bound still holds).
            low = zero == 0
            scale = torch.where(low, fp16_round_up((xmax - xmin) / (maxq - 1)), scale)
            zero = torch.where(low, 1.0, zero)
    s = scale.to(torch.float32)
    q = torch.clamp(torch.round(w / s[:, gl]) + zero[:, gl], 0, maxq).to(torch.int32)
    stored_zero = zero.to(torch.int32) - (1 if opts.checkpoint_format == "gptq" else 0)
    return {
        "qweight": pack_int32(q.t().contiguous(), opts.bits, dim=0),
        "qzeros": pack_int32(stored_zero.t().contiguous(), opts.bits, dim=1),
        "scales": scale.t().contiguous(),
        "g_idx": g_idx,
    }


def fp16_round_up(x: torch.Tensor) -> torch.Tensor:
    """Positive float32 values as float16, rounded up (never below ``x``) and kept normal.

    Rounding a scale down would push the extreme codes past the clamp and break the
    ``scale / 2`` error bound.
    """
    s16 = x.clamp(min=2.0**-14, max=65504.0).to(torch.float16)
    bump = s16.to(torch.float32) < x
    return torch.where(bump, (s16.view(torch.int16) + 1).view(torch.float16), s16)


def gptq_packable(weight: torch.Tensor, bits: int) -> bool:
    values, _ = block_shape(bits)
    return weight.shape[0] % values == 0 and weight.shape[1] % values == 0


# --------------------------------------------------------------------------------------------
# FP8


def fp8_block_quantize_tensor(weight: torch.Tensor, block_size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Block-wise e4m3 quantization: ``{"weight", "weight_scale_inv"}`` (scale = block amax / 448)."""
    bo, bi = block_size
    w = weight.to(torch.float32)
    out_f, in_f = w.shape
    go, gi = math.ceil(out_f / bo), math.ceil(in_f / bi)
    padded = torch.zeros(go * bo, gi * bi)
    padded[:out_f, :in_f] = w
    amax = padded.abs().reshape(go, bo, gi, bi).amax(dim=(1, 3))
    scale = (amax / FP8_MAX).clamp(min=1e-12)
    full = scale.repeat_interleave(bo, 0)[:out_f].repeat_interleave(bi, 1)[:, :in_f]
    q = (w / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale_inv": scale.contiguous()}


def fp8_scaled_quantize_tensor(weight: torch.Tensor, per_channel: bool) -> dict[str, torch.Tensor]:
    """Per-channel (scale ``[out, 1]``) or per-tensor (scalar scale) e4m3 quantization."""
    w = weight.to(torch.float32)
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()
    scale = (amax / FP8_MAX).clamp(min=1e-12)
    q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale": scale.to(torch.float32).contiguous()}


def _compressed_tensors_config(strategy: str, ignore: list[str]) -> dict[str, Any]:
    def args(strategy: str, dynamic: bool) -> dict[str, Any]:
        return {
            "num_bits": 8,
            "type": "float",
            "symmetric": True,
            "strategy": strategy,
            "dynamic": dynamic,
            "group_size": None,
            "block_structure": None,
            "actorder": None,
            "observer": None if dynamic else "minmax",
            "observer_kwargs": {},
        }

    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": args(strategy, False),
                "input_activations": args("token", True),
                "output_activations": None,
                "format": "float-quantized",
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


# --------------------------------------------------------------------------------------------
# Checkpoint I/O


def parse_size(text: str | int, culprit: str = "max_shard_size") -> int:
    """``"1GB"``, ``"500MB"``, ``"2GiB"`` or a byte count -> bytes; errors name ``culprit``."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
    if not m:
        raise EnhancedError(
            f"cannot parse size {text!r}; use e.g. 1GB, 500MB, 2GiB", culprit=culprit
        )
    unit = m.group(2).rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    size = int(float(m.group(1)) * base**power)
    if size <= 0:
        raise EnhancedError("size must be positive", culprit=culprit)
    return size


def source_files(src: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, from its index when there is one."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return [src / f for f in sorted(set(weight_map.values()))]
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise EnhancedError("no safetensors files", culprit=str(src))
    return files


def iter_tensors(src: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """All tensors of a checkpoint, in sorted name order."""
    where: dict[str, Path] = {}
    for path in source_files(src):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name in where:
                    raise EnhancedError(
                        f"tensor stored in both {where[name].name} and {path.name}", culprit=name
                    )
                where[name] = path
    for name in sorted(where):
        with safe_open(str(where[name]), framework="pt") as f:
            yield name, f.get_tensor(name)


class ShardWriter:
    """Collects tensors into safetensors shards of at most ``max_bytes`` each."""

    def __init__(self, dst: Path, max_bytes: int) -> None:
        self.dst, self.max_bytes = dst, max_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + nbytes > self.max_bytes:
            self._flush()
        self.current[name] = tensor.contiguous()
        self.current_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        save_file(
            self.current, str(self.dst / f".shard-{len(self.shards):05d}.tmp"), metadata={"format": "pt"}
        )
        self.shards.append(sorted(self.current))
        self.current, self.current_bytes = {}, 0

    def close(self) -> None:
        if self.current or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            (self.dst / ".shard-00000.tmp").rename(self.dst / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.dst / f".shard-{i:05d}.tmp").rename(self.dst / fname)
            weight_map.update({name: fname for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def quantize_checkpoint(src: Path, dst: Path, fmt: str, **options: Any) -> Path:
    """Quantize the checkpoint in ``src`` into ``dst`` (created; must be empty); return ``dst``.

    Options: ``bits`` (4), ``group_size`` (128), ``sym`` (True), ``desc_act`` (False),
    ``checkpoint_format`` ("gptq"), ``block_size`` ((128, 128)), ``max_shard_size`` ("1GB").
    """
    src, dst = Path(src), Path(dst)
    if fmt not in FORMATS:
        raise EnhancedError(f"unknown format {fmt!r}; valid: {list(FORMATS)}", culprit="format")
    known = {"bits", "group_size", "sym", "desc_act", "checkpoint_format", "block_size", "max_shard_size"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise EnhancedError(f"unknown options {unknown}; valid: {sorted(known)}", culprit="options")
    config_path = src / "config.json"
    if not config_path.is_file():
        raise EnhancedError("source checkpoint has no config.json", culprit=str(src))
    config = json.loads(config_path.read_text())
    if "quantization_config" in config:
        raise EnhancedError(
            "source checkpoint is already quantized", culprit=f"{config_path}:quantization_config"
        )
    if dst.exists() and any(dst.iterdir()):
        raise EnhancedError("destination folder is not empty", culprit=str(dst))
    dst.mkdir(parents=True, exist_ok=True)

    gptq = None
    if fmt == "gptq":
        gptq = GPTQFormat.from_dict(
            {k: options[k] for k in ("bits", "group_size", "sym", "desc_act", "checkpoint_format") if k in options}
            | {"bits": options.get("bits", 4), "group_size": options.get("group_size", 128)},
            "options",
        )
    block = tuple(int(v) for v in options.get("block_size", (128, 128)))
    if len(block) != 2 or min(block) <= 0:
        raise EnhancedError(f"block size must be two positive integers, got {block}", culprit="block_size")

    writer = ShardWriter(dst, parse_size(options.get("max_shard_size", "1GB")))
    ignored: list[str] = []
    n_quantized = 0
    for name, tensor in iter_tensors(src):
        prefix = name[: -len(".weight")]
        if not is_quantizable(name, tensor):
            if name.endswith(".weight") and tensor.dim() == 2 and name.split(".")[-2] != "embed_tokens":
                ignored.append(prefix)
            writer.add(name, tensor)
            continue
        if gptq is not None:
            if not gptq_packable(tensor, gptq.bits):
                logger.warning(
                    "%s: shape %s not packable at %d bits; left unquantized",
                    name,
                    tuple(tensor.shape),
                    gptq.bits,
                )
                ignored.append(prefix)
                writer.add(name, tensor)
                continue
            parts = gptq_quantize_tensor(tensor, gptq)
        elif fmt == "fp8-block":
            parts = fp8_block_quantize_tensor(tensor, block)  # type: ignore[arg-type]
        else:
            parts = fp8_scaled_quantize_tensor(tensor, per_channel=fmt == "fp8-channel")
        for suffix, value in parts.items():
            writer.add(f"{prefix}.{suffix}", value)
        n_quantized += 1
    writer.close()

    if gptq is not None:
        qc = gptq.quantize_config()
        _write_json(dst / "quantize_config.json", qc)
    elif fmt == "fp8-block":
        qc = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": list(block),
        }
    else:
        qc = _compressed_tensors_config("channel" if fmt == "fp8-channel" else "tensor", sorted(ignored))
    config["quantization_config"] = qc
    _write_json(dst / "config.json", config)
    for path in sorted(src.iterdir()):
        if (
            path.is_file()
            and path.name not in _SKIP_FILES
            and path.suffix not in (".safetensors", ".bin", ".pt")
        ):
            shutil.copyfile(path, dst / path.name)
    logger.info("quantized %d tensors of %s to %s (%s)", n_quantized, src, dst, fmt)
    return dst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sglang.srt.enhanced.tools.quantize",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--src", type=Path, required=True, help="bf16/fp16 safetensors checkpoint folder")
    parser.add_argument("--dst", type=Path, required=True, help="output folder (created; must be empty)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8), help="GPTQ bits (default 4)")
    parser.add_argument("--group-size", type=int, default=128, help="GPTQ group size, -1 for one group")
    parser.add_argument("--asym", action="store_true", help="GPTQ asymmetric zeros (default symmetric)")
    parser.add_argument("--desc-act", action="store_true", help="GPTQ act-order: groups by column norm")
    parser.add_argument("--checkpoint-format", choices=("gptq", "gptq_v2"), default="gptq")
    parser.add_argument("--block-size", type=int, nargs=2, default=(128, 128), metavar=("OUT", "IN"))
    parser.add_argument("--max-shard-size", default="1GB", help="e.g. 1GB, 500MB (default 1GB)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        out = quantize_checkpoint(
            args.src,
            args.dst,
            args.format,
            bits=args.bits,
            group_size=args.group_size,
            sym=not args.asym,
            desc_act=args.desc_act,
            checkpoint_format=args.checkpoint_format,
            block_size=tuple(args.block_size),
            max_shard_size=args.max_shard_size,
        )
    except EnhancedError as e:
        parser.exit(2, f"error: {e}\n")
    print(out)


if __name__ == "__main__":
    main()
