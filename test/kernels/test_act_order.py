"""Act-order GPTQ rows sorted by group at load: the same weight, and the kernels read it right."""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():  # before the kernel modules define their kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))

import dataclasses  # noqa: E402

import pytest  # noqa: E402
from moe_cases import make_gptq, make_routing, rel_err  # noqa: E402
from poison import poisoned  # noqa: E402, F401

from sglang.srt.enhanced.mixed_precision.kernels.act_order import sort_act_order, unsort_rows  # noqa: E402
from sglang.srt.enhanced.mixed_precision.kernels.fused_moe import (  # noqa: E402
    _expert_weights_f64,
    fused_moe_gptq,
    fused_moe_ref,
)
from sglang.srt.enhanced.mixed_precision.kernels.moe_configs import GemmConfig, MoEConfig  # noqa: E402
from sglang.srt.enhanced.mixed_precision.kernels.packed_linear import (  # noqa: E402
    LinearConfig,
    gptq_linear,
    gptq_linear_ref,
)
from sglang.srt.enhanced.mixed_precision.kernels.reference import gptq_dequant_ref  # noqa: E402


@pytest.mark.parametrize(("bits", "group", "k", "split"), [(4, 16, 64, False), (4, 16, 64, True), (8, 32, 96, False),
                                                           (3, 32, 64, False), (2, 32, 64, True)])  # fmt: skip
def test_sorted_rows_are_the_same_weight(bits, group, k, split) -> None:
    gen = torch.Generator().manual_seed(bits * 10 + k)
    w = make_gptq(gen, 3, k, 64 if bits in (2, 3) else 40, bits, group, act_order=True, split_g_idx=split)
    s = sort_act_order(w)
    assert s.g_idx is None and s.perm is not None and s.perm.shape == w.g_idx.shape
    assert s.qweight.shape == w.qweight.shape and s.qweight.dtype == torch.int32
    assert torch.equal(_expert_weights_f64(s), _expert_weights_f64(w))  # exact: the same codes, zeros and scales
    # Sorted, the groups are regular: the stored rows decode as a plain checkpoint's, in perm's order.
    plain = gptq_dequant_ref(s.qweight, s.qzeros, s.scales, None, bits=bits, group_size=group,
                             zero_offset=s.zero_offset, out_dtype=torch.float64)  # fmt: skip
    assert torch.equal(unsort_rows(plain, s), _expert_weights_f64(w))
    assert sort_act_order(s) is s


def test_irregular_groups_are_left_as_they_are() -> None:
    gen = torch.Generator().manual_seed(5)
    w = make_gptq(gen, 2, 64, 32, 4, 16, act_order=True)
    g = w.g_idx.clone()
    g[0][g[0] == 1] = 0  # expert 0: group 0 holds 32 rows, group 1 none
    odd = dataclasses.replace(w, g_idx=g)
    assert sort_act_order(odd) is odd
    plain = make_gptq(gen, 2, 64, 32, 4, 16)
    assert sort_act_order(plain) is plain


MOE_CONFIGS = {
    "gemv-planes": MoEConfig("gemv", GemmConfig(32, 32), GemmConfig(32, 32, split_k=2)),  # planes: read whole
    "gemv-join": MoEConfig("gemv", GemmConfig(16, 32, split_k=2, unpack="join"), GemmConfig(32, 16, unpack="join")),
    "grouped": MoEConfig("grouped", GemmConfig(16, 32, unpack="repeat"), GemmConfig(32, 16), block_m=2),
    "gemm": MoEConfig("gemm", GemmConfig(32, 32, split_k=2), GemmConfig(32, 32, unpack="join"), block_m=16),
}


@pytest.mark.parametrize("split", [False, True], ids=["one-order", "gate-up-orders"])
@pytest.mark.parametrize("cfg", MOE_CONFIGS.values(), ids=MOE_CONFIGS)
def test_fused_moe_on_sorted_rows_matches_the_checkpoint(cfg, split, device, poisoned):  # noqa: F811
    gen = torch.Generator().manual_seed(17 + split)
    e, h, inter, t, top_k = 4, 64, 32, 5, 2
    w13 = make_gptq(gen, e, h, 2 * inter, 4, 16, act_order=True, split_g_idx=split, device=device)
    w2 = make_gptq(gen, e, inter, h, 4, 16, act_order=True, device=device)
    tw, ti = make_routing(gen, t, e, top_k, device=device)
    x = torch.randn(t, h, generator=gen).to(torch.bfloat16).to(device)
    s13, s2 = sort_act_order(w13), sort_act_order(w2)
    assert s13.perm is not None and s2.perm is not None
    y = fused_moe_gptq(x, s13, s2, tw, ti, config=cfg)
    assert rel_err(y, fused_moe_ref(x, w13, w2, tw, ti)) < 1.5e-2  # the reference reads the checkpoint's rows


@pytest.mark.parametrize("cfg", [LinearConfig(2, 32, 32, split_k=3, use_dot=False), LinearConfig(16, 32, 32),
                                 LinearConfig(16, 32, 32, split_k=2, unpack="repeat")],
                         ids=["rows", "dot", "dot-repeat"])  # fmt: skip
def test_linear_on_sorted_rows_matches_the_checkpoint(cfg, device, poisoned):  # noqa: F811
    gen = torch.Generator().manual_seed(23)
    w = make_gptq(gen, 1, 96, 40, 4, 32, act_order=True, device=device)
    w = dataclasses.replace(w, qweight=w.qweight[0], qzeros=w.qzeros[0], scales=w.scales[0], g_idx=w.g_idx[0])
    x = torch.randn(5, 96, generator=gen).to(torch.bfloat16).to(device)
    y = gptq_linear(x, sort_act_order(w), config=cfg)
    assert rel_err(y, gptq_linear_ref(x, w)) < 1e-2


@pytest.mark.parametrize("per_part", [False, True], ids=["one-order", "part-orders"])
def test_served_decode_of_sorted_rows_is_the_checkpoints_weight(per_part) -> None:
    """The serving path's decode (large batches, the CPU server) of a sorted weight, fused parts included."""
    from sglang.srt.enhanced.mixed_precision.serving.compute import decode

    gen = torch.Generator().manual_seed(31)
    w = make_gptq(gen, 2, 64, 48, 4, 16, act_order=True, split_g_idx=per_part)
    if per_part:  # a fused linear's parts: 16 and 32 output features with their own orders
        w = dataclasses.replace(w, bounds=(0, 16, 48))
    assert torch.equal(decode(sort_act_order(w), torch.float32), decode(w, torch.float32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the server sorts act-order rows on CUDA only")
def test_loaded_cuda_weights_are_sorted_in_place(device) -> None:
    from sglang.srt.enhanced.mixed_precision.serving.compute import gptq_loaded

    gen = torch.Generator().manual_seed(37)
    w = make_gptq(gen, 2, 64, 32, 4, 16, act_order=True, device=device)
    before = _expert_weights_f64(w)
    qweight, g_idx = w.qweight.clone(), w.g_idx.clone()
    served = gptq_loaded(qweight, w.qzeros, w.scales, g_idx[:, None, :], 4, 16, w.zero_offset, ())
    assert served.perm is not None and served.g_idx is None
    assert served.qweight.data_ptr() == qweight.data_ptr() and served.perm.data_ptr() == g_idx.data_ptr()
    assert torch.equal(_expert_weights_f64(served), before)
