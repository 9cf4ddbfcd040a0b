"""FP8 dequant kernels vs their torch references and an independent float64 reconstruction."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # before the kernel module defines its kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from sglang.srt.enhanced.errors import EnhancedError  # noqa: E402
from sglang.srt.enhanced.mixed_precision.kernels.fp8_dequant import (  # noqa: E402
    fp8_block_dequant,
    fp8_scaled_dequant,
)
from sglang.srt.enhanced.mixed_precision.kernels.reference import (  # noqa: E402
    fp8_block_dequant_ref,
    fp8_scaled_dequant_ref,
)

# (rtol, atol) per output dtype; see test_gptq_dequant.py.
TOL = {
    torch.float32: (1e-6, 1e-6),
    torch.float16: (2**-10, 1e-4),
    torch.bfloat16: (2**-7, 1e-3),
}


def random_fp8(gen, m, n, dtype=torch.float8_e4m3fn):
    return (torch.randn(m, n, generator=gen) * 40).to(dtype)


def assert_close(actual, expected, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "m,n,block,config,out_dtype",
    [
        (37, 53, (16, 8), (16, 32, 4), torch.float32),  # partial edge blocks, tiles cut blocks
        (200, 300, (128, 128), None, torch.float32),  # tiles inside one block, partial edges
        (64, 96, (32, 64), (32, 64, 4), torch.bfloat16),
        (5, 7, (128, 128), None, torch.float16),  # smaller than one block
    ],
)
def test_block_dequant(device, m, n, block, config, out_dtype):
    gen = torch.Generator().manual_seed(m * n)
    w = random_fp8(gen, m, n)
    s = torch.rand(-(-m // block[0]), -(-n // block[1]), generator=gen) + 0.01
    out = fp8_block_dequant(w.to(device), s.to(device), block, out_dtype, use_triton=True, config=config)
    assert out.shape == (m, n) and out.dtype == out_dtype
    assert_close(out, fp8_block_dequant_ref(w, s, block, out_dtype), out_dtype)
    expected = torch.empty(m, n, dtype=torch.float64)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows, cols = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            expected[rows, cols] = w[rows, cols].double() * s[i, j].double()
    assert_close(out, expected, out_dtype)


@pytest.mark.parametrize("scale_shape", ["scalar", "one", "channel", "channel_col"])
@pytest.mark.parametrize("fp8_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_scaled_dequant(device, scale_shape, fp8_dtype):
    gen = torch.Generator().manual_seed(1)
    m, n = 45, 70
    w = random_fp8(gen, m, n, fp8_dtype)
    shape = {"scalar": (), "one": (1,), "channel": (m,), "channel_col": (m, 1)}[scale_shape]
    s = torch.rand(shape, generator=gen) + 0.01
    out = fp8_scaled_dequant(w.to(device), s.to(device), torch.float32, use_triton=True, config=(16, 32, 4))
    assert_close(out, fp8_scaled_dequant_ref(w, s, torch.float32), torch.float32)
    per_row = s.double().reshape(-1).expand(m) if s.numel() == 1 else s.double().reshape(m)
    expected = torch.stack([w[i].double() * per_row[i] for i in range(m)])
    assert_close(out, expected, torch.float32)


def test_bad_shapes_raise():
    w = torch.zeros(10, 20).to(torch.float8_e4m3fn)
    with pytest.raises(EnhancedError) as err:
        fp8_block_dequant(w, torch.ones(2, 2), (8, 8), torch.float32)
    assert err.value.culprit == "scale_inv"
    with pytest.raises(EnhancedError) as err:
        fp8_scaled_dequant(w, torch.ones(20), torch.float32)
    assert err.value.culprit == "weight_scale"
    with pytest.raises(EnhancedError) as err:
        fp8_scaled_dequant(torch.zeros(10, 20), torch.ones(1), torch.float32)
    assert err.value.culprit == "weight"
