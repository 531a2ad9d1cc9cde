"""`from_pretrained`: a ready-to-call model from a HF checkpoint directory, an Orbax model directory or a training
step directory, loaded by the trainer's own loader (`orbax.load_model`)."""

from __future__ import annotations

import jax.numpy as jnp

from xorl_jax.checkpoint import orbax as ckpt
from xorl_jax.models.common import ModelOptions
from xorl_jax.parallel.rules import check_replicated


def from_pretrained(path: str, dtype="float32", mesh=None, *, config_path: str | None = None,
                    options: ModelOptions | None = None):
    """A ready-to-call model from a HF checkpoint directory (safetensors + config.json), an Orbax model directory
    (`convert to-orbax`) or a training step directory (`<output_dir>/checkpoints/<step>`; LoRA: adapters merged).
    With `mesh`, each parameter is placed on the sharding the default rules give it."""
    dtype = jnp.dtype(dtype).name
    model = ckpt.load_model(path, options or ModelOptions(dtype=dtype, param_dtype=dtype), mesh=mesh,
                            config_path=config_path)
    if mesh is not None:
        check_replicated(model, mesh)
    return model
