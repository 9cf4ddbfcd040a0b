"""Served weight memory and output tokens/s of a Qwen3-30B-A3B-shaped MoE on one GPU.

The model has Qwen3-30B-A3B's layer shapes (hidden 2048, 32 query / 4 KV heads of 128,
128 experts of intermediate 768, top-8, vocab 151936) and ``--layers`` of its 48 layers,
with random bf16 weights built on the GPU. Its experts are quantized to GPTQ-Int4 (4 bit,
group 128, symmetric) by ``tools/quantize.py``'s ``quantize_checkpoint``, each tensor's
round-to-nearest run on the GPU. Served through ``launch_enhanced_server.py``:

* ``bf16``           all weights from the bf16 checkpoint, expert tracking on;
* ``int4-decoded``   experts from the GPTQ checkpoint, decoded to bf16 at load, tracking on;
* ``int4-packed``    experts from the GPTQ checkpoint kept packed (``serve: packed``), tracking on;
* ``bf16-untracked`` as ``bf16`` without ``--enable-expert-tracking``.

Servers are started one after another (the next once the previous is ready), so SGLang's
"Load weight end ... mem usage" line of each is read while no other server allocates. Output
tokens/s come from SGLang's own ``bench_serving`` (random token ids, ``--random-input-len`` /
``--random-output-len`` fixed, ``--max-concurrency`` 1, 8 and 64, all requests at once), run
in this process once per (server, concurrency). The tracked and untracked bf16 servers each
run once unmeasured at concurrency 1 and 64 (Triton compiles kernels for batch shapes it first
meets), then take turns there for ``--rounds`` rounds (the server not measuring is idle); the
ratio is of the per-setting medians. ``--tracking-only`` starts those two servers alone.

    python benchmarks/bench_served_gpu.py --workdir /tmp/q3 --out results/ [--layers 4]

Server options: ``--attention-backend triton --sampling-backend pytorch
--disable-custom-all-reduce`` and CUDA graphs on (up to batch 64), as the GPU lane runs them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import re
import runpy
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QWEN3_30B_A3B = dict(
    hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
    num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
    vocab_size=151936, max_position_embeddings=4096, rope_theta=1000000.0, norm_topk_prob=True,
    decoder_sparse_step=1, bos_token_id=0, eos_token_id=0, pad_token_id=0,
)
EXPERT_RULE = "model.layers.*.mlp.experts.*_proj.weight"
SERVER_ARGS = ("--attention-backend", "triton", "--sampling-backend", "pytorch", "--disable-custom-all-reduce",
               "--cuda-graph-max-bs", "64", "--max-total-tokens", "65536", "--context-length", "4096")
GRAPHS_DONE = "Capture cuda graph end"
MEM_LINE = re.compile(r"Load weight end\..*?mem usage=([\d.]+) GB")
GiB = 1 << 30


def _server_module():
    spec = importlib.util.spec_from_file_location("e2e_server", REPO / "test" / "e2e" / "server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


# -------------------------------------------------------------------------------- checkpoints


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A word-level tokenizer with one token per model id (``t<id>``), so any output decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, **{f"t{i}": i for i in range(1, vocab_size)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(str(out))


def build_bf16(out: Path, layers: int) -> float:
    """Random weights made on the GPU, one safetensors shard per layer; returns the GiB written."""
    import torch
    from safetensors.torch import save_file

    from sglang.srt.enhanced.tools.tiny_models import tiny_config

    config = tiny_config("qwen3_moe", num_hidden_layers=layers, **QWEN3_30B_A3B)
    config.torch_dtype = torch.bfloat16
    config.architectures = ["Qwen3MoeForCausalLM"]
    h, e, inter = config.hidden_size, config.num_experts, config.moe_intermediate_size
    q, kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32) * std).to(torch.bfloat16)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bfloat16)

    def layer(i: int) -> dict[str, torch.Tensor]:
        p = f"model.layers.{i}."
        shard = {
            p + "input_layernorm.weight": ones(h), p + "post_attention_layernorm.weight": ones(h),
            p + "self_attn.q_proj.weight": rand(q * d, h), p + "self_attn.k_proj.weight": rand(kv * d, h),
            p + "self_attn.v_proj.weight": rand(kv * d, h), p + "self_attn.o_proj.weight": rand(h, q * d),
            p + "self_attn.q_norm.weight": ones(d), p + "self_attn.k_norm.weight": ones(d),
            p + "mlp.gate.weight": rand(e, h, std=0.5),
        }
        for j in range(e):
            x = f"{p}mlp.experts.{j}."
            shard.update({x + "gate_proj.weight": rand(inter, h), x + "up_proj.weight": rand(inter, h),
                          x + "down_proj.weight": rand(h, inter)})
        return shard

    def outer() -> dict[str, torch.Tensor]:
        return {"model.embed_tokens.weight": rand(config.vocab_size, h), "model.norm.weight": ones(h),
                "lm_head.weight": rand(config.vocab_size, h)}

    out.mkdir(parents=True, exist_ok=True)
    makers = [outer, *(lambda i=i: layer(i) for i in range(layers))]
    weight_map, total = {}, 0
    for k, make in enumerate(makers):
        shard = {n: t.cpu() for n, t in make().items()}
        name = f"model-{k + 1:05d}-of-{len(makers):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        total += sum(t.numel() * t.element_size() for t in shard.values())
        del shard
    torch.cuda.empty_cache()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(str(out))
    write_tokenizer(out, config.vocab_size)
    return total / GiB


def quantize_on_gpu(src: Path, dst: Path) -> None:
    """``quantize_checkpoint(..., "gptq", bits=4, group_size=128)``, each tensor quantized on the GPU."""
    import torch

    from sglang.srt.enhanced.tools import quantize

    on_cpu = quantize.gptq_quantize_tensor

    def on_gpu(weight: torch.Tensor, opts) -> dict[str, torch.Tensor]:  # noqa: ANN001
        with torch.device("cuda"):
            parts = on_cpu(weight.to("cuda"), opts)
        return {name: part.cpu() for name, part in parts.items()}

    quantize.gptq_quantize_tensor = on_gpu
    try:
        quantize.quantize_checkpoint(src, dst, "gptq", bits=4, group_size=128, sym=True, max_shard_size="2GB")
    finally:
        quantize.gptq_quantize_tensor = on_cpu
    torch.cuda.empty_cache()


def write_configs(work: Path, bf16: Path, int4: Path) -> dict[str, Path]:
    import yaml

    data = {
        "bf16": {"bf16_path": str(bf16), "weight_mapping": {"*": "bf16"}},
        "int4-decoded": {"bf16_path": str(bf16), "int4_path": str(int4), "serve": "decoded",
                         "weight_mapping": {EXPERT_RULE: "int4"}},
        "int4-packed": {"bf16_path": str(bf16), "int4_path": str(int4), "serve": "packed",
                        "weight_mapping": {EXPERT_RULE: "int4"}},
    }
    paths = {}
    for name, section in data.items():
        paths[name] = work / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump({"mixed_precision": section}, sort_keys=False))
    return paths


# -------------------------------------------------------------------------------- servers


def start_in_turn(server_mod, bf16: Path, configs: dict[str, Path], logs: Path, timeout: float,
                  servers: dict, tracking_only: bool = False) -> None:
    """Start each server into ``servers`` once the one before is ready (graphs captured, warm-up done).

    A server whose port was taken before it bound it (another server's internal port) is started
    again on a new one (``ServerProcess.wait_ready``).
    """
    plan = [("bf16", configs["bf16"], True), ("int4-decoded", configs["int4-decoded"], True),
            ("int4-packed", configs["int4-packed"], True), ("bf16-untracked", configs["bf16"], False)]
    if tracking_only:
        plan = [entry for entry in plan if entry[1] == configs["bf16"]]
    for name, config, tracking in plan:
        extra = (*SERVER_ARGS, *(("--enable-expert-tracking",) if tracking else ()))
        server = servers[name] = server_mod.start_enhanced(bf16, logs, *extra, config=config, name=name)
        server.wait_ready(timeout)  # starts it again on a new port if its port was taken
        print(f"{name}: ready after {server.restarts} restarts (CUDA graphs captured: "
              f"{GRAPHS_DONE in server.log()})", flush=True)


def served_gib(server) -> float:
    """GiB of weights in memory per ``GET /mixed_precision`` (summed over precisions)."""
    import urllib.request

    with urllib.request.urlopen(f"{server.base_url}/mixed_precision", timeout=30) as reply:
        report = json.loads(reply.read())
    return sum(p["bytes_in_memory"] for p in report["precisions"].values()) / 2**30


def weights_gib(server) -> float:
    found = MEM_LINE.findall(server.log())
    return float(found[-1]) if found else float("nan")


def bench_serving(base_url: str, tokenizer: Path, concurrency: int, prompts: int, input_len: int,
                  output_len: int, result: Path) -> float:
    """One ``python -m sglang.bench_serving`` run, in this process; its output tokens/s."""
    argv = ["bench_serving", "--backend", "sglang", "--base-url", base_url, "--tokenizer", str(tokenizer),
            "--dataset-name", "random-ids", "--random-input-len", str(input_len),
            "--random-output-len", str(output_len), "--random-range-ratio", "1.0",
            "--num-prompts", str(prompts), "--max-concurrency", str(concurrency), "--request-rate", "inf",
            "--seed", "1", "--disable-tqdm", "--output-file", str(result)]
    saved = sys.argv
    sys.argv = argv
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            runpy.run_module("sglang.bench_serving", run_name="__main__")
    finally:
        sys.argv = saved
        with open(result.with_suffix(".log"), "a") as log:
            log.write(buffer.getvalue())
    last = result.read_text().strip().splitlines()[-1]
    return float(json.loads(last)["output_throughput"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="checkpoints are built here")
    parser.add_argument("--out", type=Path, required=True, help="results JSON, bench_serving and server logs")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (Qwen3-30B-A3B has 48)")
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="tracking on/off turns at concurrency 1 and 64")
    parser.add_argument("--tracking-only", action="store_true",
                        help="only the tracked and untracked bf16 servers (the on/off ratio)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds for one server to start")
    parser.add_argument("--build-only", action="store_true", help="build the checkpoints, start no server")
    args = parser.parse_args()

    server_mod = _server_module()
    work, out = args.workdir, args.out
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "servers"
    logs.mkdir(exist_ok=True)
    bf16, int4 = work / "bf16", work / "gptq-int4"
    built = work / "checkpoints.json"
    if not built.is_file():
        t = time.perf_counter()
        gib = build_bf16(bf16, args.layers)
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        quantize_on_gpu(bf16, int4)
        info = {"layers": args.layers, "checkpoint_bf16_gib": gib, "build_s": build_s,
                "quantize_s": time.perf_counter() - t}
        built.write_text(json.dumps(info) + "\n")
    info = json.loads(built.read_text())
    if info["layers"] != args.layers:
        raise SystemExit(f"{work} holds a {info['layers']}-layer model; give another --workdir")
    print(f"checkpoints: bf16 {info['checkpoint_bf16_gib']:.2f} GiB built in {info['build_s']:.0f} s, "
          f"GPTQ-Int4 in {info['quantize_s']:.0f} s", flush=True)
    if args.build_only:
        return
    checkpoint_gib = info["checkpoint_bf16_gib"]
    timings = {"build_s": info["build_s"], "quantize_s": info["quantize_s"]}
    configs = write_configs(work, bf16, int4)

    results: dict = {"layers": args.layers, "input_len": args.input_len, "output_len": args.output_len,
                     "checkpoint_bf16_gib": checkpoint_gib, "timings": timings, "weights_gib": {},
                     "tok_s": {}}
    servers: dict = {}
    try:
        t = time.perf_counter()
        start_in_turn(server_mod, bf16, configs, logs, args.timeout, servers, args.tracking_only)
        timings["servers_s"] = time.perf_counter() - t
        for name, srv in servers.items():
            results["weights_gib"][name] = weights_gib(srv)
            try:
                results.setdefault("served_gib", {})[name] = served_gib(srv)
            except (OSError, KeyError, ValueError) as exc:
                print(f"{name}: GET /mixed_precision failed: {exc!r}", flush=True)
        prompts = {1: 4, 8: 16, 64: 64}

        def run(name: str, c: int, tag: str) -> float:
            value = bench_serving(servers[name].base_url, bf16, c, prompts[c], args.input_len, args.output_len,
                                  out / f"bench-{name}-c{c}-{tag}.jsonl")
            if tag != "warm-up":
                results["tok_s"].setdefault(f"{name}@{c}", []).append(value)
            print(f"{name} concurrency {c} ({tag}): {value:.1f} output tok/s", flush=True)
            return value

        if not args.tracking_only:
            for c in (1, 8, 64):
                run("int4-decoded", c, "0")
                run("int4-packed", c, "0")
            run("bf16", 8, "0")
        for c in (1, 64):  # first sight of these batch shapes compiles Triton kernels: not measured
            for name in ("bf16", "bf16-untracked"):
                run(name, c, "warm-up")
        for r in range(args.rounds):
            for c in (1, 64):
                order = ("bf16", "bf16-untracked") if r % 2 == 0 else ("bf16-untracked", "bf16")
                for name in order:
                    run(name, c, str(r))
    finally:
        for srv in servers.values():
            srv.stop()
        (out / "bench_served_gpu.json").write_text(json.dumps(results, indent=2) + "\n")
        print(report(results), flush=True)


def report(results: dict) -> str:
    med = {k: statistics.median(v) for k, v in results["tok_s"].items()}
    lines = [f"Qwen3-30B-A3B-shaped, {results['layers']} of 48 layers, input {results['input_len']} / "
             f"output {results['output_len']} tokens",
             "| server | weights GiB (SGLang mem usage) | GiB per /mixed_precision | tok/s c=1 | tok/s c=8 "
             "| tok/s c=64 |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, gib in results["weights_gib"].items():
        cells = [f"{med[f'{name}@{c}']:.1f}" if f"{name}@{c}" in med else "-" for c in (1, 8, 64)]
        served = results.get("served_gib", {}).get(name, float("nan"))
        lines.append(f"| {name} | {gib:.2f} | {served:.2f} | " + " | ".join(cells) + " |")
    for c in (1, 64):
        on, off = med.get(f"bf16@{c}"), med.get(f"bf16-untracked@{c}")
        if on and off:
            lines.append(f"tracking on/off at concurrency {c}: {on / off:.3f} "
                         f"(on {results['tok_s'][f'bf16@{c}']}, off {results['tok_s'][f'bf16-untracked@{c}']})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
