"""HF <-> xorl_jax parameter maps as data: which HF tensors make one of our parameters, and how.

A family lists `TensorMap`s: our parameter path (relative to a layer, or to the model for globals), the HF keys
(relative to the same prefix) and a pair of pure numpy transforms. The same maps serve loading for training,
`convert to-orbax` and `convert to-hf`, so import and export cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from xorl_jax.models.host_copy import contiguous


@dataclasses.dataclass(frozen=True)
class TensorMap:
    ours: tuple  # path of our parameter, e.g. ("self_attn", "q_proj")
    hf: tuple  # HF keys, e.g. ("self_attn.q_proj.weight",)
    to_ours: Callable[[Sequence[np.ndarray]], np.ndarray]
    to_hf: Callable[[np.ndarray], Sequence[np.ndarray]]


def identity(ours, hf_key) -> TensorMap:
    return TensorMap(ours, (hf_key,), lambda a: a[0], lambda x: [x])


def linear(ours, hf_key) -> TensorMap:
    """HF Linear weight [out, in] <-> our kernel [in, out]."""
    return TensorMap(ours, (hf_key,), lambda a: a[0].T, lambda x: [contiguous(x.T)])


def linear_heads_out(ours, hf_key, heads: int) -> TensorMap:
    """HF [H*e, D] <-> ours [D, H, e] (q/k/v projections; e may be 2*head_dim for a fused query+gate)."""

    def to_ours(a):
        w = a[0]  # a view (no copy): the caller copies it into place
        return w.reshape(heads, w.shape[0] // heads, w.shape[1]).transpose(2, 0, 1)

    def to_hf(x):
        return [contiguous(x.reshape(x.shape[0], -1).T)]

    return TensorMap(ours, (hf_key,), to_ours, to_hf)


def linear_heads_in(ours, hf_key, heads: int) -> TensorMap:
    """HF [D, H*e] <-> ours [H, e, D] (o_proj)."""

    def to_ours(a):
        w = a[0]
        return w.reshape(w.shape[0], heads, w.shape[1] // heads).transpose(1, 2, 0)

    def to_hf(x):
        return [contiguous(x.reshape(-1, x.shape[-1]).T)]

    return TensorMap(ours, (hf_key,), to_ours, to_hf)


def fused_gate_up(ours, gate_key, up_key) -> TensorMap:
    """HF gate_proj, up_proj [F, D] each <-> ours [D, 2, F] (index 0 = gate)."""
    return TensorMap(
        ours,
        (gate_key, up_key),
        lambda a: np.stack([a[0].T, a[1].T], axis=1),
        lambda x: [contiguous(x[:, 0].T), contiguous(x[:, 1].T)],
    )


def experts_gate_up(ours, prefix: str, num_experts: int, layout: str) -> TensorMap:
    """Routed experts' gate/up <-> ours [E, D, 2, F].

    layout "fused": transformers 5.x `{prefix}.gate_up_proj` [E, 2F, D] (gate rows first).
    layout "per_expert": `{prefix}.{e}.gate_proj.weight` and `.up_proj.weight` [F, D] per expert (hub layout).
    """
    if layout == "fused":

        def to_ours(a):
            E, F2, D = a[0].shape
            return a[0].reshape(E, 2, F2 // 2, D).transpose(0, 3, 1, 2)

        def to_hf(x):
            E, D, _, F = x.shape
            return [contiguous(x.transpose(0, 2, 3, 1)).reshape(E, 2 * F, D)]

        return TensorMap(ours, (f"{prefix}.gate_up_proj",), to_ours, to_hf)
    keys = tuple(f"{prefix}.{e}.gate_proj.weight" for e in range(num_experts)) + tuple(
        f"{prefix}.{e}.up_proj.weight" for e in range(num_experts)
    )

    def to_ours_pe(a):
        gate, up = np.stack(a[:num_experts]), np.stack(a[num_experts:])  # [E, F, D]
        return np.stack([gate, up], axis=1).transpose(0, 3, 1, 2)

    def to_hf_pe(x):
        t = x.transpose(0, 2, 3, 1)  # [E, 2, F, D]
        return [contiguous(t[e, 0]) for e in range(num_experts)] + [
            contiguous(t[e, 1]) for e in range(num_experts)
        ]

    return TensorMap(ours, keys, to_ours_pe, to_hf_pe)


def experts_down(ours, prefix: str, num_experts: int, layout: str) -> TensorMap:
    """Routed experts' down projection <-> ours [E, F, D]. fused: [E, D, F]; per_expert: [D, F] each."""
    if layout == "fused":
        return TensorMap(
            ours,
            (f"{prefix}.down_proj",),
            lambda a: a[0].transpose(0, 2, 1),
            lambda x: [contiguous(x.transpose(0, 2, 1))],
        )
    keys = tuple(f"{prefix}.{e}.down_proj.weight" for e in range(num_experts))
    return TensorMap(
        ours,
        keys,
        lambda a: np.stack(a).transpose(0, 2, 1),
        lambda x: [contiguous(x[e].T) for e in range(num_experts)],
    )


@dataclasses.dataclass(frozen=True)
class FamilyKeyMap:
    """Everything the loader/exporter needs for one model instance."""

    layer_prefix: str  # e.g. "model.layers" (layer i lives under f"{layer_prefix}.{i}.")
    globals: tuple  # TensorMaps relative to the checkpoint root
    layer_maps: Callable[[int], Sequence[TensorMap]]  # layer index -> its TensorMaps
    skipped_prefixes: tuple = ()  # HF keys deliberately not loaded (vision tower, MTP head), logged once


# ---------------------------------------------------------------------- pieces of HF decoder layers
# Shared by the families whose HF checkpoints name their layers this way (Qwen3, Qwen3-MoE, Qwen3.5).
def lm_globals(tied: bool, prefix: str) -> tuple:
    maps = [
        identity(("embed_tokens",), f"{prefix}.embed_tokens.weight"),
        identity(("norm", "weight"), f"{prefix}.norm.weight"),
    ]
    if not tied:
        maps.append(linear(("lm_head",), "lm_head.weight"))
    return tuple(maps)


def attention_maps(heads: int, kv_heads: int) -> list:
    return [
        linear_heads_out(("self_attn", "q_proj"), "self_attn.q_proj.weight", heads),
        linear_heads_out(("self_attn", "k_proj"), "self_attn.k_proj.weight", kv_heads),
        linear_heads_out(("self_attn", "v_proj"), "self_attn.v_proj.weight", kv_heads),
        linear_heads_in(("self_attn", "o_proj"), "self_attn.o_proj.weight", heads),
        identity(("self_attn", "q_norm", "weight"), "self_attn.q_norm.weight"),
        identity(("self_attn", "k_norm", "weight"), "self_attn.k_norm.weight"),
    ]


def mlp_maps(ours: tuple, hf: str) -> list:
    return [
        fused_gate_up(ours + ("gate_up_proj",), f"{hf}.gate_proj.weight", f"{hf}.up_proj.weight"),
        linear(ours + ("down_proj",), f"{hf}.down_proj.weight"),
    ]


def moe_maps(num_experts: int, expert_layout: str) -> list:
    return [
        linear(("mlp", "router"), "mlp.gate.weight"),
        experts_gate_up(("mlp", "gate_up_proj"), "mlp.experts", num_experts, expert_layout),
        experts_down(("mlp", "down_proj"), "mlp.experts", num_experts, expert_layout),
    ]
