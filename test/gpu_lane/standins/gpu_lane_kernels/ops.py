"""Torch versions of the sgl-kernel / vllm ops SGLang 0.4.7 calls on CUDA on the lane's path.

Each function keeps the calling convention of the op it replaces (in-place outputs where
the caller passes them) and stays CUDA-graph capturable: fixed-size outputs, no host
synchronisation (no ``.item()``, ``nonzero`` or data-dependent shapes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------- normalisation


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * (weight.float() + offset)).to(x.dtype)


def _store(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``result``, written into ``out`` when the caller passed one."""
    if out is None:
        return result
    out.copy_(result)
    return out


def _add_then_norm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                   offset: float) -> None:
    residual.copy_((input.float() + residual.float()).to(residual.dtype))
    input.copy_(_rms(residual, weight, eps, offset))


def rmsnorm(input: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, out: torch.Tensor | None = None,
            enable_pdl: bool = False) -> torch.Tensor:
    """``out = input / rms(input) * weight`` (fp32 arithmetic, input's dtype)."""
    return _store(_rms(input, weight, eps, 0.0), out)


def fused_add_rmsnorm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                      enable_pdl: bool = False) -> None:
    """In place: ``residual += input``, then ``input = rmsnorm(residual)``."""
    _add_then_norm(input, residual, weight, eps, 0.0)


def gemma_rmsnorm(input: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, out: torch.Tensor | None = None,
                  enable_pdl: bool = False) -> torch.Tensor:
    """RMSNorm with Gemma's ``(1 + weight)`` scale."""
    return _store(_rms(input, weight, eps, 1.0), out)


def gemma_fused_add_rmsnorm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                            enable_pdl: bool = False) -> None:
    """In place, Gemma scale: ``residual += input``, then ``input = gemma_rmsnorm(residual)``."""
    _add_then_norm(input, residual, weight, eps, 1.0)


# ---------------------------------------------------------------- gated activations


def _gated(act, input: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    d = input.shape[-1] // 2
    return _store((act(input[..., :d].float()) * input[..., d:].float()).to(input.dtype), out)


def silu_and_mul(input: torch.Tensor, out: torch.Tensor | None = None, enable_pdl: bool = False) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]``."""
    return _gated(F.silu, input, out)


def gelu_and_mul(input: torch.Tensor, out: torch.Tensor | None = None, enable_pdl: bool = False) -> torch.Tensor:
    """``gelu(x[..., :d]) * x[..., d:]`` (exact erf GELU)."""
    return _gated(F.gelu, input, out)


def gelu_tanh_and_mul(input: torch.Tensor, out: torch.Tensor | None = None,
                      enable_pdl: bool = False) -> torch.Tensor:
    """``gelu_tanh(x[..., :d]) * x[..., d:]``."""
    return _gated(lambda x: F.gelu(x, approximate="tanh"), input, out)


# ---------------------------------------------------------------- rotary embedding


def _rotate_in_place(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_size: int,
                     is_neox: bool) -> None:
    """Rotate the first ``rotary_dim`` channels of every head of ``x`` (tokens, heads*head_size)."""
    tokens = x.shape[0]
    heads = x.view(tokens, -1, head_size)
    rot = heads[..., : 2 * cos.shape[-1]].float()
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    if is_neox:
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    heads[..., : 2 * cos.shape[-1]] = rotated.to(x.dtype)


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, head_size: int,
                     cos_sin_cache: torch.Tensor, is_neox: bool) -> None:
    """In place on ``query`` and ``key``; ``cos_sin_cache[pos] = [cos | sin]`` (rotary_dim/2 each)."""
    cos, sin = cos_sin_cache.index_select(0, positions.flatten().long()).float().chunk(2, dim=-1)
    _rotate_in_place(query, cos, sin, head_size, is_neox)
    if key is not None:
        _rotate_in_place(key, cos, sin, head_size, is_neox)


def apply_rope_with_cos_sin_cache_inplace(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                                          head_size: int, cos_sin_cache: torch.Tensor, is_neox: bool = True,
                                          **_unused: object) -> None:
    """sgl-kernel's name for :func:`rotary_embedding`."""
    rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox)


# ---------------------------------------------------------------- MoE routing


def topk_softmax(topk_weights: torch.Tensor, topk_ids: torch.Tensor, token_expert_indices: torch.Tensor,
                 gating_output: torch.Tensor, renormalize: bool = False) -> None:
    """Softmax over experts (fp32), then the ``k`` largest; writes weights, ids and flat slot indices."""
    probs = torch.softmax(gating_output.float(), dim=-1)
    weights, ids = torch.topk(probs, topk_weights.shape[-1], dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    topk_weights.copy_(weights)
    topk_ids.copy_(ids)
    rows, k = ids.shape
    slots = torch.arange(k, device=ids.device, dtype=torch.int64).view(1, k) * rows
    token_expert_indices.copy_(slots + torch.arange(rows, device=ids.device, dtype=torch.int64).view(rows, 1))


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_size: int,
                         sorted_token_ids: torch.Tensor, experts_ids: torch.Tensor,
                         num_tokens_post_pad: torch.Tensor, token_cnts_buffer: torch.Tensor | None = None,
                         cumsum_buffer: torch.Tensor | None = None, *_unused: object) -> None:
    """Group the flat (token, slot) indices by expert, each expert's run padded to ``block_size``.

    ``sorted_token_ids`` gets, expert by expert, the flat indices routed to it (in order) and
    ``topk_ids.numel()`` as padding; ``experts_ids[b]`` is the expert of block ``b``;
    ``num_tokens_post_pad[0]`` the padded total. The two scratch buffers are not needed.
    """
    flat = topk_ids.flatten().long()
    total = flat.numel()
    device = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_size - 1) // block_size * block_size
    padded_end = padded.cumsum(0)
    padded_start = padded_end - padded
    count_start = counts.cumsum(0) - counts
    experts_sorted, order = torch.sort(flat, stable=True)
    rank = torch.arange(total, device=device) - count_start[experts_sorted]
    destination = padded_start[experts_sorted] + rank
    sorted_token_ids.fill_(total)
    sorted_token_ids.scatter_(0, destination, order.to(sorted_token_ids.dtype))
    block_start = torch.arange(experts_ids.numel(), device=device, dtype=torch.int64) * block_size
    block_expert = torch.searchsorted(padded_end, block_start, right=True).clamp_(max=num_experts - 1)
    experts_ids.copy_(block_expert)
    num_tokens_post_pad.copy_(padded_end[-1:])


# ---------------------------------------------------------------- sampling


def _as_column(value: torch.Tensor | float | int, rows: int, device: torch.device,
               dtype: torch.dtype) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype).reshape(-1, 1).expand(rows, 1)
    return torch.full((rows, 1), value, device=device, dtype=dtype)


def _top_k_mask(probs: torch.Tensor, top_k) -> torch.Tensor:
    """True where a probability is among its row's ``top_k`` largest."""
    ks = _as_column(top_k, probs.shape[0], probs.device, torch.int64).clamp(1, probs.shape[-1])
    sorted_probs = probs.sort(dim=-1, descending=True).values
    threshold = sorted_probs.gather(-1, ks - 1)
    return probs >= threshold


def _top_p_mask(probs: torch.Tensor, top_p) -> torch.Tensor:
    """True where a probability belongs to its row's smallest set holding mass ``top_p``."""
    ps = _as_column(top_p, probs.shape[0], probs.device, probs.dtype)
    sorted_probs, index = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep_sorted = mass_before < ps * sorted_probs.sum(dim=-1, keepdim=True)
    return torch.zeros_like(keep_sorted).scatter_(-1, index, keep_sorted)


def _renorm(probs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    kept = probs.masked_fill(~keep, 0.0)
    return kept / kept.sum(dim=-1, keepdim=True)


def top_k_renorm_prob(probs: torch.Tensor, top_k) -> torch.Tensor:
    """Probabilities outside the top ``k`` set to zero, the rest rescaled to sum to one."""
    return _renorm(probs, _top_k_mask(probs, top_k))


def top_p_renorm_prob(probs: torch.Tensor, top_p) -> torch.Tensor:
    """Probabilities outside the top-``p`` nucleus set to zero, the rest rescaled to sum to one."""
    return _renorm(probs, _top_p_mask(probs, top_p))


def _draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.multinomial(probs.float(), 1, generator=generator).view(-1).to(torch.int32)


def min_p_sampling_from_probs(probs: torch.Tensor, min_p, generator: torch.Generator | None = None,
                              **_unused: object) -> torch.Tensor:
    """One token a row among those with ``p >= min_p * max(p)``."""
    ps = _as_column(min_p, probs.shape[0], probs.device, probs.dtype)
    keep = probs >= ps * probs.max(dim=-1, keepdim=True).values
    return _draw(_renorm(probs, keep), generator)


def top_k_top_p_sampling_from_probs(probs: torch.Tensor, top_k, top_p, filter_apply_order: str = "top_k_first",
                                    generator: torch.Generator | None = None, check_nan: bool = False,
                                    **_unused: object) -> torch.Tensor:
    """One token a row after the top-k and top-p filters (``joint``: both on the original probs)."""
    if filter_apply_order == "joint":
        keep = _top_k_mask(probs, top_k) & _top_p_mask(probs, top_p)
        return _draw(_renorm(probs, keep), generator)
    return _draw(top_p_renorm_prob(top_k_renorm_prob(probs, top_k), top_p), generator)
