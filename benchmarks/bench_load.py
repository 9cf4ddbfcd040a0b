"""Load time and host memory: our loader against stock SGLang, on a synthetic MoE checkpoint.

Builds (once, into ``--workdir``) a random bf16 Qwen2-MoE checkpoint of a few GB in
shards of at least ``--shard-gib`` GiB, and FP8-block and GPTQ-int4 copies of it made
with ``sglang.srt.enhanced.tools.quantize``. Then, in a fresh subprocess per
measurement, it builds the model the way SGLang's ``ModelRunner`` does on the CPU
(gloo world of 1, ``initialize_model_parallel(1)``, ``ModelConfig`` / ``LoadConfig`` /
``DeviceConfig("cpu")``, ``get_model_loader(...).load_model(...)``) with:

- ``stock``: ``load_format="auto"``, SGLang's ``DefaultModelLoader`` on the bf16 checkpoint;
- ``ours-bf16``: ``MixedPrecisionModelLoader`` with every weight mapped to bf16;
- ``ours-mixed``: attention bf16, shared-expert MLP FP8 (block 128), routed experts GPTQ int4.

Per run it records the wall time of ``load_model``, the peak RSS during it (the kernel's
high-water mark ``VmHWM``, reset through ``/proc/self/clear_refs`` just before the load;
VmRSS sampled every 10 ms is shown beside it as a check), and the RSS once loaded (after
``gc.collect()`` and ``malloc_trim(0)``). "Overhead" = peak - loaded: the host
memory a load needs on top of the model it produces. Every checkpoint file is read once
before the first timed run, so all runs read from the page cache. Runs alternate between
the loaders; the table shows medians.

    python benchmarks/bench_load.py [--workdir /tmp/sglang-enhanced-bench-load] [--repeats 3]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

MODES = ("stock", "ours-bf16", "ours-mixed")
MIXED_RULES = {
    "model.layers.*.self_attn.*": "bf16",
    "model.layers.*.mlp.shared_expert.*_proj.weight": "fp8",
    "model.layers.*.mlp.experts.*_proj.weight": "int4",
}
GiB = 1 << 30


# -------------------------------------------------------------------------------- checkpoints


def model_config(args: argparse.Namespace):
    from sglang.srt.enhanced.tools.tiny_models import tiny_config

    return tiny_config(
        "qwen2_moe",
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128,
        num_key_value_heads=max(1, args.hidden // 512),
        intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.moe_intermediate,
        shared_expert_intermediate_size=args.hidden,
        num_experts=args.experts,
        num_experts_per_tok=4,
    )


def build_bf16(args: argparse.Namespace, out: Path) -> None:
    """Random bf16 weights written shard by shard (never more than one shard in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from sglang.srt.enhanced.tools.tiny_models import train_tokenizer

    config = model_config(args)
    config.torch_dtype = torch.bfloat16
    config.architectures = ["Qwen2MoeForCausalLM"]
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    order = sorted(shapes, key=_layer_key)
    target = int(args.shard_gib * GiB)
    shards: list[list[str]] = [[]]
    size = 0
    for name in order:
        if size >= target:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += _numel(shapes[name]) * 2
    if len(shards) > 1 and size < target:  # a short tail joins the shard before it
        tail = shards.pop()
        shards[-1] += tail
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            shape = shapes[name]
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                std = 0.5 if name.endswith("mlp.gate.weight") else 0.02
                tensors[name] = (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)
            weight_map[name] = fname
            total += _numel(shape) * 2
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
        print(f"  wrote {fname} ({(out / fname).stat().st_size / GiB:.2f} GiB)", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(str(out))
    train_tokenizer(out)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _layer_key(name: str) -> tuple[int, str]:
    parts = name.split(".")
    if "layers" in parts:
        return int(parts[parts.index("layers") + 1]), name
    return (-1 if "embed" in name else 1 << 30), name


def prepare(args: argparse.Namespace) -> dict[str, Path]:
    """Build what is missing; returns the checkpoint folders and config files."""
    from sglang.srt.enhanced.tools.quantize import quantize_checkpoint

    work = args.workdir
    paths = {"bf16": work / "bf16", "fp8": work / "fp8-block", "int4": work / "gptq-int4"}
    if not (paths["bf16"] / "model.safetensors.index.json").is_file():
        print(f"building the bf16 checkpoint in {paths['bf16']}", flush=True)
        build_bf16(args, paths["bf16"])
    for key, fmt, opts in (
        ("fp8", "fp8-block", {"block_size": (128, 128)}),
        ("int4", "gptq", {"bits": 4, "group_size": 128, "sym": True}),
    ):
        if not (paths[key] / "config.json").is_file():
            print(f"quantizing to {fmt} in {paths[key]}", flush=True)
            t = time.perf_counter()
            quantize_checkpoint(paths["bf16"], paths[key], fmt, max_shard_size="1.5GB", **opts)
            print(f"  done in {time.perf_counter() - t:.0f} s", flush=True)
    configs = {
        "ours-bf16": {"mixed_precision": {"bf16_path": str(paths["bf16"]), "weight_mapping": {"*": "bf16"}}},
        "ours-mixed": {
            "mixed_precision": {
                "bf16_path": str(paths["bf16"]),
                "fp8_path": str(paths["fp8"]),
                "int4_path": str(paths["int4"]),
                "weight_mapping": MIXED_RULES,
            }
        },
    }
    import yaml

    for mode, data in configs.items():
        path = work / f"{mode}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        paths[mode] = path
    return paths


def warm_page_cache(folders: list[Path]) -> int:
    """Read every file of the folders once; returns the bytes read."""
    total = 0
    for folder in folders:
        for path in sorted(folder.iterdir()):
            if path.is_file():
                with open(path, "rb") as f:
                    while chunk := f.read(64 << 20):
                        total += len(chunk)
    return total


# -------------------------------------------------------------------------------- one measurement


def _rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # resets VmHWM to the current RSS


class RssSampler:
    """Samples this process's RSS every ``interval`` seconds in a thread; keeps the maximum."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval, self.peak = interval, _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def worker(mode: str, model_path: str, config_path: str | None, port: int) -> dict:
    """Load the model once in this (fresh) process and report time and memory."""
    import torch

    if config_path:
        os.environ["SGLANG_ENHANCED_CONFIG"] = config_path
    torch.set_num_threads(os.cpu_count() or 1)
    from sglang.srt.configs.device_config import DeviceConfig
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.distributed import init_distributed_environment, initialize_model_parallel
    from sglang.srt.layers.dp_attention import initialize_dp_attention
    from sglang.srt.model_loader.loader import get_model_loader
    from sglang.srt.model_loader.utils import get_model_architecture

    init_distributed_environment(
        backend="gloo",
        world_size=1,
        rank=0,
        local_rank=0,
        distributed_init_method=f"tcp://127.0.0.1:{port}",
    )
    initialize_model_parallel(tensor_model_parallel_size=1)
    initialize_dp_attention(False, 0, 1, 1, None, 1)
    load_format: object = "auto"
    if mode != "stock":
        from sglang.srt.enhanced.mixed_precision.sglang_loader import MixedPrecisionModelLoader

        load_format = MixedPrecisionModelLoader
    model_config = ModelConfig(model_path, dtype="bfloat16", model_override_args="{}")
    get_model_architecture(model_config)  # import the model class before timing
    loader = get_model_loader(LoadConfig(load_format=load_format))
    gc.collect()
    before = _rss_bytes()
    _reset_hwm()
    with RssSampler() as sampler:
        start = time.perf_counter()
        model = loader.load_model(model_config=model_config, device_config=DeviceConfig("cpu"))
        seconds = time.perf_counter() - start
    hwm = _hwm_bytes()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    loaded = _rss_bytes()
    with torch.no_grad():
        params = [p for _, p in sorted(model.named_parameters())]
        param_bytes = sum(p.numel() * p.element_size() for p in params)
        fingerprint = [float(p.float().sum()) for p in params]
        names = [n for n, _ in sorted(model.named_parameters())]
    return {
        "mode": mode,
        "seconds": seconds,
        "before": before,
        "peak_sampled": sampler.peak,
        "peak": max(hwm, sampler.peak),
        "loaded": loaded,
        "param_bytes": param_bytes,
        "fingerprint": fingerprint, "names": names,
    }


def run_one(mode: str, paths: dict[str, Path], port: int) -> dict:
    config = str(paths[mode]) if mode != "stock" else ""
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        mode,
        "--model",
        str(paths["bf16"]),
        "--config",
        config,
        "--port",
        str(port),
    ]
    env = {**os.environ, "TQDM_DISABLE": os.environ.get("TQDM_DISABLE", "0")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


# -------------------------------------------------------------------------------- report


def report(results: dict[str, list[dict]]) -> str:
    med = {
        m: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak", "loaded", "before")}
        for m, rs in results.items()
    }
    for m in med:
        med[m]["overhead"] = statistics.median(r["peak"] - r["loaded"] for r in results[m])
    stock = med["stock"]
    lines = [
        "| loader | load s (median) | runs s | time / stock | peak RSS GiB | loaded RSS GiB "
        "| overhead GiB | overhead / stock |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, v in med.items():
        runs = ", ".join(f"{r['seconds']:.2f}" for r in results[m])
        lines.append(
            f"| {m} | {v['seconds']:.2f} | {runs} | {v['seconds'] / stock['seconds']:.3f} "
            f"| {v['peak'] / GiB:.2f} | {v['loaded'] / GiB:.2f} | {v['overhead'] / GiB:.2f} "
            f"| {v['overhead'] / stock['overhead']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sglang-enhanced-bench-load"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=15)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--moe-intermediate", type=int, default=512)
    parser.add_argument("--shard-gib", type=float, default=1.0, help="smallest shard size (GiB)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=29500, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(args.worker, args.model, args.config or None, args.port)
        print("RESULT " + json.dumps(result), flush=True)
        os._exit(0)

    paths = prepare(args)
    folders = [paths["bf16"], paths["fp8"], paths["int4"]]
    sizes = {
        k: sum(p.stat().st_size for p in paths[k].glob("*.safetensors")) for k in ("bf16", "fp8", "int4")
    }
    shards = sorted(p.stat().st_size for p in paths["bf16"].glob("*.safetensors"))
    warmed = warm_page_cache(folders)
    print(f"page cache warmed: read {warmed / GiB:.2f} GiB once before timing", flush=True)
    import torch

    print(
        f"model: qwen2_moe hidden={args.hidden} layers={args.layers} experts={args.experts} "
        f"moe_intermediate={args.moe_intermediate}; bf16 {sizes['bf16'] / GiB:.2f} GiB in {len(shards)} "
        f"shards ({', '.join(f'{s / GiB:.2f}' for s in shards)} GiB), fp8-block {sizes['fp8'] / GiB:.2f} GiB, "
        f"gptq-int4 {sizes['int4'] / GiB:.2f} GiB; torch threads={torch.get_num_threads()}",
        flush=True,
    )
    results: dict[str, list[dict]] = {m: [] for m in args.modes}
    port = 29500 + os.getpid() % 1000
    for rep in range(args.repeats):
        order = args.modes[rep % len(args.modes) :] + args.modes[: rep % len(args.modes)]
        for mode in order:
            r = run_one(mode, paths, port)
            port += 1
            results[mode].append(r)
            print(
                f"  run {rep + 1} {mode:>10}: {r['seconds']:.2f} s, peak {r['peak'] / GiB:.2f} GiB "
                f"(sampled {r['peak_sampled'] / GiB:.2f}), loaded {r['loaded'] / GiB:.2f} GiB, "
                f"before {r['before'] / GiB:.2f} GiB",
                flush=True,
            )
    if "stock" in results and "ours-bf16" in results:
        same = results["stock"][0]["fingerprint"] == results["ours-bf16"][0]["fingerprint"]
        print(f"ours-bf16 parameters identical to stock (per-parameter sums): {same}")
    print()
    print(report({m: rs for m, rs in results.items()}))


if __name__ == "__main__":
    main()
