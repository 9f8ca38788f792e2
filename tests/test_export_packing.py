"""int4 packing: round trips, layout, range errors."""

from __future__ import annotations

import pytest
import torch

from tfmq_video.errors import ConfigError
from tfmq_video.export.packing import pack_int4, packed_columns, unpack_int4


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("in_features", [1, 2, 7, 64, 73])
def test_round_trip(signed: bool, in_features: int) -> None:
    lo, hi = (-8, 7) if signed else (0, 15)
    codes = torch.randint(lo, hi + 1, (5, in_features), dtype=torch.int8)
    packed = pack_int4(codes, signed)
    assert packed.dtype == torch.uint8 and packed.shape == (5, packed_columns(in_features))
    assert torch.equal(unpack_int4(packed, in_features, signed), codes)


def test_layout_low_nibble_is_even_column() -> None:
    codes = torch.tensor([[1, 2, -1]], dtype=torch.int8)
    packed = pack_int4(codes, signed=True)
    assert packed.tolist() == [[0x21, 0x0F]]


def test_out_of_range_codes_are_rejected() -> None:
    with pytest.raises(ConfigError, match="4-bit range"):
        pack_int4(torch.tensor([[8]], dtype=torch.int8), signed=True)
    with pytest.raises(ConfigError, match="uint8"):
        unpack_int4(torch.zeros(2, 3, dtype=torch.uint8), in_features=8, signed=True)
