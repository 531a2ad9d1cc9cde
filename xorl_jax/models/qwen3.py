"""Qwen3 (dense) and Qwen3-MoE in Flax NNX, matching HF transformers' `qwen3` / `qwen3_moe` numerics.

Block: h = x + Attn(RMSNorm(x)); out = h + MLP(RMSNorm(h)), where MLP is a SwiGLU or a sparse MoE block
(`decoder_sparse_step`, `mlp_only_layers`). Final norm, then an lm_head (tied to the embedding when the config says).
Shapes: B batch, T tokens, D hidden, V vocab, E experts.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from xorl_jax.layers.attention import Attention
from xorl_jax.layers.linear import cast, param
from xorl_jax.layers.mlp import MLP
from xorl_jax.layers.moe import MoE, load_balancing_loss, resolve_moe_implementation
from xorl_jax.layers.norm import RMSNorm
from xorl_jax.layers.rope import rope_cos_sin
from xorl_jax.kernels.attention import packed_layout, resolve_attn_implementation
from xorl_jax.models.common import HIDDEN, LayerStack, ModelOptions, ModelOutput, constrain, rope_theta
from xorl_jax.models import flops
from xorl_jax.models import keymap as km
from xorl_jax.parallel.context import context_parallel, from_ring_order, to_ring_order


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
        h = constrain(h + y.astype(h.dtype), HIDDEN)
        x = self.post_attention_layernorm(h)
        if isinstance(self.mlp, MoE):
            y, layer_stats = self.mlp(x, valid)
            stats = stats + layer_stats
        else:
            y = self.mlp(x)
        return h + y.astype(h.dtype), stats


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
                 layer_transform=None, doc_slots: int | None = None) -> ModelOutput:
        """`layer_transform` (models.common.LayerTransform) rewrites each scanned layer group's parameters inside
        the layer scan (LoRA merges its adapters there, one group at a time). `doc_slots` (static): the packed
        attention layout the host chose for this batch (`kernels.attention.document_slots`)."""
        return causal_lm_forward(self, input_ids, positions, segment_ids, return_hidden, rotary_dim=None,
                                 layer_transform=layer_transform, doc_slots=doc_slots)

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


def lm_globals(tied: bool, prefix: str) -> tuple:
    maps = [
        km.identity(("embed_tokens",), f"{prefix}.embed_tokens.weight"),
        km.identity(("norm", "weight"), f"{prefix}.norm.weight"),
    ]
    if not tied:
        maps.append(km.linear(("lm_head",), "lm_head.weight"))
    return tuple(maps)


def attention_maps(heads: int, kv_heads: int) -> list:
    return [
        km.linear_heads_out(("self_attn", "q_proj"), "self_attn.q_proj.weight", heads),
        km.linear_heads_out(("self_attn", "k_proj"), "self_attn.k_proj.weight", kv_heads),
        km.linear_heads_out(("self_attn", "v_proj"), "self_attn.v_proj.weight", kv_heads),
        km.linear_heads_in(("self_attn", "o_proj"), "self_attn.o_proj.weight", heads),
        km.identity(("self_attn", "q_norm", "weight"), "self_attn.q_norm.weight"),
        km.identity(("self_attn", "k_norm", "weight"), "self_attn.k_norm.weight"),
    ]


def mlp_maps(ours: tuple, hf: str) -> list:
    return [
        km.fused_gate_up(ours + ("gate_up_proj",), f"{hf}.gate_proj.weight", f"{hf}.up_proj.weight"),
        km.linear(ours + ("down_proj",), f"{hf}.down_proj.weight"),
    ]


def moe_maps(num_experts: int, expert_layout: str) -> list:
    return [
        km.linear(("mlp", "router"), "mlp.gate.weight"),
        km.experts_gate_up(("mlp", "gate_up_proj"), "mlp.experts", num_experts, expert_layout),
        km.experts_down(("mlp", "down_proj"), "mlp.experts", num_experts, expert_layout),
    ]


def causal_lm_forward(model, input_ids, positions, segment_ids, return_hidden, *, rotary_dim, num_experts=None,
                      layer_transform=None, doc_slots=None):
    """Embedding -> scanned layers -> final norm -> logits; shared by the Qwen families. doc_slots: see
    `kernels.attention.document_slots` (None: the packed attention layout's tier is picked on the device)."""
    cfg, opts = model.config, model.options
    B, T = input_ids.shape
    dt = opts.compute_dtype
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    cp = context_parallel()
    if cp.ring > 1:  # ring attention's load balance: the layers run on the sequence in ring order (parallel/context)
        input_ids, positions = to_ring_order(input_ids), to_ring_order(positions)
        segment_ids = None if segment_ids is None else to_ring_order(segment_ids)
    valid = jnp.ones((B, T), bool) if segment_ids is None else segment_ids != 0
    h = cast(model.embed_tokens, dt)[input_ids]
    cos, sin = rope_cos_sin(positions, rotary_dim or cfg.head_dim, cfg.rope_theta, dt)
    E = (num_experts if num_experts is not None else cfg.num_experts) or 1
    stats = jnp.zeros((2, E), jnp.float32)
    # The documents' attention layout once for all layers (and outside remat: not recomputed in the backward).
    packed = segment_ids is not None and opts.attn_implementation == "cudnn" and not cp.active
    attn_layout = packed_layout(segment_ids, slots=doc_slots) if packed else None
    h, stats = model.layers(
        (h, stats), remat_policy=opts.remat_policy, layer_transform=layer_transform, scan=opts.scan_layers,
        saved_names=opts.remat_saved_names,
        cos=cos, sin=sin, segment_ids=segment_ids, valid=valid, attn_layout=attn_layout,
    )
    h = model.norm(h)
    aux = jnp.zeros((), jnp.float32)
    if model.num_moe_layers:
        aux = load_balancing_loss(stats, model.num_moe_layers, jnp.sum(valid))
    if return_hidden:  # in ring order under ring attention: the loss takes its labels through to_ring_order
        return ModelOutput(hidden_states=h, aux_loss=aux)
    logits = jnp.einsum("btd,dv->btv", h, model.head_weight(dt), preferred_element_type=jnp.float32)
    return ModelOutput(logits=from_ring_order(logits) if cp.ring > 1 else logits, aux_loss=aux)
