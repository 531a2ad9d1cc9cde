"""Causal, document-masked (packed) multi-head attention with GQA.

Backends (`attn_implementation`):
- `xla`: the jnp reference (reference.py): fp32 scores and softmax, causal & same-segment mask. Runs everywhere.
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")` (flash attention in cuDNN) on NVIDIA GPUs
  (cudnn.py), packed documents in cuDNN's packed layout (planned in layout.py).
- `auto`: cudnn on NVIDIA GPUs, xla elsewhere.

Shapes: B batch, T tokens, H query heads, K kv heads (H % K == 0), d head dim.
segment_ids [B, T] int32: tokens attend only to earlier tokens of the same segment (documents of a packed row).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xorl_jax.kernels.attention.cudnn import cudnn_attention
from xorl_jax.kernels.attention.layout import (MASKED, SMALL_SEGMENTS, AttentionLayout, LayoutPlanner,  # noqa: F401
                                               PackedLayout, document_slots, host_tiers, layout_branch,
                                               packed_layout, packed_layout_for, segment_layout, segment_tiers,
                                               slots_for)
from xorl_jax.kernels.attention.reference import attention_reference  # noqa: F401

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


def layout_planner(options) -> LayoutPlanner | None:
    """The host's planner of packed attention layouts for a model of these ModelOptions: cuDNN attention fixes each
    batch's layout on the host (among `attn_slot_sizes`); None when attention does not take one."""
    if resolve_attn_implementation(options.attn_implementation, options.dtype) != "cudnn":
        return None
    return LayoutPlanner(options.attn_slot_sizes)


def attention(q_BTHd, k_BTKd, v_BTKd, *, segment_ids=None, scale=None, implementation="auto", max_segments=64,
              layout: PackedLayout | None = None):
    """layout: `packed_layout(segment_ids)` when the caller computed it already (once for all layers)."""
    impl = resolve_attn_implementation(implementation, q_BTHd.dtype)
    if impl == "xla":
        return attention_reference(q_BTHd, k_BTKd, v_BTKd, segment_ids=segment_ids, scale=scale)
    return cudnn_attention(q_BTHd, k_BTKd, v_BTKd, segment_ids=segment_ids, scale=scale, max_segments=max_segments,
                           layout=layout)
