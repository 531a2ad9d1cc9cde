"""Build a model from a checkpoint directory: config.json -> family (registry) -> weights (safetensors key maps)."""

from __future__ import annotations

import json
import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xorl_jax.checkpoint.hf import CheckpointError, SafetensorsReader
from xorl_jax.models import registry
from xorl_jax.models.common import ModelOptions

log = logging.getLogger(__name__)


def read_hf_config(path: str) -> dict:
    """config.json from a directory (or the file itself); for a training step directory (no config.json), the
    HF config its run recorded."""
    cfg_path = path if os.path.isfile(path) else os.path.join(path, "config.json")
    if not os.path.exists(cfg_path) and os.path.isdir(os.path.join(path, "meta")):
        from xorl_jax.checkpoint.orbax import hf_config_of, is_orbax_model_dir

        if is_orbax_model_dir(path):
            return hf_config_of(path)
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{cfg_path} not found; set model.model_path (or model.config_path) to a HF model "
                              "directory holding config.json")
    try:
        with open(cfg_path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None


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


def detect_layout(keys) -> tuple[str, str]:
    """(root prefix, expert layout) of a HF checkpoint from its tensor names."""
    root = "model.language_model" if any(k.startswith("model.language_model.") for k in keys) else "model"
    fused = any(k.endswith(".mlp.experts.gate_up_proj") for k in keys)
    per_expert = any(re.search(r"\.mlp\.experts\.\d+\.", k) for k in keys)
    return root, "per_expert" if per_expert and not fused else "fused"


def param_paths(model) -> dict:
    """{path tuple: nnx.Param} for every parameter of the model."""
    return {tuple(path): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def iter_our_tensors(model, keymap, get):
    """Yield (our path, numpy array, HF keys used) built from HF tensors fetched by `get(key)`."""
    for tm in keymap.globals:
        yield tm.ours, tm.to_ours([get(k) for k in tm.hf]), tm.hf
    stack = model.layers
    p = len(stack.pattern)
    for j in range(p):
        per_path, used = {}, {}
        for r in range(stack.repeats):
            i = r * p + j
            prefix = f"{keymap.layer_prefix}.{i}."
            for tm in keymap.layer_maps(i):
                keys = tuple(prefix + k for k in tm.hf)
                per_path.setdefault(tm.ours, []).append(tm.to_ours([get(k) for k in keys]))
                used.setdefault(tm.ours, []).extend(keys)
        for ours, arrays in per_path.items():
            yield ("layers", "groups", j) + ours, np.stack(arrays), tuple(used[ours])


def load_hf_weights(model, reader: SafetensorsReader, keymap, *, param_dtype) -> None:
    """Fill every parameter of `model` from the checkpoint, checking names and shapes."""
    params = param_paths(model)
    consumed, filled = set(), set()

    def get(key):
        if key not in reader:
            raise CheckpointError(f"{reader.directory}: tensor {key!r} is missing from the checkpoint")
        consumed.add(key)
        return reader.get(key)

    for path, arr, hf_keys in iter_our_tensors(model, keymap, get):
        if path not in params:
            raise AssertionError(f"key map names a parameter the model lacks: {path}")
        var = params[path]
        if tuple(arr.shape) != tuple(var.shape):
            raise CheckpointError(
                f"{reader.directory}: {hf_keys[0]} gives shape {tuple(arr.shape)} for {'.'.join(map(str, path))}, "
                f"expected {tuple(var.shape)} from config.json; the weights and config.json do not match"
            )
        var.set_value(jnp.asarray(np.asarray(arr), dtype=param_dtype))
        filled.add(path)
    missing = [p for p in params if p not in filled]
    if missing:
        raise AssertionError(f"key map leaves parameters unset: {missing[:5]}")
    extra = sorted(k for k in reader.keys() - consumed if not k.startswith(keymap.skipped_prefixes or ("\0",)))
    if extra:
        raise CheckpointError(
            f"{reader.directory}: {len(extra)} tensors the {type(model).__name__} key map does not know, "
            f"e.g. {extra[:5]}; is model_type in config.json right?"
        )
    skipped = [k for k in reader.keys() if keymap.skipped_prefixes and k.startswith(keymap.skipped_prefixes)]
    if skipped:
        log.info("skipped %d checkpoint tensors not used for text training (%s)", len(skipped),
                 ", ".join(sorted({k.split(".")[0] + "." + k.split(".")[1] for k in skipped})))


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


def from_pretrained(path: str, dtype="float32", mesh=None, *, config_path: str | None = None,
                    options: ModelOptions | None = None):
    """A ready-to-call model from a HF checkpoint directory (safetensors + config.json), an Orbax model directory
    (`convert to-orbax`) or a training step directory (`<output_dir>/checkpoints/<step>`; LoRA: adapters merged)."""
    from xorl_jax.checkpoint import orbax as ckpt

    if ckpt.is_orbax_model_dir(path):
        dtype = jnp.dtype(dtype).name
        return ckpt.load_model(path, options or ModelOptions(dtype=dtype, param_dtype=dtype), mesh=mesh,
                               config_path=config_path)
    hf_config = read_hf_config(config_path or path)
    cls, cfg = build_config(hf_config)
    dtype = jnp.dtype(dtype).name
    options = options or ModelOptions(dtype=dtype, param_dtype=dtype)
    model = abstract_model(cls, cfg, options)
    reader = SafetensorsReader(path)
    root, layout = detect_layout(reader.keys())
    keymap = cls.hf_key_map(cfg, expert_layout=layout, root=root)
    reader.check_float(keymap.skipped_prefixes)
    load_hf_weights(model, reader, keymap, param_dtype=jnp.dtype(options.param_dtype))
    if mesh is not None:
        from xorl_jax.parallel.rules import shard_model

        shard_model(model, mesh)
    return model
