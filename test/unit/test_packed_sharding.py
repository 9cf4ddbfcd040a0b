"""Sharding of packed tensors: each rank's pieces decode to its slice of the float weight; bad cuts are refused."""

from __future__ import annotations

import pytest
import torch

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.formats.fp8 import FP8Scale
from sglang.srt.enhanced.mixed_precision.formats.gptq import GPTQFormat
from sglang.srt.enhanced.mixed_precision.kernels.reference import fp8_block_dequant_ref, gptq_dequant_ref
from sglang.srt.enhanced.mixed_precision.serving.sharding import Piece, shard_fp8_tensor, shard_gptq_tensor
from sglang.srt.enhanced.tools.quantize import fp8_block_quantize_tensor, gptq_quantize_tensor

K, N = 256, 64
MODULE = "model.layers.0.mlp.experts"


def decode(parts: dict[str, torch.Tensor], fmt: GPTQFormat) -> torch.Tensor:
    return gptq_dequant_ref(parts["qweight"], parts["qzeros"], parts["scales"], parts.get("g_idx"), bits=fmt.bits,
                            group_size=fmt.group_size, zero_offset=fmt.zero_offset, out_dtype=torch.float64)


def pieces(parts, fmt, *, out, inp):  # noqa: ANN001, ANN201
    return {role: shard_gptq_tensor(MODULE, role, t, fmt, out=out, inp=inp, act_order=fmt.desc_act)
            for role, t in parts.items()}


@pytest.mark.parametrize("fmt", [GPTQFormat(bits=4, group_size=64), GPTQFormat(bits=3, group_size=32, sym=False),
                                 GPTQFormat(bits=4, group_size=64, desc_act=True),
                                 GPTQFormat(bits=8, group_size=-1, checkpoint_format="gptq_v2")],
                         ids=lambda f: f.name)
@pytest.mark.parametrize("tp", [2, 4])
def test_row_and_column_pieces_decode_to_the_float_slices(fmt: GPTQFormat, tp: int) -> None:
    torch.manual_seed(tp)
    parts = gptq_quantize_tensor(torch.randn(N, K), fmt)
    full = decode(parts, fmt)
    if fmt.bits == 3 and tp == 4:
        pytest.skip("3-bit output pieces of 16 cannot be cut (see the refusal test)")
    for rank in range(tp):
        k = K // tp
        row = pieces(parts, fmt, out=Piece.whole(N), inp=Piece(rank * k, k, K))
        torch.testing.assert_close(decode(row, fmt), full[:, rank * k : (rank + 1) * k], rtol=0, atol=0)
        if not fmt.desc_act and fmt.group_size != -1:
            assert row["scales"].shape[0] == k // fmt.group_size  # each rank keeps only its groups
        n = N // tp
        col = pieces(parts, fmt, out=Piece(rank * n, n, N), inp=Piece.whole(K))
        torch.testing.assert_close(decode(col, fmt), full[rank * n : (rank + 1) * n], rtol=0, atol=0)


def test_a_cut_through_a_quantization_group_is_refused() -> None:
    fmt = GPTQFormat(bits=4, group_size=128)
    parts = gptq_quantize_tensor(torch.randn(N, K), fmt)
    with pytest.raises(EnhancedError, match=r"input features \(256\) at \[64, 128\).*quantization group of 128") as err:
        shard_gptq_tensor(MODULE, "scales", parts["scales"], fmt, out=Piece.whole(N), inp=Piece(64, 64, K),
                          act_order=False)
    assert err.value.culprit == MODULE
    # With act-order every rank keeps all groups, so the same cut is fine.
    act = shard_gptq_tensor(MODULE, "scales", parts["scales"], fmt, out=Piece.whole(N), inp=Piece(64, 64, K),
                            act_order=True)
    assert torch.equal(act, parts["scales"])


def test_a_cut_through_a_packed_word_block_is_refused() -> None:
    fmt = GPTQFormat(bits=3, group_size=32)
    parts = gptq_quantize_tensor(torch.randn(N, K), fmt)
    with pytest.raises(EnhancedError, match=r"output features \(64\) at \[16, 32\).*3-bit packed word block of 32"):
        shard_gptq_tensor(MODULE, "qzeros", parts["qzeros"], fmt, out=Piece(16, 16, N), inp=Piece.whole(K),
                          act_order=False)


def test_fp8_block_pieces_and_refusal() -> None:
    torch.manual_seed(0)
    stored = fp8_block_quantize_tensor(torch.randn(N, K), (32, 32))
    full = fp8_block_dequant_ref(stored["weight"], stored["weight_scale_inv"], (32, 32), torch.float64)

    def cut(role: str, out: Piece, inp: Piece) -> torch.Tensor:
        src = stored["weight" if role == "weight" else "weight_scale_inv"]
        return shard_fp8_tensor(MODULE, role, src, FP8Scale.BLOCK, (32, 32), out=out, inp=inp)

    w = cut("weight", Piece(32, 32, N), Piece(128, 128, K))
    s = cut("scale", Piece(32, 32, N), Piece(128, 128, K))
    torch.testing.assert_close(fp8_block_dequant_ref(w, s, (32, 32), torch.float64), full[32:, 128:], rtol=0, atol=0)
    with pytest.raises(EnhancedError, match=r"output features \(64\) at \[16, 32\).*scale block of 32") as err:
        cut("scale", Piece(16, 16, N), Piece.whole(K))
    assert err.value.culprit == MODULE


def test_per_tensor_fp8_scale_grows_to_one_per_output_feature() -> None:
    scale = torch.tensor(0.5)
    out = shard_fp8_tensor(MODULE, "scale", scale, FP8Scale.TENSOR, None, out=Piece(8, 8, 16), inp=Piece.whole(4))
    assert out.shape == (8,) and bool((out == 0.5).all())
