"""Decode throughput of the real server with expert tracking on and off (CPU or GPU).

For each model two servers are started with ``launch_enhanced_server.py`` (CPU mode is
picked automatically where there is no GPU), one with ``--enable-expert-tracking``. They
take turns batch by batch; the server not measuring is frozen (``SIGSTOP`` on its
process group, ``SIGCONT`` before its turn), because an idle SGLang scheduler busy-polls
a core. Alternating every batch puts both settings under the same background load of
the machine. A batch is ``--concurrency`` prompts sent in one ``/generate`` call, each
generating ``--output-len`` tokens with ``ignore_eos``. A turn runs batches until
``--min-seconds`` have passed; its output tokens/s = completion tokens reported by the
server / wall time of its calls. Rounds (one turn per setting) alternate the order
(off-on, on-off, ...). The table gives the median over the rounds per setting, the ratio
of medians, and the median of the per-round ratios.

Models: the tiny Qwen2-MoE of ``tools/tiny_models.py`` (2 layers, hidden 64, 4 experts)
and a larger synthetic one (hidden 512, 16 layers, 32 experts, top-4), built once into
``--workdir``.

    python benchmarks/bench_tracking_throughput.py [--rounds 10] [--models tiny h512-l16-e32]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import statistics
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


def run_batch(base_url: str, concurrency: int, output_len: int, tag: str) -> tuple[int, float]:
    """One ``/generate`` call of ``concurrency`` prompts; returns (completion tokens, seconds)."""
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
    return tokens, seconds


def run_turn(base_url: str, args: argparse.Namespace, tag: str) -> float:
    """Batches until ``args.min_seconds`` have passed; returns output tokens per second."""
    tokens, seconds, batch = 0, 0.0, 0
    while seconds < args.min_seconds:
        n, s = run_batch(base_url, args.concurrency, args.output_len, f"{tag} b{batch}")
        tokens, seconds, batch = tokens + n, seconds + s, batch + 1
    return tokens / seconds


def _freeze(server, frozen: bool) -> None:
    os.killpg(server.proc.pid, signal.SIGSTOP if frozen else signal.SIGCONT)


def measure_model(server_mod, name: str, model: Path, args: argparse.Namespace) -> dict[bool, list[float]]:
    servers = {}
    try:
        for tracking in (False, True):
            extra = ["--enable-expert-tracking"] if tracking else []
            srv = server_mod.start_enhanced(model, args.workdir, *extra, name=f"{name}-{'on' if tracking else 'off'}")
            servers[tracking] = srv
            srv.wait_ready(timeout=600)
            run_batch(srv.base_url, args.concurrency, args.output_len, "warm-up")
            _freeze(srv, True)
        rates: dict[bool, list[float]] = {False: [], True: []}
        for rnd in range(args.rounds):
            for tracking in ((False, True) if rnd % 2 == 0 else (True, False)):
                srv = servers[tracking]
                _freeze(srv, False)
                rates[tracking].append(run_turn(srv.base_url, args, f"r{rnd}"))
                _freeze(srv, True)
            print(f"  {name} round {rnd + 1}: off {rates[False][-1]:.1f}, on {rates[True][-1]:.1f} tok/s", flush=True)
        _freeze(servers[True], False)
        stats = requests.get(servers[True].base_url + "/expert_stats", timeout=60).json()
        routed = sum(layer["total_tokens"] for layer in stats["layer_stats"].values())
        if routed == 0:
            raise SystemExit("the tracking server counted no routed tokens")
        return rates
    finally:
        for srv in servers.values():
            try:
                _freeze(srv, False)
            except ProcessLookupError:
                pass
            srv.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sglang-enhanced-bench-tracking"))
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--rounds", type=int, default=10, help="turns per setting, alternating")
    parser.add_argument("--min-seconds", type=float, default=10.0, help="shortest turn")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=64)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    models = build_models(args.workdir, args.models)
    server_mod = _server_module()
    results = {name: measure_model(server_mod, name, folder, args) for name, folder in models.items()}
    print()
    print(f"{args.concurrency} concurrent requests x {args.output_len} output tokens (ignore_eos), "
          f"{args.rounds} turns of >= {args.min_seconds:g} s per setting, alternating")
    print("| model | tracking off tok/s (median) | tracking on tok/s (median) | on / off (medians) "
          "| on / off (median of per-round ratios) | off runs | on runs |")
    print("|---|---|---|---|---|---|---|")
    for name, rates in results.items():
        off, on = rates[False], rates[True]
        m_off, m_on = statistics.median(off), statistics.median(on)
        paired = statistics.median(b / a for a, b in zip(off, on, strict=True))
        print(f"| {name} | {m_off:.1f} | {m_on:.1f} | {m_on / m_off:.3f} | {paired:.3f} | "
              f"{', '.join(f'{x:.0f}' for x in off)} | {', '.join(f'{x:.0f}' for x in on)} |")


if __name__ == "__main__":
    main()
