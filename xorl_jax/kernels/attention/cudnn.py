"""cuDNN's fused attention on NVIDIA GPUs (bf16/fp16), called per device on its own rows: causal, or for packed
documents in cuDNN's packed ("ragged") layout (layout.PackedLayout), which skips cross-document blocks; a row with
more documents than the layout holds falls back to an explicit mask."""

from __future__ import annotations

import jax

from xorl_jax.kernels.attention.layout import PackedLayout, layout_branch, packed_layout
from xorl_jax.parallel.rules import current, per_shard


def _cudnn_packed(q, k, v, offsets, lengths, scale):
    from jax._src.cudnn.fused_attention_stablehlo import MaskType
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention

    return cudnn_attention(
        q, k, v, None, None, lengths, lengths, offsets, offsets,
        scale=scale, mask_type=MaskType.PADDING_CAUSAL, qkv_layout="BTNH",
    )


_ROWS = ("batch", None)


def _per_device_names(H: int, K: int):
    """Logical names of q and k/v for the per-device cuDNN call: rows over the batch axes, heads over `tensor` when
    both head counts divide it (else every device takes all heads of its rows)."""
    ctx = current()
    tp = ctx.axis_size("tensor") if ctx is not None else 1
    if H % tp == 0 and K % tp == 0:
        return ("batch", None, "heads", None), ("batch", None, "kv_heads", None)
    return ("batch", None, None, None), ("batch", None, None, None)


def cudnn_attention(q_BTHd, k_BTKd, v_BTKd, *, segment_ids=None, scale=None, max_segments=64,
                    layout: PackedLayout | None = None):
    """layout: `packed_layout(segment_ids)` when the caller computed it already (once for all layers)."""
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
