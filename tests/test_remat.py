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


def _saved_residuals(opts, layer_transform=None):
    """What the backward of the tiny dense Qwen3's loss keeps, as print_saved_residuals describes it."""
    import contextlib
    import io

    graphdef, state = nnx.split(Qwen3ForCausalLM(CFG, opts, rngs=nnx.Rngs(0)))
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, CFG.vocab_size)

    def loss(state):
        out = nnx.merge(graphdef, state)(ids, layer_transform=layer_transform)
        return jnp.sum(out.logits.astype(jnp.float32))

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(loss, state)
    return out.getvalue()


def test_weights_cast_to_the_compute_dtype_are_kept_only_where_a_cast_happens():
    """fp32 parameters with bf16 compute: `dots_attention_saveable` keeps each projection's and MLP weight's bf16
    cast (q, k, v, o, gate_up, down: 6 per layer, unrolled so the names show), so the backward reads neither the fp32
    weights nor a copy of their slices. fp32 compute casts nothing, and a layer transform (LoRA's merge) would make the
    kept casts a merged weight-sized copy per layer: nothing named is kept in either."""
    from xorl_jax.layers.linear import WEIGHTS_NAME
    from xorl_jax.models.common import LayerTransform

    named = f"named '{WEIGHTS_NAME}'"
    bf16 = ModelOptions(remat_policy="dots_attention_saveable", dtype="bfloat16", scan_layers=False)
    assert _saved_residuals(bf16).count(named) == 6 * CFG.num_hidden_layers
    assert named not in _saved_residuals(dataclasses.replace(bf16, dtype="float32"))
    identity = LayerTransform(lambda group_state, extra: group_state, jnp.zeros((CFG.num_hidden_layers, 1)))
    assert named not in _saved_residuals(bf16, identity)


def test_weight_casts_are_not_kept_in_a_scan():
    """Scanned, the kept casts would stack into a bf16 copy of every layer's weights (the scan's residual outputs,
    unnamed): q_proj's [layers, 32, 4, 8] is kept with the weight casts named and not without."""
    from xorl_jax.models.common import SAVED_NAMES, WEIGHT_CAST_NAMES, weight_casts_kept

    q_proj = f"bf16[{CFG.num_hidden_layers},32,4,8]"
    scanned = ModelOptions(remat_policy="dots_attention_saveable", dtype="bfloat16", scan_layers=True)
    assert q_proj not in _saved_residuals(scanned)
    assert not set(weight_casts_kept(SAVED_NAMES, scan=True, transformed=False)) & set(WEIGHT_CAST_NAMES)
    assert weight_casts_kept(SAVED_NAMES, scan=False, transformed=False) == SAVED_NAMES


def test_keeping_the_weight_casts_changes_no_gradient():
    """Keeping the bf16 casts instead of recomputing them in the backward gives the same gradients (bf16 compute,
    unrolled layers, where the measured step keeps them)."""
    from xorl_jax.layers.linear import WEIGHTS_NAME
    from xorl_jax.models.common import SAVED_NAMES

    def grads(names):
        opts = ModelOptions(remat_policy="dots_attention_saveable", dtype="bfloat16", scan_layers=False,
                            attn_implementation="xla", remat_saved_names=names)
        model = Qwen3ForCausalLM(CFG, opts, rngs=nnx.Rngs(0))
        ids = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, CFG.vocab_size)

        def loss(m):
            return jnp.mean(jax.nn.logsumexp(m(ids).logits.astype(jnp.float32), -1))

        return jax.tree.leaves(nnx.state(nnx.grad(loss)(model)))

    without = tuple(n for n in SAVED_NAMES if n != WEIGHTS_NAME)
    assert WEIGHTS_NAME in SAVED_NAMES
    for got, ref in zip(grads(SAVED_NAMES), grads(without)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
