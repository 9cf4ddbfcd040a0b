"""Packed linear kernel (CUDA-core and tensor-core shapes, split K) vs the float64 reference."""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():  # before the kernel module defines its kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
from moe_cases import make_fp8, make_gptq, rel_err  # noqa: E402
from poison import poisoned  # noqa: E402, F401

from sglang.srt.enhanced.errors import EnhancedError  # noqa: E402
from sglang.srt.enhanced.mixed_precision.kernels.packed_linear import (  # noqa: E402
    LinearConfig,
    fp8_linear,
    fp8_linear_ref,
    gptq_linear,
    gptq_linear_ref,
)

DOT = LinearConfig(16, 32, 32)
DOT_SPLIT = LinearConfig(16, 32, 32, split_k=2)
ROWS = LinearConfig(2, 32, 32, split_k=3, use_dot=False)


def squeeze(w):
    """The first of the stacked matrices, as one dense layer's weight."""
    return type(w)(**{f: (v[0] if isinstance(v, torch.Tensor) else v) for f, v in vars(w).items()})


@pytest.mark.parametrize(
    "bits,group,act_order,lead,k,n,cfg",
    [
        (4, 32, False, (3,), 96, 40, ROWS),  # CUDA-core rows, split K, partial N tile
        (4, 16, True, (2, 5), 64, 48, DOT),  # act-order, 3-D input
        (4, -1, False, (17,), 64, 24, DOT_SPLIT),  # one group, rows past one block, split K
        (8, 32, False, (4,), 64, 32, ROWS),
        (2, 64, False, (5,), 128, 32, DOT),
        (3, 32, False, (3,), 64, 32, ROWS),
        # whole-tile reads instead of word planes
        (4, 32, False, (3,), 96, 40, LinearConfig(2, 32, 32, split_k=3, use_dot=False, unpack="join")),
        (4, 16, False, (20,), 64, 48, LinearConfig(16, 32, 32, split_k=2, unpack="join")),
        (8, 32, True, (5,), 64, 32, LinearConfig(16, 32, 32, unpack="repeat")),
    ],
)
def test_gptq_linear(bits, group, act_order, lead, k, n, cfg, device, poisoned):  # noqa: F811
    gen = torch.Generator().manual_seed(bits * 1000 + k + n)
    w = squeeze(make_gptq(gen, 1, k, n, bits, group, act_order=act_order, device=device))
    x = torch.randn(*lead, k, generator=gen).to(torch.bfloat16).to(device)
    bias = torch.randn(n, generator=gen).to(torch.bfloat16).to(device)
    y = gptq_linear(x, w, bias, config=cfg)
    assert y.shape == (*lead, n)
    assert rel_err(y, gptq_linear_ref(x, w, bias)) < 1e-2


@pytest.mark.parametrize("block,cfg", [((16, 32), ROWS), ((16, 16), DOT), (None, DOT_SPLIT)])
def test_fp8_linear(block, cfg, device, poisoned):  # noqa: F811
    gen = torch.Generator().manual_seed(11)
    w = squeeze(make_fp8(gen, 1, 80, 40, block, device=device))
    x = torch.randn(6, 80, generator=gen).to(torch.float16).to(device)
    y = fp8_linear(x, w, config=cfg)
    assert rel_err(y, fp8_linear_ref(x, w)) < 3e-3


def test_fp8_linear_per_tensor_scale(device):
    gen = torch.Generator().manual_seed(12)
    w = squeeze(make_fp8(gen, 1, 64, 32, None, device=device))
    w = type(w)(weight=w.weight, scale=torch.tensor([0.05], device=device), block_size=None)
    x = torch.randn(2, 64, generator=gen).to(torch.bfloat16).to(device)
    assert rel_err(fp8_linear(x, w, config=ROWS), fp8_linear_ref(x, w)) < 1e-2


def test_wrong_input_width_is_named(device):
    gen = torch.Generator().manual_seed(0)
    w = squeeze(make_gptq(gen, 1, 64, 32, 4, 32, device=device))
    with pytest.raises(EnhancedError, match="features"):
        gptq_linear(torch.randn(2, 32, device=device).bfloat16(), w)


def test_last_k_split_past_the_weight_adds_nothing(device, poisoned):  # noqa: F811
    """5 K tiles over 3 splits of 2: the last split's second tile lies past K (and past the last group)."""
    gen = torch.Generator().manual_seed(13)
    w = squeeze(make_gptq(gen, 1, 160, 32, 4, 32, device=device))
    x = torch.randn(3, 160, generator=gen).to(torch.bfloat16).to(device)
    for cfg in (LinearConfig(4, 32, 32, split_k=3, use_dot=False), LinearConfig(16, 32, 32, split_k=3)):
        assert rel_err(gptq_linear(x, w, config=cfg), gptq_linear_ref(x, w)) < 1e-2
    f = squeeze(make_fp8(gen, 1, 160, 32, (16, 32), device=device))
    assert rel_err(fp8_linear(x, f, config=LinearConfig(4, 32, 32, split_k=3, use_dot=False)), fp8_linear_ref(x, f)) < 1e-2
