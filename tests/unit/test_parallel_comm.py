"""The all-to-all's wire format without communication: rows of several dtypes packed into one byte buffer and read
back as views, FP8 tile quantization, and the bytes one copy costs."""
import pytest
import torch

from parallel.comm import (
    FP8_MAX, dequantize_rows_fp8, pack_rows, quantize_rows_fp8, unpack_rows, wire_bytes_per_row,
)
from parallel.permute import id_dtype


def _rows(C, D=256, K=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(C, D, generator=g).to(torch.bfloat16)
    w = torch.rand(C, K, generator=g)
    ids = torch.randint(-1, 4, (C, K), generator=g).to(torch.int8)
    return x, w, ids


@pytest.mark.parametrize("C", [0, 1, 7])
def test_pack_unpack_round_trip_as_aligned_views(C):
    x, w, ids = _rows(C)
    buf, layout = pack_rows([x, w, ids])
    assert buf.dtype == torch.uint8 and buf.shape == (C, layout.row_bytes)
    assert layout.row_bytes == 2 * 256 + 4 * 3 + 3 + 1  # padded to the widest element (4 bytes)
    back = unpack_rows(buf, layout)
    for a, b in zip(back, (x, w, ids)):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if C:
        assert back[0].data_ptr() - buf.data_ptr() == 12  # fp32 weights first, then the bf16 row: no copy


def test_pack_refuses_tensors_of_different_row_counts():
    x, w, _ = _rows(4)
    with pytest.raises(ValueError, match="rows"):
        pack_rows([x, w[:3]])


def test_fp8_tiles_map_each_tile_maximum_to_448():
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 3, 5)[:, None]
    q, scale = quantize_rows_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (5, 2)  # two 1x128 tiles per row
    tiles = x.view(5, 2, 128)
    torch.testing.assert_close(scale, tiles.abs().amax(-1) / FP8_MAX)
    back = dequantize_rows_fp8(q, scale, torch.float32).view(5, 2, 128)
    # e4m3's relative step is 2^-3 at worst: every value within 1/16 of its tile's maximum (rows of 1e-3 and of
    # 1e3 alike: the scales are per tile)
    assert ((back - tiles).abs() <= tiles.abs().amax(-1, keepdim=True) / 16).all()
    odd = torch.randn(2, 100)  # not a multiple of 128: one scale per row
    assert quantize_rows_fp8(odd)[1].shape == (2, 1)


def test_wire_bytes_per_copy_bf16_and_fp8():
    x, w, ids = _rows(2, D=7168, K=8)  # DeepSeek-V3's width and top-8
    assert wire_bytes_per_row([x, w, ids]) == 2 * 7168 + 4 * 8 + 8
    assert wire_bytes_per_row([x, w, ids], fp8_rows=True) == 7168 + 4 * 56 + 4 * 8 + 8
    assert wire_bytes_per_row([x.float(), w, ids]) == 4 * 7168 + 4 * 8 + 8


def test_expert_ids_cross_in_the_smallest_type():
    assert [id_dtype(n) for n in (1, 4, 128, 129, 32768, 32769)] == \
        [torch.int8, torch.int8, torch.int8, torch.int16, torch.int16, torch.int32]
