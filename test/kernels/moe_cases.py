"""Random packed experts (GPTQ and FP8) for the fused MoE and linear kernel tests and benchmarks."""

from __future__ import annotations

import torch

from sglang.srt.enhanced.mixed_precision.kernels.packed_weights import FP8Experts, GPTQExperts
from sglang.srt.enhanced.mixed_precision.packing import pack_int32


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of a kernel's output against a float64 reference; unwritten (NaN) outputs fail."""
    assert not torch.isnan(y).any(), "unwritten or invalid outputs"
    return float((y.double().cpu() - ref.cpu()).norm() / ref.cpu().norm())


def make_gptq(gen, e, k, n, bits, group_size, *, act_order=False, sym=False, zero_offset=1, split_g_idx=False,
              device="cpu", scale_dtype=torch.float16) -> GPTQExperts:  # fmt: skip
    """``e`` stacked GPTQ matrices ``[k -> n]`` with random codes, zeros and scales."""
    groups = 1 if group_size == -1 else -(-k // group_size)
    q = torch.randint(0, 2**bits, (e, k, n), generator=gen, dtype=torch.int32)
    if sym:
        z = torch.full((e, groups, n), 2 ** (bits - 1) - zero_offset, dtype=torch.int32)
    else:
        z = torch.randint(0, 2**bits - zero_offset, (e, groups, n), generator=gen, dtype=torch.int32)
    s = (torch.rand(e, groups, n, generator=gen) * 2 + 0.5) / (2**bits * k**0.5)
    g_idx = None
    if act_order:
        rows = 2 if split_g_idx else 1
        g_idx = torch.stack([torch.randperm(k, generator=gen) % groups for _ in range(e * rows)]).to(torch.int32)
        g_idx = g_idx.reshape(e, 2, k) if split_g_idx else g_idx
    return GPTQExperts(
        qweight=pack_int32(q, bits, dim=1).to(device),
        qzeros=pack_int32(z, bits, dim=2).to(device),
        scales=s.to(scale_dtype).to(device),
        g_idx=g_idx.to(device) if g_idx is not None else None,
        bits=bits,
        group_size=group_size,
        zero_offset=zero_offset,
    )


def make_fp8(gen, e, k, n, block_size, device="cpu") -> FP8Experts:
    """``e`` stacked FP8 e4m3 matrices ``[n, k]`` with block (``block_size``) or per-channel scales."""
    w = (torch.randn(e, n, k, generator=gen) * 2).to(torch.float8_e4m3fn)
    if block_size is None:
        scale = torch.rand(e, n, generator=gen) * 0.5 / k**0.5 + 0.1 / k**0.5
    else:
        bo, bi = block_size
        scale = torch.rand(e, -(-n // bo), -(-k // bi), generator=gen) * 0.5 / k**0.5 + 0.1 / k**0.5
    return FP8Experts(weight=w.to(device), scale=scale.to(device), block_size=block_size)


def make_routing(gen, t, e, top_k, device="cpu", zipf: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``top_k`` distinct experts per token (uniform, or Zipf-skewed with exponent ``zipf``) and softmax weights."""
    if zipf:
        p = 1.0 / torch.arange(1, e + 1, dtype=torch.float64) ** zipf
        p = p[torch.randperm(e, generator=gen)]
    else:
        p = torch.ones(e, dtype=torch.float64)
    ids = torch.multinomial(p.expand(t, e), top_k, replacement=False, generator=gen).to(torch.int32)
    w = torch.softmax(torch.randn(t, top_k, generator=gen), dim=-1)
    return w.to(device), ids.to(device)
