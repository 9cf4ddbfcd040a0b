"""GPTQ dequant kernel vs its torch reference and an independent float64 reconstruction."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # before the kernel module defines its kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from sglang.srt.enhanced.errors import EnhancedError  # noqa: E402
from sglang.srt.enhanced.mixed_precision.kernels.gptq_dequant import (  # noqa: E402
    gptq_dequant,
    gptq_dequant_batched,
)
from sglang.srt.enhanced.mixed_precision.kernels.reference import gptq_dequant_ref  # noqa: E402
from sglang.srt.enhanced.mixed_precision.packing import pack_int32  # noqa: E402

# (rtol, atol) per output dtype. float32 is exact; half types allow one rounding step
# (the CPU interpreter truncates float32 -> bfloat16 where GPUs round to nearest).
TOL = {
    torch.float32: (1e-6, 1e-6),
    torch.float16: (2**-10, 1e-4),
    torch.bfloat16: (2**-7, 1e-3),
}


def make_case(gen, e, k, n, bits, group_size, *, act_order=False, sym=False, zero_offset=1):
    """Random integer codes/zeros/scales; returns packed tensors plus the raw values."""
    groups = 1 if group_size == -1 else -(-k // group_size)
    q = torch.randint(0, 2**bits, (e, k, n), generator=gen, dtype=torch.int32)
    if sym:
        z = torch.full((e, groups, n), 2 ** (bits - 1) - zero_offset, dtype=torch.int32)
    else:
        z = torch.randint(0, 2**bits, (e, groups, n), generator=gen, dtype=torch.int32)
    s = (torch.rand(e, groups, n, generator=gen) * 0.02 + 0.001).to(torch.float16)
    if act_order:
        g = torch.stack([torch.randperm(k, generator=gen) % groups for _ in range(e)]).to(torch.int32)
    else:
        rows = torch.arange(k) // (k if group_size == -1 else group_size)
        g = rows.to(torch.int32).expand(e, k).contiguous()
    packed = (pack_int32(q, bits, dim=1), pack_int32(z, bits, dim=2), s)
    return packed, (q, z, s, g)


def float64_expected(q, z, s, g, zero_offset):
    """w[e, o, i] = s[e, g, o] * (q[e, i, o] - z[e, g, o] - offset), row by row in float64."""
    e, k, n = q.shape
    out = torch.empty(e, n, k, dtype=torch.float64)
    for b in range(e):
        for i in range(k):
            grp = int(g[b, i])
            out[b, :, i] = s[b, grp].double() * (q[b, i].double() - z[b, grp].double() - zero_offset)
    return out


def assert_close(actual, expected, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol)


CASES = [
    # bits, k, n, group_size, act_order, sym, zero_offset, config (BLOCK_N, BLOCK_K, warps)
    (4, 160, 40, 48, False, False, 1, (32, 64, 4)),  # partial tiles, groups cut across tiles
    (4, 256, 64, 128, False, True, 1, None),  # default config, tile inside one group
    (4, 160, 24, 32, False, True, 0, (16, 64, 4)),  # tile spans whole groups, partial last tile
    (4, 96, 24, -1, False, False, 0, (16, 32, 4)),  # one group, gptq_v2
    (4, 128, 48, 32, True, False, 1, (32, 64, 4)),  # act-order g_idx
    (4, 128, 48, 32, True, False, 1, (32, 64, 4, False, 0)),  # act-order, words split in registers
    (4, 160, 40, 48, False, False, 1, (32, 64, 4, True, 1)),  # values gathered, streaming stores
    (4, 160, 40, 48, False, False, 0, (32, 64, 4, False, 2)),  # [in, out]-oriented tile, no g_idx
    (3, 96, 64, 32, True, False, 1, (32, 32, 4, True, 2)),  # [in, out]-oriented tile, act-order
    (8, 96, 40, 32, True, False, 0, (16, 32, 2, True, 3)),  # row-split kernel, act-order, partial tiles
    (4, 160, 40, 48, False, False, 1, (32, 64, 4, False, 3)),  # row-split kernel, no g_idx
    (2, 192, 48, 64, True, True, 0, (32, 64, 4)),
    (2, 80, 16, -1, False, False, 1, None),
    (3, 96, 64, 32, False, False, 1, (32, 32, 4)),
    (3, 64, 32, 16, True, True, 0, None),
    (8, 72, 20, 24, False, False, 0, (16, 32, 4)),
    (8, 64, 36, -1, True, True, 1, None),
]


@pytest.mark.parametrize("bits,k,n,group_size,act_order,sym,zero_offset,config", CASES)
def test_batched_matches_reference_and_float64(
    device, bits, k, n, group_size, act_order, sym, zero_offset, config
):
    gen = torch.Generator().manual_seed(bits * 1000 + k + n)
    (qw, qz, s), raw = make_case(gen, 2, k, n, bits, group_size, act_order=act_order, sym=sym,
                                 zero_offset=zero_offset)  # fmt: skip
    g_idx = raw[3] if act_order else None
    args = [t.to(device) if t is not None else None for t in (qw, qz, s, g_idx)]
    kw = dict(bits=bits, group_size=group_size, zero_offset=zero_offset, out_dtype=torch.float32)
    out = gptq_dequant_batched(*args, **kw, use_triton=True, config=config)
    assert out.shape == (2, n, k) and out.dtype == torch.float32 and out.device.type == device.type
    assert_close(out, gptq_dequant_ref(qw, qz, s, g_idx, **kw), torch.float32)
    assert_close(out, float64_expected(*raw, zero_offset), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [3, 4])
def test_single_matrix_half_outputs(device, dtype, bits):
    gen = torch.Generator().manual_seed(7)
    (qw, qz, s), raw = make_case(gen, 1, 96, 32, bits, 32)
    kw = dict(bits=bits, group_size=32, zero_offset=1, out_dtype=dtype)
    out = gptq_dequant(qw[0].to(device), qz[0].to(device), s[0].to(device), None, **kw, use_triton=True)
    assert out.shape == (32, 96) and out.dtype == dtype
    assert_close(out, gptq_dequant_ref(qw[0], qz[0], s[0], None, **kw), dtype)
    assert_close(out, float64_expected(*raw, 1)[0], dtype)


def test_writes_into_strided_out_view(device):
    """The batched launch can fill a slice of a fused [E, 2*out, in] parameter in place."""
    gen = torch.Generator().manual_seed(3)
    (qw, qz, s), raw = make_case(gen, 3, 64, 16, 4, 32)
    fused = torch.full((3, 40, 64), float("nan"), device=device)
    view = fused[:, 8:24, :]
    kw = dict(bits=4, group_size=32, zero_offset=1, out_dtype=torch.float32)
    res = gptq_dequant_batched(
        qw.to(device), qz.to(device), s.to(device), None, **kw, out=view, use_triton=True
    )
    assert res.data_ptr() == view.data_ptr()
    assert_close(fused[:, 8:24], float64_expected(*raw, 1), torch.float32)
    assert torch.isnan(fused[:, :8]).all() and torch.isnan(fused[:, 24:]).all()


def test_torch_path_matches_on_cpu():
    gen = torch.Generator().manual_seed(11)
    (qw, qz, s), raw = make_case(gen, 1, 64, 16, 4, 16, act_order=True)
    out = gptq_dequant(qw[0], qz[0], s[0], raw[3][0], bits=4, group_size=16, zero_offset=1,
                       out_dtype=torch.float64, use_triton=False)  # fmt: skip
    assert_close(out, float64_expected(*raw, 1)[0], torch.float32)


@pytest.mark.parametrize(
    "change,culprit",
    [
        (lambda a: {**a, "scales": a["scales"][:, :-1]}, "qzeros"),
        (lambda a: {**a, "qzeros": a["qzeros"][:-1]}, "qzeros"),
        (lambda a: {**a, "group_size": 48}, "group_size"),
        (lambda a: {**a, "g_idx": torch.zeros(10, dtype=torch.int32)}, "g_idx"),
        (lambda a: {**a, "qweight": a["qweight"].float()}, "qweight"),
    ],
)
def test_bad_inputs_raise(change, culprit):
    gen = torch.Generator().manual_seed(5)
    (qw, qz, s), _ = make_case(gen, 1, 64, 16, 4, 16)
    args = dict(qweight=qw[0], qzeros=qz[0], scales=s[0], g_idx=None, bits=4, group_size=16)
    args = change(args)
    with pytest.raises(EnhancedError) as err:
        gptq_dequant(args.pop("qweight"), args.pop("qzeros"), args.pop("scales"), args.pop("g_idx"),
                     **args, zero_offset=1, out_dtype=torch.float32)  # fmt: skip
    assert err.value.culprit == culprit


def test_row_split_kernel_refuses_3_bits(device):
    """3-bit values straddle words, so the row-split variant cannot split them; it says so."""
    gen = torch.Generator().manual_seed(9)
    (qw, qz, s), _ = make_case(gen, 1, 96, 32, 3, 32)
    with pytest.raises(EnhancedError) as err:
        gptq_dequant(qw[0].to(device), qz[0].to(device), s[0].to(device), None, bits=3, group_size=32,
                     zero_offset=1, out_dtype=torch.float32, use_triton=True, config=(32, 32, 4, False, 3))  # fmt: skip
    assert err.value.culprit == "config"
