"""A model from its HF config (config.json dict -> family through the registry), and its parameters under HF tensor
names through the family's key map. No file I/O here: reading and writing checkpoints is checkpoint/'s job."""

from __future__ import annotations

import re

import jax
import numpy as np
from flax import nnx

from xorl_jax.errors import CheckpointError
from xorl_jax.models import registry
from xorl_jax.models.common import ModelOptions
from xorl_jax.parallel.rules import param_shardings


def build_config(hf_config: dict):
    """(model class, family config) for a HF config dict."""
    cls = registry.model_class(hf_config)
    try:
        return cls, cls.config_class.from_hf(hf_config)
    except KeyError as e:
        raise CheckpointError(f"config.json: required field {e.args[0]!r} is missing") from None


def abstract_model(cls, cfg, options: ModelOptions):
    """The model with shapes only (no memory, no random init): weights are filled in afterwards."""
    return nnx.eval_shape(lambda: cls(cfg, options, rngs=nnx.Rngs(0)))


def random_model(cls, cfg, options: ModelOptions, *, mesh, rules, seed: int):
    """A randomly initialised model (`train.init_from: scratch`), each parameter made in `options.param_dtype` directly
    in its shards on `mesh` (one jitted init: no full copy on one device)."""
    abstract = abstract_model(cls, cfg, options)
    shardings = param_shardings(abstract, mesh, rules)

    @jax.jit
    def init():
        state = nnx.state(cls(cfg, options, rngs=nnx.Rngs(seed)))
        state = jax.tree.map(lambda x: x.astype(options.param_dtype), state)
        return jax.lax.with_sharding_constraint(state, shardings)

    return nnx.merge(nnx.graphdef(abstract), init())


def detect_layout(keys) -> tuple[str, str]:
    """(root prefix, expert layout) of a HF checkpoint from its tensor names."""
    root = "model.language_model" if any(k.startswith("model.language_model.") for k in keys) else "model"
    fused = any(k.endswith(".mlp.experts.gate_up_proj") for k in keys)
    per_expert = any(re.search(r"\.mlp\.experts\.\d+\.", k) for k in keys)
    return root, "per_expert" if per_expert and not fused else "fused"


def param_paths(model) -> dict:
    """{path tuple: nnx.Param} for every parameter of the model."""
    return {tuple(path): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def iter_hf_tensors(model, keymap):
    """Yield (HF key, numpy array) for export, in the model's own dtypes."""
    params = param_paths(model)
    for tm in keymap.globals:
        for key, arr in zip(tm.hf, tm.to_hf(np.asarray(jax.device_get(params[tm.ours][...])))):
            yield key, arr
    stack = model.layers
    p = len(stack.pattern)
    for i in range(p * stack.repeats):
        r, j = divmod(i, p)
        prefix = f"{keymap.layer_prefix}.{i}."
        for tm in keymap.layer_maps(i):
            value = np.asarray(jax.device_get(params[("layers", "groups", j) + tm.ours][...][r]))
            for key, arr in zip(tm.hf, tm.to_hf(value)):
                yield prefix + key, arr
