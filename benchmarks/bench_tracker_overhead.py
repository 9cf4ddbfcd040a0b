"""Overhead of expert tracking per forward pass (48 MoE layers, 128 experts, top-8 by default).

Part 1, the tracker alone. A fake pass routes ``batch`` tokens (top-k over router logits
per layer). Timed per pass, in microseconds of wall time (host included):

- ``route``: the routing alone (torch.topk per layer), no tracking;
- ``route+track``: the same with begin_pass / record_routing per layer / end_pass;
- ``record x L`` and ``end_pass``: the tracker calls alone.

On CUDA also: ``eager pass`` / ``graph pass`` = begin_pass + L record_routing (eager, or
captured in a CUDA graph and replayed) + end_pass, with the one-kernel fold, with the
torch-op fold (``torch fold``) and with the fold captured in the graph (``fold in graph``,
as SGLang's graphs run it), per-request counts on; ``graph GPU`` = the GPU time of one graph pass (passes
queued behind a sleep kernel, so host launch time is hidden); ``records GPU`` = GPU time
of a graph of the L record_routing calls alone. The graph passes' counts are checked.

Part 2 (CUDA), the cost relative to MoE layers. A reference pass of L MoE layers with
Qwen3-30B-A3B sizes (hidden 2048, moe_intermediate 768): per layer a router GEMM, softmax,
top-k, and the expert GEMMs (gate/up, SiLU-and-mul, down) as batched GEMMs over the number
of distinct experts ``batch`` tokens are expected to hit. Timed per pass, eager and as one
CUDA graph, with no tracking, with our tracker counting totals only (``counts only``: no
window, no co-activation, no per-request use), with everything the server turns on by
default (``ours``: the 1000-pass window, co-activation pairs and per-request use, every token
its own request slot as in a decode batch) and with a per-layer mask-and-scatter histogram
in the style of SGLang 0.4.7's ``select_experts`` gatherer (plus its per-pass add and reset).
Variants alternate; medians of ``--repeats``. ``release`` = wall time of closing one
finished request's slot (two small device ops, once per request, not per pass).

    python benchmarks/bench_tracker_overhead.py [--device cuda] [--batches 1 8 64] [--no-moe]
"""

from __future__ import annotations

import argparse
import math
import statistics
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


def gpu_time(fn: Callable[[], None], iters: int, device: torch.device) -> float:
    """GPU microseconds per call: calls are queued behind a sleep kernel so launch gaps vanish."""
    fn()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(2e8))  # ~0.1 s of GPU time, longer than queueing the calls takes
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) * 1e3 / iters


def _tracker(args: argparse.Namespace, device: torch.device, fused: bool = True,
             extras: bool = True) -> ExpertActivationTracker:
    tracker = ExpertActivationTracker(
        args.layers, args.experts, args.top_k, max_tokens=max(args.batches), device=device,
        window_passes=1000 if extras else 0, coactivation=extras,
    )
    if extras:
        tracker.enable_request_use(args.request_slots)
    if device.type == "cuda":
        tracker._counters.fold_impl = "triton" if fused else "torch"  # noqa: SLF001 - benchmark switch
    return tracker


# ------------------------------------------------------------------------------ part 1


def bench_batch(args: argparse.Namespace, batch: int, device: torch.device) -> dict[str, float]:
    gen = torch.Generator(device=device).manual_seed(batch)
    logits = [torch.randn(batch, args.experts, device=device, generator=gen) for _ in range(args.layers)]
    ids = [torch.topk(x, args.top_k, dim=-1).indices.to(torch.int32) for x in logits]
    tracker = _tracker(args, device)
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
    result: dict[str, float] = {}
    for tag, fused, in_graph in (("", True, False), (" (torch fold)", False, False), (" (fold in graph)", True, True)):
        tracker = _tracker(args, device, fused)
        # Per-request counts on, as in a server: each row its own request slot.
        slots = torch.arange(batch, device=device) % args.request_slots

        def record_all(tracker: ExpertActivationTracker = tracker) -> None:
            for layer, t in enumerate(ids):
                tracker.record_routing(layer, t)

        if in_graph:
            with tracker.folding_in_graphs(slots):
                graph = _capture(record_all, device)
        else:
            graph = _capture(record_all, device)
        tracker.reset_stats()

        def eager_pass(tracker: ExpertActivationTracker = tracker, record_all=record_all, slots=slots) -> None:
            tracker.begin_pass(batch, is_decode=True, token_rows=slots)
            record_all()
            tracker.end_pass()

        def graph_pass(tracker: ExpertActivationTracker = tracker, graph=graph, slots=slots) -> None:
            tracker.begin_pass(batch, is_decode=True, token_rows=slots)
            graph.replay()
            tracker.end_pass()

        if not in_graph:
            result["eager pass" + tag] = timer(eager_pass, args.iters)
        tracker.reset_stats()
        result["graph pass" + tag] = timer(graph_pass, args.iters)
        _check_counts(tracker, ids, args.experts, batch)
        # Passes queued behind the sleep: with the fold in the graph, no more than the host's ring of
        # pass values holds before it waits for the GPU (half of its 64 rows).
        result["graph GPU" + tag] = gpu_time(graph_pass, min(args.iters, 30) if in_graph else args.iters, device)
        if fused and not in_graph:
            result["records GPU"] = gpu_time(graph.replay, args.iters, device)
    return result


def _capture(fn: Callable[[], None], device: torch.device) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()  # warm-up outside capture
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _check_counts(tracker: ExpertActivationTracker, ids: list[torch.Tensor], experts: int, batch: int) -> None:
    snap = tracker.snapshot()
    passes = snap.num_passes["decode"]
    expected = torch.stack([torch.bincount(t.flatten().long(), minlength=experts) for t in ids]).cpu()
    if passes == 0 or not torch.equal(snap.tokens[1], expected * passes):
        raise SystemExit(f"graph-replayed counts are wrong for batch {batch}")


# ------------------------------------------------------------------------------ part 2


class MaskScatterGatherer:
    """Per-layer histogram as SGLang 0.4.7's select_experts gatherer builds it: mask, scatter-add."""

    def __init__(self, layers: int, experts: int, device: torch.device) -> None:
        self.pass_counts = torch.zeros(layers, experts, dtype=torch.int32, device=device)
        self.totals = torch.zeros(layers, experts, dtype=torch.int64, device=device)

    def on_layer(self, layer: int, topk_ids: torch.Tensor) -> None:
        flat = topk_ids.reshape(-1)
        valid = flat >= 0
        self.pass_counts[layer].scatter_add_(0, torch.where(valid, flat, 0).long(), valid.int())

    def end_pass(self) -> None:
        self.totals += self.pass_counts
        self.pass_counts.zero_()


class MoEReference:
    """``layers`` MoE layers of one batch size: router GEMM, softmax, top-k, grouped expert GEMMs."""

    def __init__(self, args: argparse.Namespace, batch: int, weights: tuple[torch.Tensor, ...], device) -> None:
        w13, w2, router = weights
        e, k = args.experts, args.top_k
        self.active = min(e, max(k, round(e * (1 - (1 - k / e) ** batch))))  # expected distinct experts
        self.per_expert = math.ceil(batch * k / self.active)
        self.layers, self.inter = args.layers, args.moe_intermediate
        gen = torch.Generator(device=device).manual_seed(batch)
        self.x = torch.randn(batch, args.hidden, device=device, dtype=torch.bfloat16, generator=gen)
        self.xe = self.x[: self.per_expert].unsqueeze(0).expand(self.active, -1, -1).contiguous()
        starts = [(layer * self.active) % (e - self.active + 1) for layer in range(args.layers)]
        self.w13 = [w13[s : s + self.active].transpose(1, 2) for s in starts]
        self.w2 = [w2[s : s + self.active].transpose(1, 2) for s in starts]
        self.router = router
        self.top_k = k

    def forward(self, hook: Callable[[int, torch.Tensor], None] | None) -> None:
        for layer in range(self.layers):
            logits = self.x @ self.router[layer]
            _, ids = torch.topk(torch.softmax(logits.float(), dim=-1), self.top_k, dim=-1)
            ids = ids.to(torch.int32)
            if hook is not None:
                hook(layer, ids)
            h = torch.bmm(self.xe, self.w13[layer])
            a = torch.nn.functional.silu(h[..., : self.inter]) * h[..., self.inter :]
            torch.bmm(a, self.w2[layer])


def bench_moe(args: argparse.Namespace, batch: int, weights, device: torch.device) -> dict[str, float]:
    ref = MoEReference(args, batch, weights, device)
    ours = _tracker(args, device)
    counts_only = _tracker(args, device, extras=False)
    sgl = MaskScatterGatherer(args.layers, args.experts, device)
    token_rows = torch.arange(batch, dtype=torch.int64, device=device)

    hooks: dict[str, Callable[[int, torch.Tensor], None] | None] = {
        "none": None, "counts only": counts_only.record_routing, "ours": ours.record_routing,
        "mask-scatter": sgl.on_layer,
    }
    graphs = {name: _capture(lambda hook=hook: ref.forward(hook), device) for name, hook in hooks.items()}
    ours.reset_stats()
    counts_only.reset_stats()

    def pass_fn(name: str, graph: bool) -> Callable[[], None]:
        run = graphs[name].replay if graph else (lambda: ref.forward(hooks[name]))
        if name in ("ours", "counts only"):
            tracker = ours if name == "ours" else counts_only
            rows = token_rows if name == "ours" else None

            def fn() -> None:
                tracker.begin_pass(batch, is_decode=True, token_rows=rows)
                run()
                tracker.end_pass()
        elif name == "mask-scatter":
            def fn() -> None:
                run()
                sgl.end_pass()
        else:
            fn = run
        return fn

    timer = _timer(device)
    iters = max(5, int(args.moe_iters / max(1.0, batch / 8)))
    samples: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for mode in ("eager", "graph"):
            for name in hooks:
                samples.setdefault(f"{mode} {name}", []).append(timer(pass_fn(name, mode == "graph"), iters))
    for tracker in (ours, counts_only):
        snap = tracker.snapshot()
        if snap.tokens.sum().item() != snap.num_passes["decode"] * batch * args.top_k * args.layers:
            raise SystemExit(f"tracker counts in the MoE passes are wrong for batch {batch}")
    slot_total = ours.request_use.slot_counts[:batch].sum().item()
    if slot_total != ours.snapshot().lifetime_tokens.sum().item():
        raise SystemExit(f"per-request counts in the MoE passes are wrong for batch {batch}")
    row = {key: statistics.median(v) for key, v in samples.items()}
    row["active experts"] = ref.active
    row["release"] = timer(lambda: ours.release_request_slot(0, "r", finished=True), args.iters)
    return row


def moe_weights(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device=device).manual_seed(0)
    e, h, i = args.experts, args.hidden, args.moe_intermediate
    w13 = torch.randn(e, 2 * i, h, device=device, dtype=torch.bfloat16, generator=gen) * 0.02
    w2 = torch.randn(e, h, i, device=device, dtype=torch.bfloat16, generator=gen) * 0.02
    router = torch.randn(args.layers, h, e, device=device, dtype=torch.bfloat16, generator=gen) * 0.02
    return w13, w2, router


# ------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--moe-intermediate", type=int, default=768)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--moe-iters", type=int, default=40, help="MoE passes per sample at batch <= 8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--request-slots", type=int, default=2048, help="request slots of the per-request counts")
    parser.add_argument("--no-moe", action="store_true", help="skip part 2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device={name} torch={torch.__version__} layers={args.layers} experts={args.experts} "
          f"top_k={args.top_k}")
    print("\nPart 1: tracker alone (us per pass)")
    rows = {batch: bench_batch(args, batch, device) for batch in args.batches}
    columns = list(next(iter(rows.values())))
    print("| tokens | " + " | ".join(columns) + " | route+track overhead |")
    print("|---" * (len(columns) + 2) + "|")
    for batch, row in rows.items():
        overhead = (row["route+track"] - row["route"]) / row["route"] * 100
        print(f"| {batch} | " + " | ".join(f"{row[c]:.1f}" for c in columns) + f" | {overhead:.1f}% |")
    if device.type != "cuda" or args.no_moe:
        return
    print(f"\nPart 2: {args.layers} MoE layers, hidden {args.hidden}, moe_intermediate {args.moe_intermediate} "
          f"(us per pass, median of {args.repeats})")
    weights = moe_weights(args, device)
    moe = {batch: bench_moe(args, batch, weights, device) for batch in args.batches}
    variants = ("counts only", "ours", "mask-scatter")
    print("| tokens | active experts | mode | no tracking | " + " | ".join(variants) + " | release (us) |")
    print("|---" * (5 + len(variants)) + "|")
    for batch, row in moe.items():
        for mode in ("eager", "graph"):
            base = row[f"{mode} none"]
            cells = [f"{row[f'{mode} {v}']:.1f} ({row[f'{mode} {v}'] - base:+.1f} us, "
                     f"{(row[f'{mode} {v}'] - base) / base * 100:+.2f}%)" for v in variants]
            print(f"| {batch} | {row['active experts']} | {mode} | {base:.1f} | " + " | ".join(cells)
                  + f" | {row['release']:.1f} |")


if __name__ == "__main__":
    main()
