"""Layout planning for cuDNN's packed attention: where each row's documents start and how long they are, in the
slot-count tiers the kernel is compiled for, and the per-batch choice of tier the host fixes (AttentionLayout).

The host plans a batch's layout from the data pipeline's document count (or the rows' segment ids) with a
LayoutPlanner; the AttentionLayout it returns travels in the batch (train_step.LAYOUT_KEY), is a static value of
the compiled step (one compile per layout a run meets) and reaches the model as one argument, which turns it into
the device arrays of a PackedLayout once for all layers.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def segment_layout(segment_ids_BT, max_segments: int):
    """cuDNN's packed ("ragged") layout of a row of contiguous documents.

    Returns (offsets [B, M+1], lengths [B, M], count [B]): document start offsets and lengths, -1 past the last
    document; count is the true number of documents per row (may exceed M: the caller must check).
    """
    B, T = segment_ids_BT.shape
    is_start = jnp.concatenate(
        [jnp.ones((B, 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1
    )
    # Each document start writes its position into its document's slot; slots past M are dropped: one scatter of
    # T positions (jnp.nonzero(size=M) showed up in GPU profiles as a chain of small fusions).
    doc = jnp.cumsum(is_start, axis=1, dtype=jnp.int32) - 1
    slot = jnp.where(is_start, doc, max_segments + 1)
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
    t = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    starts = jnp.full((B, max_segments + 1), T, jnp.int32).at[rows, slot].set(t, mode="drop")
    starts, nxt = starts[:, :-1], starts[:, 1:]  # slot M holds the next start, the end of slot M-1's document
    valid = starts < T
    lengths = jnp.where(valid, nxt - starts, -1)
    offsets = jnp.concatenate([jnp.where(valid, starts, -1), jnp.full((B, 1), -1, jnp.int32)], axis=1)
    return offsets, lengths, doc[:, -1] + 1


# cuDNN's packed layout costs backward time in proportion to the document slots it is sized for, used or not
# (H100, B4 T4096 H16 K8 d128, 4 documents: fwd+bwd 1.33 ms sized for 8, 2.73 ms for 64). Rows are packed with a
# handful of documents most of the time, so the layout is compiled for a small and a large slot count and each
# device takes, every step, the smallest that holds its own rows.
SMALL_SEGMENTS = 8


def segment_tiers(max_segments: int) -> tuple[int, ...]:
    """The slot counts the packed layout is compiled for, smallest first."""
    return tuple(sorted({min(SMALL_SEGMENTS, max_segments), max_segments}))


def layout_branch(count_B, tiers) -> jax.Array:
    """Index of the smallest tier that holds every row's document count; len(tiers) = none does (masked path)."""
    return jnp.sum(jnp.asarray(tiers, jnp.int32) < jnp.max(count_B)).astype(jnp.int32)


MASKED = 0  # `document_slots` of a batch with a row of more documents than the largest tier: explicit mask


def host_tiers(max_segments: int, sizes: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The slot counts `slots_for` chooses among, smallest first; the largest is always `max_segments`.

    sizes: the slot counts the host may fix the layout at (`ModelOptions.attn_slot_sizes`); None = the device's tiers
    (`segment_tiers`). Finer sizes are an experiment (`bench_train.py --attn-sizes 4,8,16,32,64`): cuDNN's packed
    backward costs time in proportion to the slots, so they fit batches more closely, at one compile per size a run
    meets. Not measured end to end yet."""
    sizes = segment_tiers(max_segments) if sizes is None else sizes
    return tuple(sorted({min(m, max_segments) for m in sizes} | {max_segments}))


def document_slots(segment_ids, max_segments: int = 64, sizes: tuple[int, ...] | None = None) -> int:
    """Host side, from a batch's segment ids (numpy, any leading shape, tokens last): the slot count of the
    smallest tier of `host_tiers(max_segments, sizes)` that holds every row's documents, or MASKED when a row has
    more than `max_segments`. As an AttentionLayout given to the model, it fixes the layout at trace time: no per-layer
    `switch`, which cost 2% of the step and 15 GiB on one H200 (Qwen3 1.7B, 4 x 4096; docs/PERFORMANCE.md)."""
    seg = np.asarray(segment_ids)
    return slots_for(1 + int(np.max(np.sum(seg[..., 1:] != seg[..., :-1], axis=-1), initial=0)), max_segments,
                     sizes)


def slots_for(documents: int, max_segments: int = 64, sizes: tuple[int, ...] | None = None) -> int:
    """The slot count of the smallest tier of `host_tiers(max_segments, sizes)` that holds `documents` per row
    (segments, padding counted), or MASKED."""
    return next((m for m in host_tiers(max_segments, sizes) if documents <= m), MASKED)


class PackedLayout(NamedTuple):
    """A batch's documents in cuDNN's packed layout, one (offsets, lengths) per tier, and each row's document count
    (which picks the tier on the device). Computed once per step and shared by every attention layer.

    A layout fixed on the host (`packed_layout(..., slots=m)`) has no counts and a single tier of m slots, or no
    tier at all for MASKED: attention then calls that one path, with no conditional."""

    counts: jax.Array | None  # [B] int32 documents per row; None when the host fixed the tier
    offsets: tuple  # [B, m + 1] per tier
    lengths: tuple  # [B, m] per tier

    @property
    def tiers(self) -> tuple[int, ...]:
        return tuple(o.shape[1] - 1 for o in self.offsets)


def packed_layout(segment_ids_BT, max_segments: int = 64, slots: int | None = None) -> PackedLayout:
    """slots: None = every tier of `segment_tiers(max_segments)`, picked per step on the device; an int from
    `document_slots` (which must hold every row of this batch) = that layout alone."""
    tiers = segment_tiers(max_segments) if slots is None else ((slots,) if slots != MASKED else ())
    offsets, lengths, count = segment_layout(segment_ids_BT, max(tiers, default=1))
    end = jnp.full((offsets.shape[0], 1), -1, jnp.int32)
    # A smaller tier is the first m slots of the largest (used only when every row has at most m documents).
    return PackedLayout(count if slots is None else None,
                        tuple(jnp.concatenate([offsets[:, :m], end], axis=1) for m in tiers),
                        tuple(lengths[:, :m] for m in tiers))


@dataclasses.dataclass(frozen=True)
class AttentionLayout:
    """A batch's packed attention layout, fixed on the host: cuDNN's packed layout sized for `slots` documents per
    row, or the explicit mask (slots == MASKED: a row has more documents than the largest size). Hashable and
    static: the step is compiled once per layout. No layout (None) leaves the tier to the device, every step."""

    slots: int

    @classmethod
    def for_documents(cls, documents: int, sizes: tuple[int, ...] | None = None,
                      max_segments: int = 64) -> AttentionLayout:
        """The layout of a batch whose rows hold at most `documents` segments each (`slots_for`)."""
        return cls(slots_for(documents, max_segments, sizes))

    @classmethod
    def for_segments(cls, segment_ids, sizes: tuple[int, ...] | None = None,
                     max_segments: int = 64) -> AttentionLayout:
        """The layout of a batch from its segment ids (host arrays holding every row; `document_slots`)."""
        return cls(document_slots(segment_ids, max_segments, sizes))

    def packed(self, segment_ids_BT) -> PackedLayout:
        """The device arrays of this layout for a batch's segment ids (traced once for all layers)."""
        return packed_layout(segment_ids_BT, slots=self.slots)

    def describe(self) -> str:
        return ("more than the largest slot count (explicit mask)" if self.slots == MASKED else
                f"up to {self.slots} documents per row")


def packed_layout_for(segment_ids_BT, layout: AttentionLayout | None) -> PackedLayout:
    """The PackedLayout of a batch: the host's `layout`, or with None every tier, picked on the device per step."""
    return packed_layout(segment_ids_BT) if layout is None else layout.packed(segment_ids_BT)


@dataclasses.dataclass(frozen=True)
class LayoutPlanner:
    """How the host fixes each batch's AttentionLayout: among `sizes` (ModelOptions.attn_slot_sizes; None = the
    device's tiers, `segment_tiers`)."""

    sizes: tuple[int, ...] | None = None

    def plan(self, documents: int | None = None, segment_ids=None) -> AttentionLayout | None:
        """From the data pipeline's count of the most segments in any row of the global batch (every process gets
        the same, so all compile the same step), else from `segment_ids` when they hold every row of the batch
        (one process); None otherwise (the device picks)."""
        if documents is not None:
            return AttentionLayout.for_documents(int(documents), self.sizes)
        if segment_ids is not None:
            return AttentionLayout.for_segments(segment_ids, self.sizes)
        return None

    def usual(self) -> AttentionLayout:
        """The layout most batches get (rows of up to SMALL_SEGMENTS documents): the one compiled ahead."""
        return AttentionLayout.for_documents(SMALL_SEGMENTS, self.sizes)

