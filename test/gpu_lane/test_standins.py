"""The lane's sgl-kernel / vllm stand-ins against float64 references written out here.

Runs on CPU in CI and on the GPU lane's device (where the ops also run inside a CUDA graph).
"""

from __future__ import annotations

import math
import sys
import types

import gpu_lane_kernels
import pytest
import torch
from gpu_lane_kernels import ops


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def randn(gen: torch.Generator, *shape: int, device, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


# ---------------------------------------------------------------- norms and activations


@pytest.mark.parametrize("offset,fn", [(0.0, ops.rmsnorm), (1.0, ops.gemma_rmsnorm)])
def test_rmsnorm(gen, device, offset, fn) -> None:
    x, w = randn(gen, 7, 96, device=device), randn(gen, 96, device=device)
    x64 = x.double()
    ref = x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + 1e-6) * (w.double() + offset)
    out = torch.full_like(x, float("nan"))
    assert fn(x, w, 1e-6, out=out) is out
    assert rel_err(out, ref) < 1e-2
    assert rel_err(fn(x, w, 1e-6), ref) < 1e-2


@pytest.mark.parametrize("offset,fn", [(0.0, ops.fused_add_rmsnorm), (1.0, ops.gemma_fused_add_rmsnorm)])
def test_fused_add_rmsnorm_updates_both_in_place(gen, device, offset, fn) -> None:
    x, res, w = (randn(gen, 5, 64, device=device, dtype=torch.float32), randn(gen, 5, 64, device=device,
                 dtype=torch.float32), randn(gen, 64, device=device, dtype=torch.float32))
    s = x.double() + res.double()
    ref = s / torch.sqrt((s * s).mean(-1, keepdim=True) + 1e-5) * (w.double() + offset)
    fn(x, res, w, 1e-5)
    assert rel_err(res, s) < 1e-6
    assert rel_err(x, ref) < 1e-5


@pytest.mark.parametrize("name", ["silu_and_mul", "gelu_and_mul", "gelu_tanh_and_mul"])
def test_gated_activations(gen, device, name) -> None:
    x = randn(gen, 3, 4, 2 * 40, device=device, dtype=torch.float32)
    a, b = x.double()[..., :40], x.double()[..., 40:]
    acts = {
        "silu_and_mul": a / (1 + torch.exp(-a)),
        "gelu_and_mul": 0.5 * a * (1 + torch.erf(a / math.sqrt(2))),
        "gelu_tanh_and_mul": 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3))),
    }
    out = torch.full((3, 4, 40), float("nan"), device=device)
    getattr(ops, name)(x, out)
    assert rel_err(out, acts[name] * b) < 1e-6


# ---------------------------------------------------------------- rotary embedding


def _cos_sin_cache(max_pos: int, rotary_dim: int, base: float, device) -> torch.Tensor:
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat((angles.cos(), angles.sin()), dim=-1).to(device=device, dtype=torch.float32)


def _rope_reference(x: torch.Tensor, pos: torch.Tensor, head_size: int, rotary_dim: int, base: float,
                    neox: bool) -> torch.Tensor:
    """Each channel pair as a complex number times exp(i * pos * freq), in float64."""
    heads = x.double().cpu().view(x.shape[0], -1, head_size).clone()
    half = rotary_dim // 2
    freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    turn = torch.polar(torch.ones(x.shape[0], half, dtype=torch.float64), pos.cpu().double()[:, None] * freq)
    if neox:
        re, im = heads[..., :half], heads[..., half:rotary_dim]
    else:
        re, im = heads[..., 0:rotary_dim:2], heads[..., 1:rotary_dim:2]
    z = torch.complex(re, im) * turn[:, None, :]
    if neox:
        heads[..., :half], heads[..., half:rotary_dim] = z.real, z.imag
    else:
        heads[..., 0:rotary_dim:2], heads[..., 1:rotary_dim:2] = z.real, z.imag
    return heads.view(x.shape)


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("head_size,rotary_dim", [(16, 16), (128, 128), (64, 32)])
def test_rotary_embedding_in_place(gen, device, neox, head_size, rotary_dim) -> None:
    tokens, q_heads, k_heads, base = 9, 4, 2, 10000.0
    pos = torch.randint(0, 500, (tokens,), generator=gen).to(device)
    q = randn(gen, tokens, q_heads * head_size, device=device, dtype=torch.float32)
    k = randn(gen, tokens, k_heads * head_size, device=device, dtype=torch.float32)
    q_ref = _rope_reference(q, pos, head_size, rotary_dim, base, neox)
    k_ref = _rope_reference(k, pos, head_size, rotary_dim, base, neox)
    cache = _cos_sin_cache(512, rotary_dim, base, device)
    ops.apply_rope_with_cos_sin_cache_inplace(positions=pos, query=q, key=k, head_size=head_size,
                                              cos_sin_cache=cache, is_neox=neox)
    assert rel_err(q.cpu(), q_ref) < 1e-5 and rel_err(k.cpu(), k_ref) < 1e-5


# ---------------------------------------------------------------- MoE routing


def test_topk_softmax(gen, device) -> None:
    logits = randn(gen, 11, 16, device=device, dtype=torch.float32)
    weights = torch.full((11, 4), float("nan"), device=device)
    ids = torch.full((11, 4), -1, dtype=torch.int32, device=device)
    slots = torch.full((11, 4), -1, dtype=torch.int32, device=device)
    ops.topk_softmax(weights, ids, slots, logits)
    p = torch.softmax(logits.double().cpu(), dim=-1)
    for row in range(11):
        order = sorted(range(16), key=lambda e: -float(p[row, e]))[:4]
        assert ids[row].tolist() == order
        assert torch.allclose(weights[row].cpu().double(), p[row, order], atol=1e-6)
        assert slots[row].tolist() == [k * 11 + row for k in range(4)]


def _align_reference(topk_ids: list[list[int]], num_experts: int, block: int):
    flat = [e for row in topk_ids for e in row]
    sorted_ids, block_experts = [], []
    for e in range(num_experts):
        mine = [i for i, x in enumerate(flat) if x == e]
        padded = -(-len(mine) // block) * block
        sorted_ids += mine + [len(flat)] * (padded - len(mine))
        block_experts += [e] * (padded // block)
    return sorted_ids, block_experts


@pytest.mark.parametrize("tokens,topk,experts,block", [(1, 2, 4, 16), (37, 8, 64, 16), (200, 4, 8, 64)])
def test_moe_align_block_size(gen, device, tokens, topk, experts, block) -> None:
    topk_ids = torch.stack([torch.randperm(experts, generator=gen)[:topk] for _ in range(tokens)])
    topk_ids = topk_ids.to(device=device, dtype=torch.int32)
    capacity = topk_ids.numel() + experts * (block - 1)
    sorted_ids = torch.full((capacity,), -7, dtype=torch.int32, device=device)
    expert_ids = torch.full((-(-capacity // block),), -7, dtype=torch.int32, device=device)
    post_pad = torch.full((1,), -7, dtype=torch.int32, device=device)
    ops.moe_align_block_size(topk_ids, experts, block, sorted_ids, expert_ids, post_pad,
                             torch.empty(0, device=device), torch.empty(0, device=device))
    ref_ids, ref_experts = _align_reference(topk_ids.tolist(), experts, block)
    total = int(post_pad[0])
    assert total == len(ref_ids)
    assert sorted_ids[:total].tolist() == ref_ids
    assert expert_ids[: total // block].tolist() == ref_experts
    assert (sorted_ids[total:] == topk_ids.numel()).all()


# ---------------------------------------------------------------- sampling


def test_renorm_and_sampling_respect_the_filters(gen, device) -> None:
    probs = torch.softmax(randn(gen, 6, 50, device=device, dtype=torch.float32) * 3, dim=-1)
    top_k = torch.tensor([1, 3, 5, 50, 10, 2], device=device)
    top_p = torch.tensor([0.5, 0.9, 1.0, 0.3, 0.99, 0.8], device=device)
    p64 = probs.double().cpu()
    allowed = []
    for row in range(6):
        order = torch.argsort(p64[row], descending=True).tolist()
        k_set = set(order[: int(top_k[row])])
        mass, p_set = 0.0, set()
        for e in order:
            if mass >= float(top_p[row]):
                break
            p_set.add(e)
            mass += float(p64[row, e])
        allowed.append((k_set, p_set))
    renorm_k = ops.top_k_renorm_prob(probs, top_k).cpu()
    renorm_p = ops.top_p_renorm_prob(probs, top_p).cpu()
    for row, (k_set, p_set) in enumerate(allowed):
        assert set(torch.nonzero(renorm_k[row]).flatten().tolist()) == k_set
        assert set(torch.nonzero(renorm_p[row]).flatten().tolist()) == p_set
        assert abs(float(renorm_k[row].sum()) - 1) < 1e-5
    for _ in range(20):
        drawn = ops.top_k_top_p_sampling_from_probs(probs, top_k, top_p, filter_apply_order="joint").tolist()
        assert all(t in k_set & p_set for t, (k_set, p_set) in zip(drawn, allowed, strict=True))
        min_p = ops.min_p_sampling_from_probs(probs, 0.5).cpu()
        assert all(float(p64[r, t]) >= 0.5 * float(p64[r].max()) for r, t in enumerate(min_p.tolist()))


# ---------------------------------------------------------------- the finder and CUDA graphs


def test_finder_supplies_modules_only_with_cuda_and_without_a_real_package(monkeypatch) -> None:
    finder = gpu_lane_kernels.StandInFinder()
    for name in ("sgl_kernel", "vllm", "vllm._custom_ops"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: False))
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    assert finder.find_spec("sgl_kernel") is None
    fake_torch.cuda.is_available = lambda: True
    assert finder.find_spec("sgl_kernel") is not None
    monkeypatch.setenv("SGLANG_GPU_LANE_STANDINS", "0")
    assert finder.find_spec("sgl_kernel") is None
    monkeypatch.undo()

    module = types.ModuleType("sgl_kernel")
    gpu_lane_kernels._BUILDERS["sgl_kernel"](module)
    assert gpu_lane_kernels.is_stand_in(module) and module.rmsnorm is ops.rmsnorm
    with pytest.raises(NotImplementedError, match="sgl_kernel.allreduce.init_custom_ar"):
        module.allreduce.init_custom_ar()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_routing_ops_replay_in_a_cuda_graph(gen) -> None:
    tokens, experts, topk, block = 24, 32, 4, 16
    logits = torch.zeros(tokens, experts, device="cuda")
    weights = torch.empty(tokens, topk, device="cuda")
    ids = torch.empty(tokens, topk, dtype=torch.int32, device="cuda")
    slots = torch.empty_like(ids)
    capacity = tokens * topk + experts * (block - 1)
    sorted_ids = torch.empty(capacity, dtype=torch.int32, device="cuda")
    expert_ids = torch.empty(-(-capacity // block), dtype=torch.int32, device="cuda")
    post_pad = torch.empty(1, dtype=torch.int32, device="cuda")

    def step() -> None:
        ops.topk_softmax(weights, ids, slots, logits)
        ops.moe_align_block_size(ids, experts, block, sorted_ids, expert_ids, post_pad)

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        step()  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        logits.copy_(randn(gen, tokens, experts, device="cuda", dtype=torch.float32))
        graph.replay()
        torch.cuda.synchronize()
        ref_ids, ref_experts = _align_reference(ids.tolist(), experts, block)
        assert ids.tolist() == torch.topk(logits, topk).indices.tolist()
        assert sorted_ids[: int(post_pad[0])].tolist() == ref_ids
        assert expert_ids[: len(ref_experts)].tolist() == ref_experts


def test_triton_cache_names_are_added_only_where_missing() -> None:
    from gpu_lane_kernels import compat

    bare = types.ModuleType("triton.runtime.cache")
    compat.add_triton_cache_names(bare)
    assert bare.default_cache_dir.__name__ == "default_cache_dir"
    kept = types.ModuleType("triton.runtime.cache")
    kept.default_dump_dir = lambda: "/kept"
    compat.add_triton_cache_names(kept)
    assert kept.default_dump_dir() == "/kept"


def test_sgl_kernel_version_check_skipped_only_for_the_stand_in(monkeypatch) -> None:
    from gpu_lane_kernels import compat

    calls = []
    utils = types.SimpleNamespace(assert_pkg_version=lambda *a: calls.append(a))
    compat.accept_stand_in_sgl_kernel(utils)
    stand_in = types.ModuleType("sgl_kernel")
    gpu_lane_kernels._BUILDERS["sgl_kernel"](stand_in)
    monkeypatch.setitem(sys.modules, "sgl_kernel", stand_in)
    utils.assert_pkg_version("sgl-kernel", "0.1.7", "m")
    utils.assert_pkg_version("flashinfer_python", "0.2.6.post1", "m")
    assert calls == [("flashinfer_python", "0.2.6.post1", "m")]
    monkeypatch.setitem(sys.modules, "sgl_kernel", types.ModuleType("sgl_kernel"))  # a real package
    utils.assert_pkg_version("sgl-kernel", "0.1.7", "m")
    assert calls[-1] == ("sgl-kernel", "0.1.7", "m")
