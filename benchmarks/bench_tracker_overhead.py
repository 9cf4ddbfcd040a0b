"""Overhead of expert tracking per forward pass.

A fake pass of ``--layers`` MoE layers routes ``batch`` tokens (top-k over ``--experts``
router logits per layer). Timed per pass, in microseconds:

- ``route``: the routing alone (torch.topk per layer), no tracking;
- ``route+track``: the same with begin_pass / record_routing per layer / end_pass;
- ``record x L`` and ``end_pass``: the tracker calls alone.

On CUDA it also times the ``record_routing`` calls captured in a CUDA graph and replayed,
and checks that the counts after the replays are right.

    python benchmarks/bench_tracker_overhead.py [--device cuda] [--batches 1 8 64]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from sglang.srt.enhanced.moe_tracker.tracker import ExpertActivationTracker


def _timer(device: torch.device) -> Callable[[Callable[[], None], int], float]:
    def run(fn: Callable[[], None], iters: int) -> float:
        for _ in range(max(3, iters // 10)):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / iters * 1e6

    return run


def bench_batch(args: argparse.Namespace, batch: int, device: torch.device) -> dict[str, float]:
    gen = torch.Generator(device=device).manual_seed(batch)
    logits = [torch.randn(batch, args.experts, device=device, generator=gen) for _ in range(args.layers)]
    ids = [torch.topk(x, args.top_k, dim=-1).indices.to(torch.int32) for x in logits]
    tracker = ExpertActivationTracker(
        args.layers, args.experts, args.top_k, max_tokens=max(args.batches), device=device
    )
    timer = _timer(device)

    def route() -> None:
        for x in logits:
            torch.topk(x, args.top_k, dim=-1)

    def route_track() -> None:
        tracker.begin_pass(batch, is_decode=True)
        for layer, x in enumerate(logits):
            tracker.record_routing(layer, torch.topk(x, args.top_k, dim=-1).indices)
        tracker.end_pass()

    def record_only() -> None:
        for layer, t in enumerate(ids):
            tracker.record_routing(layer, t)

    def end_only() -> None:
        tracker.begin_pass(batch, is_decode=True)
        tracker.end_pass()

    row = {
        "route": timer(route, args.iters),
        "route+track": timer(route_track, args.iters),
        "record x L": timer(record_only, args.iters),
        "end_pass": timer(end_only, args.iters),
    }
    if device.type == "cuda":
        row.update(bench_graph(args, batch, ids, device, timer))
    return row


def bench_graph(
    args: argparse.Namespace,
    batch: int,
    ids: list[torch.Tensor],
    device: torch.device,
    timer: Callable[[Callable[[], None], int], float],
) -> dict[str, float]:
    tracker = ExpertActivationTracker(
        args.layers, args.experts, args.top_k, max_tokens=max(args.batches), device=device
    )

    def record_all() -> None:
        for layer, t in enumerate(ids):
            tracker.record_routing(layer, t)

    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        record_all()  # warm-up outside capture
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        record_all()
    tracker.reset_stats()

    def eager_pass() -> None:
        tracker.begin_pass(batch, is_decode=True)
        record_all()
        tracker.end_pass()

    def graph_pass() -> None:
        tracker.begin_pass(batch, is_decode=True)
        graph.replay()
        tracker.end_pass()

    result = {"eager pass": timer(eager_pass, args.iters)}
    tracker.reset_stats()
    result["graph pass"] = timer(graph_pass, args.iters)
    # Check the counts of the graph passes against a host-side histogram.
    passes = tracker.snapshot().num_passes["decode"]
    expected = torch.stack([torch.bincount(t.flatten().long(), minlength=args.experts) for t in ids]).cpu()
    got = tracker.snapshot().tokens[1]
    if not torch.equal(got, expected * passes):
        raise SystemExit(f"graph-replayed counts are wrong for batch {batch}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device={name} layers={args.layers} experts={args.experts} top_k={args.top_k} (us per pass)")
    rows = {batch: bench_batch(args, batch, device) for batch in args.batches}
    columns = list(next(iter(rows.values())))
    print(f"{'tokens':>6} " + " ".join(f"{c:>12}" for c in columns) + f" {'overhead':>9}")
    for batch, row in rows.items():
        overhead = (row["route+track"] - row["route"]) / row["route"] * 100
        print(f"{batch:>6} " + " ".join(f"{row[c]:>12.1f}" for c in columns) + f" {overhead:>8.1f}%")


if __name__ == "__main__":
    main()
