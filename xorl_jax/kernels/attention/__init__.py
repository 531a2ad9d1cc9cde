"""Causal, document-masked (packed) multi-head attention with GQA.

Backends (`attn_implementation`):
- `xla`: the jnp reference below: fp32 scores and softmax, causal & same-segment mask. Runs everywhere.
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")` (flash attention in cuDNN) on NVIDIA GPUs.
- `auto`: cudnn on NVIDIA GPUs, xla elsewhere.

Shapes: B batch, T tokens, H query heads, K kv heads (H % K == 0), d head dim.
segment_ids [B, T] int32: tokens attend only to earlier tokens of the same segment (documents of a packed row).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from xorl_jax.parallel.rules import current, per_shard

ATTN_IMPLEMENTATIONS = ("auto", "cudnn", "xla")


def _on_nvidia_gpu() -> bool:
    return jax.default_backend() == "gpu"


def resolve_attn_implementation(name: str, dtype=None) -> str:
    """auto: cuDNN fused attention on NVIDIA GPUs for bf16/fp16 compute (cuDNN has no fp32 kernels), else XLA."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation {name!r} is not one of {ATTN_IMPLEMENTATIONS}")
    half = dtype is None or jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    if name == "auto":
        return "cudnn" if _on_nvidia_gpu() and half else "xla"
    if name == "cudnn" and not _on_nvidia_gpu():
        raise RuntimeError(
            "attn_implementation 'cudnn' is not available on this device (no NVIDIA GPU); use 'xla' or 'auto'"
        )
    if name == "cudnn" and not half:
        raise ValueError(f"attn_implementation 'cudnn' needs bfloat16 or float16 compute, not {jnp.dtype(dtype).name}; "
                         "use model.dtype=bfloat16 or attn_implementation xla (or auto)")
    return name


def _mask_BTT(segment_ids_BT, T):
    causal = jnp.tril(jnp.ones((T, T), dtype=bool))[None]
    if segment_ids_BT is None:
        return causal
    same = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    return causal & same


def attention_reference(q_BTHd, k_BTKd, v_BTKd, *, segment_ids=None, scale=None):
    B, T, H, d = q_BTHd.shape
    K = k_BTKd.shape[2]
    scale = d**-0.5 if scale is None else scale
    q = q_BTHd.reshape(B, T, K, H // K, d)  # query head h uses kv head h // (H/K)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k_BTKd, preferred_element_type=jnp.float32) * scale
    mask = _mask_BTT(segment_ids, T)[:, None, None]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BTKd.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v_BTKd)
    return out.reshape(B, T, H, d)


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


def _cudnn_packed(q, k, v, offsets, lengths, scale):
    from jax._src.cudnn.fused_attention_stablehlo import MaskType
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention

    return cudnn_attention(
        q, k, v, None, None, lengths, lengths, offsets, offsets,
        scale=scale, mask_type=MaskType.PADDING_CAUSAL, qkv_layout="BTNH",
    )


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
    more than `max_segments`. Given to the model as `doc_slots`, it fixes the layout at trace time: no per-layer
    `switch`, which cost 2% of the step and 15 GiB on one H200 (Qwen3 1.7B, 4 x 4096; docs/PERFORMANCE.md)."""
    import numpy as np

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


_ROWS = ("batch", None)


def _per_device_names(H: int, K: int):
    """Logical names of q and k/v for the per-device cuDNN call: rows over the batch axes, heads over `tensor` when
    both head counts divide it (else every device takes all heads of its rows)."""
    ctx = current()
    tp = ctx.axis_size("tensor") if ctx is not None else 1
    if H % tp == 0 and K % tp == 0:
        return ("batch", None, "heads", None), ("batch", None, "kv_heads", None)
    return ("batch", None, None, None), ("batch", None, None, None)


def attention(q_BTHd, k_BTKd, v_BTKd, *, segment_ids=None, scale=None, implementation="auto", max_segments=64,
              layout: PackedLayout | None = None):
    """layout: `packed_layout(segment_ids)` when the caller computed it already (once for all layers)."""
    impl = resolve_attn_implementation(implementation, q_BTHd.dtype)
    if impl == "xla":
        return attention_reference(q_BTHd, k_BTKd, v_BTKd, segment_ids=segment_ids, scale=scale)
    scale = q_BTHd.shape[-1] ** -0.5 if scale is None else scale
    _Q, _KV = _per_device_names(q_BTHd.shape[2], k_BTKd.shape[2])
    if segment_ids is None:
        causal = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,  # noqa: E731
                                                              implementation="cudnn")
        return per_shard(causal, in_names=(_Q, _KV, _KV), out_names=_Q)(q_BTHd, k_BTKd, v_BTKd)
    # Packed documents: cuDNN's ragged layout skips the cross-document blocks entirely. A row with more than
    # `max_segments` documents falls back to an explicit mask (correct, slower) rather than dropping any.
    layout = packed_layout(segment_ids, max_segments) if layout is None else layout
    slots = layout.tiers  # slot count per tier, smallest first

    def masked(q, k, v, seg, offsets, lengths):
        mask = (seg[:, :, None] == seg[:, None, :])[:, None]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True, implementation="cudnn")

    def packed(i):
        return lambda q, k, v, seg, offsets, lengths: _cudnn_packed(q, k, v, offsets[i], lengths[i], scale)

    def local(q, k, v, seg, *counts_offsets_lengths):
        if layout.counts is None:  # tier fixed on the host: one path, no conditional
            offsets, lengths = counts_offsets_lengths[:len(slots)], counts_offsets_lengths[len(slots):]
            return (packed(0) if slots else masked)(q, k, v, seg, offsets, lengths)
        # the tier of this device's rows: one device's crowded row does not slow the others (no collective inside)
        counts, rest = counts_offsets_lengths[0], counts_offsets_lengths[1:]
        offsets, lengths = rest[:len(slots)], rest[len(slots):]
        branches = [packed(i) for i in range(len(slots))] + [masked]
        return jax.lax.switch(layout_branch(counts, slots), branches, q, k, v, seg, offsets, lengths)

    # Each device runs cuDNN on its own rows with its own rows' layout. Left to XLA's partitioner (cuDNN's custom
    # partitioning), the offsets and lengths did not follow q/k/v's split: on 2 x H200 with one row per GPU the
    # second GPU's gradients were 1.4 off the reference and partly non-finite, and every MoE recipe on two GPUs
    # skipped its steps; one GPU was right.
    counts = () if layout.counts is None else (layout.counts,)
    count_names = () if layout.counts is None else (("batch",),)
    return per_shard(local, in_names=(_Q, _KV, _KV, _ROWS) + count_names + (_ROWS,) * (2 * len(slots)),
                     out_names=_Q)(q_BTHd, k_BTKd, v_BTKd, segment_ids, *counts, *layout.offsets, *layout.lengths)
