"""Qwen3 (dense) and Qwen3-MoE in Flax NNX, matching HF transformers' `qwen3` / `qwen3_moe` numerics.

Block: h = x + Attn(RMSNorm(x)); out = h + MLP(RMSNorm(h)), where MLP is a SwiGLU or a sparse MoE block
(`decoder_sparse_step`, `mlp_only_layers`). Final norm, then an lm_head (tied to the embedding when the config says).
Shapes: B batch, T tokens, D hidden, V vocab, E experts.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from xorl_jax.layers.attention import Attention
from xorl_jax.layers.linear import param
from xorl_jax.layers.mlp import MLP
from xorl_jax.layers.moe import MoE, resolve_moe_implementation
from xorl_jax.layers.norm import RMSNorm
from xorl_jax.kernels.attention import AttentionLayout, resolve_attn_implementation
from xorl_jax.models.common import (HIDDEN, LayerStack, ModelOptions, ModelOutput, causal_lm_cached, causal_lm_forward,
                                    constrain, mlp_residual, rope_theta)
from xorl_jax.models import flops
from xorl_jax.models import keymap as km
from xorl_jax.models.keymap import attention_maps, lm_globals, mlp_maps, moe_maps


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    # MoE (num_experts == 0: dense Qwen3)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple = ()
    router_aux_loss_coef: float = 0.0

    @classmethod
    def from_hf(cls, hf: dict) -> "Qwen3Config":
        if hf.get("use_sliding_window"):
            raise ValueError("config.json: use_sliding_window=true is not supported; set it to false")
        D, H = hf["hidden_size"], hf["num_attention_heads"]
        moe = hf.get("model_type") == "qwen3_moe"
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=D,
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=H,
            num_key_value_heads=hf.get("num_key_value_heads") or H,
            head_dim=hf.get("head_dim") or D // H,
            intermediate_size=hf["intermediate_size"],
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta(hf),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            num_experts=(hf.get("num_experts") or hf.get("num_local_experts") or 0) if moe else 0,
            num_experts_per_tok=hf.get("num_experts_per_tok", 0) if moe else 0,
            moe_intermediate_size=hf.get("moe_intermediate_size", 0) if moe else 0,
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            decoder_sparse_step=hf.get("decoder_sparse_step", 1) or 1,
            mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()),
            router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.0)) if moe else 0.0,
        )

    def is_moe_layer(self, i: int) -> bool:
        return (
            self.num_experts > 0 and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0
        )

    @property
    def layer_kinds(self) -> list[str]:
        return ["moe" if self.is_moe_layer(i) else "dense" for i in range(self.num_hidden_layers)]

    def tensor_parallel_divisors(self) -> dict[str, int]:
        return {"num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads}

    def lora_parts(self) -> frozenset[str]:
        return frozenset({"attention"} | {"routed_experts" if k == "moe" else "dense_mlp" for k in self.layer_kinds})

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (active parameters for MoE); see models/flops.py."""
        D = self.hidden_size
        attn = flops.attention_params(D, self.num_attention_heads, self.num_key_value_heads, self.head_dim)
        matmul = self.vocab_size * D
        for kind in self.layer_kinds:
            matmul += attn
            if kind == "moe":
                matmul += flops.moe_active_params(D, self.num_experts, self.num_experts_per_tok,
                                                  self.moe_intermediate_size)
            else:
                matmul += flops.mlp_params(D, self.intermediate_size)
        return 6.0 * matmul + self.num_hidden_layers * flops.attention_flops(
            self.num_attention_heads, self.head_dim, seq_len)


class Qwen3DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen3Config, kind: str, opts: ModelOptions, rngs: nnx.Rngs):
        dt = opts.compute_dtype
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs)
        self.self_attn = Attention(
            hidden=cfg.hidden_size,
            heads=cfg.num_attention_heads,
            kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
            eps=cfg.rms_norm_eps,
            dtype=dt,
            implementation=opts.attn_implementation,
            rngs=rngs,
        )
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs)
        if kind == "moe":
            self.mlp = MoE(
                hidden=cfg.hidden_size,
                num_experts=cfg.num_experts,
                top_k=cfg.num_experts_per_tok,
                intermediate=cfg.moe_intermediate_size,
                norm_topk_prob=cfg.norm_topk_prob,
                router_fp32=opts.router_fp32,
                train_router=opts.train_router,
                dtype=dt,
                implementation=opts.moe_implementation,
                ep_exchange=opts.ep_exchange,
                ep_capacity_factor=opts.ep_capacity_factor,
                rngs=rngs,
            )
        else:
            self.mlp = MLP(hidden=cfg.hidden_size, intermediate=cfg.intermediate_size, dtype=dt, rngs=rngs)

    def __call__(self, carry, *, cos, sin, segment_ids, valid, attn_layout=None):
        h, stats = carry
        h = constrain(h, HIDDEN)
        y = self.self_attn(self.input_layernorm(h), cos, sin, segment_ids, attn_layout)
        return mlp_residual(self, constrain(h + y.astype(h.dtype), HIDDEN), stats, valid)

    def cached(self, carry, cache, *, cos, sin, segment_ids, valid, cache_valid=None, attn_layout=None):
        """The layer for sampling: (carry, its KV cache or None for prefill) -> (carry, new tokens' k, v)."""
        h, stats = carry
        h = constrain(h, HIDDEN)
        y, update = self.self_attn.cached(self.input_layernorm(h), cos, sin, cache, segment_ids=segment_ids,
                                          cache_valid=cache_valid, layout=attn_layout)
        return mlp_residual(self, h + y.astype(h.dtype), stats, valid), update


class Qwen3ForCausalLM(nnx.Module):
    """Qwen3 dense and Qwen3-MoE causal LM. Call: model(input_ids, positions, segment_ids) -> ModelOutput."""

    config_class = Qwen3Config

    def __init__(self, cfg: Qwen3Config, opts: ModelOptions = ModelOptions(), *, rngs: nnx.Rngs):
        # Resolve "auto" backends once, at build time, so the choice is visible and fixed for the run.
        opts = dataclasses.replace(
            opts,
            attn_implementation=resolve_attn_implementation(opts.attn_implementation, opts.dtype),
            moe_implementation=resolve_moe_implementation(opts.moe_implementation) if cfg.num_experts else "eager",
        )
        self.config = cfg
        self.options = opts
        D, V = cfg.hidden_size, cfg.vocab_size
        self.embed_tokens = param(rngs, (V, D), ("vocab", "embed"))
        self.layers = LayerStack(cfg.layer_kinds, lambda kind, r: Qwen3DecoderLayer(cfg, kind, opts, r), rngs=rngs)
        self.norm = RMSNorm(D, cfg.rms_norm_eps, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (D, V), ("embed", "vocab"))
        self.num_moe_layers = sum(k == "moe" for k in cfg.layer_kinds)

    def head_weight(self, dtype=None):
        """The output projection [D, V] (the transposed embedding when tied)."""
        w = self.embed_tokens[...].T if self.config.tie_word_embeddings else self.lm_head[...]
        return w if dtype is None else w.astype(dtype)

    def __call__(self, input_ids, positions=None, segment_ids=None, *, return_hidden: bool = False,
                 layer_transform=None, attention_layout: AttentionLayout | None = None) -> ModelOutput:
        """`layer_transform` (models.common.LayerTransform) rewrites each scanned layer group's parameters inside
        the layer scan (LoRA merges its adapters there, one group at a time). `attention_layout` (static): the
        packed attention layout the host planned for this batch (kernels.attention.AttentionLayout)."""
        return causal_lm_forward(self, input_ids, positions, segment_ids, return_hidden, rotary_dim=None,
                                 layer_transform=layer_transform, attention_layout=attention_layout)

    def cached_forward(self, input_ids, positions, segment_ids, caches, cache_valid=None, *, hidden=False, scan=None):
        """Sampling's forward (xorl_jax.sampling): last position's logits [B, V] fp32 (hidden: every position's
        final-norm hidden states instead) and the new cache entries of every layer. caches None: prefill; else
        decode against them (see `causal_lm_cached`)."""
        return causal_lm_cached(self, input_ids, positions, segment_ids, caches, cache_valid, rotary_dim=None,
                                hidden=hidden, scan=scan)

    @staticmethod
    def hf_key_map(cfg: Qwen3Config, *, expert_layout: str = "fused", root: str = "model") -> km.FamilyKeyMap:
        def layer_maps(i):
            maps = attention_maps(cfg.num_attention_heads, cfg.num_key_value_heads) + [
                km.identity(("input_layernorm", "weight"), "input_layernorm.weight"),
                km.identity(("post_attention_layernorm", "weight"), "post_attention_layernorm.weight"),
            ]
            if cfg.is_moe_layer(i):
                maps += moe_maps(cfg.num_experts, expert_layout)
            else:
                maps += mlp_maps(("mlp",), "mlp")
            return maps

        return km.FamilyKeyMap(f"{root}.layers", lm_globals(cfg.tie_word_embeddings, root), layer_maps)


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    """Qwen3-MoE: the same module as Qwen3 with sparse MoE blocks (chosen by the config)."""
