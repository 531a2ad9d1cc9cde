"""`from_pretrained`: a ready-to-call model from a HF checkpoint directory, an Orbax model directory or a training
step directory."""

from __future__ import annotations

import logging

import jax.numpy as jnp
import numpy as np

from xorl_jax.checkpoint import orbax as ckpt
from xorl_jax.checkpoint.hf import CheckpointError, SafetensorsReader
from xorl_jax.models.common import ModelOptions
from xorl_jax.models.loading import abstract_model, build_config, detect_layout, iter_our_tensors, param_paths
from xorl_jax.parallel.rules import shard_model

log = logging.getLogger(__name__)


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


def from_pretrained(path: str, dtype="float32", mesh=None, *, config_path: str | None = None,
                    options: ModelOptions | None = None):
    """A ready-to-call model from a HF checkpoint directory (safetensors + config.json), an Orbax model directory
    (`convert to-orbax`) or a training step directory (`<output_dir>/checkpoints/<step>`; LoRA: adapters merged)."""
    if ckpt.is_orbax_model_dir(path):
        dtype = jnp.dtype(dtype).name
        return ckpt.load_model(path, options or ModelOptions(dtype=dtype, param_dtype=dtype), mesh=mesh,
                               config_path=config_path)
    hf_config = ckpt.read_hf_config(config_path or path)
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
        shard_model(model, mesh)
    return model
