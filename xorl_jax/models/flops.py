"""Training FLOPs per token (forward + backward = 3 x forward) for MFU, counting what each token really computes.

- Matmul parameters: 6 x (parameters a token multiplies through). MoE layers count the router, the top-k routed
  experts and the shared expert only (active parameters). The lm_head counts; the embedding lookup does not.
- Causal softmax attention: each token attends to (T+1)/2 keys on average; Q K^T and P V are 2 * H * d flops per
  key each, so forward 4 * H * d * (T+1)/2 and training 3 x that = 6 * H * d * (T+1) per layer (half of the
  non-causal 12 * H * d * T that PaLM-style counts use).
- Gated DeltaNet chunked form (chunk C): per token and value head, forward about 2 * (3*C*dk + 2*C*dv + 3*dk*dv)
  (K K^T, Q K^T, the W/U products, P V, and the state reads/writes), times 3 for training.
"""

from __future__ import annotations


def attention_flops(heads: int, head_dim: int, seq_len: int) -> float:
    return 6.0 * heads * head_dim * (seq_len + 1)


def gdn_flops(value_heads: int, dk: int, dv: int, chunk: int = 64) -> float:
    return 3.0 * value_heads * 2 * (3 * chunk * dk + 2 * chunk * dv + 3 * dk * dv)


def attention_params(hidden: int, heads: int, kv_heads: int, head_dim: int, gated: bool = False) -> int:
    q_out = heads * head_dim * (2 if gated else 1)
    return hidden * q_out + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden


def mlp_params(hidden: int, intermediate: int) -> int:
    return 3 * hidden * intermediate


def moe_active_params(hidden: int, experts: int, top_k: int, intermediate: int, shared: int = 0) -> int:
    active = hidden * experts + top_k * mlp_params(hidden, intermediate)
    if shared:
        active += mlp_params(hidden, shared) + hidden
    return active
