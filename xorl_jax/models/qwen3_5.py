"""Qwen3.5 and Qwen3.5-MoE (text) in Flax NNX: hybrid Gated DeltaNet ("linear_attention") and gated full attention.

Differences from Qwen3: zero-centred RMSNorms (`1 + w`), attention with a sigmoid output gate interleaved per head
in q_proj and partial rotary (`partial_rotary_factor`; text-only mRoPE equals plain RoPE), Gated DeltaNet layers
with per-document state and conv resets, and (MoE) always-renormalised routed experts plus a gated shared expert.
The multimodal wrappers (`qwen3_5`, `qwen3_5_moe`) are read through `text_config`; vision and MTP weights are
skipped. Layers scan over their repeating group (e.g. 3 linear + 1 full attention).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from flax import nnx

from xorl_jax.kernels.attention import AttentionLayout, resolve_attn_implementation
from xorl_jax.layers.attention import Attention
from xorl_jax.layers.gdn import GatedDeltaNet, resolve_gdn_implementation
from xorl_jax.layers.linear import param
from xorl_jax.layers.mlp import MLP
from xorl_jax.layers.moe import MoE, resolve_moe_implementation
from xorl_jax.layers.norm import RMSNorm
from xorl_jax.models import flops
from xorl_jax.models import keymap as km
from xorl_jax.models.common import (HIDDEN, LayerStack, ModelOptions, ModelOutput, causal_lm_cached,
                                    causal_lm_forward, constrain, mlp_residual, rope_theta)
from xorl_jax.models.keymap import attention_maps, lm_globals, mlp_maps, moe_maps

LAYER_TYPES = ("linear_attention", "full_attention")


@dataclasses.dataclass(frozen=True)
class Qwen3_5Config:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layer_types: tuple
    intermediate_size: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    tie_word_embeddings: bool = False
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    # MoE (num_experts == 0: dense Qwen3.5)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    router_aux_loss_coef: float = 0.0

    @classmethod
    def from_hf(cls, hf: dict) -> "Qwen3_5Config":
        text = hf.get("text_config") or hf
        moe = "moe" in (hf.get("model_type") or "")
        L = text["num_hidden_layers"]
        layer_types = text.get("layer_types")
        if layer_types is None:
            interval = text.get("full_attention_interval", 4)
            layer_types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(L)]
        if len(layer_types) != L or any(t not in LAYER_TYPES for t in layer_types):
            raise ValueError(
                f"config.json: layer_types must list {L} entries from {LAYER_TYPES}, got {layer_types}"
            )
        rope = text.get("rope_parameters") or {}
        tie = text.get("tie_word_embeddings", hf.get("tie_word_embeddings", False))
        return cls(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            num_hidden_layers=L,
            num_attention_heads=text["num_attention_heads"],
            num_key_value_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
            head_dim=text.get("head_dim") or 256,
            layer_types=tuple(layer_types),
            intermediate_size=text.get("intermediate_size") or 0,
            rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta(text),
            partial_rotary_factor=float(rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))),
            tie_word_embeddings=bool(tie),
            linear_conv_kernel_dim=text.get("linear_conv_kernel_dim", 4),
            linear_key_head_dim=text.get("linear_key_head_dim", 128),
            linear_value_head_dim=text.get("linear_value_head_dim", 128),
            linear_num_key_heads=text.get("linear_num_key_heads", 16),
            linear_num_value_heads=text.get("linear_num_value_heads", 32),
            num_experts=text.get("num_experts", 0) if moe else 0,
            num_experts_per_tok=text.get("num_experts_per_tok", 0) if moe else 0,
            moe_intermediate_size=text.get("moe_intermediate_size", 0) if moe else 0,
            shared_expert_intermediate_size=text.get("shared_expert_intermediate_size", 0) if moe else 0,
            router_aux_loss_coef=float(text.get("router_aux_loss_coef", 0.0)) if moe else 0.0,
        )

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def layer_kinds(self) -> list[tuple]:
        mlp = "moe" if self.num_experts else "dense"
        return [(t, mlp) for t in self.layer_types]

    def tensor_parallel_divisors(self) -> dict[str, int]:
        return {"num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
                "linear_num_key_heads": self.linear_num_key_heads,
                "linear_num_value_heads": self.linear_num_value_heads}

    def lora_parts(self) -> frozenset[str]:
        parts = {"attention" if t == "full_attention" else "linear_attention" for t in self.layer_types}
        if self.num_experts:
            parts.add("routed_experts")
            if self.shared_expert_intermediate_size:
                parts.add("shared_expert")
        else:
            parts.add("dense_mlp")
        return frozenset(parts)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (active parameters for MoE); see models/flops.py."""
        D = self.hidden_size
        Hk, Hv = self.linear_num_key_heads, self.linear_num_value_heads
        dk, dv = self.linear_key_head_dim, self.linear_value_head_dim
        gdn_params = D * (2 * Hk * dk + Hv * dv) + D * Hv * dv + 2 * D * Hv + Hv * dv * D
        attn_params = flops.attention_params(D, self.num_attention_heads, self.num_key_value_heads, self.head_dim,
                                             gated=True)
        if self.num_experts:
            mlp = flops.moe_active_params(D, self.num_experts, self.num_experts_per_tok, self.moe_intermediate_size,
                                          self.shared_expert_intermediate_size)
        else:
            mlp = flops.mlp_params(D, self.intermediate_size)
        total = 6.0 * self.vocab_size * D
        for t in self.layer_types:
            if t == "linear_attention":
                total += 6.0 * (gdn_params + mlp) + flops.gdn_flops(Hv, dk, dv)
            else:
                total += 6.0 * (attn_params + mlp) + flops.attention_flops(self.num_attention_heads, self.head_dim,
                                                                           seq_len)
        return total


class Qwen3_5DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen3_5Config, kind: tuple, opts: ModelOptions, rngs: nnx.Rngs):
        mixer, mlp = kind
        dt = opts.compute_dtype
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(D, eps, zero_centered=True, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(D, eps, zero_centered=True, rngs=rngs)
        if mixer == "linear_attention":
            self.linear_attn = GatedDeltaNet(
                hidden=D,
                key_heads=cfg.linear_num_key_heads,
                value_heads=cfg.linear_num_value_heads,
                key_dim=cfg.linear_key_head_dim,
                value_dim=cfg.linear_value_head_dim,
                conv_kernel=cfg.linear_conv_kernel_dim,
                eps=eps,
                dtype=dt,
                implementation=opts.gdn_implementation,
                rngs=rngs,
            )
        else:
            self.self_attn = Attention(
                hidden=D,
                heads=cfg.num_attention_heads,
                kv_heads=cfg.num_key_value_heads,
                head_dim=cfg.head_dim,
                eps=eps,
                gated=True,
                zero_centered_norm=True,
                dtype=dt,
                implementation=opts.attn_implementation,
                rngs=rngs,
            )
        if mlp == "moe":
            self.mlp = MoE(
                hidden=D,
                num_experts=cfg.num_experts,
                top_k=cfg.num_experts_per_tok,
                intermediate=cfg.moe_intermediate_size,
                norm_topk_prob=True,  # Qwen3.5-MoE always renormalises the top-k weights
                shared_intermediate=cfg.shared_expert_intermediate_size,
                router_fp32=opts.router_fp32,
                train_router=opts.train_router,
                dtype=dt,
                implementation=opts.moe_implementation,
                ep_exchange=opts.ep_exchange,
                ep_capacity_factor=opts.ep_capacity_factor,
                rngs=rngs,
            )
        else:
            self.mlp = MLP(hidden=D, intermediate=cfg.intermediate_size, dtype=dt, rngs=rngs)

    def __call__(self, carry, *, cos, sin, segment_ids, valid, attn_layout=None):
        h, stats = carry
        h = constrain(h, HIDDEN)
        x = self.input_layernorm(h)
        if hasattr(self, "linear_attn"):
            y = self.linear_attn(x, segment_ids, valid)
        else:
            y = self.self_attn(x, cos, sin, segment_ids, attn_layout)
        return mlp_residual(self, constrain(h + y.astype(h.dtype), HIDDEN), stats, valid)

    def cached(self, carry, cache, *, cos, sin, segment_ids, valid, cache_valid=None, attn_layout=None):
        """The layer for sampling: (carry, its cache or None for prefill) -> (carry, its new cache entries):
        k, v for attention layers, the recurrent state and conv window for Gated DeltaNet layers."""
        h, stats = carry
        h = constrain(h, HIDDEN)
        x = self.input_layernorm(h)
        if hasattr(self, "linear_attn"):
            y, update = self.linear_attn.cached(x, cache, segment_ids=segment_ids, valid=valid)
        else:
            y, update = self.self_attn.cached(x, cos, sin, cache, segment_ids=segment_ids, cache_valid=cache_valid,
                                              layout=attn_layout)
        return mlp_residual(self, h + y.astype(h.dtype), stats, valid), update


class Qwen3_5ForCausalLM(nnx.Module):
    """Qwen3.5 (dense MLP) and, through the config, Qwen3.5-MoE. Call: model(ids, positions, segment_ids)."""

    config_class = Qwen3_5Config

    def __init__(self, cfg: Qwen3_5Config, opts: ModelOptions = ModelOptions(), *, rngs: nnx.Rngs):
        opts = dataclasses.replace(
            opts,
            attn_implementation=resolve_attn_implementation(opts.attn_implementation, opts.dtype),
            moe_implementation=resolve_moe_implementation(opts.moe_implementation) if cfg.num_experts else "eager",
            gdn_implementation=resolve_gdn_implementation(opts.gdn_implementation),
        )
        self.config = cfg
        self.options = opts
        D, V = cfg.hidden_size, cfg.vocab_size
        self.embed_tokens = param(rngs, (V, D), ("vocab", "embed"))
        self.layers = LayerStack(cfg.layer_kinds, lambda kind, r: Qwen3_5DecoderLayer(cfg, kind, opts, r), rngs=rngs)
        self.norm = RMSNorm(D, cfg.rms_norm_eps, zero_centered=True, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (D, V), ("embed", "vocab"))
        self.num_moe_layers = cfg.num_hidden_layers if cfg.num_experts else 0

    def head_weight(self, dtype=None):
        w = self.embed_tokens[...].T if self.config.tie_word_embeddings else self.lm_head[...]
        return w if dtype is None else w.astype(dtype)

    def __call__(self, input_ids, positions=None, segment_ids=None, *, return_hidden: bool = False,
                 layer_transform=None, attention_layout: AttentionLayout | None = None) -> ModelOutput:
        return causal_lm_forward(self, input_ids, positions, segment_ids, return_hidden,
                                 rotary_dim=self.config.rotary_dim, layer_transform=layer_transform,
                                 attention_layout=attention_layout)

    def cached_forward(self, input_ids, positions, segment_ids, caches, cache_valid=None, *, hidden=False, scan=None):
        """Sampling's forward; see `Qwen3ForCausalLM.cached_forward`."""
        return causal_lm_cached(self, input_ids, positions, segment_ids, caches, cache_valid,
                                rotary_dim=self.config.rotary_dim, hidden=hidden, scan=scan)

    @staticmethod
    def hf_key_map(cfg: Qwen3_5Config, *, expert_layout: str = "fused", root: str = "model") -> km.FamilyKeyMap:
        def layer_maps(i):
            mixer, mlp = cfg.layer_kinds[i]
            maps = [
                km.identity(("input_layernorm", "weight"), "input_layernorm.weight"),
                km.identity(("post_attention_layernorm", "weight"), "post_attention_layernorm.weight"),
            ]
            if mixer == "linear_attention":
                maps += gdn_maps(cfg.linear_num_value_heads)
            else:
                maps += attention_maps(cfg.num_attention_heads, cfg.num_key_value_heads)
            if mlp == "moe":
                maps += moe_maps(cfg.num_experts, expert_layout) + mlp_maps(
                    ("mlp", "shared_expert"), "mlp.shared_expert"
                ) + [km.linear(("mlp", "shared_expert_gate"), "mlp.shared_expert_gate.weight")]
            else:
                maps += mlp_maps(("mlp",), "mlp")
            return maps

        return km.FamilyKeyMap(
            f"{root}.layers",
            lm_globals(cfg.tie_word_embeddings, root),
            layer_maps,
            skipped_prefixes=("mtp.", "model.visual.", "visual."),
        )


class Qwen3_5MoeForCausalLM(Qwen3_5ForCausalLM):
    """Qwen3.5-MoE: the same module with MoE blocks (routed experts + gated shared expert) in every layer."""


def gdn_maps(value_heads: int) -> list:
    p = "linear_attn."
    return [
        km.linear(("linear_attn", "in_proj_qkv"), p + "in_proj_qkv.weight"),
        km.linear_heads_out(("linear_attn", "in_proj_z"), p + "in_proj_z.weight", value_heads),
        km.linear(("linear_attn", "in_proj_b"), p + "in_proj_b.weight"),
        km.linear(("linear_attn", "in_proj_a"), p + "in_proj_a.weight"),
        km.TensorMap(  # depthwise conv1d weight [C, 1, Kc] <-> ours [C, Kc]
            ("linear_attn", "conv1d"),
            (p + "conv1d.weight",),
            lambda a: a[0][:, 0, :],
            lambda x: [np.ascontiguousarray(x[:, None, :])],
        ),
        km.identity(("linear_attn", "dt_bias"), p + "dt_bias"),
        km.identity(("linear_attn", "A_log"), p + "A_log"),
        km.identity(("linear_attn", "norm", "weight"), p + "norm.weight"),
        km.linear_heads_in(("linear_attn", "out_proj"), p + "out_proj.weight", value_heads),
    ]
