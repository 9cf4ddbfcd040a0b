"""Launch SGLang's stock OpenAI-compatible server with the enhanced features wired in.

``launch_enhanced_server.py --config CFG --model MODEL [--port P] [--enable-expert-tracking]
[--plan] [every sglang.launch_server argument]``

Order of precedence for a server setting: the command line, then the YAML file's
``inference`` / ``server`` sections, then SGLang's defaults. ``--model`` is an alias
of SGLang's ``--model-path``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sglang.srt.enhanced.config import EnhancedConfig, resolve_path
from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.launch_checks import check_launch, check_model_folder
from sglang.srt.enhanced.settings import LaunchSettings

if TYPE_CHECKING:
    from sglang.srt.enhanced.mixed_precision.plan import LoadPlan
    from sglang.srt.enhanced.mixed_precision.serving.layout import ServingLayout
    from sglang.srt.enhanced.tensor_parallel import PackedUnits

logger = logging.getLogger(__name__)

# YAML key -> ServerArgs field. Keys absent here are reported as ignored.
INFERENCE_TO_SERVER_ARGS = {
    "max_seq_length": "context_length",
    "max_batch_size": "max_running_requests",
    "dtype": "dtype",
}
SERVER_TO_SERVER_ARGS = {"host": "host", "port": "port"}

# What CPU mode sets unless the command line says otherwise. On the CPU, SGLang sizes the
# KV pool from free RAM; a cap on tokens keeps the pool small while a generous fraction keeps
# the start-up check from failing when other processes take some RAM meanwhile.
CPU_DEFAULTS = {
    "attention_backend": "torch_native",
    "disable_cuda_graph": True,
    "disable_custom_all_reduce": True,
    "enable_p2p_check": True,
    "mem_fraction_static": 0.5,
    "max_total_tokens": 65536,
}
# On the CPU every tensor-parallel rank reads the same host RAM, so SGLang's check that the
# ranks' free memory is balanced compares one number taken at two moments: a warning only.
CPU_TP_ENV = {"SGL_DISABLE_TP_MEMORY_INBALANCE_CHECK": "true"}


def rewrite_model_alias(argv: Sequence[str]) -> list[str]:
    """Accept ``--model X`` / ``--model=X`` as SGLang's ``--model-path``."""
    out = []
    for token in argv:
        if token == "--model":
            out.append("--model-path")
        elif token.startswith("--model="):
            out.append("--model-path=" + token.split("=", 1)[1])
        else:
            out.append(token)
    return out


def build_parser() -> argparse.ArgumentParser:
    """SGLang's server arguments plus the enhanced ones."""
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(
        prog="launch_enhanced_server.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    group = parser.add_argument_group("sglang-enhanced")
    group.add_argument("--config", type=Path, default=None,
                       help="mixed-precision YAML (without it every weight is read from --model)")
    group.add_argument("--enable-expert-tracking", action="store_true",
                       help="count expert activations per layer; served on /expert_stats")
    group.add_argument("--expert-window-passes", type=int, default=1000, metavar="N",
                       help="forward passes kept for /expert_stats?window= (0 = none; default 1000)")
    group.add_argument("--expert-request-records", type=int, default=1000, metavar="K",
                       help="finished requests whose expert use is kept (0 = per-request use off; default 1000)")
    group.add_argument("--disable-expert-coactivation", action="store_true",
                       help="do not count expert pairs chosen for the same token")
    group.add_argument("--plan", action="store_true",
                       help="print the load plan (tensors and bytes per precision, each module's serving method) and exit")
    ServerArgs.add_cli_args(parser)
    return parser


def explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """Destinations of the options that appear on the command line."""
    by_option = parser._option_string_actions  # noqa: SLF001 - argparse keeps no public map
    dests = set()
    for token in argv:
        if token.startswith("--"):
            action = by_option.get(token.split("=", 1)[0])
            if action is not None:
                dests.add(action.dest)
    return dests


def apply_config_sections(args: argparse.Namespace, config: EnhancedConfig, explicit: set[str]) -> None:
    """Map the YAML ``inference`` / ``server`` sections onto unset server arguments."""
    for section_name, mapping in (("inference", INFERENCE_TO_SERVER_ARGS), ("server", SERVER_TO_SERVER_ARGS)):
        section = getattr(config, section_name)
        given = section.model_fields_set
        for key in sorted(given):
            if key == "unknown_keys":
                continue
            dest = mapping.get(key)
            if dest is None:
                logger.warning("config key %s.%s has no SGLang server equivalent; ignored", section_name, key)
            elif dest not in explicit:
                setattr(args, dest, getattr(section, key))
        for key in sorted(getattr(section, "unknown_keys", {}) or {}):
            logger.warning("config key %s.%s is not a known setting; ignored", section_name, key)


def resolve_device(args: argparse.Namespace, explicit: set[str]) -> str:
    """Pick the device (CUDA where visible, else CPU) and fill in CPU-mode defaults."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.device = device
    if device == "cpu":
        for dest, value in CPU_DEFAULTS.items():
            if dest not in explicit:
                setattr(args, dest, value)
        if args.tensor_parallel_size > 1:
            for name, value in CPU_TP_ENV.items():
                os.environ.setdefault(name, value)
    return device


def _serving_dtype(args: argparse.Namespace, config: EnhancedConfig):
    import torch

    if args.dtype and args.dtype != "auto":
        return {"half": torch.float16, "float": torch.float32}.get(args.dtype) or getattr(torch, args.dtype)
    return config.inference.torch_dtype()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``launch_enhanced_server.py``; returns the exit status."""
    argv = rewrite_model_alias(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = explicit_dests(parser, argv)
    try:
        return _launch(args, explicit)
    except EnhancedError as e:
        logger.error("cannot start: %s", e)
        print(f"error: {e}", file=sys.stderr)
        return 2


def _launch(args: argparse.Namespace, explicit: set[str]) -> int:
    from sglang.srt.enhanced.mixed_precision.plan import format_plan
    from sglang.srt.enhanced.mixed_precision.serving.layout import format_layout
    from sglang.srt.enhanced.wiring import EnhancedServerLoader

    _check_tracking_sizes(args)
    config_path = resolve_path(args.config) if args.config else None
    config, plan, layout = check_setup(args, explicit, config_path)
    if args.plan:
        print(format_plan(plan))
        if args.tensor_parallel_size > 1:
            print(f"--tp-size {args.tensor_parallel_size}: every sharded dimension divides")
        print()
        print(format_layout(layout, plan))
        return 0

    from sglang.srt.server_args import ServerArgs

    state_dir = _state_folder()
    LaunchSettings(
        config_path=config_path,
        expert_tracking=args.enable_expert_tracking,
        state_dir=state_dir,
        expert_window_passes=args.expert_window_passes,
        expert_request_records=args.expert_request_records,
        expert_coactivation=not args.disable_expert_coactivation,
    ).to_env()
    server_args = ServerArgs.from_cli_args(args)
    server_args.load_format = EnhancedServerLoader
    logger.info("serving %s on %s (%d weights planned)", args.model_path, args.device, len(plan))

    from sglang.srt.enhanced.mixed_precision.http import add_mixed_precision_route
    from sglang.srt.entrypoints import http_server

    add_mixed_precision_route(http_server.app, state_dir)
    if args.enable_expert_tracking:
        from sglang.srt.enhanced.mixed_precision.plan_route import add_precision_plan_route
        from sglang.srt.enhanced.moe_tracker.stats import expert_activation_stats
        from sglang.srt.enhanced.moe_tracker.surfaces.http import add_expert_stats_routes

        service = add_expert_stats_routes(http_server.app, server_args, state_dir)

        async def statistics() -> dict:
            return expert_activation_stats(await service.snapshot(), top_k=0)

        add_precision_plan_route(http_server.app, config, statistics)
    http_server.launch_server(server_args)
    return 0


def _check_tracking_sizes(args: argparse.Namespace) -> None:
    for name in ("expert_window_passes", "expert_request_records"):
        if getattr(args, name) < 0:
            raise EnhancedError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}",
                                culprit=f"--{name.replace('_', '-')}")


def _state_folder() -> Path:
    """The server's state folder (removed when the server ends): each rank's memory report, and
    with tracking on the statistics exchange."""
    from sglang.srt.enhanced.moe_tracker.exchange import create_state_folder

    state_dir = create_state_folder()
    logger.info("state folder: %s", state_dir)
    return state_dir


def check_tp_size(tp_size: int, model_path: Path, layout: ServingLayout) -> None:
    """Refuse a ``--tp-size`` that does not divide the model (heads, intermediate sizes, packed units).

    Shapes come from the ``--model`` checkpoint's header; nothing is read or loaded.
    """
    from sglang.srt.enhanced.mixed_precision.sources import CheckpointSource
    from sglang.srt.enhanced.tensor_parallel import check_tensor_parallel

    if tp_size == 1:
        return
    hf_config = _model_config_json(model_path)
    model = CheckpointSource(model_path)
    try:
        shapes = {name: model.shape(name) for name in model.stored_names}
    finally:
        model.close()
    check_tensor_parallel(tp_size, hf_config, shapes, packed_units(layout))


def packed_units(layout: ServingLayout) -> dict[str, PackedUnits]:
    """The units each weight the layout serves packed is cut in, by weight name (none for decoded modules)."""
    import math

    from sglang.srt.enhanced.mixed_precision.formats.fp8 import FP8Scale
    from sglang.srt.enhanced.mixed_precision.packing import block_shape
    from sglang.srt.enhanced.tensor_parallel import PackedUnits

    units: dict[str, PackedUnits] = {}
    for module in layout.modules.values():
        if module.method != "packed":
            continue
        for part in module.parts:
            gptq, fp8 = part.format.gptq, part.format.fp8
            if gptq is not None:
                word, _ = block_shape(gptq.bits)
                grouped = gptq.group_size > 0 and not gptq.desc_act
                words = f"a {gptq.bits}-bit packed word block"
                units[part.entry.name] = PackedUnits(
                    word, math.lcm(word, gptq.group_size) if grouped else word, words,
                    f"a quantization group of {gptq.group_size}" if grouped else words)
            elif fp8 is not None and part.format.fp8_scale == FP8Scale.BLOCK and fp8.weight_block_size:
                block = fp8.weight_block_size
                units[part.entry.name] = PackedUnits(block[0], block[1], "an FP8 scale block", "an FP8 scale block")
    return units


def _model_config_json(model_path: Path) -> dict:
    import json

    config_json = model_path / "config.json"
    if not config_json.is_file():
        raise EnhancedError("the model folder has no config.json", culprit=str(model_path))
    return json.loads(config_json.read_text())


def check_setup(
    args: argparse.Namespace, explicit: set[str], config_path: Path | None
) -> tuple[EnhancedConfig, LoadPlan, ServingLayout]:
    """Every check before a start, the same for ``--plan``: settings, folders, the plan and its tensors.

    Fills the YAML's server settings and the device into ``args``; returns the config, the plan and
    how the server will hold it (its serving layout).
    """
    from sglang.srt.enhanced.mixed_precision.serving.layout import build_layout
    from sglang.srt.enhanced.mixed_precision.sglang_loader import load_enhanced_config, prepare_plan

    check_model_folder(Path(args.model_path))
    config = load_enhanced_config(config_path, args.model_path)
    if config_path is not None:
        apply_config_sections(args, config, explicit)
    device = resolve_device(args, explicit)
    check_launch(args, config, explicit, device)
    plan, sources = prepare_plan(config, _serving_dtype(args, config))
    try:
        layout = build_layout(plan, sources, config.mixed_precision.serve)
    finally:
        sources.close()
    check_tp_size(args.tensor_parallel_size, Path(args.model_path), layout)
    return config, plan, layout


if __name__ == "__main__":
    os._exit(main())
