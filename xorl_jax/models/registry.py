"""model_type (from a checkpoint's config.json) -> model class. The trainer knows no family beyond this table."""

from __future__ import annotations

import importlib

from xorl_jax.errors import CheckpointError

# model_type -> "module:Class". Qwen3.5 multimodal wrappers (qwen3_5, qwen3_5_moe) are read through text_config.
MODEL_TYPES = {
    "qwen3": "xorl_jax.models.qwen3:Qwen3ForCausalLM",
    "qwen3_moe": "xorl_jax.models.qwen3:Qwen3MoeForCausalLM",
    "qwen3_5": "xorl_jax.models.qwen3_5:Qwen3_5ForCausalLM",
    "qwen3_5_text": "xorl_jax.models.qwen3_5:Qwen3_5ForCausalLM",
    "qwen3_5_moe": "xorl_jax.models.qwen3_5:Qwen3_5MoeForCausalLM",
    "qwen3_5_moe_text": "xorl_jax.models.qwen3_5:Qwen3_5MoeForCausalLM",
}


def model_class(hf_config: dict):
    """The model class for a HF config dict; CheckpointError (an input error) for a model_type not in the table."""
    model_type = hf_config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"config.json: model_type {model_type!r} is not supported (supported: {', '.join(sorted(MODEL_TYPES))}); "
            "point model.model_path (or model.config_path) at a Qwen3 or Qwen3.5 checkpoint"
        )
    module, name = MODEL_TYPES[model_type].split(":")
    return getattr(importlib.import_module(module), name)
