"""The interface a model family implements: everything the rest of xorl_jax uses of a model.

A family is a config class (`FamilyConfig`, read from a HF config.json) and a model class (`CausalLM`) in one module
under models/, listed by model_type in models/registry.py. The trainer, the dry run, the HF loader and exporter
(checkpoint/), LoRA (lora.py, lora_names.py) and the mesh check (parallel/mesh.py) go through these members only,
so none of them names a family; docs/ADDING_A_MODEL.md walks through a new one.

No JAX here (the config loader checks LoRA names through `FamilyConfig.lora_parts` before the run starts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    from xorl_jax.models.common import LayerStack, ModelOptions, ModelOutput
    from xorl_jax.models.keymap import FamilyKeyMap


@runtime_checkable
class FamilyConfig(Protocol):
    """A family's architecture: a frozen dataclass built from config.json by `from_hf`."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_experts: int  # routed experts of an MoE layer; 0 without any (expert parallelism must divide it)
    tie_word_embeddings: bool  # the export writes it; head_weight follows it

    @classmethod
    def from_hf(cls, hf: dict) -> FamilyConfig:
        """From a config.json dict (a multimodal wrapper's text model through its text_config); ValueError (one
        line naming the field) for what the family does not support, KeyError for a missing required field."""
        ...

    @property
    def layer_kinds(self) -> Sequence[Any]:
        """What each decoder layer is (hashable values); the smallest repeating pattern is one layer-scan step."""
        ...

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token at this sequence length (active parameters for MoE; models/flops.py)."""
        ...

    def tensor_parallel_divisors(self) -> dict[str, int]:
        """{config.json field: count} that tensor parallelism splits, so train.tensor_parallel_size must divide
        each (attention heads, key/value heads, ...)."""
        ...

    def lora_parts(self) -> frozenset[str]:
        """The layer parts this model has, of lora_names.PARTS ("attention", "linear_attention", "dense_mlp",
        "shared_expert", "routed_experts"): the LoRA target names it offers. Pure arithmetic on the config."""
        ...


@runtime_checkable
class CausalLM(Protocol):
    """A family's model, a Flax NNX module built as `cls(config, ModelOptions, rngs=nnx.Rngs(...))`."""

    config_class: ClassVar[type]  # its FamilyConfig
    config: FamilyConfig
    options: ModelOptions  # the options it was built with, "auto" backends resolved
    layers: LayerStack  # the decoder layers (models.common.LayerStack: `pattern`, `repeats`, state under `groups`)
    num_moe_layers: int

    def __call__(self, input_ids, positions=None, segment_ids=None, *, return_hidden: bool = False,
                 layer_transform=None, attention_layout=None) -> ModelOutput:
        """Logits (or, with return_hidden, the final-norm hidden states for a chunked loss) and the MoE aux loss.
        `segment_ids` packs documents (0 = padding); `layer_transform` rewrites each scan step's parameters (LoRA);
        `attention_layout` (kernels.attention.AttentionLayout, static) is the packed attention layout the host planned."""
        ...

    def head_weight(self, dtype=None):
        """The output projection [hidden, vocab] (the transposed embedding when tied), for the chunked loss."""
        ...

    @staticmethod
    def hf_key_map(cfg, *, expert_layout: str = "fused", root: str = "model") -> FamilyKeyMap:
        """HF tensor names <-> parameters (models/keymap.py): loading, conversion and export all use it."""
        ...
