"""GPTQ int32 packing: hand-computed words, the 3-bit word layout, round trips, bad input."""

from __future__ import annotations

import pytest
import torch

from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.mixed_precision.packing import block_shape, pack_int32, unpack_int32


def as_int32(word: int) -> int:
    return word - (1 << 32) if word >= 1 << 31 else word


def test_four_bit_word_holds_eight_rows_low_bits_first():
    values = torch.arange(8, dtype=torch.int32).reshape(8, 1)  # in = 8 rows, out = 1
    packed = pack_int32(values, 4, dim=0)
    assert packed.shape == (1, 1) and packed.dtype == torch.int32
    assert packed.item() == 0x76543210


def test_eight_and_two_bit_words():
    assert pack_int32(torch.tensor([[1, 2, 3, 4]]), 8, dim=1).item() == 0x04030201
    two = torch.tensor([[3, 0, 1, 2] + [0] * 11 + [1]])  # value k at bits [2k, 2k+2)
    assert pack_int32(two, 2, dim=1).item() == 3 | (1 << 4) | (2 << 6) | (1 << 30)


def test_high_bits_wrap_to_negative_int32():
    packed = pack_int32(torch.full((8, 2), 15), 4, dim=0)
    assert packed.tolist() == [[-1, -1]]
    packed = pack_int32(torch.tensor([[0, 0, 0, 0, 0, 0, 0, 8]]), 4, dim=1)
    assert packed.item() == as_int32(0x80000000)


def gptq_three_bit_words(vals: list[int]) -> list[int]:
    """The 3-bit layout as GPTQ tools describe it: 32 values in 3 words, pattern 10-1-10-1-10."""
    w0 = w1 = w2 = 0
    for j in range(10):
        w0 |= vals[j] << (3 * j)
    w0 |= (vals[10] & 0b11) << 30
    w1 |= vals[10] >> 2
    for j in range(11, 21):
        w1 |= vals[j] << (1 + 3 * (j - 11))
    w1 |= (vals[21] & 0b1) << 31
    w2 |= vals[21] >> 1
    for j in range(22, 32):
        w2 |= vals[j] << (2 + 3 * (j - 22))
    return [as_int32(w) for w in (w0, w1, w2)]


def test_three_bit_matches_the_gptq_word_pattern():
    gen = torch.Generator().manual_seed(0)
    values = torch.randint(0, 8, (64, 3), generator=gen)
    packed = pack_int32(values, 3, dim=0)
    assert packed.shape == (6, 3)
    for col in range(3):
        for block in range(2):
            expected = gptq_three_bit_words(values[block * 32 : (block + 1) * 32, col].tolist())
            assert packed[block * 3 : block * 3 + 3, col].tolist() == expected


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dim", [1, 2, -1, -2])
def test_round_trip(bits, dim):
    gen = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2**bits, (2, 64, 96), generator=gen, dtype=torch.int32)
    packed = pack_int32(values, bits, dim=dim)
    expected_shape = list(values.shape)
    expected_shape[dim] = expected_shape[dim] * bits // 32
    assert list(packed.shape) == expected_shape
    assert torch.equal(unpack_int32(packed, bits, dim=dim), values)


def test_gptq_qweight_and_qzeros_shapes():
    q = torch.randint(0, 16, (256, 48), dtype=torch.int32)  # [in, out]
    z = torch.randint(0, 16, (2, 48), dtype=torch.int32)  # [groups, out]
    assert pack_int32(q, 4, dim=0).shape == (32, 48)
    assert pack_int32(z, 4, dim=1).shape == (2, 6)
    assert block_shape(3) == (32, 3) and block_shape(4) == (8, 1)


@pytest.mark.parametrize(
    "call,culprit",
    [
        (lambda: pack_int32(torch.tensor([[16]] * 8), 4, 0), "values"),
        (lambda: pack_int32(torch.tensor([[-1]] * 8), 4, 0), "values"),
        (lambda: pack_int32(torch.zeros(8, 2), 4, 0), "values"),
        (lambda: pack_int32(torch.zeros(6, 2, dtype=torch.int32), 4, 0), "values"),
        (lambda: pack_int32(torch.zeros(16, 2, dtype=torch.int32), 3, 0), "values"),
        (lambda: pack_int32(torch.zeros(8, 2, dtype=torch.int32), 5, 0), "bits"),
        (lambda: pack_int32(torch.zeros(8, 2, dtype=torch.int32), 4, 2), "dim"),
        (lambda: pack_int32(torch.tensor(3), 4, 0), "dim"),
        (lambda: unpack_int32(torch.zeros(2, 2, dtype=torch.int64), 4, 0), "packed"),
        (lambda: unpack_int32(torch.zeros(2, 2, dtype=torch.int32), 3, 0), "packed"),
    ],
)
def test_bad_input_raises(call, culprit):
    with pytest.raises(EnhancedError) as err:
        call()
    assert err.value.culprit == culprit
