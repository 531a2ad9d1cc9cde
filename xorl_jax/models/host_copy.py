"""Fast host copies of transposed views: HF stores linear weights [out, in], ours are [in, out] (and head / expert
splits of those), so loading a checkpoint is mostly copying strided numpy views into contiguous arrays.

numpy copies a transposed view element by element in the destination's order, reading the source with a large
stride: every cache line it loads is evicted before its neighbours are used (Qwen3-8B's 1.2 GB head took ~5 s on
one core). `copy_into` copies in tiles that keep the source's lines in cache and spreads the tiles over threads
(numpy releases the GIL while copying), about 4x faster on 2 cores and more on larger hosts.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np



@dataclasses.dataclass(frozen=True)
class Tiles:
    """How `copy_into` cuts a copy into tiles."""

    small: int = 1 << 20  # elements: below this a plain copy is as fast
    block: int = 128  # destination extent along the source's contiguous axis per tile (two 128-byte lines per bf16 row)
    last: int = 1024  # destination's last-axis extent per tile (best of a sweep of 32-256 x 256-1024 on CPU)


TILES = Tiles()
_THREADS = max(1, min(32, os.cpu_count() or 1))
_pool: ThreadPoolExecutor | None = None


def _threads() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(_THREADS, thread_name_prefix="xorl_copy")
    return _pool


def _blocks(n: int, size: int):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def copy_into(dst: np.ndarray, src, tiles: Tiles = TILES) -> np.ndarray:
    """dst[...] = src (same shape; src may be any strided view, dtype cast included), tiled and threaded."""
    src = np.asarray(src)
    if src.shape != dst.shape:
        raise ValueError(f"copy_into: shapes differ, {src.shape} vs {dst.shape}")
    if dst.size < tiles.small or dst.ndim == 0:
        dst[...] = src
        return dst
    # the destination axis along which the source is contiguous (smallest stride); tiles are thin along it
    fast = min(range(src.ndim), key=lambda a: (abs(src.strides[a]) if src.shape[a] > 1 else np.inf, -a))
    last = dst.ndim - 1
    if fast == last:  # already in order: plain copies of chunks of axis 0, in parallel
        parts = [(rows,) for rows in _blocks(dst.shape[0], tiles.block)]
    else:  # tiles thin along `fast`, `last` wide along the last axis; one leading index at a time for 3+ dims
        leading = [slice(i, i + 1) for i in range(dst.shape[0])] if dst.ndim > 2 and fast != 0 else [slice(None)]
        parts = []
        thin, wide = _blocks(dst.shape[fast], tiles.block), _blocks(dst.shape[last], tiles.last)
        for lead, f, c in itertools.product(leading, thin, wide):
            index = [slice(None)] * dst.ndim
            index[0] = lead
            index[fast], index[last] = f, c
            parts.append(tuple(index))

    def work(batch):
        for index in batch:
            dst[index] = src[index]

    per_task = -(-len(parts) // (4 * _THREADS))  # a few tasks per thread: a future costs ~20 us
    list(_threads().map(work, [parts[i:i + per_task] for i in range(0, len(parts), per_task)]))
    return dst


def contiguous(a, dtype=None, tiles: Tiles = TILES) -> np.ndarray:
    """`np.ascontiguousarray(a, dtype)` through `copy_into` (`a` itself when already C-contiguous in that dtype)."""
    a = np.asarray(a)
    dtype = a.dtype if dtype is None else np.dtype(dtype)
    if a.flags.c_contiguous and a.dtype == dtype:
        return a
    return copy_into(np.empty(a.shape, dtype), a, tiles)
