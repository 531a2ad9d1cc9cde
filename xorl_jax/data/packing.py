"""Packing documents into rows of a fixed length.

Both packers return a list of rows, each a list of document indices whose lengths sum to <= capacity.
"""
from __future__ import annotations

import numpy as np

from xorl_jax.data.documents import IGNORE


def pack_sequential(lengths, order, capacity: int) -> list[list[int]]:
    """Documents in the given order; a document that does not fit starts a new row."""
    rows, current, used = [], [], 0
    for i in order:
        n = int(lengths[i])
        if current and used + n > capacity:
            rows.append(current)
            current, used = [], 0
        current.append(int(i))
        used += n
    if current:
        rows.append(current)
    return rows


def pack_first_fit_decreasing(lengths, order, capacity: int) -> list[list[int]]:
    """First-fit decreasing: longest first, each into the first row with room (max segment tree, O(n log n)).
    Ties keep `order`, so a shuffled order still changes which documents share a row."""
    order = np.asarray(order)
    order = order[np.argsort(-np.asarray(lengths)[order], kind="stable")]
    size = 1
    while size < max(len(order), 1):
        size *= 2
    room = np.zeros(2 * size, np.int64)  # leaves: remaining room of row k (capacity once opened)
    room[size:] = capacity  # every leaf starts as an unopened, empty row
    for k in range(size - 1, 0, -1):
        room[k] = max(room[2 * k], room[2 * k + 1])
    rows: list[list[int]] = []
    for i in order:
        n = int(lengths[i])
        k = 1
        while k < size:  # leftmost leaf with room >= n; an unopened leaf always has room
            k = 2 * k if room[2 * k] >= n else 2 * k + 1
        row = k - size
        if row == len(rows):
            rows.append([])
        rows[row].append(int(i))
        room[k] -= n
        k //= 2
        while k:
            room[k] = max(room[2 * k], room[2 * k + 1])
            k //= 2
    return rows


def build_row(docs, capacity: int):
    """One packed row: input_ids, labels, positions, segment_ids (int32, length `capacity`)."""
    out = {k: np.zeros(capacity, np.int32) for k in ("input_ids", "positions", "segment_ids")}
    out["labels"] = np.full(capacity, IGNORE, np.int32)
    t = 0
    for seg, (ids, targets) in enumerate(docs, 1):
        n = len(ids)
        out["input_ids"][t:t + n] = ids
        out["labels"][t:t + n] = targets
        out["positions"][t:t + n] = np.arange(n)
        out["segment_ids"][t:t + n] = seg
        t += n
    return out
