"""Decode throughput of the real server with expert tracking on and off (CPU or GPU).

For each model, servers are started one at a time with ``launch_enhanced_server.py``
(CPU mode is picked automatically where there is no GPU), with and without
``--enable-expert-tracking``, in alternating order over ``--rounds`` rounds (a server
busy-polls when idle, so two never run at once). Each server gets one warm-up batch,
then ``--batches`` timed batches: ``--concurrency`` prompts sent in one ``/generate``
call, each generating ``--output-len`` tokens with ``ignore_eos``. Output tokens/s =
completion tokens reported by the server / wall time of the call. The table gives the
median over every timed batch of a setting and the ratio on / off.

Models: the tiny Qwen2-MoE of ``tools/tiny_models.py`` (2 layers, hidden 64, 4 experts)
and a larger synthetic one (hidden 512, 16 layers, 32 experts, top-4), built once into
``--workdir``.

    python benchmarks/bench_tracking_throughput.py [--rounds 3] [--batches 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "tiny": {},
    "h512-l16-e32": dict(
        hidden_size=512, num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=4,
        intermediate_size=1024, moe_intermediate_size=256, shared_expert_intermediate_size=512,
        num_experts=32, num_experts_per_tok=4,
    ),
}


def _server_module():
    spec = importlib.util.spec_from_file_location("e2e_server", REPO / "test" / "e2e" / "server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def build_models(workdir: Path, names: list[str]) -> dict[str, Path]:
    from sglang.srt.enhanced.tools.tiny_models import build_tiny_model

    out = {}
    for name in names:
        folder = workdir / name
        if not (folder / "config.json").is_file():
            print(f"building {name} in {folder}", flush=True)
            build_tiny_model("qwen2_moe", folder, seed=0, **MODELS[name])
        out[name] = folder
    return out


def run_batch(base_url: str, concurrency: int, output_len: int, tag: str) -> tuple[float, int]:
    """One ``/generate`` call of ``concurrency`` prompts; returns (seconds, completion tokens)."""
    prompts = [f"{tag} request {i}: the quick brown fox number {i * 7} jumps over" for i in range(concurrency)]
    body = {
        "text": prompts,
        "sampling_params": {"max_new_tokens": output_len, "ignore_eos": True, "temperature": 0},
    }
    start = time.perf_counter()
    r = requests.post(base_url + "/generate", json=body, timeout=1800)
    seconds = time.perf_counter() - start
    r.raise_for_status()
    tokens = sum(item["meta_info"]["completion_tokens"] for item in r.json())
    if tokens != concurrency * output_len:
        raise SystemExit(f"expected {concurrency * output_len} completion tokens, got {tokens}")
    return seconds, tokens


def measure(server_mod, model: Path, tracking: bool, args: argparse.Namespace, tag: str) -> list[float]:
    extra = ["--enable-expert-tracking"] if tracking else []
    name = f"{model.name}-{'on' if tracking else 'off'}"
    with server_mod.start_enhanced(model, args.workdir, *extra, name=name) as srv:
        srv.wait_ready(timeout=600)
        if tracking:
            r = requests.get(srv.base_url + "/expert_stats", timeout=60)
            r.raise_for_status()
        run_batch(srv.base_url, args.concurrency, args.output_len, f"{tag} warm-up")
        rates = []
        for b in range(args.batches):
            seconds, tokens = run_batch(srv.base_url, args.concurrency, args.output_len, f"{tag} b{b}")
            rates.append(tokens / seconds)
        if tracking:  # the tracker saw the timed batches' decode tokens
            stats = requests.get(srv.base_url + "/expert_stats", timeout=60).json()
            if not stats.get("layer_stats"):
                raise SystemExit("tracking server reports no layer statistics")
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sglang-enhanced-bench-tracking"))
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=3, help="timed batches per server start")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=64)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    models = build_models(args.workdir, args.models)
    server_mod = _server_module()
    results: dict[tuple[str, bool], list[float]] = {}
    for rnd in range(args.rounds):
        for name, folder in models.items():
            order = (False, True) if rnd % 2 == 0 else (True, False)
            for tracking in order:
                rates = measure(server_mod, folder, tracking, args, f"r{rnd}")
                results.setdefault((name, tracking), []).extend(rates)
                print(f"  round {rnd + 1} {name} tracking={'on ' if tracking else 'off'}: "
                      + ", ".join(f"{x:.1f}" for x in rates) + " tok/s", flush=True)
    print()
    print(f"{args.concurrency} concurrent requests x {args.output_len} output tokens (ignore_eos), "
          f"{args.rounds} rounds x {args.batches} batches per setting")
    print("| model | tracking off tok/s (median) | tracking on tok/s (median) | on / off | "
          "off runs | on runs |")
    print("|---|---|---|---|---|---|")
    for name in models:
        off, on = results[(name, False)], results[(name, True)]
        m_off, m_on = statistics.median(off), statistics.median(on)
        print(f"| {name} | {m_off:.1f} | {m_on:.1f} | {m_on / m_off:.3f} | "
              f"{', '.join(f'{x:.0f}' for x in off)} | {', '.join(f'{x:.0f}' for x in on)} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
