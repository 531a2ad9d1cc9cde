"""Every registered family implements models/base.py, and models/registry.py is the only place that lists families:
no other module of the package names a registered model_type or family class, or imports a family module."""

from __future__ import annotations

import ast
import json
import os

import pytest
from flax import nnx

from xorl_jax import lora_names
from xorl_jax.data.demo import DEMO_DIR
from xorl_jax.models import registry
from xorl_jax.models.base import CausalLM, FamilyConfig
from xorl_jax.models.common import ModelOptions
from xorl_jax.models.keymap import FamilyKeyMap
from xorl_jax.models.loading import abstract_model, build_config
from xorl_jax.parallel.mesh import MeshError, check_model_fits

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "xorl_jax")


def _read(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


QWEN3_MOE = _read(os.path.join(DEMO_DIR, "config.json"))
QWEN3_5_MOE = _read(os.path.join(DEMO_DIR + "_qwen3_5_moe", "config.json"))  # model_type qwen3_5_moe_text
QWEN3 = {k: v for k, v in QWEN3_MOE.items() if "expert" not in k} | {"model_type": "qwen3"}
QWEN3_5 = {k: v for k, v in QWEN3_5_MOE.items() if "expert" not in k} | {"model_type": "qwen3_5_text",
                                                                          "intermediate_size": 96}
# One small config.json per registered model_type (a new family adds its own here).
TINY = {
    "qwen3": QWEN3,
    "qwen3_moe": QWEN3_MOE,
    "qwen3_5_text": QWEN3_5,
    "qwen3_5": {"model_type": "qwen3_5", "text_config": QWEN3_5},
    "qwen3_5_moe_text": QWEN3_5_MOE,
    "qwen3_5_moe": {"model_type": "qwen3_5_moe", "text_config": QWEN3_5_MOE},
}


def test_every_registered_type_has_a_tiny_config():
    assert set(TINY) == set(registry.MODEL_TYPES)


@pytest.mark.parametrize("model_type", sorted(registry.MODEL_TYPES))
def test_family_implements_the_interface(model_type):
    hf = TINY[model_type]
    cls, cfg = build_config(hf)
    assert cls is registry.model_classes()[model_type]
    assert isinstance(cfg, FamilyConfig) and type(cfg) is cls.config_class
    assert cfg.flops_per_token(64) > 0
    assert cfg.lora_parts() <= set(lora_names.PARTS) and cfg.lora_parts()
    assert lora_names.model_parts(hf) == set(cfg.lora_parts())
    divisors = cfg.tensor_parallel_divisors()
    assert divisors and all(isinstance(n, int) and n > 0 for n in divisors.values())
    assert isinstance(cls.hf_key_map(cfg, expert_layout="fused", root="model"), FamilyKeyMap)

    model = abstract_model(cls, cfg, ModelOptions())
    assert isinstance(model, CausalLM)
    assert model.config is cfg and isinstance(model.options, ModelOptions)
    assert len(model.layers.pattern) * model.layers.repeats == cfg.num_hidden_layers == len(cfg.layer_kinds)
    assert model.num_moe_layers == (cfg.num_hidden_layers if cfg.num_experts else 0)
    assert nnx.eval_shape(lambda m: m.head_weight(), model).shape == (cfg.hidden_size, cfg.vocab_size)


def test_tensor_parallel_check_names_the_family_field():
    _, cfg = build_config(TINY["qwen3_5_moe_text"])  # 4 heads, 2 kv heads, 2 linear key heads, 4 value heads
    check_model_fits({"tensor": 2, "expert": 1}, cfg)
    with pytest.raises(MeshError, match="num_key_value_heads 2 .*tensor_parallel_size 4"):
        check_model_fits({"tensor": 4, "expert": 1}, cfg)
    with pytest.raises(MeshError, match="num_experts 8 .*expert_parallel_size 3"):
        check_model_fits({"tensor": 1, "expert": 3}, cfg)


def _family_modules() -> set[str]:
    return {target.split(":")[0] for target in registry.MODEL_TYPES.values()}


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3]
    return rel.replace(os.sep, ".").removesuffix(".__init__")


def test_registry_is_the_only_place_listing_families():
    families = _family_modules()
    classes = {target.split(":")[1] for target in registry.MODEL_TYPES.values()}
    model_types = set(registry.MODEL_TYPES)
    offenders = []
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            module = _module_name(path)
            if module == registry.__name__ or module in families:
                continue
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and node.value in model_types:
                    offenders.append(f"{module}: model_type {node.value!r}")
                elif isinstance(node, (ast.Name, ast.Attribute)) and \
                        (node.id if isinstance(node, ast.Name) else node.attr) in classes:
                    offenders.append(f"{module}: class {node.id if isinstance(node, ast.Name) else node.attr}")
                elif isinstance(node, ast.ImportFrom) and node.module:
                    imported = {node.module} | {f"{node.module}.{a.name}" for a in node.names}
                    offenders += [f"{module}: imports {m}" for m in imported & families]
                elif isinstance(node, ast.Import):
                    offenders += [f"{module}: imports {a.name}" for a in node.names if a.name in families]
    assert not offenders, offenders
