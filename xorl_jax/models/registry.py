"""model_type (from a checkpoint's config.json) -> model class: the one place that lists the families.

Each family implements models/base.py (a config class and a model class in one module); nothing outside that module
and this table names it (tests/test_model_interface.py checks both). docs/ADDING_A_MODEL.md adds one.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from xorl_jax.errors import CheckpointError

if TYPE_CHECKING:
    from xorl_jax.models.base import CausalLM

# model_type -> "module:Class". Qwen3.5 multimodal wrappers (qwen3_5, qwen3_5_moe) are read through text_config.
MODEL_TYPES = {
    "qwen3": "xorl_jax.models.qwen3:Qwen3ForCausalLM",
    "qwen3_moe": "xorl_jax.models.qwen3:Qwen3MoeForCausalLM",
    "qwen3_5": "xorl_jax.models.qwen3_5:Qwen3_5ForCausalLM",
    "qwen3_5_text": "xorl_jax.models.qwen3_5:Qwen3_5ForCausalLM",
    "qwen3_5_moe": "xorl_jax.models.qwen3_5:Qwen3_5MoeForCausalLM",
    "qwen3_5_moe_text": "xorl_jax.models.qwen3_5:Qwen3_5MoeForCausalLM",
}


def _load(target: str) -> type[CausalLM]:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def model_class(hf_config: dict) -> type[CausalLM]:
    """The model class for a HF config dict; CheckpointError (an input error) for a model_type not in the table."""
    model_type = hf_config.get("model_type")
    if model_type is None:
        raise CheckpointError("config.json has no model_type (not a model's config.json?); point model.model_path (or "
                              "model.config_path) at the directory of a Qwen3-family checkpoint")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"config.json: model_type {model_type!r} is not supported (supported: {', '.join(sorted(MODEL_TYPES))}); "
            "point model.model_path (or model.config_path) at a checkpoint of one of them"
        )
    return _load(MODEL_TYPES[model_type])


def model_classes() -> dict[str, type[CausalLM]]:
    """{model_type: model class} of every registered family (imports each family module)."""
    return {model_type: _load(target) for model_type, target in MODEL_TYPES.items()}
