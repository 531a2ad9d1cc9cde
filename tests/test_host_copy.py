"""copy_into: tiled, threaded copies of strided views equal numpy's plain assignment (values and dtype casts)."""

import ml_dtypes
import numpy as np
import pytest

from xorl_jax.models import host_copy
from xorl_jax.models.host_copy import Tiles, copy_into

SMALL_TILES = Tiles(small=1, block=16, last=64)  # the tiled path even for these small arrays


def _views(rng, dtype):
    a = rng.standard_normal((600, 2500)).astype(dtype)
    b = rng.standard_normal((6, 300, 700)).astype(dtype)
    return {
        "transpose": a.T,
        "heads out": a.reshape(20, 30, 2500).transpose(2, 0, 1),
        "heads in": a.reshape(600, 25, 100).transpose(1, 2, 0),
        "experts": b.reshape(6, 2, 150, 700).transpose(0, 3, 1, 2),
        "batched transpose": b.transpose(0, 2, 1),
        "contiguous": a,
        "sliced transpose": a.T[100:1900:3, 7:500],
    }


@pytest.mark.parametrize("src_dtype,dtype", [(np.float32, np.float32), (np.float32, ml_dtypes.bfloat16),
                                             (ml_dtypes.bfloat16, np.float32)])
def test_copy_into_equals_plain_assignment(src_dtype, dtype):
    """Every view shape the key maps make, and the casts a load does (bf16 checkpoint -> fp32 parameters)."""
    for name, view in _views(np.random.default_rng(0), src_dtype).items():
        want = np.empty(view.shape, dtype)
        want[...] = view
        got = copy_into(np.full(view.shape, np.nan, dtype), view, SMALL_TILES)
        np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32), err_msg=name)


def test_copy_into_rejects_other_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        copy_into(np.empty((3, 4)), np.zeros((4, 3)))


def test_contiguous_is_ascontiguousarray():
    tiles = Tiles(small=1)
    a = np.random.default_rng(1).standard_normal((300, 500)).astype(np.float32)
    assert host_copy.contiguous(a, tiles=tiles) is a  # nothing to do: no copy, like numpy
    for view, dtype in ((a.T, None), (a.T, ml_dtypes.bfloat16), (a, ml_dtypes.bfloat16), (a[:, ::2], None)):
        got = host_copy.contiguous(view, dtype, tiles)
        want = np.ascontiguousarray(view, dtype)
        assert got.flags.c_contiguous and got.dtype == want.dtype
        np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32))
