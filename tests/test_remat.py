"""Rematerialisation policies: every policy gives the gradients of no remat (tiny dense Qwen3, fp32, CPU), and
`dots_attention_saveable` keeps the fused attention kernel's outputs besides the matmuls."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xorl_jax.models.common import REMAT_POLICIES, ModelOptions, checkpoint_policy
from xorl_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM

CFG = Qwen3Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, intermediate_size=48)


def _grads(policy):
    model = Qwen3ForCausalLM(CFG, ModelOptions(remat_policy=policy), rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, CFG.vocab_size)

    def loss(m):
        logits = m(ids).logits
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.roll(ids, -1, 1)[..., None], -1))

    return jax.tree.leaves(nnx.state(nnx.grad(loss)(model)))


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
def test_every_policy_gives_the_gradients_of_no_remat(policy):
    for got, ref in zip(_grads(policy), _grads("none")):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-7)


@dataclasses.dataclass(frozen=True)
class _Prim:
    name: str


def test_dots_attention_policy_saves_matmuls_and_the_cudnn_forward_only():
    policy = checkpoint_policy("dots_attention_saveable")
    f32 = jax.core.ShapedArray((4, 4), jnp.float32)
    dot = dict(dimension_numbers=(((1,), (0,)), ((), ())), precision=None, preferred_element_type=None)
    assert policy(jax.lax.dot_general_p, f32, f32, **dot)
    assert policy(_Prim("dot_product_attention_fwd_wrapper"), f32)  # the cuDNN forward (result + softmax stats)
    assert not policy(_Prim("dot_product_attention_bwd_wrapper"), f32)
    assert not policy(jax.lax.exp_p, f32)


def test_dots_attention_policy_keeps_the_grouped_matmuls_and_the_swiglu_activations():
    """The grouped GEMM is a custom call on GPU (no dot_general for the policy to see) and SwiGLU is elementwise:
    both are kept by the names they carry, so the backward runs neither the experts' forward nor the activation
    again."""
    import contextlib
    import io

    from xorl_jax.kernels.gmm import gmm
    from xorl_jax.layers.swiglu import swiglu

    x = jax.random.normal(jax.random.PRNGKey(0), (12, 8))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 8, 6))
    sizes = jnp.array([5, 4, 3], jnp.int32)

    def loss(x, w):
        return jnp.sum(jnp.tanh(swiglu(gmm(jnp.sin(x), w, sizes, implementation="reference"))))

    def saved(policy):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            jax.ad_checkpoint.print_saved_residuals(jax.checkpoint(loss, policy=policy), x, w)
        return out.getvalue()

    kept = saved(checkpoint_policy("dots_attention_saveable"))
    assert "named 'grouped_matmul'" in kept and "named 'mlp_activation'" in kept
    assert "named" not in saved(jax.checkpoint_policies.nothing_saveable)
