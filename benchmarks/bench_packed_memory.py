"""Weights in memory, packed vs decoded serving, on a synthetic MoE of more than 1 GB in bf16.

Builds (once, into ``--workdir``) a random bf16 Qwen2-MoE checkpoint (``bench_load.py``'s
builder; by default 6 layers, hidden 1024, 64 experts of intermediate 512, so the routed
experts are about 94% of the parameters) and a GPTQ-int4 group-128 copy made with
``sglang.srt.enhanced.tools.quantize``. It then serves one config twice through
``launch_enhanced_server.py`` on the CPU (routed experts from the int4 copy, everything
else bf16), once with ``mixed_precision.serve: decoded`` and once with ``packed``, and
reads for each:

- ``GET /mixed_precision``: bytes in memory per precision, from the loaded parameters;
- SGLang's own ``Load weight end. ... mem usage=X GB`` log line (the host memory taken
  by the load; on a shared machine other processes' allocations make it noisy).

Targets: routed experts (int4) at most 0.27x of decoded; the whole model at most 0.35x.

    python benchmarks/bench_packed_memory.py [--workdir /tmp/sglang-enhanced-bench-packed]
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path

import requests
import yaml

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
RULES = {"model.layers.*.mlp.experts.*_proj.weight": "int4"}


def _load(name: str, path: Path):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def prepare(args: argparse.Namespace) -> dict[str, Path]:
    from sglang.srt.enhanced.tools.quantize import quantize_checkpoint

    bench_load = _load("bench_load", REPO / "benchmarks" / "bench_load.py")
    bf16, int4 = args.workdir / "bf16", args.workdir / "gptq-int4-g128"
    if not (bf16 / "config.json").is_file():
        print(f"building the bf16 checkpoint in {bf16}", flush=True)
        bench_load.build_bf16(args, bf16)
    if not (int4 / "config.json").is_file():
        print(f"quantizing to {int4}", flush=True)
        quantize_checkpoint(bf16, int4, "gptq", bits=4, group_size=128)
    return {"bf16": bf16, "int4": int4}


def serve_once(folders: dict[str, Path], serve: str, workdir: Path) -> dict:
    server = _load("e2e_server", REPO / "test" / "e2e" / "server.py")
    config = workdir / f"{serve}.yaml"
    config.write_text(yaml.safe_dump({"mixed_precision": {
        "bf16_path": str(folders["bf16"]), "int4_path": str(folders["int4"]), "serve": serve,
        "weight_mapping": RULES}}, sort_keys=False))
    srv = server.start_enhanced(folders["bf16"], workdir, config=config, name=serve)
    with srv:
        srv.wait_ready(1800)
        report = requests.get(srv.base_url + "/mixed_precision", timeout=120).json()
        match = re.search(r"Load weight end\..*mem usage=(-?[\d.]+) GB", srv.log())
    report["sglang_mem_usage_gb"] = float(match.group(1)) if match else float("nan")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sglang-enhanced-bench-packed"))
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--moe-intermediate", type=int, default=512)
    parser.add_argument("--shard-gib", type=float, default=1.0)
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    folders = prepare(args)
    runs = {serve: serve_once(folders, serve, args.workdir) for serve in ("decoded", "packed")}

    def held(serve: str, precision: str | None = None) -> int:
        precisions = runs[serve]["precisions"]
        return sum(v["bytes_in_memory"] for p, v in precisions.items() if precision in (None, p))

    params = runs["decoded"]["precisions"]
    expert_share = held("decoded", "int4") / held("decoded")
    print(f"\nmodel: {args.layers} layers, hidden {args.hidden}, {args.experts} experts x {args.moe_intermediate}; "
          f"routed experts {expert_share:.1%} of the decoded bytes; on disk "
          f"{sum(v['bytes_on_disk'] for v in params.values()) / MiB:.1f} MiB\n")
    print("| weights | decoded (MiB) | packed (MiB) | packed / decoded | target |")
    print("|---|---:|---:|---:|---:|")
    for label, precision, target in (("routed experts (int4, g128)", "int4", "<= 0.27"),
                                     ("everything else (bf16)", "bf16", ""), ("whole model", None, "<= 0.35")):
        d, p = held("decoded", precision), held("packed", precision)
        print(f"| {label} | {d / MiB:.1f} | {p / MiB:.1f} | {p / d:.3f} | {target} |")
    d, p = runs["decoded"]["sglang_mem_usage_gb"], runs["packed"]["sglang_mem_usage_gb"]
    print(f"| SGLang `mem usage` at load (GB) | {d:.2f} | {p:.2f} | {p / d if d else float('nan'):.3f} | |")


if __name__ == "__main__":
    main()
