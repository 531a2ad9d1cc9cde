"""xorl_jax: train the Qwen3 family with JAX/XLA."""

from xorl_jax.version import __version__


def from_pretrained(path, dtype="float32", mesh=None, **kwargs):
    """Load a Hugging Face (safetensors) or xorl_jax checkpoint directory as a ready-to-call model."""
    # imported on call: `import xorl_jax` (as `python -m xorl_jax.train` does first) stays free of JAX
    from xorl_jax.checkpoint.pretrained import from_pretrained as _from_pretrained

    return _from_pretrained(path, dtype=dtype, mesh=mesh, **kwargs)


__all__ = ["from_pretrained", "__version__"]
